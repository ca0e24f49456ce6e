"""Config validation before any work starts: wrong types, impossible values and contradictory settings.

Hydra already refuses unknown keys (``Key 'foo' is not in struct``) and unknown config-group options. What it cannot
see is a value of the wrong type or range, or two settings that contradict each other; without this check such a
mistake surfaces as a traceback deep inside Lightning or, worse, after hours of base training (a bad fine-tune
setting is only read once the base model is trained). ``validate`` runs first in ``lowrank-ctr-train`` and
``lowrank-ctr-compress`` and reports every problem at once, each naming the key and the fix.
"""

from __future__ import annotations

from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from lowrank_ctr.allocator import MODES as MALLOC_MODES
from lowrank_ctr.config import UserError
from lowrank_ctr.optim import config_problems as optimizer_problems
from lowrank_ctr.precision import precision_problem

Check = Callable[[Any], str | None]  # None if the value is fine, else what it must be


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(minimum: int | None = None, optional: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if v is None and optional:
            return None
        if not _is_int(v) or (minimum is not None and v < minimum):
            what = "an integer" + (f" >= {minimum}" if minimum is not None else "")
            return what + (" or null" if optional else "")
        return None
    return check


def number(low: float | None = None, high: float | None = None, low_open: bool = False, optional: bool = False
           ) -> Check:
    def check(v: Any) -> str | None:
        if v is None and optional:
            return None
        bad = not _is_number(v) or (low is not None and (v <= low if low_open else v < low)) or \
            (high is not None and v > high)
        if bad:
            parts = [f"{'>' if low_open else '>='} {low}"] if low is not None else []
            parts += [f"<= {high}"] if high is not None else []
            return "a number" + (" " + " and ".join(parts) if parts else "") + (" or null" if optional else "")
        return None
    return check


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def choice(*options: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in options else "one of " + ", ".join(options)
    return check


def rank(v: Any) -> str | None:
    if v is None or (_is_int(v) and v >= 1) or (isinstance(v, float) and (0 < v <= 1 or v.is_integer() and v > 1)):
        return None
    return "an integer rank >= 1, a float in (0, 1] (a share of the full rank), or null"


RULES: dict[str, Check] = {
    "seed": integer(),
    "threads": integer(1, optional=True),
    "malloc": choice(*MALLOC_MODES),
    "progress_bar": boolean,
    "bench": boolean,
    "bench_int8": boolean,
    "embedding_l2": number(0.0),
    "early_stopping_patience": integer(0, optional=True),
    "optimizer.lr": number(0.0, low_open=True),
    "trainer.max_epochs": integer(-1),
    "trainer.min_epochs": integer(0, optional=True),
    "data.batch_size": integer(1),
    "data.eval_batch_size": integer(1, optional=True),
    "data.num_workers": integer(0),
    "data.shuffle_buffer": integer(0),
    "data.min_count": integer(1),
    "data.rows": integer(1),
    "model.embedding_dim": integer(1),
    "compression.embedding_rank": rank,
    "compression.mlp_rank": rank,
    "compression.other_rank": rank,
    "compression.energy": number(0.0, 1.0, low_open=True, optional=True),
    "compression.target_ratio": number(1.0, low_open=True, optional=True),
    "compression.calibration_batches": integer(1),
    "compression.finetune_epochs": integer(0),
    "compression.finetune_lr": number(0.0, low_open=True),
    "compression.fold": boolean,
    "compression.control": boolean,
    "compression.code_dtype": choice("float32", "int8"),
    "compression.calibration": choice("oneshot", "sequential"),
    "compression.correction": choice("none", "lstsq"),
    "compression.allocator": choice("variance", "loss"),
    "compression.from_scratch": boolean,
    "compression.distill": number(0.0, 1.0),
    "compression.temperature": number(0.0, low_open=True),
    "compression.warmup": number(0.0, 1.0),
    "compression.freeze_codes": boolean,
    "compression.val_check_interval": number(0.0, low_open=True),
    "trainer.val_check_interval": number(0.0, low_open=True, optional=True),
}
GROUPS = ("embedding", "mlp", "other")


def _get(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    """(present, value): keys a config does not have are not checked (e.g. data.rows outside data=synthetic)."""
    missing = object()
    value = OmegaConf.select(cfg, key, default=missing, throw_on_missing=False)
    return (value is not missing), (None if value is missing else value)


def _fmt(v: Any) -> str:
    return "null" if v is None else repr(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


def problems(cfg: DictConfig) -> list[str]:
    """Every problem of a resolved job config, one line each naming the key."""
    out = []
    for key, check in RULES.items():
        present, value = _get(cfg, key)
        if present:
            need = check(value)
            if need:
                out.append(f"{key}={_fmt(value)} must be {need}")
    if out:  # the contradictions below assume well-typed values
        return out
    out += _compression_conflicts(cfg)
    out += _trainer_conflicts(cfg)
    out += _loader_conflicts(cfg)
    out += optimizer_problems(cfg)  # row-wise optimizer settings (lowrank_ctr.optim)
    out += _data_problems(cfg)
    precision = OmegaConf.select(cfg, "trainer.precision")
    if precision is not None:
        out += [p for p in [precision_problem(precision, OmegaConf.select(cfg, "trainer.accelerator"))] if p]
    return out


def _data_problems(cfg: DictConfig) -> list[str]:
    """The data format's own checks (data/formats/: required keys, types, value ranges of its options)."""
    from lowrank_ctr.data.formats import REGISTRY

    data = cfg.get("data")
    if data is None or data.get("format") not in REGISTRY:
        return []  # no data config yet (compress fills it from the checkpoint), or preparation names the format
    return REGISTRY[data.format].validate(OmegaConf.to_container(data, resolve=True))


def _compression_conflicts(cfg: DictConfig) -> list[str]:
    """Contradictions between compression keys; what a method itself requires comes from its registry entry."""
    comp = cfg.get("compression")
    if comp is None or comp.get("method", "none") == "none":
        return []
    found = _two_stage_conflicts(comp) if comp.get("mlp_method") not in (None, "none") else _method_conflicts(comp)
    return found + _stage_conflicts(comp)


def _stage_conflicts(comp: DictConfig) -> list[str]:
    """The run's stages around the method (control, caches): checked once, whatever the method stages are."""
    out = []
    if comp.get("control_cache") and not comp.get("control"):
        out.append(f"compression.control_cache={_fmt(comp.control_cache)} shares the control's result across runs, "
                   "but compression.control=false: set compression.control=true or control_cache=null")
    if comp.get("scratch_cache") and not comp.get("from_scratch"):
        out.append(f"compression.scratch_cache={_fmt(comp.scratch_cache)} shares a from-scratch training across "
                   "runs, but compression.from_scratch=false: set compression.from_scratch=true or scratch_cache=null")
    if comp.get("control") and int(comp.get("finetune_epochs", 1)) == 0:
        out.append("compression.control=true fine-tunes the base for compression.finetune_epochs as a baseline, "
                   "but compression.finetune_epochs=0: set finetune_epochs >= 1 or control=false")
    return out


def _two_stage_conflicts(comp: DictConfig) -> list[str]:
    """``method`` on the embeddings + ``mlp_method`` on the Linears: the pair itself, then each stage checked as
    the single-method config it runs as."""
    from lowrank_ctr.compression.api import split_groups
    from lowrank_ctr.compression.methods import METHODS

    names = {"method": str(comp.method), "mlp_method": str(comp.mlp_method)}
    unknown = [f"compression.{k}={v!r} is not a known method; choose one of {list(METHODS)}"
               for k, v in names.items() if v not in METHODS]
    if unknown:
        return unknown
    targets = comp.get("targets")
    try:
        emb_groups, layer_groups = split_groups(METHODS[names["method"]], METHODS[names["mlp_method"]],
                                                None if targets is None else list(targets), comp.get("target_ratio"),
                                                bool(comp.get("from_scratch")), bool(comp.get("fold")))
    except ValueError as e:
        return [str(e)]
    plain = OmegaConf.to_container(comp, resolve=True)
    embedding_stage = {**plain, "targets": emb_groups, "target_ratio": None, "energy": None, "mlp_rank": None,
                       "other_rank": None, "code_dtype": "float32", "allocator": "variance", "mlp_method": None}
    linear_stage = {**plain, "method": names["mlp_method"], "targets": layer_groups, "embedding_rank": None,
                    "mlp_method": None, "from_scratch": False}  # the Linear stage calibrates the trained model
    found = _method_conflicts(OmegaConf.create(embedding_stage)) + _method_conflicts(OmegaConf.create(linear_stage))
    return list(dict.fromkeys(found))


def _method_conflicts(comp: DictConfig) -> list[str]:
    """The checks of a one-method ``compression`` config."""
    from lowrank_ctr.compression.methods import METHODS

    name = str(comp.method)
    if name not in METHODS:
        return [f"compression.method={name!r} is not a known method; choose one of {list(METHODS)}"]
    method = METHODS[name]
    out = []
    for key, check in method.options.items():
        need = check(comp.get(key))
        if need:
            out.append(f"compression.{key}={_fmt(comp.get(key))} must be {need} for compression={name}")
    energy, ratio = comp.get("energy"), comp.get("target_ratio")
    if not method.low_rank:
        for key, value in (("energy", energy), ("target_ratio", ratio)):
            if value is not None:
                out.append(f"compression.{key}={_fmt(value)} chooses low ranks, which compression={name} does not "
                           f"have: use compression=afm or svd, or set compression.{key}=null")
        if comp.get("code_dtype", "float32") != "float32":
            out.append(f"compression.code_dtype={_fmt(comp.code_dtype)} stores low-rank codes, which compression={name} "
                       "does not have: use compression=afm or svd, or code_dtype=float32")
    if energy is not None and ratio is not None:
        out.append(f"compression.energy={_fmt(energy)} and compression.target_ratio={_fmt(ratio)} both choose the "
                   "ranks (target_ratio allocates them from the spectra and ignores energy): set one to null")
    targets = comp.get("targets")
    groups = list(targets) if targets is not None else None
    unknown = [g for g in (groups or []) if g not in GROUPS]
    if unknown:
        out.append(f"compression.targets={_fmt(list(groups))}: unknown group(s) {unknown}; choose from {list(GROUPS)}")
    elif groups is not None and any(g not in method.groups for g in groups):
        out.append(f"compression.targets={_fmt(list(groups))}: compression={name} compresses {list(method.groups)} "
                   f"only; use compression.targets={_fmt(list(method.groups))}")
    active = groups if groups is not None else list(method.targets_for(ratio))
    ranks = {g: comp.get(f"{g}_rank") for g in active if g in GROUPS}  # the target groups' fixed ranks (or None)
    fixed = [f"compression.{g}_rank={_fmt(r)}" for g, r in ranks.items() if r is not None]
    missing = [g for g, r in ranks.items() if r is None]
    if method.low_rank and ratio is not None and fixed:
        out.append(f"{', '.join(fixed)} and compression.target_ratio={_fmt(ratio)} both choose the ranks "
                   f"(the budget allocates every rank): for fixed ranks set compression.target_ratio=null, for "
                   f"the budget set the rank(s) to null")
    if method.low_rank and ratio is None and energy is None and missing:
        out.append(f"no rank policy for target group(s) {missing} of compression={name}: set "
                   f"{', '.join(f'compression.{g}_rank' for g in missing)}, compression.energy or "
                   f"compression.target_ratio, or leave the group(s) out of compression.targets")
    if method.low_rank and energy is not None and ratio is None and fixed and not missing:
        out.append(f"compression.energy={_fmt(energy)} has no effect: every target group has a fixed rank "
                   f"({', '.join(fixed)}); set the ranks of the groups energy should choose to null")
    out += method.problems(comp)
    # allocator=loss without a budget is simply unused (afm's default); with a method that has no calibration
    # pass there is no gradient statistic to weigh components by
    if comp.get("allocator", "variance") == "loss" and not (method.low_rank and method.needs_calibration):
        out.append(f"compression.allocator=loss weighs output components by their loss impact, measured in the "
                   f"calibration pass of compression=afm; compression={name} has none: use "
                   f"compression.allocator=variance")
    if comp.get("fold"):
        if not method.low_rank:
            out.append(f"compression.fold=true folds an SVD/AFM embedding projection; compression={name} has none")
        elif "embedding" not in active:
            out.append("compression.fold=true folds the low-rank embedding into the Linears that read it: add "
                       "'embedding' to compression.targets")
    if comp.get("from_scratch") and not method.from_scratch:
        able = [n for n, m in METHODS.items() if m.from_scratch]
        out.append(f"compression.from_scratch=true trains the compressed structure from random initialisation; "
                   f"compression={name} cannot (methods that can: {able})")
    return out


def _loader_conflicts(cfg: DictConfig) -> list[str]:
    in_memory, workers = OmegaConf.select(cfg, "data.in_memory"), OmegaConf.select(cfg, "data.num_workers")
    if in_memory and _is_int(workers) and workers > 0:
        return [f"data.in_memory={in_memory} serves batches from tensors this process holds; "
                f"data.num_workers={workers} would copy them into every worker: set data.num_workers=0"]
    return []


def _trainer_conflicts(cfg: DictConfig) -> list[str]:
    accelerator = OmegaConf.select(cfg, "trainer.accelerator")
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            return [f"trainer.accelerator={accelerator} (trainer=gpu/ddp) but PyTorch sees no CUDA GPU "
                    f"(torch {torch.__version__}): use trainer=cpu, or install the CUDA build of torch"]
    max_epochs, min_epochs = OmegaConf.select(cfg, "trainer.max_epochs"), OmegaConf.select(cfg, "trainer.min_epochs")
    if _is_int(max_epochs) and _is_int(min_epochs) and max_epochs >= 0 and min_epochs > max_epochs:
        return [f"trainer.min_epochs={min_epochs} is more than trainer.max_epochs={max_epochs}"]
    return []


def validate(cfg: DictConfig) -> None:
    found = problems(cfg)
    if len(found) == 1:
        raise UserError(f"config: {found[0]}")
    if found:
        raise UserError("config has {} problems:\n  ".format(len(found)) + "\n  ".join(found))
