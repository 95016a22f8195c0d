"""Exact memory accounting of optimizer states (and any other pytree)."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


def _leaf_bytes(leaf: Any) -> int:
  shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
  if shape is None or dtype is None:
    return 0
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    # A typed key stores its key data: e.g. two uint32 for threefry.
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
    return math.prod(data.shape) * np.dtype(data.dtype).itemsize
  return math.prod(shape) * np.dtype(dtype).itemsize


def state_bytes(tree: Any) -> int:
  """Total bytes of every array leaf of ``tree``.

  Works on concrete states and on the ``jax.ShapeDtypeStruct`` trees returned
  by ``jax.eval_shape`` (nothing is allocated), so the state of a 7B model can
  be measured on a laptop. Python scalars and None hold no device memory and
  count 0.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import apollo_optax
    >>> params = {"w": jax.ShapeDtypeStruct((4096, 1024), jnp.float32)}
    >>> tx = apollo_optax.apollo(1e-2, rank=256)
    >>> state = jax.eval_shape(tx.init, params)
    >>> apollo_optax.state_bytes(state) - 2 * 256 * 4096 * 4  # O(1) scalars
    12

  Args:
    tree: any pytree (optimizer state, params, gradients).

  Returns:
    The number of bytes, an int.
  """
  return sum(_leaf_bytes(leaf) for leaf in jax.tree.leaves(tree))
