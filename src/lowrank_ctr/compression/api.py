"""``compress(model, method, ...)``: the one entry point; works on any model by module replacement by name.

Steps: find targets (targets.py) -> for afm, one calibration pass with hooks on all targets at once (stats.py,
statistics of the ORIGINAL model) -> choose ranks (ranks.py) -> build replacements (methods.py) -> swap them in
by dotted name -> size accounting (size.py) and a spec (spec.py) that rebuilds the structure on a fresh model.

A replacement that would not be smaller than the layer it replaces (e.g. rank above the break-even
k >= in*out/(in+out), or an embedding asked for rank = dim) is not made: the layer stays as it is and its report
entry says why. Linears that no rank can shrink (an output Linear(d, 1)) are skipped the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from lowrank_ctr.compression.methods import (
    METHODS,
    embedding_full_ranks,
    embedding_spectra,
    linear_full_rank,
    linear_spectrum,
)
from lowrank_ctr.compression.fold import fold_model
from lowrank_ctr.compression.ranks import (
    BudgetLayer,
    RankArg,
    allocate_budget,
    linear_break_even,
    resolve_embedding_ranks,
    resolve_linear_rank,
)
from lowrank_ctr.compression.size import SIZE_GROUPS, compression_ratio, model_size, module_size
from lowrank_ctr.compression.spec import make_spec
from lowrank_ctr.compression.stats import OutputStats, collect_output_stats
from lowrank_ctr.compression.targets import Target, find_targets, module_groups, set_module
from lowrank_ctr.models.layers import FieldEmbedding

KNOWN_METHODS: tuple[str, ...] = ("none", "svd", "afm", "tt", "int8")
#: targets used when ``targets`` is None (tt factorises embedding tables only)
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "none": (), "svd": ("embedding", "mlp"), "afm": ("embedding", "mlp"), "tt": ("embedding",),
    "int8": ("embedding", "mlp"),
}


@dataclass
class CompressionReport:
    """What was done: per-layer entries, sizes per group before / after, the ratio and the rebuild spec.

    ``base`` / ``compressed``: {group: {"params": n, "bytes": b}} for embedding, mlp, other, rest, total.
    ``ratio``: base total bytes / compressed total bytes; ``group_ratios`` the same per group.
    """

    method: str
    policy: dict[str, Any]
    layers: list[dict[str, Any]]
    base: dict[str, dict[str, int]]
    compressed: dict[str, dict[str, int]]
    ratio: float
    group_ratios: dict[str, float]
    spec: dict[str, Any]
    calibration_batches: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"compression {self.method}: {self.base['total']['bytes']} -> {self.compressed['total']['bytes']} "
                 f"bytes (ratio {self.ratio:.2f})"]
        for l in self.layers:
            e = l.get("retained_energy")
            lines.append(f"  {l['name']:<32} {l['group']:<9} {l['method']:<5} rank={l.get('rank')!s:<6} "
                         f"energy={'-' if e is None else f'{e:.4f}'} {l['params_before']}->{l['params_after']}"
                         + (f"  ({l['note']})" if l.get("note") else ""))
        return "\n".join(lines)


def _entry(t: Target, method: str, **kw: Any) -> dict[str, Any]:
    params, nbytes = module_size(t.module)
    base = {"name": t.name, "group": t.group, "method": method, "rank": None, "full_rank": None,
            "retained_energy": None, "params_before": params, "params_after": params, "bytes_before": nbytes,
            "bytes_after": nbytes, "replaced": False, "note": ""}
    base.update(kw)
    return base


def _fixed_parts(model: nn.Module, active: Sequence[Target]) -> dict[str, int]:
    """Bytes of everything that is not an active target, by owning module name."""
    prefixes = [t.name + "." for t in active]
    parts: dict[str, int] = {}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen or any(name.startswith(p) for p in prefixes):
            continue
        seen.add(id(t))
        owner = name.rpartition(".")[0]
        parts[owner] = parts.get(owner, 0) + t.numel() * t.element_size()
    return parts


def compress(
    model: nn.Module,
    method: str,
    calibration_batches: Iterable[Any] | None = None,
    targets: Sequence[str] | None = None,
    embedding_rank: RankArg = None,
    mlp_rank: RankArg = None,
    other_rank: RankArg = None,
    energy: float | None = None,
    target_ratio: float | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    max_calibration_batches: int | None = None,
    fold: bool = False,
) -> CompressionReport:
    """Compress ``model`` in place and report what was done.

    method: "none" | "svd" | "afm" | "tt" | "int8".
    targets: groups among "embedding", "mlp", "other" (None: DEFAULT_TARGETS[method]).
    Rank policy for svd / afm, per group: ``<group>_rank`` int (fixed) or float in (0, 1] (ratio of full rank);
    a group without one uses ``energy`` (smallest rank keeping that share of the spectrum); ``target_ratio``
    (the whole model N times smaller in bytes) overrides both and allocates ranks from the spectra.
    tt: ``embedding_rank`` is the TT-rank (int). int8 / none ignore ranks.
    calibration_batches: needed by afm (and then also run through ``forward_fn(model, batch)``, default
    ``model(batch)``, under no_grad in eval mode, at most ``max_calibration_batches``).
    fold: move the embedding projection into the Linear that reads the flattened embeddings (models that declare
    ``embedding_sink``, e.g. dnn): same predictions, one batched matmul fewer per batch.
    """
    if method not in KNOWN_METHODS:
        raise ValueError(f"unknown compression method {method!r}; known methods: {list(KNOWN_METHODS)}")
    groups = tuple(DEFAULT_TARGETS[method] if targets is None else [targets] if isinstance(targets, str) else targets)
    if method == "tt" and any(g != "embedding" for g in groups):
        raise ValueError(f"tt factorises embedding tables only; use targets=['embedding'] (got {list(groups)})")
    if target_ratio is not None and method not in ("svd", "afm"):
        raise ValueError(f"target_ratio allocates low ranks and needs method 'svd' or 'afm', not {method!r}")
    if energy is not None and method not in ("svd", "afm"):
        raise ValueError(f"energy chooses low ranks and needs method 'svd' or 'afm', not {method!r}")

    group_map = module_groups(model)
    base = model_size(model, group_map)
    policy: dict[str, Any] = {"targets": list(groups), "include": list(include), "exclude": list(exclude),
                              "embedding_rank": embedding_rank, "mlp_rank": mlp_rank, "other_rank": other_rank,
                              "energy": energy, "target_ratio": target_ratio,
                              "mode": "budget" if target_ratio is not None else
                              ("per-group" if method in ("svd", "afm") else method)}
    found = find_targets(model, groups, include, exclude) if groups else []
    if method != "none" and not found:
        raise ValueError(f"no layer to compress: groups {list(groups)} with include={list(include)} "
                         f"exclude={list(exclude)} match nothing in {type(model).__name__}")

    layers: list[dict[str, Any]] = []
    active: list[Target] = []
    for t in found:
        if method in ("svd", "afm") and isinstance(t.module, nn.Linear) \
                and linear_break_even(t.module.in_features, t.module.out_features) < 1:
            layers.append(_entry(t, "none", note=f"skipped: no rank shrinks Linear({t.module.in_features}, "
                                                 f"{t.module.out_features})"))
        else:
            active.append(t)

    stats: dict[str, OutputStats] = {}
    n_batches = 0
    if method == "afm" and active:
        if calibration_batches is None:
            raise ValueError("afm needs calibration_batches (an iterable of training batches)")
        stats, n_batches = collect_output_stats(model, {t.name: t.module for t in active}, calibration_batches,
                                                forward_fn, max_calibration_batches)

    ranks = _choose_ranks(model, method, active, stats, base, policy,
                          {"embedding": embedding_rank, "mlp": mlp_rank, "other": other_rank}, energy, target_ratio)

    replaced: dict[str, nn.Module] = {}
    fns = METHODS.get(method)
    for t in active:
        is_emb = isinstance(t.module, FieldEmbedding)
        rank = ranks.get(t.name)
        if method in ("svd", "afm") and rank is None:
            layers.append(_entry(t, "none", note="kept dense by the budget (its full spectrum was worth the bytes)",
                                 full_rank=linear_full_rank(t.module)))
            continue
        fn = fns[0] if is_emb else fns[1]
        new, info = fn(t.module, rank, stats.get(t.name))
        entry = _entry(t, method)
        entry.update(info)
        if isinstance(t.module, nn.Linear) and method in ("svd", "afm"):
            entry["break_even_rank"] = linear_break_even(t.module.in_features, t.module.out_features)
        if info["bytes_after"] >= info["bytes_before"]:
            for key in ("field_ranks", "field_retained_energy", "tt_fields"):
                entry.pop(key, None)
            entry.update(method="none", rank=None, requested_rank=info["rank"], retained_energy=1.0,
                         params_after=info["params_before"], bytes_after=info["bytes_before"],
                         note=f"kept dense: the {method} replacement ({info['bytes_after']} B) is not smaller than "
                              f"the layer ({info['bytes_before']} B); lower the rank to save space")
        else:
            entry["replaced"] = True
            replaced[t.name] = new
        layers.append(entry)

    for name, new in replaced.items():
        set_module(model, name, new)
    if fold:  # the embedding projection moves into the Linear that reads the flattened embeddings
        if method not in ("svd", "afm"):
            raise ValueError(f"compression.fold=true needs method 'svd' or 'afm', not {method!r}")
        replaced.update(fold_model(model))
        policy["fold"] = True
    order = {t.name: i for i, t in enumerate(found)}
    layers.sort(key=lambda l: order[l["name"]])
    after = model_size(model, group_map)
    return CompressionReport(
        method=method, policy=policy, layers=layers, base=base, compressed=after,
        ratio=compression_ratio(base["total"]["bytes"], after["total"]["bytes"]),
        group_ratios={g: compression_ratio(base[g]["bytes"], after[g]["bytes"])
                      for g in SIZE_GROUPS + ("total",) if base[g]["bytes"]},
        spec=make_spec(method, replaced), calibration_batches=n_batches)


def _choose_ranks(model: nn.Module, method: str, active: Sequence[Target], stats: dict[str, OutputStats],
                  base: dict[str, dict[str, int]], policy: dict[str, Any], group_ranks: dict[str, RankArg],
                  energy: float | None, target_ratio: float | None) -> dict[str, Any]:
    if method in ("none", "int8"):
        return {}
    if method == "tt":
        r = group_ranks["embedding"]
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"tt needs embedding_rank = the TT-rank, an int >= 1 (got {r!r})")
        return {t.name: r for t in active}

    def spectra(t: Target) -> list[torch.Tensor]:
        if isinstance(t.module, FieldEmbedding):
            return embedding_spectra(method, t.module, stats.get(t.name))
        return [linear_spectrum(method, t.module, stats.get(t.name))]

    if target_ratio is not None:
        layers = []
        for t in active:
            m = t.module
            es = next(iter(m.parameters())).element_size()
            if isinstance(m, FieldEmbedding):
                layers.append(BudgetLayer(t.name, "embedding", spectra(t), es, vocab_sizes=m.vocab_sizes, dim=m.dim))
            else:
                layers.append(BudgetLayer(t.name, "linear", spectra(t), es, in_features=m.in_features,
                                          out_features=m.out_features, bias=method == "afm" or m.bias is not None))
        chosen, predicted = allocate_budget(layers, base["total"]["bytes"], float(target_ratio),
                                            _fixed_parts(model, active))
        policy["predicted_bytes"] = predicted
        return chosen

    out: dict[str, Any] = {}
    for t in active:
        r = group_ranks[t.group]
        spec = spectra(t) if r is None else None
        if isinstance(t.module, FieldEmbedding):
            out[t.name] = resolve_embedding_ranks(t.name, r, energy, t.module.dim, embedding_full_ranks(t.module),
                                                  spec)
        else:
            out[t.name] = resolve_linear_rank(t.name, r, energy, linear_full_rank(t.module),
                                              spec[0] if spec else None, group=t.group)
    return out


def _rank_arg(value: Any) -> Any:
    """int rank, float ratio in (0, 1], or None (from YAML, 2 and 2.0 mean a rank of 2)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer() and value > 1:
        return int(value)
    return value


#: compression config keys that ``compress`` reads (the rest of a ``compression`` config is the pipeline's:
#: fine-tune, distillation, control)
COMPRESS_KEYS: tuple[str, ...] = ("method", "targets", "embedding_rank", "mlp_rank", "other_rank", "energy",
                                  "target_ratio", "include", "exclude", "fold")


def compress_from_config(model: nn.Module, cfg: Any, calibration_batches: Iterable[Any] | None = None,
                         forward_fn: Callable[[nn.Module, Any], Any] | None = None) -> CompressionReport:
    """``compress`` with the keys of a ``compression`` config (a mapping or DictConfig); other keys are ignored.

    ``calibration_batches``: training batches (already on the model's device); at most
    ``cfg.calibration_batches`` of them are used.
    """
    kw = {k: cfg[k] for k in COMPRESS_KEYS if k in cfg and cfg[k] is not None}
    for k in ("embedding_rank", "mlp_rank", "other_rank"):
        if k in kw:
            kw[k] = _rank_arg(kw[k])
    for k in ("targets", "include", "exclude"):
        if k in kw:
            kw[k] = list(kw[k])
    if "target_ratio" in kw:
        kw["target_ratio"] = float(kw["target_ratio"])
    if "energy" in kw:
        kw["energy"] = float(kw["energy"])
    kw["fold"] = bool(kw.get("fold", False))
    limit = cfg.get("calibration_batches") if hasattr(cfg, "get") else None
    return compress(model, calibration_batches=calibration_batches, forward_fn=forward_fn,
                    max_calibration_batches=int(limit) if limit else None, **kw)
