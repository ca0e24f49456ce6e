"""Compression spec: a JSON description of every replaced module, to rebuild a compressed model's structure.

Format::

    {"format": "lowrank_ctr.compression/1", "method": "afm",
     "modules": [{"name": "embedding.table", "class": "LowRankFieldEmbedding",
                  "args": {"vocab_sizes": [...], "dim": 16, "ranks": [...]}},
                 {"name": "mlp.net.0", "class": "LowRankLinear",
                  "args": {"in_features": 64, "out_features": 32, "rank": 8, "bias": true}}, ...]}

Loading a compressed checkpoint: build the base model from its config, ``apply_spec(model, spec)``, then
``model.load_state_dict(torch.load(path, weights_only=True))``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import nn

from lowrank_ctr.compression.methods import module_types
from lowrank_ctr.compression.methods.base import place
from lowrank_ctr.compression.targets import get_module, set_module
from lowrank_ctr.models.layers import FieldEmbedding

SPEC_FORMAT = "lowrank_ctr.compression/1"


def module_entry(name: str, module: nn.Module) -> dict[str, Any]:
    cls = type(module).__name__
    known = module_types()
    if cls not in known:
        raise TypeError(f"{name!r}: {cls} is not a compressed module type ({sorted(known)})")
    return {"name": name, "class": cls, "args": module.spec_args()}


def make_spec(method: str, replaced: Mapping[str, nn.Module]) -> dict[str, Any]:
    return {"format": SPEC_FORMAT, "method": method,
            "modules": [module_entry(n, m) for n, m in replaced.items()]}


def _check_compatible(name: str, old: nn.Module, cls: type, args: dict) -> None:
    if cls.replaces == "embedding":
        ok = isinstance(old, FieldEmbedding) and old.vocab_sizes == list(args["vocab_sizes"]) \
            and old.dim == int(args["dim"])
        want = f"a FieldEmbedding with vocab sizes {list(args['vocab_sizes'])} and dim {args['dim']}"
        have = (f"FieldEmbedding(vocab sizes {old.vocab_sizes}, dim {old.dim})" if isinstance(old, FieldEmbedding)
                else type(old).__name__)
    elif cls.replaces == "linear":
        ok = isinstance(old, nn.Linear) and old.in_features == int(args["in_features"]) \
            and old.out_features == int(args["out_features"])
        want = f"an nn.Linear({args['in_features']}, {args['out_features']})"
        have = (f"nn.Linear({old.in_features}, {old.out_features})" if isinstance(old, nn.Linear)
                else type(old).__name__)
    else:
        raise ValueError(f"{cls.__name__} declares replaces={cls.replaces!r}; expected 'embedding' or 'linear'")
    if not ok:
        raise ValueError(f"compression spec expects {want} at {name!r} but the model has {have}: build the base "
                         f"model from the same data schema and model config as the compressed checkpoint")


def apply_spec(model: nn.Module, spec: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> nn.Module:
    """Replace modules of a freshly built base model so its structure (and state_dict keys) match the spec.

    Weights of the new modules are placeholders until ``load_state_dict``. Returns ``model`` (changed in place).
    """
    entries = spec["modules"] if isinstance(spec, Mapping) else spec
    if isinstance(spec, Mapping) and spec.get("format", SPEC_FORMAT) != SPEC_FORMAT:
        raise ValueError(f"unknown compression spec format {spec.get('format')!r}; this version reads {SPEC_FORMAT}")
    for entry in entries:
        name, cls_name, args = entry["name"], entry["class"], dict(entry["args"])
        known = module_types()
        cls = known.get(cls_name)
        if cls is None:
            raise ValueError(f"compression spec names unknown module class {cls_name!r} at {name!r}; "
                             f"known: {sorted(known)}")
        old = get_module(model, name)
        _check_compatible(name, old, cls, args)
        new = place(cls(**args), next(iter(old.parameters())))
        set_module(model, name, new)
    return model
