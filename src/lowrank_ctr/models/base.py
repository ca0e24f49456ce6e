"""Common base of every CTR model: argument checks that name the model, and the embedding / MLP builders.

Models stay plain ``nn.Module``s taking a batch dict and returning (B,) logits; the base only makes a wrong
config fail at construction with a message naming the model and the argument.
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable, Sequence

import torch
from torch import nn

from lowrank_ctr.data.schema import Schema
from lowrank_ctr.models.layers import ACTIVATIONS, MLP, NUMERIC_MODES, FeatureEmbedding


class ModelArgumentError(TypeError, ValueError):
    """A model argument of the wrong type or name: a TypeError as Python would raise, and a ValueError so the command
    line reports it as the user's mistake (one line, exit 2) rather than a traceback."""


class CTRModel(nn.Module):
    """Base class: ``forward(batch) -> logits (B,)``; ``model_name`` is set by ``register_model``."""

    model_name: ClassVar[str] = "ctr"

    # Argument checks ---------------------------------------------------------------------------
    def _fail(self, arg: str, message: str, value: Any, exc: type[Exception] = ValueError) -> None:
        raise exc(f"model {self.model_name!r}: {arg} {message}, got {value!r}")

    def _int(self, arg: str, value: Any, minimum: int = 1) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self._fail(arg, "must be an int", value, ModelArgumentError)
        if value < minimum:
            self._fail(arg, f"must be >= {minimum}", value)
        return int(value)

    def _float(self, arg: str, value: Any, low: float, high: float, high_inclusive: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self._fail(arg, "must be a number", value, ModelArgumentError)
        ok = low <= value <= high if high_inclusive else low <= value < high
        if not ok:
            self._fail(arg, f"must be in [{low}, {high}{']' if high_inclusive else ')'}", value)
        return float(value)

    def _bool(self, arg: str, value: Any) -> bool:
        if not isinstance(value, bool):
            self._fail(arg, "must be true or false", value, ModelArgumentError)
        return value

    def _sizes(self, arg: str, value: Any, allow_empty: bool = True) -> list[int]:
        """A list of layer widths (accepts tuples and OmegaConf ListConfig)."""
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            self._fail(arg, "must be a list of positive ints", value, ModelArgumentError)
        sizes = list(value)
        if not allow_empty and not sizes:
            self._fail(arg, "must not be empty", sizes)
        for s in sizes:
            if isinstance(s, bool) or not isinstance(s, int) or s < 1:
                self._fail(arg, "must be a list of positive ints", sizes)
        return [int(s) for s in sizes]

    def _choice(self, arg: str, value: Any, choices: Sequence[str]) -> str:
        if value not in choices:
            self._fail(arg, f"must be one of {list(choices)}", value)
        return value

    # Builders ----------------------------------------------------------------------------------
    def _embedding(self, schema: Schema, embedding_dim: Any, numeric: Any, min_fields: int = 0) -> FeatureEmbedding:
        dim = self._int("embedding_dim", embedding_dim)
        mode = self._choice("numeric", numeric, NUMERIC_MODES)
        emb = FeatureEmbedding(schema, dim, numeric=mode)
        if emb.num_fields < min_fields:
            raise ValueError(
                f"model {self.model_name!r} needs at least {min_fields} embedded field(s) but schema {schema.name!r} "
                f"gives {emb.num_fields} with numeric={mode!r}; use numeric='embed' or a schema with id fields"
            )
        if emb.flat_dim == 0:
            raise ValueError(f"model {self.model_name!r}: schema {schema.name!r} yields no input features")
        return emb

    def _mlp(self, in_dim: int, mlp: Any, activation: Any, batch_norm: Any, dropout: Any,
             out_dim: int | None = 1, arg: str = "mlp", allow_empty: bool = True) -> MLP:
        hidden = self._sizes(arg, mlp, allow_empty=allow_empty)
        self._choice("activation", str(activation).lower(), sorted(ACTIVATIONS))
        return MLP(in_dim, hidden, activation=str(activation), batch_norm=self._bool("batch_norm", batch_norm),
                   dropout=self._float("dropout", dropout, 0.0, 1.0), out_dim=out_dim)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
