"""Q-APOLLO: INT8 weights with group-wise scales, and the optimizer wrapper.

Weights of shape ``(..., m, n)`` are stored as :class:`QuantizedArray` (int8
values, one scale per group of rows along the input dimension);
:func:`quantized_weights` runs any optimizer on the dequantized weights and
re-quantizes the result with stochastic rounding, and
:func:`apply_quantized_updates` applies its updates.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from apollo_optax import quantization
  >>> params = {"w": quantization.quantize(jnp.ones((128, 32)), group_size=64)}
  >>> tx = quantization.quantized_weights(optax.sgd(0.1), key=jax.random.key(0))
  >>> updates, _ = tx.update({"w": jnp.ones((128, 32))}, tx.init(params), params)
  >>> quantization.apply_quantized_updates(params, updates)["w"].values.dtype
  dtype('int8')

References:
  Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
  <https://arxiv.org/abs/2412.05270>`_, MLSys 2025 (Q-APOLLO, §5.3)
"""

from apollo_optax._src.quantization import apply_quantized_updates
from apollo_optax._src.quantization import dequantize
from apollo_optax._src.quantization import dequantize_params
from apollo_optax._src.quantization import is_quantized
from apollo_optax._src.quantization import quantize
from apollo_optax._src.quantization import quantize_params
from apollo_optax._src.quantization import QuantizedArray
from apollo_optax._src.quantization import quantized_weights
from apollo_optax._src.quantization import QuantizedWeightsState
from apollo_optax._src.quantization import RequantizedWeights

__all__ = (
    "QuantizedArray",
    "QuantizedWeightsState",
    "RequantizedWeights",
    "apply_quantized_updates",
    "dequantize",
    "dequantize_params",
    "is_quantized",
    "quantize",
    "quantize_params",
    "quantized_weights",
)
