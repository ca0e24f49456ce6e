"""Collect finished runs' test metrics and training time into a JSON that ``readme_speed.py`` renders, e.g. the
README's choice of the default optimizer (base recipe on the synthetic default, 3 seeds per setting):

    python benchmarks/collect_runs.py --name default_recipe \\
        "32:adam=outputs/compression_table/base/synthetic/deepfm/seed*" \\
        "32:rowwise_adam=outputs/default_recipe/32-rowwise_adam/seed*" \\
        "bf16-mixed:rowwise_adam=outputs/default_recipe/bf16-mixed-rowwise_adam/seed*"

Each ``LABEL=GLOB`` names the run folders (``results.json`` inside) of one setting; per setting the JSON keeps
every run's figures and their means. Output: ``benchmarks/results/NAME.json``.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
from pathlib import Path
from typing import Any

FIGURES = ("test/auc", "test/logloss", "train/seconds", "train/epochs", "train/samples_per_s")


def collect(settings: list[str]) -> dict[str, Any]:
    out = []
    for item in settings:
        label, _, pattern = item.partition("=")
        if not pattern:
            raise SystemExit(f"{item!r}: expected LABEL=GLOB (run folders holding results.json)")
        runs = []
        for d in sorted(glob.glob(pattern)):
            path = Path(d) / "results.json"
            if path.exists():
                r = json.loads(path.read_text())
                runs.append({"run_dir": d, "seed": r.get("seed"), "optimizer": r.get("train/optimizer"),
                             "precision": r.get("train/precision"), **{k: r.get(k) for k in FIGURES}})
        if not runs:
            raise SystemExit(f"{label}: no results.json under {pattern!r}")
        means = {k: statistics.mean(float(r[k]) for r in runs) for k in FIGURES if all(r[k] is not None for r in runs)}
        out.append({"label": label, "pattern": pattern, "runs": runs, "mean": means})
    return {"settings": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("settings", nargs="+", help="LABEL=GLOB of run folders")
    args = ap.parse_args()
    path = Path(__file__).resolve().parent / "results" / f"{args.name}.json"
    path.write_text(json.dumps(collect(args.settings), indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
