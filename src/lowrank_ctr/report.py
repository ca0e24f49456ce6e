"""``lowrank-ctr-report DIR... [--out OUT]``: aggregate the ``results.json`` of many runs into tables and plots.

Every ``results.json`` below the given directories is one row (a run of ``lowrank-ctr-train`` or one job of a
Hydra multirun); a Hydra job directory (``.hydra/config.yaml``) without one is a failed row too, so a crashed job
never silently disappears from a comparison. Directories are searched whatever their name (a run may be called
``wandb`` or ``checkpoints``); a ``results.json`` that is not a lowrank-ctr record is counted, named and left out.
A metric that is undefined in a run (``null`` in results.json, e.g. the AUC of a one-class test split) reads
``undefined`` in every table and makes its group's mean undefined; it is never shown as a number. Writes ``OUT/results.csv`` (one row per run, raw numbers),
``OUT/grouped.csv`` (seeds aggregated), ``OUT/results.md``, a self-contained ``OUT/report.html`` and PNG plots.

The loading functions (:func:`load_results`) are what the dashboard notebook uses too.
"""

from __future__ import annotations

import argparse
import base64
import functools
import html
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from lowrank_ctr.pipeline import results as R  # the results schema: file name and every key, spelled once there
from lowrank_ctr.pipeline.results import RESULTS_FILE

HYDRA_CONFIG = Path(".hydra") / "config.yaml"
BATCH_SIZES: tuple[int, ...] = R.BENCH_BATCH_SIZES
#: directories never searched: version control and Python caches. Everything else is searched whatever its name, so
#: a run called ``wandb`` or ``checkpoints`` is found; what the project and its loggers write inside a run
#: (checkpoints/, stages/, wandb/, csv/, .hydra/, report/) holds no results.json, so searching it finds nothing.
NEVER_SEARCHED = frozenset({".git", "__pycache__"})
#: keys every results.json that lowrank-ctr writes has at least one of (ok, failed and older records)
RECORD_KEYS: tuple[str, ...] = (R.KEY_STATUS, R.KEY_TEST_AUC, R.KEY_CONFIG_HASH)

#: columns of results.csv, in order (one row per run; failed runs included)
RUN_COLUMNS: list[str] = [
    "run_dir", "status", "error", "data", "model", "method", "targets", "ranks", "setting", "seed",
    "params", "bytes", "base_params", "base_bytes", "ratio", "ratio_embedding", "ratio_mlp",
    "base_auc", "base_logloss", "before_ft_auc", "before_ft_logloss", "auc", "logloss",
    "delta_auc", "delta_auc_before_ft", "delta_logloss", "control_auc", "control_logloss", "delta_auc_vs_control",
    "int8_auc", "delta_auc_int8", *[f"speedup@{b}" for b in BATCH_SIZES], "base_ms@4096", "latency_ms@4096",
    "speedup_int8@4096",
    "val_auc", "train_seconds", "compress_seconds", "base_epoch_seconds", "train_samples_per_s", "undefined",
]
#: what identifies one experimental setting; seeds of a setting are aggregated
GROUP_KEYS: list[str] = ["data", "model", "method", "targets", "setting"]
#: aggregated as mean and sample standard deviation (ddof=1) over the ok seeds of a group
STAT_COLUMNS: list[str] = ["auc", "base_auc", "before_ft_auc", "control_auc", "delta_auc", "delta_auc_before_ft",
                           "delta_auc_vs_control", "logloss", "int8_auc", "delta_auc_int8"]
#: aggregated as mean only
MEAN_COLUMNS: list[str] = ["ratio", "params", "bytes", "speedup@4096", "latency_ms@4096", "speedup_int8@4096",
                           "train_seconds"]
#: per-layer rows (from ``compress/layers``) used by the retained-energy plot; ``energy_curve`` is the cumulative
#: retained energy at ranks 1..full rank from the layer's stored spectrum (None when results.json has none)
LAYER_COLUMNS: list[str] = ["run_dir", "data", "model", "method", "setting", "seed", "name", "group",
                            "layer_method", "rank", "full_rank", "retained_energy", "params_before", "params_after",
                            "replaced", "note", "chosen_rank", "energy_curve"]
#: the per-layer rows a report writes beside results.csv (read back by ``--merge``)
LAYERS_FILE = "layers.csv"
#: the run-table column of each metric read from results.json (an undefined metric is null there)
METRIC_SOURCES: dict[str, str] = {
    "auc": R.KEY_TEST_AUC, "logloss": R.KEY_TEST_LOGLOSS, "base_auc": R.KEY_BASE_TEST_AUC,
    "base_logloss": R.KEY_BASE_TEST_LOGLOSS, "before_ft_auc": R.KEY_AUC_BEFORE_FINETUNE,
    "before_ft_logloss": R.KEY_LOGLOSS_BEFORE_FINETUNE, "control_auc": R.KEY_CONTROL_TEST_AUC,
    "control_logloss": R.KEY_CONTROL_TEST_LOGLOSS, "val_auc": R.KEY_VAL_AUC, "int8_auc": R.KEY_INT8_AUC,
}
#: derived columns and the columns they are computed from (undefined when one of those is undefined)
DERIVED_FROM: dict[str, tuple[str, ...]] = {
    "delta_auc": ("auc", "base_auc"), "delta_auc_before_ft": ("before_ft_auc", "base_auc"),
    "delta_logloss": ("logloss", "base_logloss"), "delta_auc_vs_control": ("auc", "control_auc"),
    "delta_auc_int8": ("int8_auc", "auc"),  # the same weights served with int8 Linears (bench_int8=true)
}
#: derived columns of opt-in measurements and the key a run that made the measurement writes (a run without it has
#: no value there, which is not an undefined one, even when its other part is undefined)
OPT_IN_SOURCES: dict[str, str] = {"delta_auc_int8": R.KEY_INT8_AUC}
UNDEFINED = "undefined"
#: text columns of results.csv (the rest are numbers); an earlier report's CSV is read back with these as strings
TEXT_COLUMNS: tuple[str, ...] = ("run_dir", "status", "error", "data", "model", "method", "targets", "ranks",
                                 "setting", "undefined")


class ReportError(ValueError):
    """A mistake the user can fix (bad directory, nothing to report); the message names the fix."""


# ----------------------------------------------------------------------------------------------- discovery

def _natural_key(path: Path) -> list[Any]:
    """Sort ``run/2`` before ``run/10`` (Hydra numbers jobs without padding)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _is_train_job(config_yaml: Path) -> bool:
    """A Hydra job of ``lowrank-ctr-train`` (``lowrank-ctr-prepare`` jobs have no model and are not runs)."""
    try:
        import yaml

        cfg = yaml.safe_load(config_yaml.read_text())
    except Exception:  # unreadable: still a job that did not finish, report it
        return True
    return isinstance(cfg, dict) and "model" in cfg


def find_run_dirs(roots: Sequence[str | Path]) -> list[Path]:
    """Directories below ``roots`` holding a ``results.json``, or a Hydra train job without one (a failed job).

    Every directory is searched whatever its name (only :data:`NEVER_SEARCHED` is not). Overlapping roots are
    deduplicated; the order is natural path order (``0, 1, ..., 10``).
    """
    found: dict[Path, Path] = {}
    for root in map(Path, roots):
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            is_run = RESULTS_FILE in filenames
            if not is_run and ".hydra" in dirnames and (here / HYDRA_CONFIG).is_file():
                is_run = _is_train_job(here / HYDRA_CONFIG)
            if is_run:
                found.setdefault(here.resolve(), here)
            dirnames[:] = sorted(d for d in dirnames if d not in NEVER_SEARCHED)
    return sorted(found.values(), key=_natural_key)


def not_a_record(run_dir: Path, rec: Mapping[str, Any]) -> str | None:
    """Why a results.json is not a lowrank-ctr run record (another tool's file of the same name), else None."""
    if rec.get(R.KEY_STATUS) == "failed" and "unreadable results.json" in str(rec.get(R.KEY_ERROR, "")):
        # unreadable: a row (failed) only where a Hydra train job says a run was meant to be here
        return None if (run_dir / HYDRA_CONFIG).is_file() else str(rec[R.KEY_ERROR])
    if not any(k in rec for k in RECORD_KEYS):
        return f"not a lowrank-ctr results.json (none of the keys {', '.join(RECORD_KEYS)})"
    return None


def find_wandb_offline_runs(roots: Sequence[str | Path]) -> list[Path]:
    """W&B offline run directories (``**/wandb/offline-run-*``), to upload later with ``wandb sync``."""
    runs: set[Path] = set()
    for root in map(Path, roots):
        if root.is_dir():
            runs.update(p for p in root.glob("**/wandb/offline-run-*") if p.is_dir())
    return sorted(runs, key=_natural_key)


def _hydra_job_record(run_dir: Path, error: str) -> dict[str, Any]:
    """What a job directory without results tells: its data, model, method and seed from ``.hydra/config.yaml``."""
    rec: dict[str, Any] = {R.KEY_STATUS: "failed", R.KEY_ERROR: error}
    cfg_path = run_dir / HYDRA_CONFIG
    if not cfg_path.is_file():
        return rec
    try:
        from omegaconf import OmegaConf

        import lowrank_ctr.config  # noqa: F401  (registers the project's resolvers used in the configs)

        cfg = OmegaConf.load(cfg_path)

        def pick(key: str) -> Any:
            value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
            if value is None:  # an interpolation we cannot resolve here (e.g. hydra's ${now:}): keep it raw
                raw = OmegaConf.to_container(cfg, resolve=False)
                for part in key.split("."):
                    raw = raw.get(part) if isinstance(raw, dict) else None
                value = raw
            return value

        for key, path in ((R.KEY_DATA, "data.name"), (R.KEY_MODEL, "model.name"), (R.KEY_SEED, "seed")):
            value = pick(path)
            if value is not None:
                rec[key] = value
        if "compression" in cfg:
            rec[R.KEY_CONFIG] = {"compression": OmegaConf.to_container(cfg.compression, resolve=False)}
    except Exception as exc:  # noqa: BLE001 - a broken config must not stop the report
        rec[R.KEY_ERROR] = f"{error}; .hydra/config.yaml unreadable ({type(exc).__name__}: {exc})"
    return rec


def load_record(run_dir: Path) -> dict[str, Any]:
    """The run's ``results.json`` as a dict (a failed record when missing or unreadable), plus ``run_dir``."""
    path = run_dir / RESULTS_FILE
    if not path.is_file():
        rec = _hydra_job_record(run_dir, "no results.json")
    else:
        try:
            rec = json.loads(path.read_text())
            if not isinstance(rec, dict):
                raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
        except (OSError, ValueError) as exc:
            rec = _hydra_job_record(run_dir, f"unreadable results.json ({exc})")
    rec[R.KEY_RUN_DIR] = str(run_dir)
    return rec


# ----------------------------------------------------------------------------------------------- tables

def _num(value: Any) -> float:
    """A float, NaN for anything missing or non-numeric (a failed run leaves holes, not crashes)."""
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _compression_config(rec: Mapping[str, Any]) -> dict[str, Any]:
    """The run's compression settings: ``config.compression`` overlaid with the policy compress() reported."""
    cfg = rec.get(R.KEY_CONFIG)
    comp = cfg.get("compression") if isinstance(cfg, Mapping) else None
    out = dict(comp) if isinstance(comp, Mapping) else {}
    policy = rec.get(R.KEY_POLICY)
    if isinstance(policy, Mapping):
        out.update(policy)
    return out


def _find_key(tree: Any, key: str) -> Any:
    """First value of ``key`` anywhere in a nested config dict (configs may nest the rank policy)."""
    if isinstance(tree, Mapping):
        if key in tree:
            return tree[key]
        for value in tree.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    return None


def _fmt_rank_values(values: Sequence[Any]) -> str:
    """``8`` when all equal, else ``min-max``; non-integer ranks (ratios of full rank) as written."""
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not nums:
        return "/".join(str(v) for v in values)
    lo, hi = min(nums), max(nums)
    return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"


def compact_ranks(rec: Mapping[str, Any]) -> str:
    """The chosen ranks in a few characters: per layer group from ``compress/layers`` (``embedding=8 mlp=4-16``),
    else per layer from ``compress/ranks``; ``""`` when the run chose no ranks (uncompressed, int8)."""
    layers = rec.get(R.KEY_LAYERS)
    if isinstance(layers, list) and layers:
        by_group: dict[str, list[Any]] = {}
        for layer in layers:
            if not isinstance(layer, Mapping) or not layer.get("replaced") or layer.get("rank") is None:
                continue
            ranks = layer.get("field_ranks") or [layer["rank"]]
            by_group.setdefault(str(layer.get("group", "?")), []).extend(ranks)
        if by_group:
            return " ".join(f"{g}={_fmt_rank_values(v)}" for g, v in by_group.items())
    ranks = rec.get(R.KEY_RANKS)
    if isinstance(ranks, Mapping) and ranks:
        return " ".join(f"{name}={_fmt_rank_values(r if isinstance(r, list) else [r])}"
                        for name, r in ranks.items() if r is not None)
    return ""


#: compression keys that make a different experiment at the same ranks / budget (a variant of the recipe)
#: (the recovery fine-tune's keys join them in _variant: pipeline.finetune.RECIPE_KEYS)
VARIANT_KEYS: tuple[str, ...] = ("code_dtype", "allocator", "calibration", "correction", "fold", "from_scratch",
                                "calibration_batches")


@functools.lru_cache(maxsize=None)  # a few YAML files per method, read once per report, not once per run
def _method_defaults(method: str) -> dict[str, Any]:
    """The shipped defaults of the method's ``conf/compression/`` file with everything its defaults list pulls in
    (``none.yaml`` first): a variant is named only where a run differs from them. A combined ``tt+afm`` reads its
    preset ``tt_afm.yaml`` when there is one, else the file of its first method (the one the run started from)."""
    from lowrank_ctr.compression.methods import method_parts
    from lowrank_ctr.config import CONF_DIR

    folder = Path(CONF_DIR) / "compression"
    preset = method.replace("+", "_")
    return _compression_yaml(folder, preset if (folder / f"{preset}.yaml").exists() else method_parts(method)[0])


def _compression_yaml(folder: Path, name: str) -> dict[str, Any]:
    """One ``conf/compression/NAME.yaml`` over the files its ``defaults`` list names (``_self_`` last)."""
    import yaml

    path = folder / f"{name}.yaml"
    if not path.exists():
        return {}
    raw = yaml.safe_load(path.read_text()) or {}
    out: dict[str, Any] = {}
    for parent in raw.get("defaults") or []:
        if isinstance(parent, str) and parent != "_self_":
            out.update(_compression_yaml(folder, parent))
    out.update({k: v for k, v in raw.items() if k != "defaults"})
    return out


def _variant(comp: Mapping[str, Any], method: str) -> list[str]:
    """``code_dtype=float32 collisions=5 from_scratch=true``: the recipe keys and the method's own options whose
    value is not the method's default. Without them, runs of different recipes would be averaged as one setting."""
    from lowrank_ctr.compression.methods import METHODS, method_parts
    from lowrank_ctr.pipeline.finetune import RECIPE_KEYS

    defaults = _method_defaults(method)
    parts = [METHODS[p] for p in method_parts(method) if p in METHODS]
    keys = [*VARIANT_KEYS, *RECIPE_KEYS.values(), *(k for m in parts for k in m.options)]
    if comp.get("target_ratio") is None:
        keys.remove("allocator")  # only a budget allocates
    if parts:
        from lowrank_ctr.compression.api import reads_calibration_batches

        setting = {**defaults, **{k: v for k, v in comp.items() if v is not None}}
        if not reads_calibration_batches(parts[-1], setting.get("allocator", "variance"),
                                         setting.get("calibration", "oneshot"), setting.get("correction", "none"),
                                         setting.get("fold", False),
                                         setting.get("from_scratch", False) and len(parts) == 1):  # a 2nd stage calibrates
            keys.remove("calibration_batches")  # e.g. SVD: no batch is read, their number changes nothing
    out = []
    for key in keys:
        value = comp.get(key)
        if value is not None and key in defaults and value != defaults[key]:
            out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return out


def _policy_setting(rec: Mapping[str, Any], method: str, ranks: str) -> str:
    """What the user asked for (so seeds group together even when a budget or energy policy picks other ranks):
    ``target_ratio=4``, ``energy=0.99 mlp_rank=8``, else the chosen ranks; then the recipe variant, if any."""
    comp = _compression_config(rec)
    return " ".join(filter(None, [_requested_ranks(rec, comp, method, ranks), *_variant(comp, method)]))


def _requested_ranks(rec: Mapping[str, Any], comp: Mapping[str, Any], method: str, ranks: str) -> str:
    from lowrank_ctr.compression.methods import method_parts

    parts = method_parts(method)
    if len(parts) > 1:  # tt+afm: the embedding method's rank, then what the Linear method was asked for
        asked = {g: _find_key(comp, f"{g}_rank") for g in ("mlp", "other")}
        linears = _requested_ranks(rec, {**comp, "embedding_rank": None}, parts[-1], "") \
            or " ".join(f"{g}_rank={r}" for g, r in asked.items() if r is not None)
        emb = _find_key(comp, "embedding_rank")  # qr has none: its collisions name the variant
        return " ".join(filter(None, [f"embedding_rank={emb}" if emb is not None else "", linears]))
    target_ratio = _find_key(comp, "target_ratio")  # the policy compress() reported, over the config
    if method in ("svd", "afm") and target_ratio is not None:
        return f"target_ratio={_num(target_ratio):g}"
    energy = _find_key(comp, "energy")
    if method in ("svd", "afm") and energy is not None:
        fixed = [f"{g}_rank={_find_key(comp, f'{g}_rank')}" for g in ("embedding", "mlp", "other")
                 if _find_key(comp, f"{g}_rank") is not None]
        return " ".join([f"energy={_num(energy):g}", *fixed])
    if ranks:
        return ranks
    if method not in ("none", "", "int8"):  # a failed job: the requested ranks from its config
        asked = [f"{g}_rank={_find_key(comp, f'{g}_rank')}" for g in ("embedding", "mlp", "other")
                 if _find_key(comp, f"{g}_rank") is not None]
        return " ".join(asked)
    return ""


def _configured_method(comp: Mapping[str, Any]) -> str | None:
    """The method name a run's config asks for, as a finished run records it: ``tt`` with ``mlp_method=afm`` is
    ``tt+afm`` (a run that failed before recording its method must join its setting's group, not ``tt``'s)."""
    method, second = comp.get("method"), comp.get("mlp_method")
    if method and second not in (None, "none", "") and method not in (None, "none"):
        return f"{method}+{second}"
    return method


def _configured_targets(comp: Mapping[str, Any]) -> Any:
    """The groups a run's config would have compressed, as a finished run records them: a run that failed before
    recording them (e.g. an unreachable budget) then groups with the runs of its setting that finished."""
    from lowrank_ctr.compression.api import planned_targets

    try:
        return planned_targets(comp)
    except (KeyError, ValueError, TypeError):  # an unknown method or a config that cannot run: as written
        return comp.get("targets")


@functools.lru_cache(maxsize=256)
def _training_record(results_json: str) -> Mapping[str, Any]:
    """The train/* keys of a base run's results.json (many compression runs share one base)."""
    try:
        rec = json.loads(Path(results_json).read_text())
    except (OSError, ValueError):
        return {}
    return {k: rec[k] for k in (R.KEY_TRAIN_SECONDS, R.KEY_TRAIN_EPOCHS) if k in rec} if isinstance(rec, dict) else {}


def base_epoch_seconds(rec: Mapping[str, Any]) -> float:
    """Seconds of one training epoch of the run's base, on the machine that trained it: from the run's own
    ``train/*`` keys when it trained its base, else from the results.json of the run that wrote ``base/checkpoint``
    (``<run>/checkpoints/*.ckpt``). NaN when neither is there. It is what a compression time is compared with, and
    it travels with the run's row, so rows merged from another machine keep their own machine's figure."""
    source: Mapping[str, Any] = rec
    if R.KEY_TRAIN_EPOCHS not in rec:
        ckpt = rec.get(R.KEY_BASE_CHECKPOINT)
        if not ckpt:
            return math.nan
        source = _training_record(str(Path(str(ckpt)).parent.parent / RESULTS_FILE))
    seconds, epochs = _num(source.get(R.KEY_TRAIN_SECONDS)), _num(source.get(R.KEY_TRAIN_EPOCHS))
    return seconds / epochs if epochs > 0 and seconds > 0 else math.nan


def run_row(rec: Mapping[str, Any]) -> dict[str, Any]:
    """One results.csv row from one run record (the formulas for ratio and the deltas live here)."""
    status = str(rec.get(R.KEY_STATUS) or ("ok" if R.KEY_TEST_AUC in rec else "failed"))
    comp = _compression_config(rec)
    method = str(rec.get(R.KEY_METHOD) or _configured_method(comp) or "none")
    targets = rec.get(R.KEY_TARGETS) if R.KEY_TARGETS in rec else _configured_targets(comp)
    if method == "none":
        targets = []
    targets_str = "+".join(map(str, targets)) if isinstance(targets, (list, tuple)) else str(targets or "")
    ranks = compact_ranks(rec)

    auc, logloss = _num(rec.get(R.KEY_TEST_AUC)), _num(rec.get(R.KEY_TEST_LOGLOSS))
    params = _num(rec.get(R.KEY_COMPRESS_PARAMS, rec.get(R.KEY_PARAMS)))
    nbytes = _num(rec.get(R.KEY_COMPRESS_BYTES, rec.get(R.KEY_BYTES)))
    # an uncompressed run is its own base (ratio 1, deltas 0): the reference point of every plot
    own = method == "none"
    base_auc = _num(rec.get(R.KEY_BASE_TEST_AUC, auc if own else None))
    base_logloss = _num(rec.get(R.KEY_BASE_TEST_LOGLOSS, logloss if own else None))
    base_params = _num(rec.get(R.KEY_BASE_PARAMS, params if own else None))
    base_bytes = _num(rec.get(R.KEY_BASE_BYTES, nbytes if own else None))
    ratio = _num(rec.get(R.KEY_RATIO))
    if math.isnan(ratio) and status == "ok" and base_bytes > 0 and nbytes > 0:
        ratio = base_bytes / nbytes
    before_auc = _num(rec.get(R.KEY_AUC_BEFORE_FINETUNE))
    before_logloss = _num(rec.get(R.KEY_LOGLOSS_BEFORE_FINETUNE))
    control_auc = _num(rec.get(R.KEY_CONTROL_TEST_AUC))
    int8_auc = _num(rec.get(R.KEY_INT8_AUC))

    row: dict[str, Any] = {
        "run_dir": rec.get(R.KEY_RUN_DIR, ""), "status": status, "error": str(rec.get(R.KEY_ERROR) or ""),
        "data": str(rec.get(R.KEY_DATA) or ""), "model": str(rec.get(R.KEY_MODEL) or ""), "method": method,
        "targets": targets_str, "ranks": ranks, "setting": _policy_setting(rec, method, ranks),
        "seed": rec.get(R.KEY_SEED), "params": params, "bytes": nbytes, "base_params": base_params,
        "base_bytes": base_bytes, "ratio": ratio,
        "ratio_embedding": _num(rec.get(R.group_ratio_key("embedding"))),
        "ratio_mlp": _num(rec.get(R.group_ratio_key("mlp"))),
        "base_auc": base_auc, "base_logloss": base_logloss, "before_ft_auc": before_auc,
        "before_ft_logloss": before_logloss, "auc": auc, "logloss": logloss,
        "delta_auc": auc - base_auc, "delta_auc_before_ft": before_auc - base_auc,
        "delta_logloss": logloss - base_logloss, "control_auc": control_auc,
        "control_logloss": _num(rec.get(R.KEY_CONTROL_TEST_LOGLOSS)),
        "delta_auc_vs_control": auc - control_auc,
        "int8_auc": int8_auc, "delta_auc_int8": int8_auc - auc,
        "speedup_int8@4096": _num(rec.get(R.bench_key("int8_speedup", 4096))),
        "base_ms@4096": _num(rec.get(R.bench_key("base_ms", 4096))),
        "latency_ms@4096": _num(rec.get(R.bench_key("compressed_ms", 4096), rec.get(R.bench_key("base_ms", 4096)))),
        "val_auc": _num(rec.get(R.KEY_VAL_AUC)), "train_seconds": _num(rec.get(R.KEY_TRAIN_SECONDS)),
        "compress_seconds": _num(rec.get(R.KEY_COMPRESS_SECONDS)), "base_epoch_seconds": base_epoch_seconds(rec),
        "train_samples_per_s": _num(rec.get(R.KEY_TRAIN_SAMPLES_PER_S)),
    }
    for b in BATCH_SIZES:
        row[f"speedup@{b}"] = _num(rec.get(R.bench_key("speedup", b)))
    row["undefined"] = " ".join(undefined_columns(rec, own)) if status == "ok" else ""
    return row


def undefined_columns(rec: Mapping[str, Any], own_base: bool = False) -> list[str]:
    """Run-table columns whose metric is undefined: null in results.json (present, not missing), or derived from one.

    ``own_base``: an uncompressed run is its own base, so an undefined ``test/auc`` makes ``base_auc`` undefined.
    """
    undefined = {col for col, key in METRIC_SOURCES.items() if key in rec and _is_undefined(rec[key])}
    if own_base:
        undefined |= {base for base, own in (("base_auc", "auc"), ("base_logloss", "logloss"))
                      if own in undefined and METRIC_SOURCES[base] not in rec}
    undefined |= {col for col, parts in DERIVED_FROM.items() if undefined.intersection(parts)}
    undefined -= {col for col, key in OPT_IN_SOURCES.items() if key not in rec}  # not measured: missing, not undefined
    return [c for c in RUN_COLUMNS if c in undefined]


def _is_undefined(value: Any) -> bool:
    """null (or a non-finite number) in results.json: the metric exists for this run but has no value."""
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def runs_table(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per run with :data:`RUN_COLUMNS` (missing numbers are NaN)."""
    df = pd.DataFrame([run_row(r) for r in records], columns=RUN_COLUMNS)
    df["seed"] = pd.to_numeric(df["seed"], errors="coerce").astype("Int64")
    return df


def cumulative_energy(spectrum: Sequence[float]) -> list[float]:
    """Retained energy at ranks 1..len(spectrum): the cumulative share of a descending spectrum (monotone, ends at 1).

    Negative entries (round-off of an eigen-solver) count as 0; an all-zero spectrum keeps everything at any rank.
    """
    values = np.clip(np.asarray([_num(v) for v in spectrum], dtype=float), 0.0, None)
    if values.size == 0 or not np.isfinite(values).all():
        return []
    values = np.sort(values)[::-1]
    total = values.sum()
    if total <= 0:
        return [1.0] * values.size
    return (np.cumsum(values) / total).tolist()


def pooled_cumulative_energy(spectra: Sequence[Sequence[float]]) -> list[float]:
    """Retained energy of a whole embedding table when every field keeps rank k, for k = 1..max field rank:
    ``sum_f kept_f(k) / sum_f total_f`` (a field with fewer components keeps all of them), as compress() reports
    ``retained_energy`` of a table. Monotone by construction."""
    fields = [np.sort(np.clip(np.asarray([_num(v) for v in s], dtype=float), 0.0, None))[::-1] for s in spectra]
    fields = [f for f in fields if f.size]
    if not fields or not all(np.isfinite(f).all() for f in fields):
        return []
    width = max(f.size for f in fields)
    kept = np.zeros(width)
    for f in fields:
        c = np.cumsum(f)
        kept += np.concatenate([c, np.full(width - c.size, c[-1])])
    total = kept[-1]
    return (kept / total).tolist() if total > 0 else [1.0] * width


def layer_energy_curve(layer: Mapping[str, Any]) -> list[float] | None:
    """The cumulative energy curve of one ``compress/layers`` entry from its stored ``spectrum`` (a Linear, or a
    whole table) or ``field_spectra`` (an embedding table, one spectrum per field); None when neither is stored."""
    if isinstance(layer.get("spectrum"), list) and layer["spectrum"]:
        return cumulative_energy(layer["spectrum"]) or None
    spectra = layer.get("field_spectra")
    if isinstance(spectra, list) and spectra and all(isinstance(f, list) for f in spectra):
        return pooled_cumulative_energy(spectra) or None
    return None


def _chosen_rank(layer: Mapping[str, Any]) -> float:
    """The rank a layer kept; a table with per-field ranks: their mean (where its kept energy is plotted)."""
    ranks = layer.get("field_ranks")
    if isinstance(ranks, list) and ranks:
        values = [_num(r) for r in ranks]
        return float(np.mean(values)) if all(math.isfinite(v) for v in values) else math.nan
    return _num(layer.get("rank"))


def layers_table(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per (ok run, compressed layer) from ``compress/layers``: rank, full rank, retained energy, and the
    cumulative energy curve of the layer's stored spectrum (``energy_curve``)."""
    rows = []
    for rec in records:
        layers = rec.get(R.KEY_LAYERS)
        if not isinstance(layers, list) or rec.get(R.KEY_STATUS, "ok") != "ok":
            continue
        base = run_row(rec)
        for layer in layers:
            if not isinstance(layer, Mapping):
                continue
            rows.append({**{k: base[k] for k in ("run_dir", "data", "model", "method", "setting", "seed")},
                         "name": layer.get("name"), "group": layer.get("group"),
                         "layer_method": layer.get("method"), "rank": _num(layer.get("rank")),
                         "full_rank": _num(layer.get("full_rank")),
                         "retained_energy": _num(layer.get("retained_energy")),
                         "params_before": _num(layer.get("params_before")),
                         "params_after": _num(layer.get("params_after")),
                         "replaced": bool(layer.get("replaced")), "note": layer.get("note") or "",
                         "chosen_rank": _chosen_rank(layer), "energy_curve": layer_energy_curve(layer)})
    return pd.DataFrame(rows, columns=LAYER_COLUMNS)


#: colours of methods the registry does not know (results of a method since removed), assigned in first-seen order
_UNREGISTERED_COLORS = ["#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#8c564b", "#9467bd"]
_unregistered: dict[str, str] = {}


def _registry() -> Mapping[str, Any]:
    """The compression-method registry: its order is the order of reports, and each method's label and colour are
    the ones every table and plot uses (one place: ``lowrank_ctr/compression/methods/``)."""
    from lowrank_ctr.compression.methods import METHODS

    return METHODS


def method_rank(method: str) -> int:
    """Position of a method in reports (registration order); unregistered methods after all registered ones."""
    names = list(_registry())
    return names.index(method) if method in names else len(names)


def method_label(method: str) -> str:
    """How plots name a method (``AFM``, ``SVD``, ``base``, ``TT+AFM``); its name when the registry does not know
    it."""
    from lowrank_ctr.compression.methods import method_parts

    return "+".join(str(getattr(_registry().get(p), "label", "") or p) for p in method_parts(method))


def method_color(method: str) -> str:
    """A method's colour, the same in every plot."""
    registered = _registry().get(method)
    if registered is not None and getattr(registered, "color", None):
        return str(registered.color)
    if method not in _unregistered:
        _unregistered[method] = _UNREGISTERED_COLORS[len(_unregistered) % len(_UNREGISTERED_COLORS)]
    return _unregistered[method]



def grouped_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Seeds aggregated per :data:`GROUP_KEYS`: ``n`` ok seeds, ``n_failed``, mean and std (ddof=1, NaN for one
    seed) of :data:`STAT_COLUMNS`, mean of :data:`MEAN_COLUMNS`. Failed runs count in ``n_failed`` only."""
    columns = [*GROUP_KEYS, "n", "n_failed", "seeds",
               *[f"{c}_{s}" for c in STAT_COLUMNS for s in ("mean", "std")], *[f"{c}_mean" for c in MEAN_COLUMNS],
               "undefined"]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    keyed = runs.assign(**{k: runs[k].fillna("").astype(str) for k in GROUP_KEYS})
    out = []
    for key, g in keyed.groupby(GROUP_KEYS, sort=False, dropna=False):
        ok = g[g["status"] == "ok"]
        row: dict[str, Any] = dict(zip(GROUP_KEYS, key))
        row["n"] = len(ok)
        row["n_failed"] = len(g) - len(ok)
        row["seeds"] = " ".join(str(s) for s in sorted(ok["seed"].dropna().unique()))
        # a statistic over seeds where one seed's metric is undefined is undefined too (not a mean of the others)
        undefined = {c for cell in ok["undefined"].fillna("") for c in str(cell).split()}
        for c in STAT_COLUMNS:
            values = ok[c].astype(float)
            row[f"{c}_mean"] = math.nan if c in undefined else values.mean()
            row[f"{c}_std"] = math.nan if c in undefined else values.std(ddof=1)
        for c in MEAN_COLUMNS:
            row[f"{c}_mean"] = math.nan if c in undefined else ok[c].astype(float).mean()
        row["undefined"] = " ".join(c for c in [*STAT_COLUMNS, *MEAN_COLUMNS] if c in undefined)
        out.append(row)
    df = pd.DataFrame(out, columns=columns)
    order = df["method"].map(method_rank)
    return (df.assign(_m=order).sort_values(["data", "model", "_m", "targets", "ratio_mean", "setting"],
                                            na_position="last", kind="stable")
            .drop(columns="_m").reset_index(drop=True))


@dataclass
class Results:
    """Everything the report and the dashboard show, loaded once."""

    roots: list[Path]
    records: list[dict[str, Any]]
    runs: pd.DataFrame
    layers: pd.DataFrame
    #: results.json files found below the roots (each counted once), and those left out with the reason
    results_found: int = 0
    ignored: list[tuple[Path, str]] = field(default_factory=list)
    #: rows taken from earlier reports' results.csv (``--merge``): per file, how many were kept and whether their
    #: per-layer rows came too (from the layers.csv beside it; an older report wrote none)
    merged: list[tuple[Path, int, bool]] = field(default_factory=list)
    grouped: pd.DataFrame = field(init=False)

    def __post_init__(self) -> None:
        self.grouped = grouped_table(self.runs)

    @property
    def n_ok(self) -> int:
        return int((self.runs["status"] == "ok").sum())

    @property
    def n_failed(self) -> int:
        return len(self.runs) - self.n_ok

    @property
    def results_used(self) -> int:
        return self.results_found - len(self.ignored)

    @property
    def jobs_without_results(self) -> int:
        """Hydra train jobs that wrote no results.json (each is a failed row)."""
        return len(self.runs) - self.results_used - sum(n for _, n, _ in self.merged)

    def counts(self) -> str:
        """``2 runs (2 ok, 0 failed)``: what the report is made of."""
        return f"{plural(len(self.runs), 'run')} ({self.n_ok} ok, {self.n_failed} failed)"

    def sources(self) -> str:
        """How the runs were found: results.json found / used, and jobs that wrote none."""
        text = (f"{plural(self.results_found, 'results.json', 'results.json')} found, {self.results_used} used"
                + (f" ({len(self.ignored)} ignored: not lowrank-ctr results)" if self.ignored else ""))
        if self.jobs_without_results:
            text += (f"; {plural(self.jobs_without_results, 'Hydra job')} without results.json "
                     f"counted as failed")
        for path, n, with_layers in self.merged:
            text += f"; {plural(n, 'row')} from {path}"
            if n and not with_layers:
                text += f" (no {LAYERS_FILE} beside it: the retained-energy plot leaves those runs out)"
        return text

    def undefined_auc_runs(self) -> int:
        ok = self.runs[self.runs["status"] == "ok"]
        return int(ok["undefined"].fillna("").str.split().map(lambda cols: "auc" in cols).sum())


def plural(n: int, singular: str, plural_form: str | None = None) -> str:
    """``1 run``, ``2 runs``."""
    return f"{n} {singular if n == 1 else (plural_form or singular + 's')}"


def check_dirs(dirs: Sequence[str | Path]) -> list[Path]:
    """The directories as paths; a missing one or a file is a :class:`ReportError` naming it."""
    paths = []
    for d in dirs:
        p = Path(d).expanduser()
        if not p.exists():
            raise ReportError(f"results directory {str(d)!r} does not exist: pass the directory of a run or a "
                              "multirun (e.g. outputs/multiruns/<time>) that holds results.json files")
        if not p.is_dir():
            raise ReportError(f"{str(d)!r} is not a directory: pass the directory that holds results.json "
                              "(or a parent of many)")
        paths.append(p)
    return paths


def _read_earlier_csv(path: Path, what: str, text: Sequence[str], numeric: Sequence[str], required: Sequence[str],
                      fix: str) -> pd.DataFrame:
    """A CSV an earlier report wrote: ``text`` columns as str (an empty cell stays ''), ``numeric`` columns NaN
    where empty. One ReportError starting with ``what`` and ending with ``fix`` when the file is not a readable
    CSV or lacks a ``required`` column."""
    try:
        df = pd.read_csv(path, dtype={c: str for c in text}, keep_default_na=False,
                         na_values={c: ["", "nan", "NaN"] for c in numeric})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ReportError(f"{what} is not a readable CSV ({exc}); {fix}") from exc
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ReportError(f"{what} has no column {', '.join(missing)}; {fix}")
    return df


def read_earlier_runs(path: str | Path) -> pd.DataFrame:
    """The rows of a results.csv an earlier ``lowrank-ctr-report`` wrote (e.g. a committed table whose run
    directories are gone), as :func:`runs_table` builds them; a column a newer version added reads NaN."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ReportError(f"--merge {path}: no such file; pass the results.csv an earlier lowrank-ctr-report wrote")
    df = _read_earlier_csv(
        path, f"--merge {path}", TEXT_COLUMNS, [c for c in RUN_COLUMNS if c not in TEXT_COLUMNS],
        ["run_dir", "status", "data", "model", "method", "setting", "ratio", "auc"],
        "it is not a lowrank-ctr results.csv: pass the results.csv an earlier lowrank-ctr-report wrote, not "
        "grouped.csv or another table")
    df = df.reindex(columns=RUN_COLUMNS)
    for c in TEXT_COLUMNS:
        df[c] = df[c].fillna("").astype(str)
    for c in RUN_COLUMNS:
        if c not in TEXT_COLUMNS:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    df["seed"] = df["seed"].astype("Int64")
    return df


def layers_to_csv(layers: pd.DataFrame, path: Path) -> None:
    """``layers.csv``: the per-layer rows with each energy curve as a JSON list (5 decimals), so that a later
    ``--merge`` of the results.csv beside it keeps its runs in the retained-energy plot."""
    df = layers.copy()
    df["energy_curve"] = df["energy_curve"].map(
        lambda c: json.dumps([round(float(x), 5) for x in c]) if isinstance(c, (list, tuple, np.ndarray)) else "")
    df.to_csv(path, index=False)


def read_earlier_layers(results_csv: Path, run_dirs: set[str]) -> pd.DataFrame | None:
    """The rows of the ``layers.csv`` beside an earlier results.csv that belong to ``run_dirs``; None when there is
    no such file (a report older than layers.csv)."""
    path = results_csv.expanduser().parent / LAYERS_FILE
    if not path.is_file():
        return None
    df = _read_earlier_csv(
        path, f"--merge {results_csv}: the {LAYERS_FILE} beside it",
        ["run_dir", "name", "group", "layer_method", "note", "energy_curve", "data", "model", "method", "setting"],
        ["rank", "full_rank", "retained_energy", "params_before", "params_after", "chosen_rank", "seed"],
        LAYER_COLUMNS, "move it away to merge the runs without their layers")
    df = df[df["run_dir"].isin(run_dirs)].reset_index(drop=True)
    df["energy_curve"] = df["energy_curve"].map(lambda s: json.loads(s) if s else None)
    df["replaced"] = df["replaced"].astype(str).str.lower().isin(["true", "1"])
    df["seed"] = pd.to_numeric(df["seed"], errors="coerce").astype("Int64")
    return df[LAYER_COLUMNS]


def load_results(dirs: Sequence[str | Path], merge: Sequence[str | Path] = ()) -> Results:
    """Load every run below ``dirs`` (see :func:`find_run_dirs`), then the rows of the earlier reports' results.csv
    in ``merge`` whose run directory is not among them (a run found now replaces its earlier row; of two earlier
    files, the first wins). An empty result is fine here, the CLI refuses it."""
    roots = check_dirs(dirs)
    records: list[dict[str, Any]] = []
    found = 0
    ignored: list[tuple[Path, str]] = []
    for run_dir in find_run_dirs(roots):
        has_results = (run_dir / RESULTS_FILE).is_file()
        rec = load_record(run_dir)
        found += has_results
        why = not_a_record(run_dir, rec) if has_results else None
        if why is not None:
            ignored.append((run_dir / RESULTS_FILE, why))
            continue
        records.append(rec)
    runs = runs_table(records)
    layers = layers_table(records)
    merged: list[tuple[Path, int, bool]] = []
    for path in merge:
        earlier = read_earlier_runs(path)
        earlier = earlier[~earlier["run_dir"].isin(set(runs["run_dir"].astype(str)))]
        earlier_layers = read_earlier_layers(Path(path), set(earlier["run_dir"]))
        merged.append((Path(path), len(earlier), earlier_layers is not None))
        if not earlier.empty:
            runs = earlier if runs.empty else pd.concat([runs, earlier], ignore_index=True)
        if earlier_layers is not None and not earlier_layers.empty:
            layers = earlier_layers if layers.empty else pd.concat([layers, earlier_layers], ignore_index=True)
    runs["seed"] = runs["seed"].astype("Int64")
    return Results(roots=roots, records=records, runs=runs, layers=layers,
                   results_found=found, ignored=ignored, merged=merged)


# ----------------------------------------------------------------------------------------------- writing

def _formatter(col: str) -> Callable[[Any], str]:
    """How a column's values read in results.md / report.html (the CSV keeps full precision)."""
    if col.startswith("delta_"):
        spec = "+.5f"
    elif "auc" in col or "logloss" in col:
        spec = ".5f"
    elif col.startswith(("ratio", "speedup")):
        spec = ".2f"
    elif col.startswith(("params", "bytes", "base_params", "base_bytes")):
        spec = ",.0f"
    elif "seconds" in col or "ms@" in col or "samples_per_s" in col:
        spec = ".3g"
    else:
        spec = ""

    def fmt(v: Any) -> str:
        if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, str) or not spec:
            return str(v)
        return format(v, spec)

    return fmt


def _undefined_cells(df: pd.DataFrame) -> list[set[str]]:
    """Per row, the columns whose value is undefined (from the ``undefined`` column of the run / grouped table)."""
    if "undefined" not in df.columns:
        return [set() for _ in range(len(df))]
    return [set(str(v).split()) if isinstance(v, str) else set() for v in df["undefined"]]


def display_table(df: pd.DataFrame, drop: Sequence[str] = ()) -> pd.DataFrame:
    """Strings for people: rounded numbers, ``undefined`` for undefined metrics, empty columns (e.g. no control
    runs) and ``drop`` left out."""
    undefined = _undefined_cells(df)
    shown_undefined = set().union(*undefined) if undefined else set()
    keep = [c for c in df.columns if c not in drop and c != "undefined"
            and (c in shown_undefined or not (df[c].isna() | (df[c].astype(str) == "")).all())]
    return pd.DataFrame({c: [UNDEFINED if c in u else _formatter(c)(v) for v, u in zip(df[c], undefined)]
                         for c in keep}, index=df.index)


def display_grouped(grouped: pd.DataFrame) -> pd.DataFrame:
    """The grouped table for people: ``mean ± std`` in one cell per statistic, empty statistics left out."""
    out = pd.DataFrame(index=grouped.index)
    for c in GROUP_KEYS:
        out[c] = grouped[c]
    out["n"] = [f"{n}" + (f" (+{f} failed)" if f else "") for n, f in zip(grouped["n"], grouped["n_failed"])]
    out["seeds"] = grouped["seeds"]
    out["ratio"] = grouped["ratio_mean"].map(_formatter("ratio"))
    for c in STAT_COLUMNS:
        fmt = _formatter(c)
        out[c] = [fmt(m) + (f" ± {s:.5f}" if pd.notna(s) else "") for m, s in
                  zip(grouped[f"{c}_mean"], grouped[f"{c}_std"])]
    for c in ("speedup@4096", "latency_ms@4096", "speedup_int8@4096", "bytes"):
        out[c] = grouped[f"{c}_mean"].map(_formatter(c))
    if "undefined" in grouped.columns:
        out["undefined"] = grouped["undefined"]
    return display_table(out)


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (no tabulate dependency)."""
    if df.empty:
        return "_(none)_\n"
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(esc(c) for c in df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


_HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 12px; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; position: sticky; top: 0; }
tr:nth-child(even) td { background: #fafafa; }
tr.failed td { background: #fde8e8; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note { color: #666; font-size: 13px; }
"""


def _html_table(df: pd.DataFrame, failed_mask: Sequence[bool] | None = None) -> str:
    if df.empty:
        return "<p class='note'>(none)</p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for i, row in enumerate(df.itertuples(index=False)):
        cls = " class='failed'" if failed_mask is not None and failed_mask[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(res: Results, plots: Mapping[str, Path], skipped: Mapping[str, str]) -> str:
    """One self-contained page: grouped table, plots as base64 PNG, per-run table, failures."""
    roots = ", ".join(html.escape(str(r)) for r in res.roots)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>lowrank-ctr report</title>"
             f"<style>{_HTML_STYLE}</style></head><body>",
             "<h1>lowrank-ctr report</h1>",
             f"<p>{html.escape(res.counts())} below {roots}: {html.escape(res.sources())}. "
             "AUC deltas are final minus base model; std is over seeds (ddof=1). "
             "Compression ratio = base bytes / compressed bytes. "
             f"<i>{UNDEFINED}</i>: the metric has no value in that run (e.g. the AUC of a one-class test split); "
             "a group with such a seed has no mean.</p>",
             *[f"<p class='note'>ignored {html.escape(str(path))}: {html.escape(why)}</p>" for path, why in res.ignored],
             "<h2>Grouped by setting (seeds aggregated)</h2>",
             _html_table(display_grouped(res.grouped)),
             "<h2>Plots</h2>"]
    for name, path in plots.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f'<h3>{html.escape(name)}</h3>'
                     f'<img src="data:image/png;base64,{data}" alt="{html.escape(name)}">')
    for name, why in skipped.items():
        parts.append(f"<p class='note'>{html.escape(name)}: skipped ({html.escape(why)})</p>")
    parts += ["<h2>All runs</h2>",
              _html_table(display_table(res.runs, drop=("error",)), list(res.runs["status"] != "ok"))]
    failed = res.runs[res.runs["status"] != "ok"]
    if len(failed):
        parts += ["<h2>Failed runs</h2>", _html_table(display_table(failed[["run_dir", "data", "model", "method",
                                                                            "seed", "error"]]))]
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(res: Results, plots: Mapping[str, Path], skipped: Mapping[str, str]) -> str:
    lines = ["# lowrank-ctr report", "",
             f"{res.counts()} below {', '.join(str(r) for r in res.roots)}: {res.sources()}. "
             f"AUC deltas are final minus base; std over seeds (ddof=1). `{UNDEFINED}`: the metric has no value in "
             "that run (e.g. the AUC of a one-class test split); a group with such a seed has no mean.", "",
             *[f"- ignored {path}: {why}" for path, why in res.ignored],
             "## Grouped by setting (seeds aggregated)", "", markdown_table(display_grouped(res.grouped)),
             "## Plots", ""]
    lines += [f"![{name}]({path.name})" for name, path in plots.items()]
    lines += [f"- {name}: skipped ({why})" for name, why in skipped.items()]
    lines += ["", "## All runs", "", markdown_table(display_table(res.runs))]
    return "\n".join(lines)


def write_report(res: Results, out: Path) -> dict[str, Path]:
    """Write results.csv, grouped.csv, the PNG plots, results.md and report.html into ``out``; return the paths."""
    from lowrank_ctr import plots as P

    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    written["results.csv"] = out / "results.csv"
    res.runs.to_csv(written["results.csv"], index=False)
    written["grouped.csv"] = out / "grouped.csv"
    res.grouped.to_csv(written["grouped.csv"], index=False)
    written[LAYERS_FILE] = out / LAYERS_FILE
    layers_to_csv(res.layers, written[LAYERS_FILE])

    plots: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for title, filename, make in (
        ("AUC vs compression ratio", "auc_vs_ratio.png", lambda: P.auc_vs_ratio(res.runs)),
        ("AUC difference to the control vs compression ratio", "delta_vs_ratio.png",
         lambda: P.delta_vs_ratio(res.runs)),
        ("AUC vs latency at batch 4096", "auc_vs_latency.png", lambda: P.auc_vs_latency(res.runs)),
        ("Retained energy vs rank per layer", "retained_energy.png", lambda: P.retained_energy(res.layers)),
    ):
        fig = make()
        if fig is None:
            skipped[title] = P.why_skipped(filename)
            stale = out / filename
            if stale.exists():  # an old plot would contradict this report
                stale.unlink()
            continue
        plots[title] = out / filename
        P.save_png(fig, plots[title])
        written[filename] = plots[title]

    written["results.md"] = out / "results.md"
    written["results.md"].write_text(render_markdown(res, plots, skipped))
    written["report.html"] = out / "report.html"
    written["report.html"].write_text(render_html(res, plots, skipped))
    return written


# ----------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lowrank-ctr-report",
        description="Aggregate the results.json of runs / multiruns below DIR... into results.csv, results.md, "
                    "report.html and PNG plots (failed jobs included as rows with status=failed).")
    p.add_argument("dirs", nargs="*", metavar="DIR", help="run or multirun directories (searched recursively)")
    p.add_argument("--merge", type=Path, action="append", default=[], metavar="CSV",
                   help="also the rows of an earlier report's results.csv (e.g. a committed table whose runs are "
                        "gone); a run found below DIR replaces its row. Repeatable")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: DIR/report of the first DIR)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lowrank-ctr-report``; user mistakes end in one ``error:`` line and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.dirs and not args.merge:
        parser.error("pass at least one run directory DIR (or an earlier report's results.csv with --merge CSV)")
    if not args.dirs and args.out is None:
        parser.error("--out OUT is needed when only --merge files are given (there is no DIR to write DIR/report)")
    try:
        res = load_results(args.dirs, merge=args.merge)
        if res.runs.empty and res.ignored:
            raise ReportError(f"no runs found below {', '.join(map(str, args.dirs))}: "
                              f"{plural(res.results_found, 'results.json', 'results.json')} found, none written by "
                              f"lowrank-ctr ({res.ignored[0][0]}: {res.ignored[0][1]})")
        if res.runs.empty:
            raise ReportError(f"no runs found below {', '.join(map(str, args.dirs))}: no results.json and no Hydra "
                              "job directory (.hydra/config.yaml). Point at the directory lowrank-ctr-train wrote "
                              "(hydra.run.dir or hydra.sweep.dir, e.g. outputs/multiruns/<time>)")
        import matplotlib

        matplotlib.use("Agg")
        out = args.out if args.out is not None else Path(args.dirs[0]) / "report"
        for path in args.merge:  # writing the report would overwrite the rows (or the layers beside them) it merges
            if path.expanduser().resolve().parent == out.expanduser().resolve():
                raise ReportError(f"--out {out} would overwrite --merge {path}: write the report to another "
                                  "directory (then copy it over the old one if that is what you want)")
        if out.exists() and not out.is_dir():
            raise ReportError(f"--out {out} is a file: pass a directory for the report")
        written = write_report(res, out)
    except ReportError as exc:
        if os.environ.get("LOWRANK_CTR_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(res.sources())
    for path, why in res.ignored:
        print(f"  ignored: {path}: {why}")
    print(f"{res.counts()}, {plural(len(res.grouped), 'setting')} -> {out}")
    if res.undefined_auc_runs():
        print(f"  {plural(res.undefined_auc_runs(), 'ok run')} with an undefined test AUC (null in results.json): "
              "shown as undefined, not drawn in the AUC plots")
    for name in written:
        print(f"  {name}")
    if res.n_failed:
        for row in res.runs[res.runs["status"] != "ok"].itertuples():
            print(f"  failed: {row.run_dir}: {row.error}")
    return 0


if __name__ == "__main__":
    main()
