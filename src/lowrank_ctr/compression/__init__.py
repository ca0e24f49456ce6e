"""Compression of CTR models by module replacement: low-rank (svd, afm), tensor-train, int8.

Plain torch: works on any ``nn.Module`` holding ``FieldEmbedding`` / ``nn.Linear`` layers. Entry points:
``compress`` (in place, returns a ``CompressionReport`` with a rebuild ``spec``) and ``apply_spec`` (rebuild a
compressed structure on a fresh base model before ``load_state_dict``).
"""

from lowrank_ctr.compression.api import DEFAULT_TARGETS, KNOWN_METHODS, CompressionReport, compress
from lowrank_ctr.compression.modules import (
    Int8FieldEmbedding,
    Int8Linear,
    LowRankFieldEmbedding,
    LowRankLinear,
    TTEmbedding,
    TTFieldEmbedding,
)
from lowrank_ctr.compression.size import model_size, module_size
from lowrank_ctr.compression.spec import apply_spec
from lowrank_ctr.compression.stats import OutputStats, collect_output_stats
from lowrank_ctr.compression.targets import find_targets, module_groups

__all__ = [
    "DEFAULT_TARGETS", "KNOWN_METHODS", "CompressionReport", "compress", "apply_spec", "model_size", "module_size",
    "OutputStats", "collect_output_stats", "find_targets", "module_groups", "LowRankLinear", "LowRankFieldEmbedding",
    "TTEmbedding", "TTFieldEmbedding", "Int8FieldEmbedding", "Int8Linear",
]
