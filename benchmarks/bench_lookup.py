"""The low-rank embedding lookup, three ways: batched (one padded gather + one batched GEMM), rank-grouped (one row
gather + one batched GEMM per distinct rank) and the per-field loop, against the dense table it replaced, at batch
sizes from 1 to 4096. ``LowRankFieldEmbedding.batched_lookup_max_rows`` (the largest batch that takes the batched
path) is chosen from it. A model compressed before the rank-grouped layout is re-laid out for that column.

    python benchmarks/bench_lookup.py --base BASE.ckpt --compressed COMPRESSED.ckpt [--threads 1]
        [--out outputs/bench_lookup.json]

Every timing is the median of repeated forward passes of the embedding layer alone on the same random ids, one
configuration after another in one process with a fixed thread count; ratios are against the dense table measured
in the same run. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from torch import nn

from lowrank_ctr.bench import latency_ms
from lowrank_ctr.compression.modules import LowRankFieldEmbedding
from lowrank_ctr.lightning.module import load_model

SIZES = (1, 8, 32, 64, 128, 256, 512, 1024, 4096)


class _Call(nn.Module):
    """Time one function of ids through bench.latency_ms (which passes a batch dict)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, batch: dict) -> torch.Tensor:
        return self.fn(batch["ids"])


def _table(model: nn.Module, kind: type) -> nn.Module:
    found = [m for name, m in model.named_modules() if isinstance(m, kind) and "linear" not in name]
    if not found:
        raise SystemExit(f"no {kind.__name__} in the model (give an AFM/SVD-compressed checkpoint)")
    return found[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the uncompressed checkpoint")
    ap.add_argument("--compressed", required=True, help="an AFM/SVD-compressed checkpoint of it")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="outputs/bench_lookup.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base, _ = load_model(args.base)
    compressed, _ = load_model(args.compressed)
    low = _table(compressed, LowRankFieldEmbedding).eval()
    grouped = low if low.rank_grouped else low.rank_grouped_copy().eval()
    dense = base.embedding.table.eval()
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for size in SIZES:
            ids = torch.stack([torch.randint(0, v, (size,), generator=gen) for v in low.vocab_sizes], 1)
            batch = {"ids": ids}
            dense_ms = latency_ms(_Call(dense), {"ids": ids.unsqueeze(-1)} if _needs_bags(dense) else batch)
            loop_ms = latency_ms(_Call(low._forward_per_field), batch)
            batched_ms = latency_ms(_Call(low._forward_batched), batch)
            grouped_ms = latency_ms(_Call(grouped._forward_rank_grouped), batch)
            paths = {"per_field": loop_ms, "batched": batched_ms, "rank_grouped": grouped_ms}
            rows.append({"batch": size, "dense_ms": dense_ms, **{f"{p}_ms": ms for p, ms in paths.items()},
                         **{f"{p}_vs_dense": ms / dense_ms for p, ms in paths.items()},
                         "fastest_path": min(paths, key=paths.get)})
            print(f"batch {size:5d}: dense {dense_ms:.4f} ms; " + ", ".join(
                f"{p} {ms:.4f} ms ({ms / dense_ms:.2f}x)" for p, ms in paths.items()))
    out = {"threads": args.threads, "fields": low.num_fields, "dim": low.dim, "ranks": low.ranks,
           "distinct_ranks": len({r for r in low.ranks if r > 0}),
           "code_dtype": low.code_dtype, "batched_lookup_max_rows": LowRankFieldEmbedding.batched_lookup_max_rows,
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


def _needs_bags(table: nn.Module) -> bool:
    """A multi-hot capable table takes (B, F, L) ids; a one-hot one (B, F)."""
    try:
        table(torch.zeros(1, len(getattr(table, "vocab_sizes", [0])), dtype=torch.long))
        return False
    except Exception:  # noqa: BLE001 - only probing the expected input rank
        return True


if __name__ == "__main__":
    main()
