"""The README's compression table, regenerated from a compression-table run (never typed in).

    python experiments/readme_table.py outputs/compression_table [--write README.md]

Reads ``OUT/report/results.csv`` (``lowrank-ctr-report OUT/runs`` and the ablations, as
``experiments/compression_table.sh`` writes it) and the base runs in ``OUT/base``; prints a Markdown table of every
setting (mean +- std over seeds of the test AUC and of the AUC difference to the "base + same fine-tune" control),
then the issue's targets, each met or missed by how much. ``--write`` replaces the part of the README between
``<!-- compression-table:start -->`` and ``<!-- compression-table:end -->``.

Run directories do not outlive a machine, so a table grows across sessions: ``lowrank-ctr-report OUT/runs ...
--merge experiments/results/compression_table/results.csv`` keeps the committed rows of runs that are gone. The
compression-time share divides each run's compression seconds by one epoch of ITS base on the machine that ran it
(``base_epoch_seconds`` in results.csv, which the report reads from the base run); rows written before that column
existed use the figure recorded per (data, model) in ``base_epochs.csv``.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import pandas as pd

START, END = "<!-- compression-table:start -->", "<!-- compression-table:end -->"
#: (data, model, setting, the least AUC difference to the control that meets the target) - issue 10's targets
TARGETS = [("synthetic", "deepfm", "target_ratio=5", -0.0005), ("synthetic", "deepfm", "target_ratio=10", -0.0015),
           ("synthetic", "dcnv2", "target_ratio=5", -0.0005), ("synthetic", "dcnv2", "target_ratio=10", -0.0015),
           ("movielens100k", "deepfm", "target_ratio=5", -0.0005)]


def mean_std(values: pd.Series, digits: int = 4, sign: bool = False) -> str:
    v = values.dropna()
    if v.empty:
        return "undefined"
    fmt = f"{{:+.{digits}f}}" if sign else f"{{:.{digits}f}}"
    text = fmt.format(v.mean())
    return text + (f" ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else " (1 seed)")


def setting_rows(runs: pd.DataFrame, recorded: dict[tuple[str, str], float] | None = None) -> pd.DataFrame:
    """One row per setting (seeds aggregated); ``share``: the mean over its runs of compression seconds / one epoch of
    the run's own base (``base_epoch_seconds``), else of the ``recorded`` figure of its (data, model)."""
    ok = runs[(runs["status"] == "ok") & (runs["method"] != "none")].copy()
    recorded = recorded or {}
    own = ok["base_epoch_seconds"] if "base_epoch_seconds" in ok else pd.Series(math.nan, index=ok.index)
    fallback = pd.Series([recorded.get((d, m), math.nan) for d, m in zip(ok["data"], ok["model"])], index=ok.index)
    ok["share"] = ok["compress_seconds"] / own.where(own > 0, fallback)
    ok["setting"] = ok["setting"].fillna("")
    ok["source"] = ok["run_dir"].map(lambda p: "ablation" if "/ablations/" in str(p) else "table")
    ok["before_vs_control"] = ok["before_ft_auc"] - ok["control_auc"]
    rows = []
    for key, g in ok.groupby(["data", "model", "method", "setting", "source"], sort=False):
        rows.append(dict(zip(["data", "model", "method", "setting", "source"], key),
                         seeds=len(g), ratio=g["ratio"].mean(), auc=mean_std(g["auc"]),
                         vs_control=mean_std(g["delta_auc_vs_control"], sign=True),
                         before_vs_control=mean_std(g["before_vs_control"], sign=True),
                         delta_mean=g["delta_auc_vs_control"].mean(),
                         compress_seconds=g["compress_seconds"].mean(),
                         share=g["share"].mean() if g["share"].notna().all() else math.nan))
    from lowrank_ctr.report import method_rank

    out = pd.DataFrame(rows)
    if out.empty:
        return out
    order = out.assign(_s=out["source"] != "table", _m=out["method"].map(method_rank))
    return order.sort_values(["data", "model", "_s", "_m", "ratio", "setting"], kind="stable").drop(columns=["_s", "_m"])


RATIO_TOKEN = re.compile(r"(?:^| )target_ratio=(\d+(?:\.\d+)?)(?= |$)")
PIVOT_START, PIVOT_END = "<!-- compression-families:start -->", "<!-- compression-families:end -->"


def _family(method: str, setting: str) -> tuple[str, str] | None:
    """(family, target ratio) of a whole-model budget setting, e.g. ("tt+afm embedding_rank=8 from scratch", "5")."""
    m = RATIO_TOKEN.search(setting)
    if m is None:
        return None
    rest = RATIO_TOKEN.sub(" ", setting).split()
    scratch = "from_scratch=true" in rest
    label = " ".join([method, *[t for t in rest if t != "from_scratch=true"]] + (["from scratch"] if scratch else []))
    return label, m.group(1)


UNREACHABLE = re.compile(r"target_ratio \S+ is unreachable: .*\(ratio (\d+(?:\.\d+)?)\)")


def _failure(runs: pd.DataFrame) -> str:
    """The cell of a setting whose every run failed: "unreachable (19.43x at most)" when the compressor said the
    budget cannot be met (with the smallest ratio any seed's model allows), else "failed (n runs)"."""
    errors = runs["error"].fillna("").astype(str) if "error" in runs else pd.Series([""] * len(runs))
    reach = [float(m.group(1)) for m in map(UNREACHABLE.search, errors) if m]
    if len(reach) == len(runs):
        return f"unreachable ({min(reach):.2f}x at most)"
    return f"failed ({len(runs)} runs)"


def families_at_budgets(runs: pd.DataFrame) -> str:
    """Every family at each whole-model budget, one row per (data, model, family): the AUC difference to the
    equally fine-tuned base (mean ± std over seeds; "unreachable" where the family cannot reach the budget, "failed"
    where every seed's run failed otherwise; the size ratio reached where it is more than 5% off the budget). Table rows only (no ablations)."""
    table = runs[~runs["run_dir"].astype(str).str.contains("/ablations/") & (runs["method"] != "none")].copy()
    table["setting"] = table["setting"].fillna("")
    cells: dict[tuple[str, str, str], dict[str, str]] = {}
    ratios: set[float] = set()
    for (data, model, method, setting), g in table.groupby(["data", "model", "method", "setting"], sort=False):
        fam = _family(method, setting)
        if fam is None:
            continue
        label, ratio = fam
        ok = g[g["status"] == "ok"]
        text = (mean_std(ok["delta_auc_vs_control"], sign=True) + (f" ({len(ok)} seeds)" if len(ok) not in (1, 3) else "")
                if len(ok) else _failure(g))
        reached = float(ok["ratio"].mean()) if len(ok) and "ratio" in ok else float(ratio)
        if abs(reached / float(ratio) - 1) > 0.05:  # e.g. TT alone already smaller than a 3x budget asks
            text += f" (at {reached:.2f}x)"
        cells.setdefault((data, model, label), {})[ratio] = text
        ratios.add(float(ratio))
    if not cells:
        return "(no whole-model budget settings in this table)"
    from lowrank_ctr.report import method_rank

    cols = [f"{r:g}" for r in sorted(ratios)]
    lines = ["| data | model | family | " + " | ".join(f"{c}x" for c in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for data, model, label in sorted(cells, key=lambda k: (k[0], k[1], method_rank(k[2].split()[0]), k[2])):
        row = cells[(data, model, label)]
        lines.append(f"| {data} | {model} | {label} | " + " | ".join(row.get(c, "not run") for c in cols) + " |")
    return "\n".join(lines)


def replace_between(text: str, start: str, end: str, body: str, where: Path) -> str:
    if start not in text or end not in text:
        raise SystemExit(f"{where} has no {start} ... {end} markers: add them where the table goes")
    return re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: f"{start}\n{body}\n{end}", text, flags=re.S)


BASE_EPOCHS = Path(__file__).parent / "results" / "compression_table" / "base_epochs.csv"


def base_epochs(recorded: Path | None = BASE_EPOCHS) -> dict[tuple[str, str], float]:
    """Seconds of one base epoch per (data, model) recorded for rows without ``base_epoch_seconds`` (runs from
    before the report wrote that column, on the machine that ran them)."""
    if recorded is None or not recorded.is_file():
        return {}
    return {(r.data, r.model): float(r.seconds_per_epoch) for r in pd.read_csv(recorded).itertuples()}


def markdown(rows: pd.DataFrame) -> str:
    lines = ["| data | model | method | setting | seeds | size ratio | test AUC | Δ vs base + same fine-tune | "
             "Δ vs control before fine-tune | compression s (share of a base epoch) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows.itertuples():
        share = f" ({r.share:.0%})" if not math.isnan(r.share) else ""
        setting = r.setting + (" (ablation)" if r.source == "ablation" else "")
        lines.append(f"| {r.data} | {r.model} | {r.method} | {setting} | {r.seeds} | {r.ratio:.2f}x | {r.auc} | "
                     f"{r.vs_control} | {r.before_vs_control} | {r.compress_seconds:.1f}{share} |")
    lines += ["", "Targets (issue 10; AFM with the default recipe, mean over seeds, against the control):", ""]
    for data, model, setting, least in TARGETS:
        # a generated dataset is named with its size and seed (synthetic-1000000-2024): the family name matches
        hit = rows[((rows.data == data) | rows.data.str.startswith(f"{data}-")) & (rows.model == model) & (rows.method == "afm") & (rows.setting == setting)
                   & (rows.source == "table")]
        if hit.empty:
            lines.append(f"- {data} {model} afm {setting} >= {least:+.4f}: **not measured** in this table")
            continue
        d = float(hit.iloc[0]["delta_mean"])
        verdict = "met" if d >= least else f"**missed by {least - d:.4f}**"
        lines.append(f"- {data} {model} afm {setting} >= {least:+.4f}: {d:+.4f}, {verdict} "
                     f"({int(hit.iloc[0]['seeds'])} seeds)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the compression table's output directory (OUT)")
    ap.add_argument("--report", type=Path, help="its report directory (default: OUT/report_all)")
    ap.add_argument("--write", type=Path, help="README to update between the compression-table markers")
    ap.add_argument("--base-epochs", type=Path, default=BASE_EPOCHS,
                    help="recorded seconds per base epoch for rows without base_epoch_seconds [%(default)s]")
    args = ap.parse_args()
    report = args.report or args.out / "report_all"
    runs = pd.read_csv(report / "results.csv")
    text = markdown(setting_rows(runs, base_epochs(args.base_epochs)))
    families = families_at_budgets(runs)
    print(families + "\n\n" + text)
    if args.write:
        new = replace_between(args.write.read_text(), PIVOT_START, PIVOT_END, families, args.write)
        new = replace_between(new, START, END, text, args.write)
        tmp = args.write.with_suffix(".tmp")
        tmp.write_text(new)
        tmp.replace(args.write)


if __name__ == "__main__":
    main()
