"""apollo_optax: APOLLO and APOLLO-Mini as Optax gradient transformations.

APOLLO (Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance",
MLSys 2025) keeps Adam moments of a random low-rank projection of each weight
gradient and uses them only to estimate a channel-wise (or tensor-wise) scale
for the raw gradient. Q-APOLLO's INT8 weights are in
:mod:`apollo_optax.quantization`.

References:
  Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
  <https://arxiv.org/abs/2412.05270>`_, MLSys 2025
"""

from apollo_optax._src.adam import scale_by_adam_bias_correction
from apollo_optax._src.adam import scale_by_adam_moments
from apollo_optax._src.adam import ScaleByAdamBiasCorrectionState
from apollo_optax._src.adam import ScaleByAdamMomentsState
from apollo_optax._src.alias import apollo
from apollo_optax._src.alias import apollo_mini
from apollo_optax._src.alias import default_lowrank_mask
from apollo_optax._src.coverage import LowRankCoverageWarning
from apollo_optax._src.coverage import lowrank_summary
from apollo_optax._src.coverage import LowRankSummary
from apollo_optax._src.coverage import MIN_LOWRANK_FRACTION
from apollo_optax._src.dimension_numbers import ApolloDimensionNumbers
from apollo_optax._src.limiter import norm_growth_limiter
from apollo_optax._src.limiter import NormGrowthLimiterState
from apollo_optax._src.memory import state_bytes
from apollo_optax._src.projection import gaussian_projection
from apollo_optax._src.projection import rademacher_projection
from apollo_optax._src.scale_by_apollo import scale_by_apollo
from apollo_optax._src.scale_by_apollo import ScaleByApolloState
from apollo_optax._src.sharding import state_shardings

__version__ = "0.1.0"

__all__ = (
    "ApolloDimensionNumbers",
    "LowRankCoverageWarning",
    "LowRankSummary",
    "MIN_LOWRANK_FRACTION",
    "NormGrowthLimiterState",
    "ScaleByAdamBiasCorrectionState",
    "ScaleByAdamMomentsState",
    "ScaleByApolloState",
    "apollo",
    "apollo_mini",
    "default_lowrank_mask",
    "gaussian_projection",
    "lowrank_summary",
    "norm_growth_limiter",
    "quantization",
    "rademacher_projection",
    "scale_by_adam_bias_correction",
    "scale_by_adam_moments",
    "scale_by_apollo",
    "state_bytes",
    "state_shardings",
)

from apollo_optax import quantization
# Q-APOLLO's names also at the top level, as before they were grouped in
# `apollo_optax.quantization` (listed there, not in `__all__` below).
from apollo_optax.quantization import apply_quantized_updates
from apollo_optax.quantization import dequantize
from apollo_optax.quantization import dequantize_params
from apollo_optax.quantization import is_quantized
from apollo_optax.quantization import quantize
from apollo_optax.quantization import quantize_params
from apollo_optax.quantization import QuantizedArray
from apollo_optax.quantization import quantized_weights
from apollo_optax.quantization import QuantizedWeightsState
from apollo_optax.quantization import RequantizedWeights
