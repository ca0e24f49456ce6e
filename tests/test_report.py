"""lowrank-ctr-report and the dashboard notebook on a fake results tree (no training: fast)."""

from __future__ import annotations

import base64
import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

import matplotlib.colors
import numpy as np
import pandas as pd
import pytest

from helpers import run_cli
from lowrank_ctr.plots import pareto_front
from lowrank_ctr.report import (ReportError, compact_ranks, find_run_dirs, find_wandb_offline_runs, load_results,
                                read_earlier_layers, read_earlier_runs)

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATA = "synthetic-4000-1"


def fake_results(method: str, rank: int, seed: int, auc: float, base_auc: float, before: float, ratio: float,
                 control: float | None = None, model: str = "deepfm") -> dict[str, Any]:
    """A results.json as lowrank-ctr-train writes it for a compressed run (flat slash keys + nested config)."""
    energy = lambda r, full: round(1.0 - 0.4 * (1 - r / full) ** 2, 6)  # noqa: E731 - grows with rank
    layers = [
        {"name": "embedding.table", "group": "embedding", "method": method, "rank": rank, "full_rank": 16,
         "retained_energy": energy(rank, 16), "params_before": 4800, "params_after": 300 * rank + 3 * rank * 16,
         "replaced": True, "note": "", "field_ranks": [rank, rank, rank - 1]},
        {"name": "mlp.net.0", "group": "mlp", "method": method, "rank": rank, "full_rank": 32,
         "retained_energy": energy(rank, 32), "params_before": 1568, "params_after": rank * (48 + 32) + 32,
         "replaced": True, "note": ""},
        {"name": "mlp.net.3", "group": "mlp", "method": "none", "rank": None, "full_rank": None,
         "retained_energy": None, "params_before": 33, "params_after": 33, "replaced": False,
         "note": "skipped: no rank shrinks Linear(32, 1)"},
    ]
    base_bytes = 26000
    rec: dict[str, Any] = {
        "status": "ok", "data": DATA, "model": model, "seed": seed,
        "params": int(base_bytes / ratio / 4), "bytes": int(base_bytes / ratio),
        "test/auc": auc, "test/logloss": 0.5 - (auc - 0.7) / 3, "val/auc": auc + 0.001,
        "train/samples_per_s": 12345.6, "train/seconds": 3.25 + seed,
        "base/test/auc": base_auc, "base/test/logloss": 0.5 - (base_auc - 0.7) / 3,
        "base/params": base_bytes // 4, "base/bytes": base_bytes,
        "compress/method": method, "compress/targets": ["embedding", "mlp"], "compress/ratio": ratio,
        "compress/ratio/embedding": ratio * 1.2, "compress/ratio/mlp": ratio * 0.8,
        "compress/params": int(base_bytes / ratio / 4), "compress/bytes": int(base_bytes / ratio),
        "compress/test/auc_before_finetune": before, "compress/test/logloss_before_finetune": 0.51,
        "compress/seconds": 0.4, "compress/layers": layers,
        "compress/ranks": {"embedding.table": [rank, rank, rank - 1], "mlp.net.0": rank},
        "config": {"seed": seed, "data": {"name": DATA}, "model": {"name": model},
                   "compression": {"method": method, "targets": ["embedding", "mlp"], "embedding_rank": rank,
                                   "mlp_rank": rank, "other_rank": None, "energy": None, "target_ratio": None}},
    }
    for b, base_ms in ((1, 0.2), (256, 1.5), (4096, 20.0)):
        comp_ms = base_ms / (1.0 + rank / 8)
        rec.update({f"bench/base_ms@{b}": base_ms, f"bench/compressed_ms@{b}": comp_ms,
                    f"bench/speedup@{b}": base_ms / comp_ms})
    if control is not None:
        rec["control/test/auc"] = control
    return rec


def write_json(run_dir: Path, rec: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 1\n")
    (run_dir / "results.json").write_text(json.dumps(rec, indent=2))


#: the 4 ok runs of the main tree: (method, rank, seed, auc, base_auc, before, ratio, control)
OK_RUNS = [("svd", 4, 1, 0.7712, 0.7750, 0.7401, 4.1, 0.7755),
           ("svd", 8, 1, 0.7744, 0.7750, 0.7602, 2.3, None),
           ("afm", 4, 1, 0.7761, 0.7750, 0.7683, 4.0, 0.7755),
           ("afm", 8, 1, 0.7758, 0.7750, 0.7741, 2.2, None)]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """multirun/0..3 ok, multirun/4 failed results.json, multirun/5 a Hydra job that died before writing one."""
    root = tmp_path_factory.mktemp("results") / "multirun"
    for i, args in enumerate(OK_RUNS):
        write_json(root / str(i), fake_results(*args))
    write_json(root / "4", {"status": "failed", "error": "RuntimeError: rank 64 exceeds full rank 16",
                            "data": DATA, "model": "deepfm", "seed": 2,
                            "config": {"compression": {"method": "tt", "targets": ["embedding"]}}})
    job = root / "5" / ".hydra"
    job.mkdir(parents=True)
    (job / "config.yaml").write_text(
        "seed: 3\ndata:\n  rows: 4000\n  seed: 1\n  name: synthetic-${data.rows}-${data.seed}\n"
        "model:\n  name: dcnv2\ncompression:\n  method: afm\n  targets: [mlp]\n  mlp_rank: 4\n"
        "paths:\n  output_dir: ${now:%Y}\n")
    (root / "0" / "wandb" / "offline-run-20260101_000000-abc123").mkdir(parents=True)
    # a lowrank-ctr-prepare job directory is not a run
    (root.parent / "prepare" / ".hydra").mkdir(parents=True)
    (root.parent / "prepare" / ".hydra" / "config.yaml").write_text("data:\n  name: x\nforce: false\n")
    return root


@pytest.fixture(scope="module")
def report(tree: Path) -> tuple[Path, Any]:
    out = tree.parent / "out"
    r = run_cli(["lowrank-ctr-report", str(tree.parent), "--out", str(out)], timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_report_writes_every_file(report):
    out, r = report
    for name in ("results.csv", "grouped.csv", "results.md", "report.html", "auc_vs_ratio.png",
                 "delta_vs_ratio.png", "auc_vs_latency.png", "retained_energy.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert "6 runs (4 ok, 2 failed)" in r.stdout


def test_csv_has_one_row_per_run_with_the_runs_numbers(report, tree):
    out, _ = report
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 6
    for c in ("run_dir", "status", "data", "model", "method", "targets", "ranks", "seed", "params", "bytes", "ratio",
              "base_auc", "before_ft_auc", "auc", "base_logloss", "before_ft_logloss", "logloss", "delta_auc",
              "delta_auc_before_ft", "control_auc", "delta_auc_vs_control", "speedup@1", "speedup@256",
              "speedup@4096", "train_seconds"):
        assert c in df.columns, c
    ok = df[df["status"] == "ok"]
    assert len(ok) == 4
    for i, (method, rank, seed, auc, base, before, ratio, control) in enumerate(OK_RUNS):
        row = df[df["run_dir"] == str(tree / str(i))].iloc[0]
        rec = json.loads((tree / str(i) / "results.json").read_text())
        assert (row["method"], row["seed"], row["data"], row["model"]) == (method, seed, DATA, "deepfm")
        assert row["targets"] == "embedding+mlp"
        assert row["ranks"] == f"embedding={rank - 1}-{rank} mlp={rank}"
        assert row["auc"] == auc and row["base_auc"] == base and row["before_ft_auc"] == before
        assert row["ratio"] == ratio and row["bytes"] == rec["compress/bytes"]
        assert row["logloss"] == rec["test/logloss"] and row["base_logloss"] == rec["base/test/logloss"]
        assert row["delta_auc"] == pytest.approx(auc - base, abs=1e-12)
        assert row["delta_auc_before_ft"] == pytest.approx(before - base, abs=1e-12)
        if control is None:
            assert pd.isna(row["control_auc"]) and pd.isna(row["delta_auc_vs_control"])
        else:
            assert row["delta_auc_vs_control"] == pytest.approx(auc - control, abs=1e-12)
        for b in (1, 256, 4096):
            assert row[f"speedup@{b}"] == rec[f"bench/speedup@{b}"]
        assert row["train_seconds"] == rec["train/seconds"]


def test_failed_runs_are_rows(report, tree):
    out, r = report
    df = pd.read_csv(out / "results.csv", keep_default_na=False)
    failed = df[df["status"] == "failed"].set_index("run_dir")
    assert sorted(failed.index) == [str(tree / "4"), str(tree / "5")]
    crashed = failed.loc[str(tree / "4")]
    assert "rank 64 exceeds" in crashed["error"] and crashed["method"] == "tt" and crashed["auc"] == ""
    no_json = failed.loc[str(tree / "5")]
    assert no_json["error"] == "no results.json"
    assert (no_json["data"], no_json["model"], no_json["method"], str(no_json["seed"])) == (DATA, "dcnv2", "afm", "3")
    assert "prepare" not in " ".join(df["run_dir"])
    assert "failed: " in r.stdout


def test_a_two_stage_run_that_failed_joins_its_settings_group():
    """A tt+afm run that failed before recording its method (e.g. a budget TT cannot reach) is a failed row of the
    tt+afm group at its target ratio, not a row of plain tt without a budget."""
    from lowrank_ctr.report import grouped_table, runs_table

    comp = {"method": "tt", "mlp_method": "afm", "embedding_rank": 8, "target_ratio": 20, "allocator": "loss",
            "code_dtype": "int8", "targets": None}
    ok = fake_results("tt+afm", 8, 1, 0.770, 0.760, 0.765, 20.0, control=0.772)
    ok["config"]["compression"] = dict(comp)
    ok["compress/targets"] = ["embedding", "embedding", "mlp", "other"]  # as a finished tt+afm run records them
    failed = {"status": "failed", "error": "ValueError: target_ratio 20.0 is unreachable", "data": DATA,
              "model": "deepfm", "seed": 2, "config": {"compression": dict(comp)}}
    runs = runs_table([ok, failed])
    assert runs["method"].tolist() == ["tt+afm", "tt+afm"]
    assert runs["setting"].nunique() == 1 and "target_ratio=20" in runs["setting"].iloc[0]
    g = grouped_table(runs)
    assert len(g) == 1 and (g["n"].item(), g["n_failed"].item()) == (1, 1)


def test_html_is_self_contained_with_valid_pngs(report):
    out, _ = report
    page = (out / "report.html").read_text()
    # AUC vs ratio, AUC difference to the control vs ratio, AUC vs latency, retained energy
    assert page.count('<img src="data:image/png;base64,') == 4
    for b64 in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page):
        assert base64.b64decode(b64).startswith(PNG_MAGIC)
    assert page.index("Grouped by setting") < page.index("All runs")
    md = (out / "results.md").read_text()
    assert md.index("Grouped by setting") < md.index("All runs") and "| data |" in md
    import matplotlib.image

    for name in ("auc_vs_ratio.png", "auc_vs_latency.png", "retained_energy.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
        img = matplotlib.image.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_grouped_stats_over_seeds_and_default_out(tmp_path):
    """Two seeds of afm rank 4 + one svd run: mean and sample std (ddof=1) per setting; OUT defaults to DIR/report."""
    seeds = {1: (0.7761, 0.7750, 0.7683, 4.0), 2: (0.7790, 0.7760, 0.7700, 4.2)}
    for s, (auc, base, before, ratio) in seeds.items():
        write_json(tmp_path / f"afm{s}", fake_results("afm", 4, s, auc, base, before, ratio, control=base + 0.001))
    write_json(tmp_path / "svd1", fake_results("svd", 4, 1, 0.7700, 0.7750, 0.7400, 4.1))
    r = run_cli(["lowrank-ctr-report", str(tmp_path)], timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "report" / "results.csv").is_file() and (tmp_path / "report" / "report.html").is_file()
    g = pd.read_csv(tmp_path / "report" / "grouped.csv")
    assert len(g) == 2
    afm = g[g["method"] == "afm"].iloc[0]
    aucs = [v[0] for v in seeds.values()]
    deltas = [v[0] - v[1] for v in seeds.values()]
    before_deltas = [v[2] - v[1] for v in seeds.values()]
    assert afm["n"] == 2 and afm["seeds"] == "1 2"
    assert afm["auc_mean"] == pytest.approx(statistics.mean(aucs), abs=1e-12)
    assert afm["auc_std"] == pytest.approx(statistics.stdev(aucs), abs=1e-12)
    assert afm["delta_auc_mean"] == pytest.approx(statistics.mean(deltas), abs=1e-12)
    assert afm["delta_auc_std"] == pytest.approx(statistics.stdev(deltas), abs=1e-12)
    assert afm["delta_auc_before_ft_mean"] == pytest.approx(statistics.mean(before_deltas), abs=1e-12)
    assert afm["delta_auc_vs_control_mean"] == pytest.approx(-0.001 + statistics.mean(deltas), abs=1e-12)
    assert afm["ratio_mean"] == pytest.approx(4.1, abs=1e-12)
    svd = g[g["method"] == "svd"].iloc[0]
    assert svd["n"] == 1 and pd.isna(svd["auc_std"]) and svd["auc_mean"] == 0.77
    md = (tmp_path / "report" / "results.md").read_text()
    assert f"{statistics.mean(aucs):.5f}" in md


def test_nonexistent_dir_is_a_clear_error(tmp_path):
    r = run_cli(["lowrank-ctr-report", str(tmp_path / "nope")], timeout=60)
    assert r.returncode != 0
    assert "error:" in r.stderr and "nope" in r.stderr and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr


def test_dir_without_runs_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    r = run_cli(["lowrank-ctr-report", str(tmp_path / "empty")], timeout=60)
    assert r.returncode != 0
    assert "no runs found" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "empty" / "report").exists()


def test_loading_api(tree):
    res = load_results([tree, tree / "0"])  # overlapping roots count a run once
    assert len(res.runs) == 6 and res.n_ok == 4 and res.n_failed == 2
    assert len(find_run_dirs([tree])) == 6
    assert [p.name for p in find_wandb_offline_runs([tree])] == ["offline-run-20260101_000000-abc123"]
    layers = res.layers
    assert set(layers["name"]) == {"embedding.table", "mlp.net.0", "mlp.net.3"} and len(layers) == 12
    assert compact_ranks({"compress/ranks": {"a": 3, "b": [2, 4]}}) == "a=3 b=2-4"
    assert compact_ranks({}) == ""


def test_pareto_front():
    # ratio: higher better; (3, .785) dominates (3, .78); (4, .70) is alone at the highest ratio
    assert pareto_front([1, 2, 3, 3, 4], [0.80, 0.79, 0.78, 0.785, 0.70]) == [0, 1, 3, 4]
    # latency: lower better; (5 ms, .80) is dominated by (4 ms, .81)
    assert pareto_front([5, 3, 4], [0.80, 0.79, 0.81], x_higher_better=False) == [1, 2]
    assert pareto_front([1.0, float("nan")], [0.7, 0.9]) == [0]


def test_dashboard_notebook_executes(tree, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(REPO / "notebooks" / "dashboard.ipynb", as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1 and "RESULTS_DIR" in params[0].source
    monkeypatch.setenv("LOWRANK_CTR_RESULTS_DIR", str(tree))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) + str(
        o.get("data", {}).get("text/html", "")) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "6 runs (4 ok, 2 failed)" in text
    assert "offline-run-20260101_000000-abc123" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3


# ----------------------------------------------------------------------------------------------- issue 13

def _ok_run(auc: float | None = 0.77, seed: int = 1, **extra: Any) -> dict[str, Any]:
    rec = fake_results("afm", 4, seed, 0.77, 0.775, 0.76, 3.0)
    rec["test/auc"] = auc
    rec.update(extra)
    return rec


def test_runs_named_like_logger_folders_are_found_and_counted(tmp_path):
    """A run may be called ``wandb`` or ``checkpoints``: nothing is skipped by name; found/used counts are printed."""
    root = tmp_path / "try"
    write_json(root / "wandb", _ok_run(seed=1))
    write_json(root / "checkpoints", _ok_run(seed=2))
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "results.json").write_text(json.dumps({"accuracy": 0.9}))  # another tool's file
    r = run_cli(["lowrank-ctr-report", str(root), "--out", str(tmp_path / "rep")], timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3 results.json found, 2 used (1 ignored: not lowrank-ctr results)" in r.stdout
    assert f"ignored: {root / 'elsewhere' / 'results.json'}" in r.stdout
    assert "2 runs (2 ok, 0 failed)" in r.stdout
    df = pd.read_csv(tmp_path / "rep" / "results.csv")
    assert sorted(Path(p).name for p in df["run_dir"]) == ["checkpoints", "wandb"]


def test_one_run_reads_one_run(tmp_path):
    write_json(tmp_path / "only", _ok_run())
    r = run_cli(["lowrank-ctr-report", str(tmp_path)], timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 results.json found, 1 used" in r.stdout and "1 run (1 ok, 0 failed), 1 setting ->" in r.stdout
    assert "1 runs" not in r.stdout and "1 settings" not in r.stdout


def test_only_foreign_results_json_is_a_clear_error(tmp_path):
    (tmp_path / "results.json").write_text("[1, 2]")
    r = run_cli(["lowrank-ctr-report", str(tmp_path)], timeout=60)
    assert r.returncode == 2 and "none written by lowrank-ctr" in r.stderr and "Traceback" not in r.stderr


def test_int8_serving_columns_come_from_bench_int8_runs_only(tmp_path):
    """bench_int8 runs fill int8_auc, delta_auc_int8 (int8 minus float32, same weights) and speedup_int8@4096; a null
    int8 AUC reads undefined; a run that did not measure int8 has no value there, and nothing reads undefined."""
    write_json(tmp_path / "a", _ok_run(seed=1, **{"test/int8/auc": 0.7695, "bench/int8_speedup@4096": 1.4}))
    write_json(tmp_path / "b", _ok_run(seed=2, **{"test/int8/auc": None, "bench/int8_speedup@4096": None}))
    write_json(tmp_path / "c", _ok_run(seed=3))
    res = load_results([tmp_path])
    runs = res.runs.set_index(res.runs["run_dir"].map(lambda p: Path(p).name))
    assert runs.loc["a", "int8_auc"] == 0.7695 and runs.loc["a", "delta_auc_int8"] == pytest.approx(0.7695 - 0.77)
    assert runs.loc["a", "speedup_int8@4096"] == 1.4 and runs.loc["a", "undefined"] == ""
    assert runs.loc["b", "undefined"].split() == ["int8_auc", "delta_auc_int8"]
    assert pd.isna(runs.loc["c", "int8_auc"]) and runs.loc["c", "undefined"] == ""
    from lowrank_ctr.report import display_table

    shown = display_table(res.runs.sort_values("seed"))
    assert list(shown["int8_auc"]) == ["0.76950", "undefined", ""]
    assert list(shown["delta_auc_int8"]) == ["-0.00050", "undefined", ""]


def test_undefined_metric_reads_undefined_never_a_number(tmp_path):
    """test/auc null (one-class test split): 'undefined' in the tables, and its group's mean is undefined."""
    write_json(tmp_path / "a", _ok_run(auc=None, seed=1))
    write_json(tmp_path / "b", _ok_run(auc=0.7712, seed=2))
    res = load_results([tmp_path])
    runs = res.runs.set_index(res.runs["run_dir"].map(lambda p: Path(p).name))
    assert runs.loc["a", "undefined"].split() == ["auc", "delta_auc", "delta_auc_vs_control"]
    assert runs.loc["b", "undefined"] == ""
    assert pd.isna(runs.loc["a", "auc"]) and runs.loc["b", "auc"] == 0.7712
    g = res.grouped.iloc[0]
    assert g["n"] == 2 and pd.isna(g["auc_mean"]) and pd.isna(g["delta_auc_mean"]) and "auc" in g["undefined"].split()
    assert g["base_auc_mean"] == pytest.approx(0.775)  # defined metrics of the same runs still aggregate
    from lowrank_ctr.report import display_grouped, display_table

    shown = display_table(res.runs)
    assert list(shown["auc"]) == ["undefined", "0.77120"]
    assert display_grouped(res.grouped).iloc[0]["auc"] == "undefined"
    r = run_cli(["lowrank-ctr-report", str(tmp_path)], timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 ok run with an undefined test AUC" in r.stdout
    md = (tmp_path / "report" / "results.md").read_text()
    assert "| undefined |" in md and "nan" not in md.lower().replace("finetune", "")


def test_cumulative_energy_numbers():
    from lowrank_ctr.report import cumulative_energy, layer_energy_curve, pooled_cumulative_energy

    assert cumulative_energy([4.0, 3.0, 2.0, 1.0]) == pytest.approx([0.4, 0.7, 0.9, 1.0])
    assert cumulative_energy([1.0, 4.0, -1e-12]) == pytest.approx([0.8, 1.0, 1.0])  # sorted; round-off negatives 0
    assert cumulative_energy([0.0, 0.0]) == [1.0, 1.0]
    # two fields (totals 10 and 2), the second with 2 components: kept(k) = (cum_a(k) + cum_b(min(k, 2))) / 12
    assert pooled_cumulative_energy([[6, 3, 1], [1.5, 0.5]]) == pytest.approx([7.5 / 12, 11 / 12, 1.0])
    assert layer_energy_curve({"spectrum": [3.0, 1.0]}) == pytest.approx([0.75, 1.0])
    assert layer_energy_curve({"field_spectra": [[1.0, 1.0]]}) == pytest.approx([0.5, 1.0])
    assert layer_energy_curve({"rank": 2}) is None


def _energy_tree(root: Path) -> None:
    """Two seeds whose chosen (rank, energy) points, joined, would go DOWN with rank; their spectra rise."""
    spectra = {1: [8.0, 1.0, 0.5, 0.3, 0.2], 2: [2.0, 1.9, 1.8, 1.7, 1.6]}
    for seed, rank in ((1, 2), (2, 4)):
        rec = fake_results("afm", rank, seed, 0.77, 0.775, 0.76, 3.0)
        for layer in rec["compress/layers"]:
            if layer["name"] == "mlp.net.0":
                layer.update(full_rank=5, spectrum=spectra[seed],
                             retained_energy=sum(spectra[seed][:rank]) / sum(spectra[seed]))
            elif layer["name"] == "embedding.table":
                layer["field_spectra"] = [[3.0, 2.0, 1.0], [1.0, 1.0, 1.0], [5.0, 0.1, 0.1]]
        write_json(root / f"s{seed}", rec)


def test_retained_energy_draws_monotone_curves_from_the_stored_spectrum(tmp_path):
    from lowrank_ctr.plots import retained_energy
    from lowrank_ctr.report import cumulative_energy

    _energy_tree(tmp_path)
    res = load_results([tmp_path])
    fig = retained_energy(res.layers)
    lines = {ln.get_label(): ln for ln in fig.axes[0].lines}
    mlp = lines["mlp.net.0 (mlp)"]
    expected = (np.array(cumulative_energy([8.0, 1.0, 0.5, 0.3, 0.2]))
                + np.array(cumulative_energy([2.0, 1.9, 1.8, 1.7, 1.6]))) / 2  # the mean of the two seeds
    assert list(mlp.get_xdata()) == [1, 2, 3, 4, 5]
    assert mlp.get_ydata() == pytest.approx(expected)
    for line in fig.axes[0].lines:  # every curve rises to 1: monotone by construction
        y = np.asarray(line.get_ydata(), dtype=float)
        assert np.all(np.diff(y) >= -1e-12) and y[-1] == pytest.approx(1.0), line.get_label()
    # the chosen points themselves go down with rank (0.905 at rank 2, 0.821 at rank 4): they are markers, not a line
    chosen = res.layers[res.layers["name"] == "mlp.net.0"].sort_values("rank")["retained_energy"].tolist()
    assert chosen[0] > chosen[1]


def test_merged_layers_csv_gives_back_the_layers_and_energy_curves(tmp_path):
    """layers.csv round trip: the runs of a report merged after their directories are gone have the same layer rows
    (energy curves within the 5 decimals stored) and draw the same retained-energy curves."""
    from lowrank_ctr.plots import retained_energy
    from lowrank_ctr.report import write_report

    _energy_tree(tmp_path / "runs")
    direct = load_results([tmp_path / "runs"])
    write_report(direct, tmp_path / "old_report")
    gone = tmp_path / "runs"
    gone.rename(tmp_path / "elsewhere")  # the runs are gone: only the report's CSVs are left
    merged = load_results([], merge=[tmp_path / "old_report" / "results.csv"])
    assert merged.merged == [(tmp_path / "old_report" / "results.csv", 2, True)]
    key = ["run_dir", "name"]
    a = direct.layers.sort_values(key).reset_index(drop=True)
    b = merged.layers.sort_values(key).reset_index(drop=True)
    assert len(a) == len(b) == 6 and b["energy_curve"].map(lambda c: c is not None).sum() == 4
    pd.testing.assert_frame_equal(a.drop(columns="energy_curve"), b.drop(columns="energy_curve"), check_dtype=False)
    for x, y in zip(a["energy_curve"], b["energy_curve"]):
        assert (x is None and y is None) or x == pytest.approx(y, abs=1e-5)
    lines = {ln.get_label(): ln.get_ydata() for ln in retained_energy(b).axes[0].lines}
    for label, y in ((ln.get_label(), ln.get_ydata()) for ln in retained_energy(a).axes[0].lines):
        assert lines[label] == pytest.approx(y, abs=1e-5)


def test_retained_energy_without_spectra_draws_points_not_lines(tree):
    from lowrank_ctr.plots import retained_energy

    fig = retained_energy(load_results([tree]).layers)
    assert all(len(ax.lines) == 0 for ax in fig.axes) and any(len(ax.collections) for ax in fig.axes)
    assert "no spectrum" in fig._suptitle.get_text()


def test_one_panel_titles_fit_and_labels_clear_the_markers(tmp_path):
    """One data/model panel (a narrow figure): the title is wrapped, not cut; point labels overlap no marker."""
    from lowrank_ctr.plots import auc_vs_latency, auc_vs_ratio, label_overlaps, title_fits

    rows = []
    for i in range(8):  # a crowded Pareto front: every setting on it, close together
        method = ("afm", "svd")[i % 2]
        rec = fake_results(method, 4, 1, 0.775 - 0.0003 * i, 0.7755, 0.77, 2.0 + 0.1 * i)
        rec["compress/policy"] = {"target_ratio": 2.0 + 0.1 * i}  # what compress() reports
        rec["bench/compressed_ms@4096"] = 10 - 0.3 * i
        rec["run_dir"] = str(tmp_path / str(i))
        rows.append(rec)
    from lowrank_ctr.report import runs_table

    runs = runs_table(rows)
    for make in (auc_vs_ratio, auc_vs_latency):
        fig = make(runs)
        assert len(fig.axes) == 1 and title_fits(fig)
        assert len([t for t in fig.axes[0].texts]) == 8
        assert label_overlaps(fig) == []
        # method names and colours come from the compression-method registry (one place)
        from lowrank_ctr.compression import get_method

        legend = {t.get_text(): h for t, h in zip(fig.legends[0].get_texts(), fig.legends[0].legend_handles)}
        for method in ("afm", "svd"):
            registered = get_method(method)
            assert registered.label in legend
            assert matplotlib.colors.to_hex(legend[registered.label].get_color()) == registered.color


def test_coincident_points_share_one_label_next_to_them(tmp_path):
    """Two settings at the same ratio and AUC (e.g. a recipe and its ablation that changed nothing) are one marker:
    one label naming both, placed by the point, not two labels pushing each other across the panel."""
    import matplotlib.pyplot as plt

    from lowrank_ctr.plots import label_overlaps, place_labels

    fig, ax = plt.subplots(figsize=(4, 3))
    xs, ys = [1.0, 5.0, 5.0, 5.0, 10.0], [0.0, -0.001, -0.001, -0.001, -0.002]
    ax.scatter(xs, ys)
    labels = ["a", "AFM target_ratio=5", "AFM target_ratio=5 calibration_batches=32", "AFM target_ratio=5", "b"]
    placed = place_labels(ax, xs, ys, labels)
    texts = [a.get_text() for a in placed]
    assert texts == ["a", "AFM target_ratio=5\nAFM target_ratio=5 calibration_batches=32", "b"]
    assert label_overlaps(fig) == []
    for ann in placed:  # every label starts within 30 points of its point (a leader line when beyond 10)
        dx, dy = ann.xyann
        assert (dx * dx + dy * dy) ** 0.5 <= 30
        assert (ann.arrow_patch is not None) == ((dx * dx + dy * dy) ** 0.5 > 10)
    plt.close(fig)


def test_recipe_variants_are_separate_settings():
    """Two recipes at the same budget (int8 vs float32 codes; qr with 5 vs 20 collisions, from scratch or not) are
    different experiments: never averaged as one setting's seeds."""
    from lowrank_ctr.report import grouped_table, runs_table

    recs = []
    for seed in (1, 2):
        for dtype, auc in (("int8", 0.77), ("float32", 0.76)):
            rec = fake_results("afm", 4, seed, auc, 0.775, 0.76, 5.0)
            rec["config"]["compression"].update(target_ratio=5, code_dtype=dtype)
            recs.append(rec)
        for collisions, scratch in ((5, False), (20, False), (5, True)):
            rec = fake_results("qr", 4, seed, 0.7, 0.775, 0.69, 1.2)
            rec["compress/layers"], rec["compress/ranks"] = [], {}
            rec["config"]["compression"].update(method="qr", collisions=collisions, from_scratch=scratch,
                                                embedding_rank=None, mlp_rank=None)
            recs.append(rec)
        # the same compression with another recovery fine-tune (longer, pure distillation)
        rec = fake_results("afm", 4, seed, 0.78, 0.775, 0.76, 5.0)
        rec["config"]["compression"].update(target_ratio=5, code_dtype="int8", distill=1.0, finetune_epochs=3,
                                            finetune_lr=1e-4)
        recs.append(rec)
    g = grouped_table(runs_table(recs))
    afm = g[g["method"] == "afm"].set_index("setting")
    recovery = "target_ratio=5 finetune_epochs=3 finetune_lr=0.0001 distill=1.0"
    assert set(afm.index) == {"target_ratio=5", "target_ratio=5 code_dtype=float32", recovery}
    assert afm.loc[recovery, "auc_mean"] == pytest.approx(0.78)
    assert afm.loc["target_ratio=5", "auc_mean"] == pytest.approx(0.77)
    assert afm.loc["target_ratio=5 code_dtype=float32", "auc_mean"] == pytest.approx(0.76)
    qr = g[g["method"] == "qr"]
    assert sorted(qr["setting"]) == ["collisions=20", "collisions=5", "from_scratch=true collisions=5"]
    assert (qr["n"] == 2).all()
    # combined methods (compression.mlp_method): the embedding method's setting, then the Linear method's budget
    recs = []
    for seed in (1, 2):
        for method, key, value in (("tt", "embedding_rank", 4), ("tt", "embedding_rank", 8), ("qr", "collisions", 20),
                                   ("qr", "collisions", 5)):
            rec = fake_results(f"{method}+afm", 4, seed, 0.7 + seed / 100, 0.775, 0.69, 5.0 + seed / 100)
            rec["config"]["compression"].update({"method": method, "mlp_method": "afm", "target_ratio": 5,
                                                 "mlp_rank": None, "embedding_rank": None, "code_dtype": "int8",
                                                 "allocator": "loss", key: value})
            recs.append(rec)
    g = grouped_table(runs_table(recs)).set_index(["method", "setting"])
    # the presets conf/compression/tt_afm.yaml / qr_afm.yaml are the defaults: only departures from them name a variant
    assert set(g.index) == {("tt+afm", "embedding_rank=4 target_ratio=5"), ("tt+afm", "embedding_rank=8 target_ratio=5"),
                            ("qr+afm", "target_ratio=5"), ("qr+afm", "target_ratio=5 collisions=5")}
    assert (g["n"] == 2).all() and g["auc_mean"].tolist() == pytest.approx([0.715] * 4)
    from lowrank_ctr.compression.methods import get_method
    from lowrank_ctr.report import method_label

    assert method_label("tt+afm") == f"{get_method('tt').label}+{get_method('afm').label}"


def test_merge_keeps_an_earlier_reports_rows_whose_runs_are_gone(report, tree, tmp_path):
    """--merge CSV: rows of an earlier results.csv come back with the same numbers and groups; a run found again
    replaces its earlier row (no double count); the report refuses to overwrite the CSV it merges."""
    out, _ = report
    earlier = pd.read_csv(out / "results.csv")
    moved = tmp_path / "committed" / "results.csv"
    moved.parent.mkdir()
    earlier.to_csv(moved, index=False)
    # only the merged file: the same rows and the same grouped table as from the runs themselves; without the
    # layers.csv beside it the report says the retained-energy plot leaves those runs out
    r = run_cli(["lowrank-ctr-report", "--merge", str(moved), "--out", str(tmp_path / "a")], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"6 rows from {moved} (no layers.csv beside it" in r.stdout and "6 runs (4 ok, 2 failed)" in r.stdout
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a" / "grouped.csv"), pd.read_csv(out / "grouped.csv"))
    assert not (tmp_path / "a" / "retained_energy.png").exists()
    # with the layers.csv beside it the merged runs keep their retained-energy points (round trip: next test)
    (moved.parent / "layers.csv").write_bytes((out / "layers.csv").read_bytes())
    r = run_cli(["lowrank-ctr-report", "--merge", str(moved), "--out", str(tmp_path / "a2")], timeout=120)
    assert r.returncode == 0 and "no layers.csv" not in r.stdout and (tmp_path / "a2" / "retained_energy.png").is_file()
    # runs 0 and 1 found again (one with a new AUC): their rows replace the earlier ones, the other 4 are kept
    again = tmp_path / "again"
    for i in (0, 1):
        rec = json.loads((tree / str(i) / "results.json").read_text())
        rec["test/auc"] = 0.7999 if i == 0 else rec["test/auc"]
        write_json(again / str(i), rec)
    earlier.loc[earlier["run_dir"] == str(tree / "0"), "run_dir"] = str(again / "0")
    earlier.loc[earlier["run_dir"] == str(tree / "1"), "run_dir"] = str(again / "1")
    earlier.to_csv(moved, index=False)
    r = run_cli(["lowrank-ctr-report", str(again), "--merge", str(moved), "--out", str(tmp_path / "b")], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    merged = pd.read_csv(tmp_path / "b" / "results.csv")
    assert len(merged) == 6 and merged["run_dir"].is_unique and "4 rows from" in r.stdout
    assert merged.loc[merged["run_dir"] == str(again / "0"), "auc"].item() == 0.7999
    # writing the report over the file it merges is refused, and the file is untouched
    before = moved.read_bytes()
    r = run_cli(["lowrank-ctr-report", str(again), "--merge", str(moved), "--out", str(moved.parent)], timeout=120)
    assert r.returncode == 2 and "would overwrite --merge" in r.stderr and moved.read_bytes() == before
    r = run_cli(["lowrank-ctr-report", "--merge", str(out / "grouped.csv"), "--out", str(tmp_path / "c")],
                timeout=120)
    assert r.returncode == 2 and "not a lowrank-ctr results.csv" in r.stderr


def test_a_broken_earlier_csv_is_one_error_naming_the_file_and_the_fix(tmp_path):
    results = tmp_path / "results.csv"
    results.write_text("run_dir,auc\nx,0.7\n")
    with pytest.raises(ReportError, match=r"results.csv has no column status, data.*not a lowrank-ctr results.csv"):
        read_earlier_runs(results)
    results.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ReportError, match="is not a readable CSV"):
        read_earlier_runs(results)
    layers = tmp_path / "layers.csv"
    layers.write_text("run_dir,name\nx,mlp.net.0\n")
    with pytest.raises(ReportError, match=r"the layers.csv beside it has no column .*group.*move it away"):
        read_earlier_layers(results, {"x"})
    layers.unlink()
    assert read_earlier_layers(results, {"x"}) is None  # a report older than layers.csv


def test_readme_table_means_stds_and_target_verdicts():
    """experiments/readme_table.py: mean +- std over seeds of the difference to the control, and each target said
    met or missed by how much (the README's compression table is generated by it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_table", Path(__file__).parents[1] / "experiments"
                                                  / "readme_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = []
    for seed, (d5, d10) in enumerate([(-0.0002, -0.0030), (-0.0004, -0.0010)], start=1):
        for setting, d in (("target_ratio=5", d5), ("target_ratio=10", d10)):
            rows.append(dict(status="ok", method="afm", data="synthetic", model="deepfm", setting=setting, seed=seed,
                             run_dir=f"/x/runs/{seed}", ratio=5.0, auc=0.70 + d, control_auc=0.70,
                             before_ft_auc=0.70 + d, delta_auc_vs_control=d, compress_seconds=2.0))
    text = mod.markdown(mod.setting_rows(pd.DataFrame(rows), {("synthetic", "deepfm"): 40.0}))
    assert "| -0.0003 ± 0.0001 |" in text and "| -0.0020 ± 0.0014 |" in text and "2.0 (5%)" in text
    assert "synthetic deepfm afm target_ratio=5 >= -0.0005: -0.0003, met (2 seeds)" in text
    assert "synthetic deepfm afm target_ratio=10 >= -0.0015: -0.0020, **missed by 0.0005**" in text
    assert "synthetic dcnv2 afm target_ratio=5 >= -0.0005: **not measured**" in text


def test_readme_table_families_at_budgets():
    """The family x budget view: one row per family (from-scratch apart), one column per target ratio, each cell the
    mean ± std of the difference to the control (a seed count other than 3 named; the ratio reached where a family
    overshoots its budget); "unreachable" with the ratio the model allows where the budget cannot be met, "failed"
    where every run failed otherwise, "not run" where none ran; ablations and fixed-rank
    settings left out."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_table", REPO / "experiments" / "readme_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = []
    for seed, d in ((1, -0.001), (2, -0.003)):
        for method, setting, delta in (("afm", "target_ratio=5", d), ("afm", "target_ratio=10", 2 * d),
                                       ("tt+afm", "embedding_rank=8 target_ratio=5 from_scratch=true", d / 2),
                                       ("tt", "embedding_rank=8", d)):
            reached = 6.0 if method == "tt+afm" else float(setting.split("target_ratio=")[-1].split()[0]) \
                if "target_ratio" in setting else 1.2
            rows.append(dict(run_dir=f"o/runs/s{seed}/{method}/{setting}", status="ok", data="synthetic",
                             model="deepfm", method=method, setting=setting, delta_auc_vs_control=delta,
                             ratio=reached))
        rows.append(dict(run_dir=f"o/ablations/s{seed}/afm", status="ok", data="synthetic", model="deepfm",
                         method="afm", setting="target_ratio=5 code_dtype=float32", delta_auc_vs_control=-0.5))
        rows.append(dict(run_dir=f"o/runs/s{seed}/tt+afm/20", status="failed", data="synthetic", model="deepfm",
                         method="tt+afm", setting="embedding_rank=8 target_ratio=20 from_scratch=true",
                         delta_auc_vs_control=float("nan"), error="RuntimeError: out of memory"))
        rows.append(dict(run_dir=f"o/runs/s{seed}/afm/20", status="failed", data="synthetic", model="deepfm",
                         method="afm", setting="target_ratio=20", delta_auc_vs_control=float("nan"),
                         error=f"ValueError: target_ratio 20.0 is unreachable: 300 bytes / 20.0 = 15 bytes, but at "
                               f"the smallest ranks the model still needs 16 bytes (ratio {19 + seed / 10:.2f}). Lower"))
    text = mod.families_at_budgets(pd.DataFrame(rows))
    lines = text.splitlines()
    assert lines[0] == "| data | model | family | 5x | 10x | 20x |" and len(lines) == 4
    assert ("| synthetic | deepfm | afm | -0.0020 ± 0.0014 (2 seeds) | -0.0040 ± 0.0028 (2 seeds) | "
            "unreachable (19.10x at most) |") in lines  # the budget cannot be met: said, with what can
    assert ("| synthetic | deepfm | tt+afm embedding_rank=8 from scratch | -0.0010 ± 0.0007 (2 seeds) (at 6.00x) | not run | "
            "failed (2 runs) |") in lines
    assert "float32" not in text and "-0.5" not in text


def test_compression_time_share_uses_each_runs_own_base_epoch(tmp_path):
    """The report reads one epoch of each run's base from the base run's results.json (base_epoch_seconds, NaN
    without one); readme_table divides by it, and only rows without it (merged from before the column) use the
    recorded figure of their (data, model)."""
    import importlib.util

    from lowrank_ctr.report import base_epoch_seconds

    base = tmp_path / "base"
    (base / "checkpoints").mkdir(parents=True)
    (base / "results.json").write_text(json.dumps({"status": "ok", "train/seconds": 90.0, "train/epochs": 3}))
    rec = fake_results("afm", 4, 1, 0.77, 0.775, 0.76, 5.0)
    rec["base/checkpoint"] = str(base / "checkpoints" / "best.ckpt")
    assert base_epoch_seconds(rec) == 30.0
    assert math.isnan(base_epoch_seconds({**rec, "base/checkpoint": str(tmp_path / "gone" / "c" / "x.ckpt")}))
    assert base_epoch_seconds({"train/seconds": 50.0, "train/epochs": 5}) == 10.0  # a run that trained its base
    from lowrank_ctr.report import runs_table

    assert runs_table([rec])["base_epoch_seconds"].tolist() == [30.0]

    spec = importlib.util.spec_from_file_location("readme_table", REPO / "experiments" / "readme_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    recorded = tmp_path / "base_epochs.csv"
    recorded.write_text("data,model,seconds_per_epoch,source\nsynthetic,deepfm,100.0,old\n")
    rows = [dict(status="ok", method="afm", data="synthetic", model="deepfm", setting=s, seed=1, run_dir=f"/x/{s}",
                 ratio=5.0, auc=0.7, control_auc=0.7, before_ft_auc=0.7, delta_auc_vs_control=0.0,
                 compress_seconds=6.0, base_epoch_seconds=e)
            for s, e in (("target_ratio=5", 30.0), ("target_ratio=10", math.nan))]
    text = mod.markdown(mod.setting_rows(pd.DataFrame(rows), mod.base_epochs(recorded)))
    assert "| 6.0 (20%) |" in text and "| 6.0 (6%) |" in text  # its own base; the recorded 100 s


def test_delta_plot_shows_each_run_minus_its_control():
    """delta_vs_ratio.png plots test AUC minus the control's AUC of the same run (the bases' seed spread cancels)."""
    from lowrank_ctr.plots import delta_vs_ratio, title_fits
    from lowrank_ctr.report import runs_table

    recs = [fake_results("afm", 4, 1, 0.770, 0.760, 0.765, 5.0, control=0.772),
            fake_results("afm", 4, 2, 0.790, 0.780, 0.785, 5.0, control=0.791)]
    fig = delta_vs_ratio(runs_table(recs))
    ys = sorted(float(y) for c in fig.axes[0].collections for _, y in c.get_offsets())
    assert any(abs(y + 0.002) < 1e-9 for y in ys) and any(abs(y + 0.001) < 1e-9 for y in ys)  # each run's own delta
    assert any(abs(y) < 1e-12 for y in ys)  # the control itself at 0
    assert title_fits(fig)
    no_control = [fake_results("afm", 4, 1, 0.770, 0.760, 0.765, 5.0)]
    assert delta_vs_ratio(runs_table(no_control)) is None


def test_delta_plot_tells_structures_trained_from_scratch_apart():
    """One colour per family; the same family trained from scratch has its own legend entry and square markers."""
    from lowrank_ctr.plots import delta_vs_ratio, method_label
    from lowrank_ctr.report import runs_table

    recs = [fake_results("tt", 4, 1, 0.770, 0.760, 0.765, 5.0, control=0.772),
            fake_results("tt", 4, 1, 0.768, 0.760, 0.765, 5.0, control=0.772)]
    recs[1]["config"]["compression"]["from_scratch"] = True
    recs[1]["compress/from_scratch"] = True
    runs = runs_table(recs)
    assert runs["setting"].str.contains("from_scratch=true").tolist() == [False, True]
    fig = delta_vs_ratio(runs)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert sorted(t for t in labels if t.startswith(method_label("tt"))) == [
        method_label("tt"), method_label("tt") + ", trained from scratch"]
    markers = {line.get_marker() for line in fig.axes[0].get_lines() if line.get_linestyle() in ("None", "")}
    assert {"o", "s"} <= markers


def test_calibration_batches_name_a_variant_only_where_batches_are_read():
    """AFM reads calibration batches, so 32 instead of the default is a different recipe; SVD with the variance
    budget reads none, so the same key on an SVD run names nothing (it would split identical experiments)."""
    from lowrank_ctr.report import runs_table

    afm = fake_results("afm", 4, 1, 0.77, 0.775, 0.76, 5.0)
    afm["config"]["compression"].update(target_ratio=5, calibration_batches=32)
    svd = fake_results("svd", 4, 1, 0.76, 0.775, 0.75, 5.0)
    svd["config"]["compression"].update(method="svd", target_ratio=5, calibration_batches=32, allocator="variance",
                                        code_dtype="float32")
    settings = runs_table([afm, svd]).set_index("method")["setting"]
    assert settings["afm"] == "target_ratio=5 calibration_batches=32"
    assert settings["svd"] == "target_ratio=5"
