"""Random projections for APOLLO, regenerated from a PRNG key.

A projection is never stored: each step rebuilds it from a key derived from
(seed, leaf path, refresh index, matrix index), which costs rank x d random
numbers and saves rank x d state per matrix.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp

# projection(key, shape, dtype) -> array of `shape` = (rank, d).
ProjectionFn = Callable[[jax.Array, tuple[int, int], Any], jax.Array]


def gaussian_projection(
    key: jax.Array, shape: tuple[int, int], dtype: Any = jnp.float32
) -> jax.Array:
  """P with i.i.d. entries N(0, 1/rank), rank = shape[0] (the paper's choice).

  Example:
    >>> import jax
    >>> p = gaussian_projection(jax.random.key(0), (4, 64))
    >>> p.shape
    (4, 64)
  """
  rank = shape[0]
  return jax.random.normal(key, shape, dtype) * (1.0 / math.sqrt(rank))


def leaf_seed(path: str) -> int:
  """A stable 31-bit number for a leaf path (same on every host and run)."""
  return zlib.crc32(path.encode("utf-8")) & 0x7FFFFFFF


def projection_keys(
    seed: Any,
    path: str,
    refresh_index: jax.Array,
    num_matrices: int,
    first_matrix: Any = 0,
) -> jax.Array:
  """Keys of the projections of one leaf: one per matrix in its batch.

  The key of matrix ``b`` of the leaf at ``path`` for the ``refresh_index``-th
  projection is ``fold_in(fold_in(fold_in(key(seed), crc32(path)),
  refresh_index), b)``, for ``b = first_matrix, ..., first_matrix +
  num_matrices - 1``. A non-zero ``first_matrix`` (possibly traced) gives the
  keys of a slice of a larger batch, e.g. one layer of a scanned stack.
  """
  key = jax.random.key(seed)
  key = jax.random.fold_in(key, leaf_seed(path))
  key = jax.random.fold_in(key, refresh_index)
  first = jnp.asarray(first_matrix, jnp.uint32)
  return jax.vmap(lambda b: jax.random.fold_in(key, b))(
      jnp.arange(num_matrices, dtype=jnp.uint32) + first
  )


def svd_projection(g: jax.Array, rank: int, tall: bool) -> jax.Array:
  """Top-``rank`` singular vectors of a batch of matrices g (batch, m, n).

  Returns P of shape (batch, rank, d) with orthonormal rows: right singular
  vectors when m >= n (so that R = G Pᵀ), left ones otherwise (R = P G).
  """
  u, _, vh = jnp.linalg.svd(g, full_matrices=False)
  if tall:
    return vh[:, :rank, :]
  return jnp.swapaxes(u[:, :, :rank], 1, 2)
