"""CTR model zoo (plain torch): shared layers, one small file per model, and a registry to build them by name.

Importing this package registers every model, so ``build_model("deepfm", schema, ...)`` works after
``import lowrank_ctr.models``.
"""

from lowrank_ctr.models import autoint, dcn, dcnv2, deepfm, dnn, fibinet, finalmlp, fm, lr, widedeep, xdeepfm  # noqa: F401  (registration)
from lowrank_ctr.models.base import CTRModel
from lowrank_ctr.models.layers import (
    CIN,
    MLP,
    BilinearInteraction,
    CrossNetwork,
    CrossNetworkV2,
    FactorizationMachine,
    FeatureEmbedding,
    FeatureGate,
    FieldEmbedding,
    InteractingLayer,
    InteractionAggregation,
    LinearTerm,
    NumericEmbedding,
    SENETLayer,
    pooled_lookup,
)
from lowrank_ctr.models.registry import MODELS, build_model, list_models, model_arguments, register_model

__all__ = [
    "CIN", "MLP", "MODELS", "BilinearInteraction", "CTRModel", "CrossNetwork", "CrossNetworkV2",
    "FactorizationMachine", "FeatureEmbedding", "FeatureGate", "FieldEmbedding", "InteractingLayer",
    "InteractionAggregation", "LinearTerm", "NumericEmbedding", "SENETLayer", "build_model", "list_models",
    "model_arguments", "pooled_lookup", "register_model",
]
