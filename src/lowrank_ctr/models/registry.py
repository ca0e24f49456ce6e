"""Model registry: configs name a model (``model.name: deepfm``) and ``build_model`` builds it from the schema."""

from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

from torch import nn

from lowrank_ctr.data.schema import Schema
from lowrank_ctr.models.base import ModelArgumentError
from lowrank_ctr.plugins import register_entry

MODELS: dict[str, type[nn.Module]] = {}

M = TypeVar("M", bound=type[nn.Module])


def register_model(name: str) -> Callable[[M], M]:
    """Class decorator: make a model buildable by ``name`` and set its ``model_name``."""

    def decorate(cls: M) -> M:
        register_entry(MODELS, name, cls, "model")
        cls.model_name = name
        return cls

    return decorate


def list_models() -> list[str]:
    return sorted(MODELS)


def model_arguments(name: str) -> dict[str, Any]:
    """Hyperparameters a model accepts with their defaults (everything but ``schema``)."""
    params = inspect.signature(_lookup(name).__init__).parameters
    return {k: p.default for k, p in params.items()
            if k not in ("self", "schema") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _lookup(name: str) -> type[nn.Module]:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return MODELS[name]


def build_model(name: str, schema: Schema, **kwargs: Any) -> nn.Module:
    """Build model ``name`` for ``schema``; every wrong argument ends in one message naming model and argument."""
    cls = _lookup(name)
    accepted = model_arguments(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ModelArgumentError(f"model {name!r} got unknown argument(s) {unknown}; it accepts {sorted(accepted)}")
    try:
        return cls(schema, **kwargs)
    except ValueError as e:
        if f"model {name!r}" in str(e):
            raise
        raise ValueError(f"model {name!r}: {e}") from e
