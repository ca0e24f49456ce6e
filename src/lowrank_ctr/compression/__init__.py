"""Compression of CTR models by module replacement: low-rank (svd, afm), tensor-train, quotient-remainder, int8.

Plain torch: works on any ``nn.Module`` holding ``FieldEmbedding`` / ``nn.Linear`` layers. Entry points:
``compress`` (in place, returns a ``CompressionReport`` with a rebuild ``spec``), ``compress_from_config`` (the
same from a ``compression`` config), ``check_config`` (impossible settings, before training) and ``apply_spec``
(rebuild a compressed structure on a fresh base model before ``load_state_dict``). Methods live in ``methods/``,
one file each, in a registry (``METHODS``).
"""

from lowrank_ctr.compression.api import (
    COMPRESS_KEYS,
    CompressionReport,
    check_config,
    compress,
    compress_from_config,
    compress_linear_stage,
)
from lowrank_ctr.compression.methods import METHODS, get_method, method_names, module_types
from lowrank_ctr.compression.methods.int8 import Int8FieldEmbedding, Int8Linear
from lowrank_ctr.compression.methods.qr import QRFieldEmbedding
from lowrank_ctr.compression.methods.tt import TTEmbedding, TTFieldEmbedding
from lowrank_ctr.compression.modules import LowRankFieldEmbedding, LowRankLinear
from lowrank_ctr.compression.size import model_size, module_size
from lowrank_ctr.compression.spec import apply_spec
from lowrank_ctr.compression.stats import OutputStats, collect_output_stats
from lowrank_ctr.compression.targets import find_targets, module_groups

__all__ = [
    "COMPRESS_KEYS", "CompressionReport", "METHODS", "check_config", "compress", "compress_from_config",
    "compress_linear_stage",
    "get_method", "method_names", "module_types", "apply_spec", "model_size", "module_size", "OutputStats",
    "collect_output_stats", "find_targets", "module_groups", "LowRankLinear", "LowRankFieldEmbedding",
    "TTEmbedding", "TTFieldEmbedding", "Int8FieldEmbedding", "Int8Linear", "QRFieldEmbedding",
]
