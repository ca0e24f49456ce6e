"""CTR model zoo (plain torch): shared layers, one small file per model, and a registry to build them by name.

Importing this package imports every module in it, and each model file registers itself with
``@register_model``: ``build_model("deepfm", schema, ...)`` works after ``import lowrank_ctr.models``, and a new
model is one file here plus ``conf/model/NAME.yaml``.
"""

from lowrank_ctr.plugins import import_package_modules

# registration: every model file, no list to keep
import_package_modules(__name__, __path__, skip=("base", "layers", "registry"))
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
