"""Collect one ``../shared/peers-bench/run_all.sh`` run into ``benchmarks/results/peers.json`` (the README's
"next to DeepCTR-Torch and FuxiCTR" table is rendered from it by ``readme_speed.py``).

    python benchmarks/collect_peers.py /tmp/peers_bench/results/RUN_ID [--out benchmarks/results/peers.json]

Reads the per-run JSONs of the timed workload (``synth/``), keeps per column the median over its repeats of each
figure (and the largest CPU share other processes took), and the ratios against the plain loop of the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

FIGURES = ("prep_s", "train_samples_per_s", "infer_samples_per_s", "peak_rss_mb", "test_auc", "test_logloss")
ORDER = ("plain-pytorch", "plain-pytorch-fused-adam", "deepctr-torch", "fuxictr", "lowrank-ctr")


def collect(run_dir: Path) -> dict[str, Any]:
    runs = [json.loads(p.read_text()) for p in sorted((run_dir / "synth").glob("*.json"))]
    if not runs:
        raise SystemExit(f"{run_dir / 'synth'} holds no run JSON: pass the RUN folder of run_all.sh's results")
    by_peer: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_peer.setdefault(r["peer"], []).append(r)
    columns = []
    for peer in sorted(by_peer, key=lambda p: ORDER.index(p) if p in ORDER else len(ORDER)):
        rs = by_peer[peer]
        col = {"peer": peer, "repeats": len(rs), "version": rs[0].get("peer_version"),
               "overrides": rs[0].get("overrides"), "precision": rs[0].get("precision"),
               "infer_precision": rs[0].get("infer_precision"),
               "other_cpu_share_max": max(float(r.get("other_cpu_share") or 0.0) for r in rs)}
        col.update({k: statistics.median(float(r[k]) for r in rs) for k in FIGURES if all(k in r for r in rs)})
        columns.append(col)
    plain = next((c for c in columns if c["peer"] == "plain-pytorch"), None)
    if plain is not None:
        for c in columns:
            for k in ("train_samples_per_s", "infer_samples_per_s", "peak_rss_mb"):
                c[f"{k}_over_plain"] = c[k] / plain[k]
    first = runs[0]
    return {"run": run_dir.name, "data": first.get("data"), "n_train": first.get("n_train"),
            "n_test": first.get("n_test"), "threads": first.get("torch_threads"), "torch": first.get("torch"),
            "columns": columns}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "peers.json"))
    args = ap.parse_args()
    result = collect(Path(args.run_dir))
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
