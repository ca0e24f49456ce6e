"""The README's speed figures, rendered from the benchmark results (never typed in).

    python benchmarks/readme_speed.py [--results benchmarks/results] [--write README.md]

Each block between ``<!-- speed:NAME:start -->`` and ``<!-- speed:NAME:end -->`` in the README is the rendering of
one JSON file in ``benchmarks/results/`` (train.json, train_gpu.json, train_gpu_batch16384.json, zoo.json, scale.json, serving.json, lookup.json,
peers.json, default_recipe.json, host_overhead.json). Without
``--write`` the blocks are printed. A block whose JSON is missing is left as it is.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]


def _f(value: Any, fmt: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, fmt)


def _header(*columns: str) -> list[str]:
    """A Markdown table's header and rule lines."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _load_note(d: dict[str, Any]) -> str:
    share = (d.get("machine") or {}).get("other_cpu_share")
    return "" if share is None else f"Other processes used {share:.1%} of the CPU during the run (0 = quiet)."


def _cpu_note(w: dict[str, Any]) -> str:
    """The CPU a figure was measured on (benchmarks record it since 2026-12-04; older ones: empty)."""
    cpu = w.get("cpu")
    if not cpu:
        return ""
    kernels = "with" if cpu.get("bf16_kernels") else "without"
    return f"CPU: {cpu['name']} ({cpu['capability']}, {kernels} bf16 kernels). "


def _train_table(d: dict[str, Any]) -> list[str]:
    """The workload line and the table of bench_train.py's columns (ratios against the plain loop)."""
    w = d["workload"]
    device = w.get("device", "cpu")
    where = f"{w['threads']} threads" if device == "cpu" else f"on one {device} ({w['threads']} CPU threads)"
    epochs = f"{w['epochs']} epoch" + ("s" if w["epochs"] > 1 else "")
    code = f"; code {w['commit']}" if w.get("commit") else ""
    code += f" ({w['commit_note']})" if w.get("commit_note") else ""
    lines = [f"DeepFM (embedding {w['embedding_dim']}, MLP {'x'.join(map(str, w['mlp']))}), batch {w['batch_size']}, "
             f"{where}, {epochs}, data `{Path(str(w['data'])).name}`{code}; "
             + (f"medians of {repeats} interleaved runs" if (repeats := d["rows"][0]["repeats"]) > 1 else "one run")
             + (f" (inference: the fastest of {w['infer_passes']} passes in each)" if w.get("infer_passes", 1) > 1
                else "")
             + "; ratios against the plain loop of the same run. " + _cpu_note(w)
             + _load_note(d), "",
             *_header("column", "train samples/s", "x plain", "inference samples/s", "x plain", "peak RSS MB",
                      "x plain", "test AUC", "AUC - project 32:adam")]
    for r in d["rows"]:
        lines.append(f"| {r['name']} | {_f(r['train_samples_per_s'])} | {r['train_over_plain']:.2f} | "
                     f"{_f(r['infer_samples_per_s'])} | {r['infer_over_plain']:.2f} | {_f(r['peak_rss_mb'])} | "
                     f"{r['rss_over_plain']:.2f} | {r['test_auc']:.4f} | {_f(r.get('auc_minus_project_float32_adam'), '+.4f')} |")
    changes = [r for r in d["rows"] if r.get("infer_auc_change") is not None]
    if changes:
        lines += ["", "Serving at another precision than training (`infer=`), test AUC change on the same weights: "
                  + "; ".join(f"{r['name']}: {r['infer_auc_change']:+.5f}" for r in changes) + "."]
    return lines


def _breakdown_table(d: dict[str, Any]) -> list[str]:
    if not d.get("breakdown"):
        return []
    lines = ["", "Where one training step goes (`--breakdown`, shares of a step; the last column times the MLP's "
             "forward + backward by itself on an input of the step's shape: the part of a step only faster GEMMs "
             "can shorten):", "",
             *_header("column", "step ms", "data", "forward", "backward", "optimizer", "Lightning loop",
                      "MLP alone ms (share)")]
    for name, b in d["breakdown"].items():
        s, ms = b["shares"], b["step_s"] * 1000
        mlp = b.get("mlp_alone_s")
        mlp_cell = "-" if mlp is None else f"{mlp * 1000:.{0 if mlp >= 0.01 else 2}f} ({mlp / b['step_s']:.0%})"
        lines.append(f"| {name} | {ms:.{0 if ms >= 10 else 2}f} | {s['data']:.1%} | {s['forward']:.1%} | "
                     f"{s['backward']:.1%} | {s['optimizer']:.1%} | {s['lightning_loop_overhead']:.1%} | "
                     f"{mlp_cell} |")
    return lines


def render_train_gpu(d: dict[str, Any]) -> str:
    """bench_train.py --device cuda (benchmarks/gpu_check.sh): the table and the step breakdown; the issue's
    targets are the CPU table's."""
    return "\n".join(_train_table(d) + _breakdown_table(d))


def render_train(d: dict[str, Any]) -> str:
    lines = _train_table(d)
    rows = {r["name"]: r for r in d["rows"]}
    project = [r for r in d["rows"] if r["name"].startswith("project")]
    fastest = max(project, key=lambda r: r["train_over_plain"])
    lines += ["", "Targets (issue 14), from this table:"]
    lines.append(f"- train >= 2.0x the plain dense-Adam loop: {fastest['train_over_plain']:.2f}x "
                 f"({fastest['name']}) — {'met' if fastest['train_over_plain'] >= 2.0 else 'missed'}")
    bf16 = rows.get("project bf16-mixed:adam")
    if bf16 is not None:
        diff = bf16["auc_minus_project_float32_adam"]
        lines.append(f"- bf16-mixed keeps the float32 AUC (same optimizer, within 0.001): {diff:+.4f} — "
                     f"{'met' if abs(diff) <= 0.001 else 'missed'}")
    best_infer = max(project, key=lambda r: r["infer_over_plain"])
    lines.append(f"- inference >= 1.5x the plain loop: {best_infer['infer_over_plain']:.2f}x ({best_infer['name']}) — "
                 f"{'met' if best_infer['infer_over_plain'] >= 1.5 else 'missed'}")
    worst_rss = max(project, key=lambda r: r["rss_over_plain"])
    lines.append(f"- peak RSS <= the plain loop's: at most {worst_rss['rss_over_plain']:.2f}x ({worst_rss['name']}) — "
                 f"{'met' if worst_rss['rss_over_plain'] <= 1.0 else 'missed'}")
    return "\n".join(lines + _breakdown_table(d))


def render_zoo(d: dict[str, Any]) -> str:
    w = d["workload"]
    lines = [f"Every registered model, {w['data']}, batch {w['batch_size']}, {w['threads']} threads, "
             f"{w['timed_batches']} timed training steps; `fast` = `{w['fast']}`. " + _load_note(d), "",
             *_header("model", "parameters", "train samples/s 32:adam", "train samples/s fast", "x",
                      "inference samples/s 32:adam", "inference fast", "x")]
    for r in d["rows"]:
        lines.append(f"| {r['model']} | {_f(r.get('params'))} | {_f(r['float32_adam_train_samples_per_s'])} | "
                     f"{_f(r['fast_train_samples_per_s'])} | {r['train_speedup']:.2f} | "
                     f"{_f(r['float32_adam_infer_samples_per_s'])} | {_f(r['fast_infer_samples_per_s'])} | "
                     f"{r['infer_speedup']:.2f} |")
    return "\n".join(lines)


def render_scale(d: dict[str, Any]) -> str:
    w = d["workload"]
    lines = [f"{w['rows']:,} synthetic rows, vocabularies up to {w['max_vocab']:,}, {w['threads']} threads, "
             f"training `{w['fast']}`, fine-tune epochs {w['finetune_epochs']}. " + _load_note(d), "",
             *_header("stage", "wall s", "peak RSS MB", "rows", "rows/s")]
    for name, s in d["stages"].items():
        lines.append(f"| {name} | {_f(s.get('wall_s'), '.1f')} | {_f(s.get('peak_rss_mb'))} | {_f(s.get('rows'))} | "
                     f"{_f(s.get('rows_per_s'))} |")
    t = d["stages"].get("train_epoch", {})
    c = d["stages"].get("compress", {})
    lines += ["", f"Training: {_f(t.get('train/samples_per_s'))} samples/s, test AUC {_f(t.get('test/auc'), '.4f')}; "
              f"compressed {_f(c.get('compress/ratio'), '.2f')}x, test AUC {_f(c.get('test/auc'), '.4f')}, "
              f"compression {_f(c.get('compress/seconds'), '.1f')} s. Preparation peak RSS, {w['rows']:,} rows over "
              f"{w['small_rows']:,}: {d['prepare_peak_rss_ratio_big_over_small']:.2f}x (bounded by the vocabularies, "
              "not the rows)."]
    p = d.get("projection_full_criteo")
    if p:
        lines.append(f"Projected to full Criteo ({p['rows']:,} rows) from these rates: preparation "
                     f"{p['prepare_s'] / 60:.1f} min, one training epoch {_f((p['train_epoch_s'] or 0) / 60, '.1f')} "
                     f"min, prediction {p['predict_s_per_million_rows']:.1f} s per million rows (vocabularies of real "
                     "Criteo are larger: see the note in scale.json).")
    return "\n".join(lines)


def render_serving(d: dict[str, Any]) -> str:
    int8 = any(r["backend"].endswith("-int8") for r in d["rows"])  # serving runs since int8 inference (2026-12-04)
    lines = [f"{d['threads']} intra-op thread, torch {d['torch']}; base {d['params']['base']:,} stored values, "
             f"compressed {d['params']['compressed']:,} ({d['size_ratio']:.2f}x fewer bytes). " + _cpu_note(d)
             + "p50 / p99 latency per call:", "",
             *_header("batch", "model", "PyTorch", "TorchScript", "onnxruntime", "onnxruntime rows/s",
                      *(["PyTorch int8", "onnxruntime int8", "onnxruntime int8 rows/s"] if int8 else []))]
    cells: dict[tuple[int, str], dict[str, dict[str, Any]]] = {}
    for r in d["rows"]:
        cells.setdefault((r["batch"], r["model"]), {})[r["backend"]] = r
    for (batch, model), by in sorted(cells.items()):
        def cell(backend: str) -> str:
            r = by.get(backend)
            return "n/a" if r is None else f"{r['p50_ms']:.3f} / {r['p99_ms']:.3f} ms"

        ort, ort8 = by.get("onnxruntime"), by.get("onnxruntime-int8")
        extra = (f" {cell('pytorch-int8')} | {cell('onnxruntime-int8')} | "
                 f"{_f(ort8['rows_per_s'] if ort8 else None)} |") if int8 else ""
        lines.append(f"| {batch} | {model} | {cell('pytorch')} | {cell('torchscript')} | {cell('onnxruntime')} | "
                     f"{_f(ort['rows_per_s'] if ort else None)} |" + extra)
    ratios = d.get("ratios_p50") or {}
    if ratios:
        lines += ["", "Compressed over base (p50 speed-up): " + "; ".join(
            f"batch {batch}: PyTorch {r['compressed_speedup_pytorch']:.2f}x, onnxruntime "
            f"{r['compressed_speedup_onnxruntime']:.2f}x" for batch, r in ratios.items())]
    e2e = d.get("predict_end_to_end")
    if isinstance(e2e, dict) and e2e:
        lines.append("End to end (`lowrank-ctr-predict`: raw Criteo-format TSV rows read, encoded, scored by the ONNX "
                     "model, written as CSV): " + ", ".join(
                         f"{k} {_f(v.get('rows_per_second'))} rows/s" for k, v in e2e.items()) + ".")
    return "\n".join(lines)


def render_int8(d: dict[str, Any]) -> str:
    """bench_int8.py: float32 vs int8 Linear layers on the same weights, per checkpoint."""
    w = d["workload"]
    lines = [f"Test split of each model's dataset, {w['threads']} threads, torch {w['torch']} (quantized engine "
             f"{w['engine']}); inference samples/s best of {w['repeats']} alternated passes in one process. "
             + _cpu_note(w) + _load_note(d), "",
             *_header("model", "test rows", "AUC float32", "AUC int8", "AUC change", "logloss change",
                      "logit RMS diff", "samples/s float32", "samples/s int8", "x")]
    for r in d["rows"]:
        a, b = r["32"], r["int8"]
        lines.append(f"| {r['model']} | {r['test_rows']:,} | {_f(a['auc'], '.5f')} | {_f(b['auc'], '.5f')} | "
                     f"{_f(r['auc_change'], '+.5f')} | {b['logloss'] - a['logloss']:+.5f} | "
                     f"{b['logit_rms_vs_float32']:.4f} | {_f(a['samples_per_s'])} | {_f(b['samples_per_s'])} | "
                     f"{r['speedup']:.2f} |")
    changes = [r["auc_change"] for r in d["rows"] if r["auc_change"] is not None]
    if changes:
        lines += ["", f"AUC change over {len(changes)} models: mean {sum(changes) / len(changes):+.5f}, largest "
                  f"drop {min(changes):+.5f}."]
    return "\n".join(lines)


def render_lookup(d: dict[str, Any]) -> str:
    lines = [f"The compressed embedding alone ({d['fields']} fields, dim {d['dim']}, {d['code_dtype']} codes, "
             f"{d.get('distinct_ranks', 'n/a')} distinct ranks), {d['threads']} thread; median ms per lookup and the "
             "ratio to the dense table it replaced:", "",
             *_header("batch", "dense", "per-field loop", "batched", "rank-grouped", "fastest")]
    for r in d["rows"]:
        def cell(path: str) -> str:
            ms = r.get(f"{path}_ms")
            return "n/a" if ms is None else f"{ms:.3f} ({r[f'{path}_vs_dense']:.1f}x)"

        lines.append(f"| {r['batch']} | {r['dense_ms']:.3f} | {cell('per_field')} | {cell('batched')} | "
                     f"{cell('rank_grouped')} | {r.get('fastest_path', r.get('faster_path', ''))} |")
    return "\n".join(lines)


def render_peers(d: dict[str, Any]) -> str:
    cols = d["columns"]
    share = max(c["other_cpu_share_max"] for c in cols)
    lines = [f"`../shared/peers-bench/run_all.sh` run {d['run']}: DeepFM, {d['n_train']:,} train / {d['n_test']:,} "
             f"test rows, {d['threads']} threads, torch {d['torch']}; medians of {cols[0]['repeats']} interleaved "
             f"runs per column; ratios against the plain loop of the same run. Other processes used at most "
             f"{share:.1%} of the CPU during any run (0 = quiet).", "",
             *_header("column", "settings", "prepare s", "train samples/s", "x plain", "inference samples/s",
                      "x plain", "peak RSS MB", "x plain", "test AUC")]
    for c in cols:
        settings = " ".join(o for o in (c.get("overrides") or []) if o.startswith(("trainer.precision", "optimizer=")))
        if c.get("infer_precision") and c["infer_precision"] != c.get("precision"):  # served at another precision
            settings += f" infer={c['infer_precision']}"
        lines.append(f"| {c['peer']} | {settings or '-'} | {c['prep_s']:.1f} | {_f(c['train_samples_per_s'])} | "
                     f"{c['train_samples_per_s_over_plain']:.2f} | {_f(c['infer_samples_per_s'])} | "
                     f"{c['infer_samples_per_s_over_plain']:.2f} | {_f(c['peak_rss_mb'])} | "
                     f"{c['peak_rss_mb_over_plain']:.2f} | {c['test_auc']:.4f} |")
    return "\n".join(lines)


def render_host_overhead(d: dict[str, Any]) -> str:
    """bench_host_overhead.py: host time per step of a tiny DeepFM, hand loop vs Lightning."""
    w, m = d["workload"], d["median_step_s"]
    hand = m["hand"]
    names = {"hand": "hand-written loop", "lightning": "Lightning (the project now)",
             "lightning_self_log_every_step": "Lightning, `train/loss` through `self.log` every step (before)"}
    lines = [f"DeepFM (embedding {w['embedding_dim']}, MLP {w['mlp'][0]}), batch {w['batch_size']}, {w['threads']} thread, "
             f"{w['steps']} steps, medians of {w['repeats']} interleaved runs; code {w.get('commit')}. "
             + _load_note(d), "", *_header("loop", "host ms a step", "x hand loop", "added ms a step")]
    for key, name in names.items():
        lines.append(f"| {name} | {m[key] * 1e3:.2f} | {m[key] / hand:.2f} | {(m[key] - hand) * 1e3:+.2f} |")
    return "\n".join(lines)


def render_default_recipe(d: dict[str, Any]) -> str:
    lines = [*_header("precision:optimizer", "seeds", "test AUC (mean; per seed)", "test logloss (mean)",
                      "epochs (mean)", "training s (mean)", "samples/s (mean)")]
    for s in d["settings"]:
        m, runs = s["mean"], s["runs"]
        per_seed = ", ".join(f"{r['test/auc']:.4f}" for r in runs)
        lines.append(f"| {s['label']} | {len(runs)} | {m['test/auc']:.4f} ({per_seed}) | {m['test/logloss']:.4f} | "
                     f"{m['train/epochs']:.1f} | {m['train/seconds']:.0f} | {_f(m['train/samples_per_s'])} |")
    return "\n".join(lines)


RENDERERS: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "train": ("train.json", render_train), "train_gpu": ("train_gpu.json", render_train_gpu),
    "train_gpu_batch16384": ("train_gpu_batch16384.json", render_train_gpu),
    "zoo": ("zoo.json", render_zoo), "scale": ("scale.json", render_scale),
    "train_avx2": ("train_avx2.json", render_train), "int8": ("int8.json", render_int8),
    "serving": ("serving.json", render_serving), "serving_avx2": ("serving_avx2.json", render_serving), "lookup": ("lookup.json", render_lookup),
    "peers": ("peers.json", render_peers), "peers_avx2": ("peers_avx2.json", render_peers), "default_recipe": ("default_recipe.json", render_default_recipe),
    "host_overhead": ("host_overhead.json", render_host_overhead),
}


def blocks(results: Path) -> dict[str, str]:
    """Rendered block per name whose JSON exists in ``results``."""
    out = {}
    for name, (file, render) in RENDERERS.items():
        path = results / file
        if path.exists():
            out[name] = render(json.loads(path.read_text()))
    return out


def replace_blocks(text: str, rendered: dict[str, str]) -> str:
    for name, body in rendered.items():
        pattern = re.compile(rf"(<!-- speed:{name}:start -->\n)(?:.*?\n)?(<!-- speed:{name}:end -->)", re.S)
        text, found = pattern.subn(lambda m: m.group(1) + body + "\n" + m.group(2), text)
        if not found:
            raise SystemExit(f"no <!-- speed:{name}:start --> ... end markers in the README: add them where it goes")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--write", default=None, help="README to update in place")
    args = ap.parse_args()
    rendered = blocks(Path(args.results))
    if args.write:
        path = Path(args.write)
        path.write_text(replace_blocks(path.read_text(), rendered))
        print(f"updated {', '.join(rendered)} in {path}")
    else:
        for name, body in rendered.items():
            print(f"<!-- speed:{name} -->\n{body}\n")


if __name__ == "__main__":
    main()
