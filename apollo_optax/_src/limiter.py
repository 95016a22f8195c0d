"""Fira's norm-growth limiter as a stand-alone transformation."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import optax

from apollo_optax._src import dimension_numbers as dn
from apollo_optax._src import sharding as shd
from apollo_optax._src import utils

# Added to the previous norm, as in the official implementation.
_NORM_EPS = 1e-8


class NormGrowthLimiterState(NamedTuple):
  """State of :func:`norm_growth_limiter`.

  Attributes:
    previous_norm: for each leaf, the norm of the last (limited) update of each
      matrix, shaped like the leaf's batch axes (a scalar for a plain matrix or
      vector); 0 until the first non-zero update.
  """

  previous_norm: optax.Updates


def growth_limit(
    norm: jax.Array, previous: jax.Array, norm_growth_limit: ArrayLike
) -> tuple[jax.Array, jax.Array]:
  """(factor c, remembered norm c·‖U‖) for update norms ``norm``.

  c = γ / max(‖U‖ / (p + 1e-8), γ) where the previous norm p > 0, else 1,
  with γ = ``norm_growth_limit``.
  """
  gamma = norm_growth_limit
  ratio = norm / (previous + _NORM_EPS)
  factor = jnp.where(
      previous > 0, gamma / jnp.maximum(ratio, gamma), jnp.ones_like(norm)
  ).astype(norm.dtype)
  return factor, norm * factor


def _per_matrix_layout(leaf: Any, dims: Any) -> tuple[tuple[int, ...], Any]:
  """(batch axes, layout or None) of a leaf for per-matrix norms."""
  if dims is None or len(leaf.shape) < 2:
    return (), None
  layout = dn.MatrixLayout.create(leaf.shape, dims)
  return layout.batch_axes, layout


def norm_growth_limiter(
    norm_growth_limit: ArrayLike = 1.01,
    *,
    weight_dimension_numbers: dn.DimensionNumbersOrFn = None,
    gamma: Optional[ArrayLike] = None,
) -> optax.GradientTransformation:
  r"""Limits how fast the norm of each update may grow (Fira, Chen et al. 2024).

  For each matrix U of each leaf, with :math:`p` the norm remembered from the
  previous step:

  .. math::
    c = \frac{\gamma}{\max(\|U\| / (p + 10^{-8}), \gamma)}, \quad
    U \leftarrow c\,U, \quad p \leftarrow c\,\|U\|.

  So an update may be at most γ = ``norm_growth_limit`` times larger than the
  previous one. The first
  non-zero update only sets p (while p = 0 nothing is limited; the official
  code would instead shrink every later update towards 0 after an all-zero
  first gradient).

  Works after any optimizer. Matrices are found as in :func:`scale_by_apollo`:
  leaves with more than two axes are batches of independent matrices (by
  ``weight_dimension_numbers``, default: the last two axes), vectors and
  scalars count as one block each.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import apollo_optax
    >>> tx = optax.chain(optax.sgd(0.1), apollo_optax.norm_growth_limiter(1.01))
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> u, state = tx.update({"w": jnp.ones(3)}, state)
    >>> u, state = tx.update({"w": 10 * jnp.ones(3)}, state)
    >>> round(float(jnp.linalg.norm(u["w"])) / (0.1 * 3 ** 0.5), 4)
    1.01

  Args:
    norm_growth_limit: γ, the largest allowed growth factor of the update norm
      per step, > 1 (the argument of the same name of :func:`apollo`).
    weight_dimension_numbers: which axes form a matrix (see
      :class:`ApolloDimensionNumbers`); batch axes get independent limiters.
    gamma: deprecated, use ``norm_growth_limit`` (given, it replaces it).

  Returns:
    A ``GradientTransformation``.

  References:
    Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024
  """
  if gamma is not None:
    norm_growth_limit = utils.deprecated_argument(
        "norm_growth_limiter", "gamma", gamma, "norm_growth_limit", None
    )
  utils.check_real(
      "norm_growth_limit", norm_growth_limit, lambda v: v > 1.0,
      "> 1 (e.g. 1.01)",
  )
  dn.check_dimension_numbers(weight_dimension_numbers, "weight_dimension_numbers")

  def leaf_info(tree):
    dims = dn.resolve_dimension_numbers(weight_dimension_numbers, tree)
    leaves, treedef = jax.tree.flatten(tree)
    return leaves, treedef.flatten_up_to(dims), treedef

  def init_fn(params):
    leaves, dims, treedef = leaf_info(params)
    norms, derivations = [], []
    for leaf, leaf_dims in zip(leaves, dims):
      batch_axes, layout = _per_matrix_layout(leaf, leaf_dims)
      shape = layout.batch_shape if layout is not None else ()
      # Sharded like the parameter's batch axes.
      derivations.append(shd.Derivation(batch_axes))
      norms.append(shd.zeros(
          leaf, shape, utils.compute_dtype(leaf.dtype), derivations[-1]
      ))
    return NormGrowthLimiterState(
        previous_norm=shd.relabel_variables(
            treedef.unflatten(norms), derivations
        )
    )

  def leaf_update(u, previous, leaf_dims):
    cdt = previous.dtype
    _, layout = _per_matrix_layout(u, leaf_dims)
    if layout is None:
      norm = jnp.sqrt(jnp.sum(jnp.square(u.astype(cdt))))
    else:
      u3 = layout.to_canonical(u).astype(cdt)
      norm = jnp.sqrt(jnp.sum(jnp.square(u3), axis=(1, 2))).reshape(
          layout.batch_shape
      )
    factor, new_norm = growth_limit(norm, previous, norm_growth_limit)
    broadcast = (
        factor if layout is None else layout.per_matrix_to_broadcast(factor)
    )
    return (u * broadcast).astype(u.dtype), new_norm

  def update_fn(updates, state, params=None):
    del params
    leaves, dims, treedef = leaf_info(updates)
    previous = treedef.flatten_up_to(state.previous_norm)
    results = [leaf_update(*args) for args in zip(leaves, previous, dims)]
    new_updates = [u for u, _ in results]
    new_norms = [p for _, p in results]
    return treedef.unflatten(new_updates), NormGrowthLimiterState(
        previous_norm=treedef.unflatten(new_norms)
    )

  return optax.GradientTransformation(init_fn, update_fn)
