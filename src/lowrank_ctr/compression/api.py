"""``compress(model, method, ...)``: the one entry point; works on any model by module replacement by name.

Steps: find targets (targets.py) -> one calibration pass with hooks on all targets at once when the method or the
allocator needs statistics of the ORIGINAL model (stats.py; with gradients for the loss-aware budget) -> choose
ranks (ranks.py) -> build replacements (the method, from methods/) and swap them in by dotted name, all at once
(one-shot) or layer by layer in forward order with re-measured statistics and a least-squares refit of every
Linear downstream of a compressed layer (calibrate.py) -> optional folding (fold.py) -> size accounting (size.py)
and a spec (spec.py) that rebuilds the structure on a fresh model.

A replacement that would not be smaller than the layer it replaces (e.g. rank above the break-even
k >= in*out/(in+out), or an embedding asked for rank = dim with float32 codes) is not made: the layer stays as it
is and its report entry says why. Linears that no rank can shrink (an output Linear(d, 1)) are skipped the same way.
"""

from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from lowrank_ctr.compression.calibrate import forward_order, linear_moments, refit_linear
from lowrank_ctr.compression.fold import fold_model, find_field_readers
from lowrank_ctr.compression.methods import METHODS, CompressionMethod, LayerContext, get_method
from lowrank_ctr.compression.methods.lowrank import LowRankMethod, embedding_full_ranks, linear_full_rank
from lowrank_ctr.compression.modules import CODE_DTYPES, LowRankFieldEmbedding
from lowrank_ctr.compression.ranks import (
    ALLOCATORS,
    BudgetLayer,
    RankArg,
    allocate_budget,
    linear_break_even,
    linear_budget_layer,
    minimum_bytes,
    resolve_embedding_ranks,
    resolve_linear_rank,
    unreachable_message,
)
from lowrank_ctr.compression.size import SIZE_GROUPS, compression_ratio, model_size, module_size
from lowrank_ctr.compression.spec import make_spec
from lowrank_ctr.compression.stats import OutputStats, collect_output_stats
from lowrank_ctr.compression.targets import Target, find_targets, module_groups, set_module
from lowrank_ctr.models.layers import FieldEmbedding

CALIBRATIONS: tuple[str, ...] = ("oneshot", "sequential")
CORRECTIONS: tuple[str, ...] = ("none", "lstsq")


log = logging.getLogger(__name__)


def reads_calibration_batches(method: CompressionMethod, allocator: str, calibration: str, correction: str,
                              fold: bool, from_scratch: bool) -> bool:
    """Whether a compression reads training batches at all (so ``calibration_batches`` changes its result): AFM's
    statistics, the loss allocator's gradients, sequential calibration, the least-squares correction, folding."""
    return not from_scratch and (method.needs_calibration or allocator == "loss" or calibration == "sequential"
                                 or correction == "lstsq" or bool(fold))


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
        lines = [f"compression {self.method}: {self.base['total']['bytes']:,} -> {self.compressed['total']['bytes']:,} "
                 f"bytes (ratio {self.ratio:.2f}); per layer: rank, retained share of the output variance, "
                 f"parameters before -> after"]
        for l in self.layers:
            e = l.get("retained_energy")
            lines.append(f"  {l['name']:<32} {l['group']:<9} {l['method']:<5} rank={l.get('rank')!s:<6} "
                         f"energy={'-' if e is None else f'{e:.4f}'} params {l['params_before']:,}->"
                         f"{l['params_after']:,}" + (f"  ({l['note']})" if l.get("note") else ""))
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


class _Plan:
    """The choices of one ``compress`` call, checked before any work (also what ``check_config`` runs)."""

    def __init__(self, model: nn.Module, method: str, targets: Sequence[str] | str | None, include: Sequence[str],
                 exclude: Sequence[str], code_dtype: str, calibration: str, correction: str, allocator: str,
                 energy: float | None, target_ratio: float | None, fold: bool, from_scratch: bool,
                 options: Mapping[str, Any]) -> None:
        self.method: CompressionMethod = get_method(method)
        m = self.method
        self.groups = tuple(m.targets_for(target_ratio) if targets is None
                            else [targets] if isinstance(targets, str) else targets)
        outside = [g for g in self.groups if g not in m.groups]
        if outside and m.name != "none":
            raise ValueError(f"{m.name} compresses {list(m.groups)} only; use targets={list(m.groups)} "
                             f"(got {list(self.groups)})")
        for key, value in (("target_ratio", target_ratio), ("energy", energy)):
            if value is not None and not m.low_rank:
                raise ValueError(f"{key} chooses low ranks and needs a low-rank method (svd or afm), not {m.name!r}")
        for key, value, allowed in (("code_dtype", code_dtype, CODE_DTYPES), ("calibration", calibration, CALIBRATIONS),
                                    ("correction", correction, CORRECTIONS), ("allocator", allocator, ALLOCATORS)):
            if value not in allowed:
                raise ValueError(f"compression.{key}={value!r} is not one of {list(allowed)}")
        if code_dtype != "float32" and not m.low_rank:
            raise ValueError(f"code_dtype={code_dtype} stores low-rank codes; {m.name!r} has none (use svd or afm)")
        if allocator == "loss" and not (m.needs_calibration and m.low_rank):
            raise ValueError(f"allocator=loss weighs output components by their loss impact, measured in afm's "
                             f"calibration pass; {m.name!r} has none (use allocator='variance')")
        if target_ratio is None:  # fixed ranks / energy: there is no budget to allocate (no gradient pass either)
            allocator = "variance"
        if fold and not m.low_rank:
            raise ValueError(f"compression.fold=true folds an SVD/AFM embedding projection; {m.name!r} has none")
        if from_scratch and not m.from_scratch:
            raise ValueError(f"compression.from_scratch=true: {m.name!r} cannot be trained from scratch "
                             f"(methods that can: tt, qr)")
        for key, check in m.options.items():
            need = check(options.get(key))
            if need is not None:
                raise ValueError(f"compression.{key}={options.get(key)!r} must be {need} for {m.name}")
        self.code_dtype, self.calibration, self.correction, self.allocator = code_dtype, calibration, correction, allocator
        self.fold, self.from_scratch, self.options = fold, from_scratch, dict(options)
        self.found = (find_targets(model, self.groups, include, exclude, first_order=m.first_order)
                      if self.groups and m.name != "none" else [])
        if m.name != "none" and not self.found:
            raise ValueError(f"no layer to compress: groups {list(self.groups)} with include={list(include)} "
                             f"exclude={list(exclude)} match nothing in {type(model).__name__}")
        self.skipped: list[dict[str, Any]] = []
        self.active: list[Target] = []
        for t in self.found:
            if m.low_rank and isinstance(t.module, nn.Linear) \
                    and linear_break_even(t.module.in_features, t.module.out_features) < 1:
                self.skipped.append(_entry(t, "none", note=f"skipped: no rank shrinks Linear({t.module.in_features}, "
                                                           f"{t.module.out_features})"))
            else:
                self.active.append(t)

    @property
    def needs_batches(self) -> bool:
        return reads_calibration_batches(self.method, self.allocator, self.calibration, self.correction, self.fold,
                                         self.from_scratch)

    @property
    def sequential(self) -> bool:
        return self.calibration == "sequential" or self.correction == "lstsq"

    def element_size(self, t: Target) -> int:
        return next(iter(t.module.parameters())).element_size()

    def budget_layers(self, stats: Mapping[str, OutputStats] | None,
                      gains: Mapping[str, list[torch.Tensor]] | None) -> list[BudgetLayer]:
        """The active targets as the allocator sees them (gains None: only sizes matter, e.g. for a check)."""
        out = []
        for t in self.active:
            mod, es = t.module, self.element_size(t)
            g = gains[t.name] if gains is not None else None
            if isinstance(mod, FieldEmbedding):
                vocab, dim, dtype = mod.vocab_sizes, mod.dim, self.code_dtype
                out.append(BudgetLayer(
                    t.name, g if g is not None else [torch.zeros(f) for f in embedding_full_ranks(mod)],
                    lambda r, vocab=vocab, dim=dim, dtype=dtype, es=es: LowRankFieldEmbedding.num_bytes(
                        vocab, dim, r, dtype, es),
                    sum(vocab) * dim * es, [0] * mod.num_fields))
            else:
                out.append(linear_budget_layer(t.name, g[0] if g is not None else torch.zeros(linear_full_rank(mod)),
                                               mod.in_features, mod.out_features, es, mod.bias is not None))
        return out


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
    code_dtype: str = "float32",
    calibration: str = "oneshot",
    correction: str = "none",
    allocator: str = "variance",
    from_scratch: bool = False,
    options: Mapping[str, Any] | None = None,
    mlp_method: str | None = None,
    reference_bytes: int | None = None,
) -> CompressionReport:
    """Compress ``model`` in place and report what was done.

    method: a registered method (methods/: "none", "svd", "afm", "tt", "int8", "qr").
    targets: groups among "embedding", "mlp", "other" (None: the method's default targets).
    Rank policy for svd / afm, per group: ``<group>_rank`` int (fixed) or float in (0, 1] (ratio of full rank);
    a group without one uses ``energy`` (smallest rank keeping that share of the spectrum); ``target_ratio``
    (the whole model N times smaller in bytes) overrides both and allocates ranks with ``allocator``
    ("variance" or "loss"). tt: ``embedding_rank`` is the TT-rank; qr reads ``options["collisions"]``.
    code_dtype: "float32" | "int8" storage of svd/afm embedding codes (first-order tables included).
    calibration: "oneshot" (every layer measured on the original model) | "sequential" (forward order, each layer
    measured after its upstream is compressed); correction: "none" | "lstsq" (refit every Linear downstream of a
    compressed layer to reproduce the original outputs; implies forward order).
    calibration_batches: training batches; needed by afm, sequential, lstsq, allocator=loss and fold (run through
    ``forward_fn(model, batch)``, default ``model(batch)``, in eval mode, at most ``max_calibration_batches``).
    fold: Linears that read the svd/afm field vectors read them through each field's small basis (fold.py).
    from_scratch: build the method's structure with random initialisation (tt, qr), for training from scratch.
    mlp_method: a second method for the Linear layers (groups mlp and other) when ``method`` compresses the
    embeddings only (tt, qr): the embeddings first (``embedding_rank``), then the Linears (``mlp_rank`` /
    ``other_rank`` / ``energy`` / ``target_ratio``, measured on the model whose embeddings are already
    compressed); a ``target_ratio`` is then the WHOLE model's, the compressed embeddings counted as fixed bytes.
    reference_bytes: the size a ``target_ratio`` divides (default: this model's size now).
    """
    if mlp_method not in (None, "none"):
        return _compress_embeddings_then_linears(
            model, method, str(mlp_method), calibration_batches, targets, embedding_rank, mlp_rank, other_rank,
            energy, target_ratio, include, exclude, forward_fn, max_calibration_batches, fold, code_dtype,
            calibration, correction, allocator, from_scratch, options or {})
    plan = _Plan(model, method, targets, include, exclude, code_dtype, calibration, correction, allocator, energy,
                 target_ratio, fold, from_scratch, options or {})
    m = plan.method
    group_map = module_groups(model)
    base = model_size(model, group_map)
    policy: dict[str, Any] = {"targets": list(plan.groups), "include": list(include), "exclude": list(exclude),
                              "embedding_rank": embedding_rank, "mlp_rank": mlp_rank, "other_rank": other_rank,
                              "energy": energy, "target_ratio": target_ratio, "code_dtype": code_dtype,
                              "calibration": calibration, "correction": correction, "allocator": plan.allocator,
                              "from_scratch": from_scratch, "fold": fold, **plan.options,
                              "mode": "budget" if target_ratio is not None else
                              ("per-group" if m.low_rank else m.name)}
    batches: list[Any] = []
    if plan.needs_batches and plan.active:
        if calibration_batches is None:
            raise ValueError(f"{m.name} with these settings needs calibration_batches (an iterable of training "
                             "batches)")
        batches = list(itertools.islice(calibration_batches, max_calibration_batches))
        if not batches:
            raise ValueError("calibration_batches is empty: calibration needs at least one batch of (training) data")
    group_ranks = {"embedding": embedding_rank, "mlp": mlp_rank, "other": other_rank}
    layers = list(plan.skipped)
    replaced: dict[str, nn.Module] = {}

    if plan.from_scratch:
        for t in plan.active:
            ctx = LayerContext(code_dtype=code_dtype, options=plan.options)
            new = m.scratch_embedding(t.module, m.fixed_rank(t.group, group_ranks[t.group]), ctx)
            set_module(model, t.name, new)
            replaced[t.name] = new
            pa, ba = module_size(new)
            layers.append(_entry(t, m.name, params_after=pa, bytes_after=ba, replaced=True,
                                 note="random initialisation (trained from scratch)"))
    else:
        stats: dict[str, OutputStats] = {}
        if (m.needs_calibration or plan.allocator == "loss") and plan.active:
            stats, _ = collect_output_stats(model, {t.name: t.module for t in plan.active}, batches, forward_fn,
                                            gradients=plan.allocator == "loss")
        ranks, orders = _choose_ranks(model, plan, stats, base, policy, group_ranks, energy, target_ratio,
                                      reference_bytes)
        teacher = copy.deepcopy(model).eval() if correction == "lstsq" else None
        layers += _replace(model, plan, stats, ranks, orders, batches, forward_fn, teacher, replaced)
        if fold:
            # the embedding is a target (checked before any work), but the ranks chosen may have kept every table
            # dense (a small table whose low-rank form is not smaller): then there is nothing to fold, not an error
            tables = [n for n, mod in replaced.items() if isinstance(mod, LowRankFieldEmbedding) and mod.dim > 1]
            if not tables:
                log.warning("compression.fold=true: no embedding table became low-rank at these ranks, nothing folded")
            folded: dict[str, nn.Module] = {}
            for name in tables:
                folded.update(fold_model(model, name, batches[0], forward_fn))
            replaced.update(folded)
            policy["folded"] = list(folded)
    order = {t.name: i for i, t in enumerate(plan.found)}
    layers.sort(key=lambda l: order[l["name"]])
    after = model_size(model, group_map)
    return CompressionReport(
        method=m.name, policy=policy, layers=layers, base=base, compressed=after,
        ratio=compression_ratio(base["total"]["bytes"], after["total"]["bytes"]),
        group_ratios={g: compression_ratio(base[g]["bytes"], after[g]["bytes"])
                      for g in SIZE_GROUPS + ("total",) if base[g]["bytes"]},
        spec=make_spec(m.name, replaced), calibration_batches=len(batches))


def split_groups(method: CompressionMethod, mlp_method: CompressionMethod, targets: Sequence[str] | None,
                 target_ratio: float | None, from_scratch: bool = False, fold: bool = False
                 ) -> tuple[list[str], list[str]]:
    """The groups of the two stages of ``method`` + ``mlp_method``: (first stage's, second stage's); raises
    ValueError (naming the key) when the pair cannot be combined. With ``from_scratch`` the first stage is built
    with random initialisation and trained (the pipeline's from-scratch stage) before the second one runs."""
    if fold:
        raise ValueError(f"compression.mlp_method={mlp_method.name} compresses the Linear layers with their own "
                         "method: it cannot be combined with compression.fold=true (folding reads svd/afm tables)")
    if tuple(method.groups) != ("embedding",):
        raise ValueError(f"compression.mlp_method={mlp_method.name} adds a method for the Linear layers to one that "
                         f"compresses only embeddings (e.g. tt, qr); {method.name!r} already compresses "
                         f"{list(method.groups)}: set compression.mlp_method=null")
    if mlp_method.name == "none" or "mlp" not in mlp_method.groups or not mlp_method.low_rank:
        low = [n for n, m in METHODS.items() if m.low_rank and "mlp" in m.groups]
        raise ValueError(f"compression.mlp_method={mlp_method.name!r} must be a low-rank method for the Linear "
                         f"layers: one of {low}")
    # targets naming only the embedding (tt.yaml's own default): the Linear groups are mlp_method's defaults
    groups = list(targets) if targets is not None else ["embedding"]
    layer_groups = [g for g in groups if g != "embedding"] or \
        [g for g in mlp_method.targets_for(target_ratio) if g != "embedding"]
    if "embedding" not in groups:
        raise ValueError(f"compression.mlp_method={mlp_method.name} compresses the embeddings with {method.name} "
                         f"and the Linear layers with {mlp_method.name}: compression.targets must name 'embedding' "
                         f"(got {groups})")
    if target_ratio is not None and mlp_method.first_order:
        # under a budget the second method also gets what the first left of the embedding group: the dim-1
        # first-order tables (int8 codes or rank 0), which tt / qr do not touch and which cap the ratio at ~d
        layer_groups = ["embedding", *layer_groups]
    return ["embedding"], layer_groups


def _compress_embeddings_then_linears(
        model: nn.Module, method: str, mlp_method: str, calibration_batches: Iterable[Any] | None,
        targets: Sequence[str] | None, embedding_rank: RankArg, mlp_rank: RankArg, other_rank: RankArg,
        energy: float | None, target_ratio: float | None, include: Sequence[str], exclude: Sequence[str],
        forward_fn: Callable[[nn.Module, Any], Any] | None, max_calibration_batches: int | None, fold: bool,
        code_dtype: str, calibration: str, correction: str, allocator: str, from_scratch: bool,
        options: Mapping[str, Any]) -> CompressionReport:
    """``method`` on the embeddings, then ``mlp_method`` on the Linears of the result; one report for both.

    With ``from_scratch`` only the first stage is built (random initialisation): its report names the stage still
    to come (``policy["mlp_method"]``), which ``compress_linear_stage`` runs once the structure is trained."""
    first, second = get_method(method), get_method(mlp_method)
    emb_groups, layer_groups = split_groups(first, second, targets, target_ratio, from_scratch, fold)
    batches = list(itertools.islice(calibration_batches, max_calibration_batches)) \
        if calibration_batches is not None else None
    r1 = compress(model, method, batches, targets=emb_groups, embedding_rank=embedding_rank, include=include,
                  exclude=exclude, forward_fn=forward_fn, options=options, from_scratch=from_scratch)
    if from_scratch:
        r1.policy.update(mlp_method=second.name, stage="embeddings from scratch; the Linear stage follows training")
        return r1
    return _linear_stage(model, first, second, r1, batches, layer_groups, mlp_rank, other_rank, energy,
                         target_ratio, include, exclude, forward_fn, code_dtype, calibration, correction, allocator,
                         options)


def compress_linear_stage(model: nn.Module, cfg: Any, calibration_batches: Iterable[Any] | None,
                          first: CompressionReport,
                          forward_fn: Callable[[nn.Module, Any], Any] | None = None) -> CompressionReport:
    """The second stage of a ``method`` + ``mlp_method`` config whose first stage ``first`` was built from scratch
    and has since been trained: ``mlp_method`` on the Linears, a ``target_ratio`` measured against the size before
    the first stage (``first.base``); one report for both stages."""
    kw = _compress_kwargs(cfg)
    one, two = get_method(kw["method"]), get_method(kw["mlp_method"])
    _, layer_groups = split_groups(one, two, kw.get("targets"), kw.get("target_ratio"), kw["from_scratch"],
                                   kw["fold"])
    limit = _calibration_limit(cfg)
    batches = list(itertools.islice(calibration_batches, limit)) if calibration_batches is not None else None
    return _linear_stage(model, one, two, first, batches, layer_groups, kw.get("mlp_rank"), kw.get("other_rank"),
                         kw.get("energy"), kw.get("target_ratio"), kw.get("include", ()), kw.get("exclude", ()),
                         forward_fn, kw.get("code_dtype", "float32"), kw.get("calibration", "oneshot"),
                         kw.get("correction", "none"), kw.get("allocator", "variance"), kw["options"])


def _linear_stage(model: nn.Module, first: CompressionMethod, second: CompressionMethod, r1: CompressionReport,
                  batches: list[Any] | None, layer_groups: list[str], mlp_rank: RankArg, other_rank: RankArg,
                  energy: float | None, target_ratio: float | None, include: Sequence[str], exclude: Sequence[str],
                  forward_fn: Callable[[nn.Module, Any], Any] | None, code_dtype: str, calibration: str,
                  correction: str, allocator: str, options: Mapping[str, Any]) -> CompressionReport:
    """``second`` on the Linears of a model whose embeddings ``r1`` compressed; the report of both stages, sizes
    against the model before the first stage."""
    original = r1.base
    r2 = compress(model, second.name, batches, targets=layer_groups, mlp_rank=mlp_rank, other_rank=other_rank,
                  energy=energy, target_ratio=target_ratio, code_dtype=code_dtype, calibration=calibration,
                  correction=correction, allocator=allocator, reference_bytes=original["total"]["bytes"],
                  include=include, exclude=exclude, forward_fn=forward_fn, options=options)
    name = "+".join([first.name, second.name])  # methods.method_parts splits it
    policy = {**r2.policy, "targets": ["embedding", *layer_groups],
              "embedding_method": first.name, "mlp_method": second.name,
              "embedding_rank": r1.policy.get("embedding_rank"), "from_scratch": bool(r1.policy.get("from_scratch")),
              **{k: v for k, v in r1.policy.items() if k in first.options}}
    after = r2.compressed
    return CompressionReport(
        method=name, policy=policy, layers=[*r1.layers, *r2.layers], base=original, compressed=after,
        ratio=compression_ratio(original["total"]["bytes"], after["total"]["bytes"]),
        group_ratios={g: compression_ratio(original[g]["bytes"], after[g]["bytes"])
                      for g in SIZE_GROUPS + ("total",) if original[g]["bytes"]},
        spec={**r2.spec, "method": name, "modules": [*r1.spec["modules"], *r2.spec["modules"]]},
        calibration_batches=max(r1.calibration_batches, r2.calibration_batches))


def _loss_orders(stats: OutputStats, full_ranks: Sequence[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per group: the estimated loss of dropping each of its first ``full_ranks[g]`` eigen-components, descending,
    and the component indices in that order (the order in which the loss allocator keeps them)."""
    loss = stats.component_loss()
    gains, orders = [], []
    for g, f in enumerate(full_ranks):
        order = torch.argsort(loss[g, :f], descending=True)
        gains.append(loss[g, :f][order])
        orders.append(order)
    return gains, orders


def _choose_ranks(model: nn.Module, plan: _Plan, stats: Mapping[str, OutputStats], base: dict[str, dict[str, int]],
                  policy: dict[str, Any], group_ranks: dict[str, RankArg], energy: float | None,
                  target_ratio: float | None, reference_bytes: int | None = None,
                  ) -> tuple[dict[str, Any], dict[str, list[torch.Tensor] | None]]:
    """Ranks per active target, and for the loss allocator the order in which components are kept."""
    m = plan.method
    orders: dict[str, list[torch.Tensor] | None] = {t.name: None for t in plan.active}
    if not m.low_rank:
        return {t.name: m.fixed_rank(t.group, group_ranks[t.group]) for t in plan.active}, orders
    assert isinstance(m, LowRankMethod)

    def spectra(t: Target) -> list[torch.Tensor]:
        ctx = LayerContext(stats=stats.get(t.name))
        if isinstance(t.module, FieldEmbedding):
            return m.embedding_spectra(t.module, ctx)
        return [m.linear_spectrum(t.module, ctx)]

    if target_ratio is not None:
        gains: dict[str, list[torch.Tensor]] = {}
        for t in plan.active:
            if plan.allocator == "loss":
                full = embedding_full_ranks(t.module) if isinstance(t.module, FieldEmbedding) \
                    else [linear_full_rank(t.module)]
                gains[t.name], orders[t.name] = _loss_orders(stats[t.name], full)
            else:  # each spectrum normalised to sum 1: shares of the layer's (field's) own variance
                gains[t.name] = [s / s.sum() if float(s.sum()) > 0 else s for s in spectra(t)]
        chosen, predicted = allocate_budget(plan.budget_layers(stats, gains), reference_bytes or base["total"]["bytes"],
                                            float(target_ratio), _fixed_parts(model, plan.active))
        policy["predicted_bytes"] = predicted
        return chosen, orders

    out: dict[str, Any] = {}
    for t in plan.active:
        r = group_ranks[t.group]
        spec = spectra(t) if r is None else None
        if isinstance(t.module, FieldEmbedding):
            out[t.name] = resolve_embedding_ranks(t.name, r, energy, t.module.dim, embedding_full_ranks(t.module),
                                                  spec)
        else:
            out[t.name] = resolve_linear_rank(t.name, r, energy, linear_full_rank(t.module),
                                              spec[0] if spec else None, group=t.group)
    return out, orders


def _build(model: nn.Module, plan: _Plan, t: Target, rank: Any, ctx: LayerContext,
           replaced: dict[str, nn.Module]) -> dict[str, Any]:
    """Build one replacement, swap it in when it is smaller; returns the layer's report entry."""
    m = plan.method
    if m.low_rank and rank is None:
        return _entry(t, "none", note="kept dense by the budget (its full spectrum was worth the bytes)",
                      full_rank=linear_full_rank(t.module))
    is_emb = isinstance(t.module, FieldEmbedding)
    new, info = (m.embedding if is_emb else m.linear)(t.module, rank, ctx)
    entry = _entry(t, m.name)
    entry.update(info)
    if isinstance(t.module, nn.Linear) and m.low_rank:
        entry["break_even_rank"] = linear_break_even(t.module.in_features, t.module.out_features)
    if info["bytes_after"] >= info["bytes_before"]:
        for key in ("field_ranks", "field_retained_energy", "tt_fields", "field_collisions"):
            entry.pop(key, None)
        entry.update(method="none", rank=None, requested_rank=info["rank"], retained_energy=1.0,
                     params_after=info["params_before"], bytes_after=info["bytes_before"],
                     note=f"kept dense: the {m.name} replacement ({info['bytes_after']} B) is not smaller than "
                          f"the layer ({info['bytes_before']} B); lower the rank to save space")
    else:
        entry["replaced"] = True
        set_module(model, t.name, new)
        replaced[t.name] = new
    return entry


def _replace(model: nn.Module, plan: _Plan, stats: Mapping[str, OutputStats], ranks: Mapping[str, Any],
             orders: Mapping[str, list[torch.Tensor] | None], batches: Sequence[Any],
             forward_fn: Callable[[nn.Module, Any], Any] | None, teacher: nn.Module | None,
             replaced: dict[str, nn.Module]) -> list[dict[str, Any]]:
    """Build and swap in every replacement: all from one-shot statistics, or layer by layer in forward order."""
    def ctx_of(t: Target, **overrides: Any) -> LayerContext:
        kw = dict(stats=stats.get(t.name), order=orders.get(t.name), code_dtype=plan.code_dtype, options=plan.options)
        return LayerContext(**{**kw, **overrides})

    if not plan.sequential:
        return [_build(model, plan, t, ranks.get(t.name), ctx_of(t), replaced) for t in plan.active]

    targets = {t.name: t for t in plan.active}
    # Every Linear may need a refit (correction) once something upstream is compressed; MultiheadAttention reads
    # its out_proj weights directly, so its Linears are left alone (as targets.py does).
    groups = module_groups(model)
    linears = [n for n, g in groups.items() if isinstance(model.get_submodule(n), nn.Linear)]
    names = forward_order(model, list(dict.fromkeys(list(targets) + linears)), batches[0], forward_fn)
    entries, upstream_changed = [], False
    for name in names:
        t = targets.get(name)
        module = model.get_submodule(name)
        if isinstance(module, FieldEmbedding):
            if t is not None:  # nothing upstream of an embedding: its one-shot statistics are its sequential ones
                entries.append(_build(model, plan, t, ranks.get(name), ctx_of(t), replaced))
                upstream_changed |= name in replaced
            continue
        refit = plan.correction == "lstsq" and upstream_changed
        if t is None and not refit:
            continue
        if refit or plan.calibration == "sequential":
            moments = linear_moments(model, name, batches, teacher if refit else None, forward_fn)
            if refit:
                refit_linear(module, *moments.least_squares(intercept=module.bias is not None))
        if t is not None:
            ctx = ctx_of(t)
            if plan.method.needs_calibration and (refit or plan.calibration == "sequential"):
                layer_stats = moments.output_stats(module.weight, module.bias)
                if plan.allocator == "loss":  # the loss weights of the original outputs, on the new basis
                    layer_stats.grad_count, layer_stats.grad_sq = stats[name].grad_count, stats[name].grad_sq
                    _, order = _loss_orders(layer_stats, [linear_full_rank(module)])
                    ctx = ctx_of(t, order=order)
                ctx.stats = layer_stats
            entries.append(_build(model, plan, t, ranks.get(name), ctx, replaced))
        upstream_changed |= refit or name in replaced
    return entries


# ---------------------------------------------------------------------------------------------------------------
# Config front end
# ---------------------------------------------------------------------------------------------------------------
def _rank_arg(value: Any) -> Any:
    """int rank, float ratio in (0, 1], or None (from YAML, 2 and 2.0 mean a rank of 2)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer() and value > 1:
        return int(value)
    return value


#: compression config keys that ``compress`` reads (the rest of a ``compression`` config is the pipeline's:
#: fine-tune, distillation, control); a method's own keys (``CompressionMethod.options``) come on top
COMPRESS_KEYS: tuple[str, ...] = ("method", "targets", "embedding_rank", "mlp_rank", "other_rank", "energy",
                                  "target_ratio", "include", "exclude", "fold", "code_dtype", "calibration",
                                  "correction", "allocator", "from_scratch", "mlp_method")


def _compress_kwargs(cfg: Any) -> dict[str, Any]:
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: d)
    kw = {k: get(k) for k in COMPRESS_KEYS if get(k) is not None}
    for k in ("embedding_rank", "mlp_rank", "other_rank"):
        if k in kw:
            kw[k] = _rank_arg(kw[k])
    for k in ("targets", "include", "exclude"):
        if k in kw:
            kw[k] = list(kw[k])
    for k in ("target_ratio", "energy"):
        if k in kw:
            kw[k] = float(kw[k])
    for k in ("fold", "from_scratch"):
        kw[k] = bool(kw.get(k, False))
    if kw.get("mlp_method") == "none":
        del kw["mlp_method"]
    methods = [get_method(str(kw.get("method", "none")))]
    if "mlp_method" in kw:
        methods.append(get_method(str(kw["mlp_method"])))
    kw["options"] = {k: get(k) for m in methods for k in m.options}
    return kw


def planned_targets(cfg: Any) -> list[str]:
    """The groups a ``compression`` config compresses, as a finished run records them (``compress/targets``; a
    two-stage config: the first stage's, then the second's); ValueError for a config that cannot run."""
    kw = _compress_kwargs(cfg)
    method = get_method(str(kw.get("method", "none")))
    if "mlp_method" in kw:
        first, second = split_groups(method, get_method(str(kw["mlp_method"])), kw.get("targets"),
                                     kw.get("target_ratio"), kw["from_scratch"], kw["fold"])
        return [*first, *second]
    targets = kw.get("targets")
    return list(targets) if targets is not None else list(method.targets_for(kw.get("target_ratio")))


def compress_from_config(model: nn.Module, cfg: Any, calibration_batches: Iterable[Any] | None = None,
                         forward_fn: Callable[[nn.Module, Any], Any] | None = None) -> CompressionReport:
    """``compress`` with the keys of a ``compression`` config (a mapping or DictConfig); other keys are ignored.

    ``calibration_batches``: training batches (already on the model's device); at most
    ``cfg.calibration_batches`` of them are used.
    """
    return compress(model, calibration_batches=calibration_batches, forward_fn=forward_fn,
                    max_calibration_batches=_calibration_limit(cfg), **_compress_kwargs(cfg))


def _calibration_limit(cfg: Any) -> int | None:
    """``cfg.calibration_batches``: at most this many calibration batches are read (None: all given)."""
    limit = cfg.get("calibration_batches") if hasattr(cfg, "get") else None
    return int(limit) if limit else None


def check_config(model: nn.Module, cfg: Any, batch: Any | None = None,
                 forward_fn: Callable[[nn.Module, Any], Any] | None = None) -> None:
    """Raise ValueError (one line naming the key and the fix) for settings no training can make possible: an
    unknown method or group, fixed ranks outside their layers' range, a budget below what the smallest ranks
    need, folding where no Linear reads the field vectors. Needs only the (untrained) model and, for folding,
    one batch: run it before the base is trained, not after hours."""
    kw = _compress_kwargs(cfg)
    if kw.get("method", "none") == "none":
        return
    if "mlp_method" in kw:
        _check_two_stage(model, kw)
        return
    plan = _Plan(model, kw["method"], kw.get("targets"), kw.get("include", ()), kw.get("exclude", ()),
                 kw.get("code_dtype", "float32"), kw.get("calibration", "oneshot"), kw.get("correction", "none"),
                 kw.get("allocator", "variance"), kw.get("energy"), kw.get("target_ratio"), kw["fold"],
                 kw["from_scratch"], kw["options"])
    m = plan.method
    group_ranks = {g: kw.get(f"{g}_rank") for g in ("embedding", "mlp", "other")}
    if kw.get("target_ratio") is not None:
        _check_budget(model, plan, kw["target_ratio"], model_size(model)["total"]["bytes"])
    elif m.low_rank:
        for t in plan.active:
            r = group_ranks[t.group]
            if r is None and kw.get("energy") is None:
                continue
            if isinstance(t.module, FieldEmbedding):
                resolve_embedding_ranks(t.name, r, kw.get("energy"), t.module.dim, embedding_full_ranks(t.module),
                                        [torch.ones(f) for f in embedding_full_ranks(t.module)])
            else:
                resolve_linear_rank(t.name, r, kw.get("energy"), linear_full_rank(t.module),
                                    torch.ones(linear_full_rank(t.module)), group=t.group)
    else:
        for t in plan.active:
            m.fixed_rank(t.group, group_ranks[t.group])
    if kw["fold"] and batch is not None:
        tables = [t.name for t in plan.active if isinstance(t.module, FieldEmbedding) and t.module.dim > 1]
        if not tables:
            raise ValueError("compression.fold=true needs an svd/afm embedding: include 'embedding' in targets")
        if not any(find_field_readers(model, name, batch, forward_fn) for name in tables):
            raise ValueError(f"compression.fold=true: no Linear layer of {type(model).__name__} reads the embedded "
                             "field vectors directly (e.g. a DNN fed by a cross network or by attention), so there is "
                             "nothing to fold; set compression.fold=false")


def _check_two_stage(model: nn.Module, kw: dict[str, Any]) -> None:
    """``check_config`` of ``method`` + ``mlp_method``: the embedding method's structure is built with random
    initialisation on a copy of the model (sizes only), then the Linear stage is checked on that copy with the
    original size as the reference of ``target_ratio``."""
    first, second = get_method(kw["method"]), get_method(kw["mlp_method"])
    emb_groups, layer_groups = split_groups(first, second, kw.get("targets"), kw.get("target_ratio"),
                                            kw["from_scratch"], kw["fold"])
    if not first.from_scratch:
        return  # no cheap way to know the embedding stage's size before it runs: checked when it runs
    shell = copy.deepcopy(model)
    original = model_size(shell)["total"]["bytes"]
    common = dict(include=kw.get("include", ()), exclude=kw.get("exclude", ()), options=kw["options"])
    compress(shell, first.name, targets=emb_groups, embedding_rank=kw.get("embedding_rank"), from_scratch=True,
             **common)
    plan = _Plan(shell, second.name, layer_groups, common["include"], common["exclude"],
                 kw.get("code_dtype", "float32"), kw.get("calibration", "oneshot"), kw.get("correction", "none"),
                 kw.get("allocator", "variance"), kw.get("energy"), kw.get("target_ratio"), False, False,
                 kw["options"])
    if kw.get("target_ratio") is not None:
        _check_budget(shell, plan, kw["target_ratio"], original)


def _check_budget(model: nn.Module, plan: _Plan, target_ratio: float, reference_bytes: int) -> None:
    """Raise when even the smallest ranks of the plan's layers, plus everything they do not touch, exceed the
    budget ``reference_bytes / target_ratio``."""
    budget = int(reference_bytes / target_ratio)
    fixed = _fixed_parts(model, plan.active)
    layers = plan.budget_layers(None, None)
    minimum = minimum_bytes(layers) + sum(fixed.values())
    if minimum > budget:
        raise ValueError(unreachable_message(target_ratio, reference_bytes, budget, minimum,
                                             {repr(l.name): l.bytes_of(l.min_ranks) for l in layers}, fixed))
