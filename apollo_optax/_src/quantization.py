"""INT8 weights with group-wise scales, and an optimizer wrapper for them.

Q-APOLLO (APOLLO paper §5.3, Table 8) stores the attention and MLP weight
matrices in INT8 with one scale per group of 128 consecutive weights along the
input dimension (as Q-GaLore), dequantizes them on the fly in the forward pass
and, after each optimizer step, re-quantizes the updated weights with
stochastic rounding, which keeps small updates (smaller than one quantization
step) alive in expectation.

Representation (:class:`QuantizedArray`) of a weight ``W`` of shape
``(..., m, n)`` used as ``x @ W`` (``m`` = input dimension), with groups of
``g`` rows along ``m``:

.. math::
  s_{k j} = \\max_{i \\in \\text{group } k} |W_{i j}| / 127, \\qquad
  Q_{i j} = \\operatorname{round}(W_{i j} / s_{k(i) j}) \\in [-127, 127],
  \\qquad \\hat W_{i j} = s_{k(i) j} Q_{i j}.

``values`` is int8 ``(..., m, n)`` and ``scales`` is ``(..., m / g, n)``
(float32 by default), i.e. ``1 + 4/g`` bytes per weight (1.03 for g = 128).
Rounding to nearest gives :math:`|W - \\hat W| \\le s/2`; stochastic rounding
:math:`Q = \\lfloor W/s + u \\rfloor`, :math:`u \\sim U[0, 1)`, gives
:math:`|W - \\hat W| < s` and :math:`\\mathbb E[\\hat W] = W`.

This is symmetric quantization without a zero point; the official
``apollo-torch`` ``QAPOLLOAdamW`` uses asymmetric uint8 with a zero point per
group (one more number per group).

The public names are in :mod:`apollo_optax.quantization`.

References:
  Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
  <https://arxiv.org/abs/2412.05270>`_, MLSys 2025 (Q-APOLLO, §5.3)

  Zhang et al., `Q-GaLore: Quantized GaLore with INT4 Projection and
  Layer-Adaptive Low-Rank Gradients <https://arxiv.org/abs/2407.08296>`_, 2024
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from apollo_optax._src import alias
from apollo_optax._src import projection as proj
from apollo_optax._src import utils

# Largest magnitude of the symmetric int8 grid (-128 is never used).
_QMAX = 127


class QuantizedArray(NamedTuple):
  """An int8 weight matrix (or stack of matrices) with group-wise scales.

  Attributes:
    values: int8, the weight's shape ``(..., m, n)``.
    scales: ``(..., m // group_size, n)``, one scale per group of
      ``group_size`` consecutive rows (input dimension) of each column.
  """

  values: jax.Array
  scales: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.values.shape)

  @property
  def group_size(self) -> int:
    return self.values.shape[-2] // self.scales.shape[-2]


class RequantizedWeights(NamedTuple):
  """The update of a :class:`QuantizedArray` leaf: the weights replacing it.

  A distinct type so that ``optax.apply_updates`` refuses quantized trees
  (structure mismatch) instead of adding int8 values; use
  :func:`apply_quantized_updates`.
  """

  values: jax.Array
  scales: jax.Array


def is_quantized(x: Any) -> bool:
  """True for a :class:`QuantizedArray` (use as ``is_leaf`` in tree maps)."""
  return isinstance(x, QuantizedArray)


def _check_group_size(shape: tuple[int, ...], group_size: int) -> int:
  group_size = utils.check_static_int("group_size", group_size, 1)
  if len(shape) < 2:
    raise ValueError(
        f"quantize: only matrices (..., m, n) are quantized, got shape {shape}."
    )
  if shape[-2] % group_size:
    raise ValueError(
        f"quantize: group_size={group_size} does not divide the input"
        f" dimension m={shape[-2]} of a weight of shape {shape}; choose a"
        f" group size that divides it (e.g. a power of two dividing {shape[-2]})."
    )
  return group_size


def _grouped(x: jax.Array, group_size: int) -> jax.Array:
  """(..., m, n) -> (..., m // g, g, n)."""
  *batch, m, n = x.shape
  return x.reshape(*batch, m // group_size, group_size, n)


def _quantize_with_noise(
    w: jax.Array, group_size: int, noise: Optional[jax.Array], scale_dtype: Any
) -> QuantizedArray:
  """Nearest rounding if ``noise`` is None, else ``floor(w / s + noise)``."""
  wg = _grouped(w.astype(jnp.float32), group_size)
  absmax = jnp.max(jnp.abs(wg), axis=-2, keepdims=True)
  # An all-zero group quantizes to zeros with any scale; 1 avoids 0 / 0.
  scales = jnp.where(absmax > 0, absmax / _QMAX, 1.0).astype(scale_dtype)
  x = wg / scales.astype(jnp.float32)
  if noise is None:
    q = jnp.round(x)
  else:
    q = jnp.floor(x + _grouped(noise, group_size))
  q = jnp.clip(q, -_QMAX, _QMAX).astype(jnp.int8).reshape(w.shape)
  return QuantizedArray(values=q, scales=jnp.squeeze(scales, -2))


def quantize(
    w: jax.Array,
    group_size: int = 128,
    *,
    key: Optional[jax.Array] = None,
    scale_dtype: Any = jnp.float32,
) -> QuantizedArray:
  """Quantizes ``w`` of shape ``(..., m, n)`` to int8 with group-wise scales.

  Groups are ``group_size`` consecutive rows (along the input dimension m,
  axis -2) of each column; leading axes are batch axes (e.g. scanned layers).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from apollo_optax.quantization import quantize, dequantize
    >>> w = jax.random.normal(jax.random.key(0), (256, 64))
    >>> q = quantize(w, group_size=128)
    >>> q.values.dtype, q.scales.shape
    (dtype('int8'), (2, 64))
    >>> bool(jnp.all(jnp.abs(dequantize(q) - w) <= q.scales.repeat(128, 0) / 2))
    True

  Args:
    w: a float array with at least two axes.
    group_size: rows per scale; must divide m.
    key: None for round-to-nearest; a PRNG key for stochastic rounding
      (unbiased: ``E[dequantize(quantize(w, key=k))] = w`` over keys).
    scale_dtype: dtype of the scales.

  Returns:
    A :class:`QuantizedArray`.

  Raises:
    ValueError: ``w`` has fewer than two axes or ``group_size`` does not
      divide m.
  """
  group_size = _check_group_size(tuple(w.shape), group_size)
  noise = None if key is None else jax.random.uniform(key, w.shape, jnp.float32)
  return _quantize_with_noise(w, group_size, noise, scale_dtype)


def dequantize(q: QuantizedArray, dtype: Any = None) -> jax.Array:
  """``scales * values`` in ``dtype`` (default: the scales' dtype)."""
  dtype = q.scales.dtype if dtype is None else dtype
  g = q.group_size
  wg = _grouped(q.values, g).astype(q.scales.dtype) * q.scales[..., None, :]
  return wg.reshape(q.values.shape).astype(dtype)


def quantize_params(
    params: optax.Params,
    group_size: int = 128,
    *,
    mask: Any = None,
    scale_dtype: Any = jnp.float32,
) -> optax.Params:
  """Replaces the masked matrices of ``params`` by :class:`QuantizedArray`.

  Args:
    params: a pytree of arrays.
    group_size: rows per scale, must divide the input dimension of every
      quantized leaf.
    mask: pytree of bools (or a callable on ``params``): which leaves to
      quantize; None: :func:`apollo_optax.default_lowrank_mask` (attention and
      MLP matrices; embeddings, output head and norms stay in float).
    scale_dtype: dtype of the scales.

  Returns:
    ``params`` with the masked leaves quantized (round-to-nearest).
  """
  if mask is None:
    mask = alias.default_lowrank_mask(params)
  elif callable(mask):
    mask = mask(params)
  return jax.tree.map(
      lambda w, m: quantize(w, group_size, scale_dtype=scale_dtype) if m else w,
      params,
      mask,
  )


def dequantize_params(params: optax.Params, dtype: Any = None) -> optax.Params:
  """Dequantizes every :class:`QuantizedArray` leaf of ``params``."""
  return jax.tree.map(
      lambda x: dequantize(x, dtype) if is_quantized(x) else x,
      params,
      is_leaf=is_quantized,
  )


def apply_quantized_updates(
    params: optax.Params, updates: optax.Updates
) -> optax.Params:
  """``optax.apply_updates`` for trees with quantized leaves.

  A :class:`QuantizedArray` leaf is replaced by its
  :class:`RequantizedWeights` update; other leaves get ``p + u`` in ``p``'s
  dtype, as ``optax.apply_updates``.
  """

  def apply(p, u):
    if is_quantized(p):
      if not isinstance(u, RequantizedWeights):
        raise TypeError(
            "apply_quantized_updates: a QuantizedArray leaf needs a"
            f" RequantizedWeights update (from quantized_weights), got {type(u)}."
        )
      return QuantizedArray(values=u.values, scales=u.scales)
    if p is None:
      return None
    return jnp.asarray(p + u).astype(jnp.asarray(p).dtype)

  return jax.tree.map(
      apply, params, updates, is_leaf=lambda x: x is None or is_quantized(x)
  )


class QuantizedWeightsState(NamedTuple):
  """State of :func:`quantized_weights`.

  Attributes:
    key: PRNG key of the stochastic rounding, split at every update.
    inner_state: the wrapped transformation's state (for the dequantized
      weights).
  """

  key: jax.Array
  inner_state: optax.OptState


def _fmix32(x: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection that mixes every bit."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _hash_uniform(key: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """U(0, 1) dither for one matrix: a counter-based hash of the element index.

  ``jax.random`` bits materialise several full-size uint32 buffers per matrix
  (gigabytes for the MLP kernels of one 7B layer); this hash is elementwise,
  so XLA fuses it into the rounding and it needs no buffer. The top 16 bits
  give u = (k + 1/2) / 2^16, a grid symmetric in [0, 1): the rounding bias is
  below 2^-17 of a quantization step.
  """
  data = jax.random.key_data(key)
  k0, k1 = data[0], data[1]
  n = shape[1]
  rows = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
  cols = jax.lax.broadcasted_iota(jnp.uint32, shape, 1)
  x = _fmix32((rows * jnp.uint32(n) + cols) ^ k0)
  x = _fmix32(x + k1 * jnp.uint32(0x9E3779B9))
  return ((x >> 16).astype(jnp.float32) + 0.5) / 65536.0


def _rounding_noise(
    key: jax.Array, path: str, shape: tuple[int, ...], first_matrix: Any
) -> jax.Array:
  """U(0, 1) noise; matrix b of the leaf at ``path`` uses key (key, path, b).

  Keyed per matrix like APOLLO's projections, so that a slice of a scanned
  stack (``first_matrix`` = its first layer) draws the noise of the stack.
  """
  *batch, m, n = shape
  num = 1
  for size in batch:
    num *= size
  leaf_key = jax.random.fold_in(key, proj.leaf_seed(path))
  index = jnp.arange(num, dtype=jnp.uint32) + jnp.asarray(first_matrix, jnp.uint32)
  noise = jax.vmap(
      lambda b: _hash_uniform(jax.random.fold_in(leaf_key, b), (m, n))
  )(index)
  return noise.reshape(shape)


def quantized_weights(
    inner: optax.GradientTransformation,
    *,
    key: Union[jax.Array, int],
    stochastic_round: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``inner`` on dequantized weights and re-quantizes the result.

  For every :class:`QuantizedArray` leaf :math:`Q` (with its group size and
  scale dtype) and its float gradient :math:`G`:

  .. math::
    W = \text{deq}(Q), \quad U = \text{inner}(G, W), \quad
    Q' = \text{quantize}(W + U, \text{key}_t),

  with stochastic rounding driven by ``key`` (split at every step, so a run is
  deterministic for a given key). The update of such a leaf is
  :class:`RequantizedWeights` ``Q'``; other leaves get ``inner``'s update
  unchanged. Apply with :func:`apply_quantized_updates` (``optax.apply_updates``
  raises on the quantized leaves). ``inner`` sees float parameters and
  gradients throughout, so any optax transformation works, and extra keyword
  arguments (``matrix_index_offset`` of :func:`apollo_optax.scale_by_apollo`) are passed
  to it; ``matrix_index_offset`` also offsets the per-matrix rounding keys.

  Must be the outermost transformation. ``inner``'s ``init`` sees the
  dequantized parameters (a transient float copy).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import apollo_optax
    >>> w = jax.random.normal(jax.random.key(0), (128, 32))
    >>> from apollo_optax import quantization
    >>> params = {"w": quantization.quantize(w, group_size=64)}
    >>> tx = quantization.quantized_weights(optax.sgd(0.1), key=jax.random.key(1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones((128, 32))}, state, params)
    >>> params = quantization.apply_quantized_updates(params, updates)
    >>> params["w"].values.dtype
    dtype('int8')

  Args:
    inner: the optimizer of the float weights (e.g. ``apollo_mini``).
    key: PRNG key of the stochastic rounding (``jax.random.key``), or an int
      seed standing for ``jax.random.key(seed)``.
    stochastic_round: round stochastically (True, as Q-GaLore / Q-APOLLO) or
      to nearest (False: updates smaller than half a step are lost).

  Returns:
    A ``GradientTransformationExtraArgs``.

  References:
    Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
    <https://arxiv.org/abs/2412.05270>`_, MLSys 2025 (Q-APOLLO, §5.3)
  """
  inner = optax.with_extra_args_support(inner)
  key = utils.prng_key(key)

  def init_fn(params):
    # A fresh buffer: states may be donated, and several states (e.g. one per
    # group of a layer-wise step) start from the same key.
    fresh_key = jax.random.wrap_key_data(
        jnp.array(jax.random.key_data(key), copy=True))
    return QuantizedWeightsState(
        key=fresh_key, inner_state=inner.init(dequantize_params(params))
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
          "quantized_weights needs `params` (the quantized weights) in update."
      )
    float_params = dequantize_params(params)
    inner_updates, inner_state = inner.update(
        updates, state.inner_state, float_params, **extra_args
    )
    new_key, step_key = jax.random.split(state.key)
    first_matrix = extra_args.get("matrix_index_offset", 0)

    def requantize(path, p, u, w):
      if not is_quantized(p):
        return u
      noise = None
      if stochastic_round:
        noise = _rounding_noise(step_key, utils.path_str(path), p.shape,
                                first_matrix)
      new = _quantize_with_noise(
          w.astype(jnp.float32) + u.astype(jnp.float32), p.group_size, noise,
          p.scales.dtype,
      )
      return RequantizedWeights(values=new.values, scales=new.scales)

    new_updates = jax.tree_util.tree_map_with_path(
        requantize, params, inner_updates, float_params, is_leaf=is_quantized
    )
    return new_updates, QuantizedWeightsState(new_key, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

