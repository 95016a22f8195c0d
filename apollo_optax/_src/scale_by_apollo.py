"""APOLLO's gradient scaling: low-rank moments estimate a channel-wise scale.

This module owns:

- :class:`ApolloSettings`, the validated static settings of the
  transformation;
- :func:`matrix_leaves`, which views each leaf as a batch of (m, n) matrices;
- :func:`apollo_leaf_step`, APOLLO's computation for one leaf (projection,
  low-rank moments, scaling factor), a pure function returning
  :class:`ApolloLeafStep`;
- :func:`scale_by_apollo`, the transformation built from them;
- :func:`apollo_matrix_chain` (``scale_by_apollo``, √scale and the norm-growth
  limiter, as an ``optax.chain``) and :func:`fused_apollo_matrix_chain`, which
  computes the same in one pass over each gradient and keeps the chain's own
  state, whose parts it finds by type.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, Optional, Union, get_args
import warnings

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import optax

from apollo_optax._src import dimension_numbers as dn
from apollo_optax._src import limiter
from apollo_optax._src import projection as proj
from apollo_optax._src import sharding as shd
from apollo_optax._src import utils

ScaleType = Literal["channel", "tensor"]
ProjectionName = Literal["gaussian", "rademacher", "svd"]
SCALE_TYPES: tuple[str, ...] = get_args(ScaleType)
PROJECTIONS: tuple[str, ...] = get_args(ProjectionName)
# Guards the scaling factor against an all-zero projected gradient, as in the
# official implementation.
_NORM_EPS = 1e-8


class ScaleByApolloState(NamedTuple):
  """State of :func:`scale_by_apollo`.

  Attributes:
    count: number of updates taken (int32).
    mu: first moments of the projected gradient R, one low-rank array per
      matrix leaf (shape: the leaf's with the projected axes replaced by rank).
    nu: second moments of R, same shapes as ``mu``.
    svd_projection: the projections in use, one ``(batch, r, d)`` array per
      matrix leaf, only for ``projection="svd"`` (the SVD of a past gradient
      cannot be regenerated); None for random projections, which are
      regenerated from the key at every step.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  svd_projection: Optional[optax.Updates]

  @property
  def projection(self) -> Optional[optax.Updates]:
    """Deprecated name of :attr:`svd_projection`."""
    warnings.warn(
        "ScaleByApolloState.projection is deprecated, use"
        " ScaleByApolloState.svd_projection.",
        DeprecationWarning,
        stacklevel=2,
    )
    return self.svd_projection


class ApolloSettings(NamedTuple):
  """The static settings of :func:`scale_by_apollo`, validated by :meth:`create`.

  Attributes:
    rank: projection rank r (clamped to min(m, n) per matrix).
    scale_type: "channel" or "tensor".
    update_proj_gap: steps between projection refreshes.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to √V.
    projection: "gaussian", "rademacher", "svd" or a callable
      ``(key, shape, dtype)``.
    key: PRNG key (or int seed) of the projections.
    mu_dtype: dtype of the moments, or None for the leaf's compute dtype.
    projection_dtype: input dtype of the product R = G Pᵀ, or None for the
      leaf's compute dtype.
  """

  rank: int
  scale_type: ScaleType
  update_proj_gap: int
  b1: ArrayLike
  b2: ArrayLike
  eps: ArrayLike
  projection: Union[ProjectionName, proj.ProjectionFn]
  key: Union[jax.Array, int]
  mu_dtype: Optional[jnp.dtype]
  projection_dtype: Optional[jnp.dtype] = None

  @classmethod
  def create(
      cls,
      rank: int = 256,
      *,
      scale_type: ScaleType = "channel",
      update_proj_gap: int = 200,
      b1: ArrayLike = 0.9,
      b2: ArrayLike = 0.999,
      eps: ArrayLike = 1e-6,
      projection: Union[ProjectionName, proj.ProjectionFn] = "gaussian",
      key: Union[jax.Array, int] = 0,
      mu_dtype: Optional[Any] = None,
      projection_dtype: Optional[Any] = None,
  ) -> "ApolloSettings":
    """Checks every argument; raises an error naming the bad one."""
    rank = utils.check_static_int("rank", rank, 1)
    update_proj_gap = utils.check_static_int(
        "update_proj_gap", update_proj_gap, 1
    )
    utils.check_choice("scale_type", scale_type, SCALE_TYPES)
    if not callable(projection):
      utils.check_choice("projection", projection, PROJECTIONS + ("<callable>",))
    utils.check_real("b1", b1, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
    utils.check_real("b2", b2, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
    utils.check_real("eps", eps, lambda v: v >= 0.0, ">= 0")
    utils.prng_key(key)
    mu_dtype = utils.canonicalize_dtype(mu_dtype, "mu_dtype")
    projection_dtype = utils.canonicalize_dtype(
        projection_dtype, "projection_dtype"
    )
    return cls(rank, scale_type, update_proj_gap, b1, b2, eps, projection,
               key, mu_dtype, projection_dtype)

  @property
  def stores_projection(self) -> bool:
    """Whether the projection is kept in the state (SVD) or regenerated."""
    return isinstance(self.projection, str) and self.projection == "svd"

  def state_dtype(self, leaf: Any) -> jnp.dtype:
    """dtype of the moments of ``leaf``."""
    if self.mu_dtype is not None:
      return self.mu_dtype
    return utils.compute_dtype(leaf.dtype)


class MatrixLeaf(NamedTuple):
  """One leaf seen as a batch of matrices: its path, array and layout."""

  path: str
  value: Any
  layout: dn.MatrixLayout


def matrix_leaves(
    tree: Any, weight_dimension_numbers: dn.DimensionNumbersOrFn
) -> tuple[list[MatrixLeaf], Any]:
  """The leaves of ``tree`` as :class:`MatrixLeaf`, and the tree's treedef.

  Raises:
    ValueError: a leaf has no dimension numbers (a vector or scalar).
  """
  dims = dn.resolve_dimension_numbers(weight_dimension_numbers, tree)
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  leaves = []
  for (key_path, leaf), leaf_dims in zip(
      path_leaves, treedef.flatten_up_to(dims)
  ):
    path = utils.path_str(key_path)
    if leaf_dims is None:
      raise ValueError(
          f"scale_by_apollo got the leaf {path!r} of shape"
          f" {tuple(leaf.shape)}, which has no weight_dimension_numbers"
          " (vectors and scalars cannot be projected). Route it to Adam,"
          " e.g. with apollo_optax.apollo's `lowrank_mask` or"
          " optax.partition."
      )
    leaves.append(
        MatrixLeaf(path, leaf, dn.MatrixLayout.create(leaf.shape, leaf_dims, path))
    )
  return leaves, treedef


def apollo_scaling_factor(
    r: jax.Array,
    normalized: jax.Array,
    *,
    tall: bool,
    scale_type: ScaleType,
) -> jax.Array:
  """s = ‖Ñ‖ / (‖R‖ + 1e-8), per channel or per matrix.

  Args:
    r: projected gradients, (batch, m, rank) if ``tall`` else (batch, rank, n).
    normalized: Ñ = M / (√V + eps), same shape as ``r``.
    tall: whether m >= n.
    scale_type: "channel" (one factor per row when tall, per column otherwise,
      i.e. along the longer side) or "tensor" (one factor per matrix).

  Returns:
    Factors shaped to broadcast against the canonical (batch, m, n) gradient.
  """
  if scale_type == "tensor":
    axis = (1, 2)
  else:
    axis = 2 if tall else 1
  return _channel_norm(normalized, axis) / (_channel_norm(r, axis) + _NORM_EPS)


def _channel_norm(x: jax.Array, axis: Union[int, tuple[int, ...]]) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))


class ApolloLeafStep(NamedTuple):
  """What :func:`apollo_leaf_step` computes for one leaf.

  Attributes:
    gradient: the leaf's gradient in canonical form (batch, m, n), its dtype.
    factor: the scaling factor s, broadcastable to ``gradient`` (float32 or
      wider); the update is ``gradient * factor``.
    mu: the new first moments, in the stored layout and dtype.
    nu: the new second moments, likewise.
    svd_projection: the projection used, (batch, r, d), when it is stored
      (SVD); None otherwise.
  """

  gradient: jax.Array
  factor: jax.Array
  mu: jax.Array
  nu: jax.Array
  svd_projection: Optional[jax.Array]


def apollo_leaf_step(
    settings: ApolloSettings,
    leaf: MatrixLeaf,
    mu: jax.Array,
    nu: jax.Array,
    stored_projection: Optional[jax.Array],
    count: jax.Array,
    matrix_index_offset: Any = 0,
) -> ApolloLeafStep:
  """APOLLO for one gradient leaf: projection, moments and scaling factor.

  Args:
    settings: the transformation's settings.
    leaf: the gradient leaf with its path and layout.
    mu: its first moments (stored layout).
    nu: its second moments.
    stored_projection: its stored projection (SVD only), else None.
    count: the number of updates taken so far.
    matrix_index_offset: index of the leaf's first matrix in the full leaf
      (see :func:`scale_by_apollo`).

  Returns:
    An :class:`ApolloLeafStep`.
  """
  layout = leaf.layout
  compute_dtype = utils.compute_dtype(leaf.value.dtype)
  r = layout.effective_rank(settings.rank)
  gradient = layout.to_canonical(leaf.value)
  if settings.stores_projection:
    p = jax.lax.cond(
        count % settings.update_proj_gap == 0,
        lambda: proj.svd_projection(
            gradient.astype(compute_dtype), r, layout.tall
        ),
        lambda: stored_projection,
    )
    p_scale = None
  else:
    keys = proj.projection_keys(
        settings.key, leaf.path, count // settings.update_proj_gap,
        layout.num_matrices, matrix_index_offset,
    )
    p, p_scale = proj.regenerate(
        settings.projection, keys, (r, layout.projected_dim), compute_dtype,
        settings.projection_dtype,
    )
  m = layout.lowrank_to_canonical(mu).astype(compute_dtype)
  v = layout.lowrank_to_canonical(nu).astype(compute_dtype)
  # With sharding in types, R keeps G's sharding on the kept axis: a sharded
  # contracted axis of G is reduced into R, G is never moved. R then takes
  # the moments' sharding (a local slice when they are sharded further).
  out = shd.lowrank_sharding(gradient, rank_axis=2 if layout.tall else 1)
  projected = proj.project(
      gradient, p, tall=layout.tall, compute_dtype=compute_dtype,
      projection_dtype=settings.projection_dtype, scale=p_scale,
      out_sharding=out,
  )
  if out is not None:
    projected = jax.sharding.reshard(projected, shd.explicit_sharding(m))
  m = settings.b1 * m + (1.0 - settings.b1) * projected
  v = settings.b2 * v + (1.0 - settings.b2) * jnp.square(projected)
  normalized = m / (jnp.sqrt(v) + settings.eps)
  factor = apollo_scaling_factor(
      projected, normalized, tall=layout.tall, scale_type=settings.scale_type
  )
  # The moments may be sharded where G is not: gather the (small) factors.
  target = shd.broadcast_sharding(factor, gradient)
  if target is not None:
    factor = jax.sharding.reshard(factor, target)
  return ApolloLeafStep(
      gradient=gradient,
      factor=factor,
      mu=layout.lowrank_from_canonical(m).astype(mu.dtype),
      nu=layout.lowrank_from_canonical(v).astype(nu.dtype),
      svd_projection=p if settings.stores_projection else None,
  )


def init_apollo_state(
    settings: ApolloSettings,
    params: Any,
    weight_dimension_numbers: dn.DimensionNumbersOrFn,
) -> ScaleByApolloState:
  """Zero moments (and stored projections) for the matrix leaves of ``params``."""
  leaves, treedef = matrix_leaves(params, weight_dimension_numbers)
  # Sharded like the parameter along its kept and batch axes (see sharding).
  derivations = [shd.lowrank_derivation(leaf.layout) for leaf in leaves]
  moments = [
      shd.zeros(
          leaf.value,
          leaf.layout.lowrank_shape(settings.rank),
          settings.state_dtype(leaf.value),
          derivation,
      )
      for leaf, derivation in zip(leaves, derivations)
  ]
  mu = shd.relabel_variables(treedef.unflatten(moments), derivations)
  nu = shd.relabel_variables(
      treedef.unflatten([jnp.zeros_like(m) for m in moments]), derivations
  )
  stored = None
  if settings.stores_projection:
    stored = shd.relabel_variables(treedef.unflatten([
        jnp.zeros(
            (
                leaf.layout.num_matrices,
                leaf.layout.effective_rank(settings.rank),
                leaf.layout.projected_dim,
            ),
            utils.compute_dtype(leaf.value.dtype),
        )
        for leaf in leaves
    ]), [shd.Derivation((None, None, None))] * len(leaves))
  return ScaleByApolloState(
      count=jnp.zeros([], jnp.int32), mu=mu, nu=nu, svd_projection=stored
  )


def _leaf_steps(
    settings: ApolloSettings,
    leaves: list[MatrixLeaf],
    treedef: Any,
    state: ScaleByApolloState,
    matrix_index_offset: Any,
) -> list[ApolloLeafStep]:
  stored = (
      treedef.flatten_up_to(state.svd_projection)
      if settings.stores_projection
      else [None] * len(leaves)
  )
  return [
      apollo_leaf_step(
          settings, leaf, mu, nu, p, state.count, matrix_index_offset
      )
      for leaf, mu, nu, p in zip(
          leaves,
          treedef.flatten_up_to(state.mu),
          treedef.flatten_up_to(state.nu),
          stored,
      )
  ]


def _next_apollo_state(
    settings: ApolloSettings,
    steps: list[ApolloLeafStep],
    treedef: Any,
    state: ScaleByApolloState,
) -> ScaleByApolloState:
  return ScaleByApolloState(
      count=optax.safe_increment(state.count),
      mu=treedef.unflatten([step.mu for step in steps]),
      nu=treedef.unflatten([step.nu for step in steps]),
      svd_projection=(
          treedef.unflatten([step.svd_projection for step in steps])
          if settings.stores_projection
          else None
      ),
  )


def scale_by_apollo(
    rank: int = 256,
    *,
    scale_type: ScaleType = "channel",
    update_proj_gap: int = 200,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-6,
    projection: Union[ProjectionName, proj.ProjectionFn] = "gaussian",
    key: Optional[Union[jax.Array, int]] = None,
    weight_dimension_numbers: dn.DimensionNumbersOrFn = None,
    mu_dtype: Optional[Any] = None,
    projection_dtype: Optional[Any] = None,
    seed: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Scales each gradient matrix by APOLLO's low-rank estimate of Adam.

  For a gradient matrix G of shape (m, n) and step t = 1, 2, …:

  1. P of shape (r, d), d = min(m, n), r = min(rank, d): for
     ``projection="gaussian"`` entries :math:`\mathcal N(0, 1/r)`, for
     ``"rademacher"`` entries :math:`\pm 1/\sqrt r` with fair signs (the
     same guarantee: independent sub-Gaussian entries, :math:`\mathbb
     E[P^\top P] = I`, Johnson–Lindenstrauss), drawn from a key derived from
     (``key``, the leaf's path, the refresh index
     :math:`\lfloor (t-1)/\text{gap} \rfloor`); P is regenerated, not stored.
  2. :math:`R = G P^\top` (m × r) if m ≥ n, else :math:`R = P G` (r × n);
     with ``projection_dtype`` G and P enter this product in that dtype
     (e.g. bfloat16) and it accumulates in float32 (at rank 1 only P is
     rounded: the matrix-vector product is bound by reading G).
  3. :math:`M \leftarrow b_1 M + (1-b_1) R`,
     :math:`V \leftarrow b_2 V + (1-b_2) R^2` (kept across refreshes).
  4. :math:`\tilde N = M / (\sqrt V + \epsilon)`; ``"channel"``:
     :math:`s_j = \|\tilde N_j\| / (\|R_j\| + 10^{-8})` for each channel j along
     the longer side; ``"tensor"``: one Frobenius-norm ratio.
  5. Returns :math:`G \cdot s` (the raw gradient, rescaled).

  ``update`` accepts the extra keyword argument ``matrix_index_offset`` (an
  int or traced int32, default 0): the leaves are then a slice of larger
  batches starting at that matrix, and matrix b of a leaf gets the projection
  of matrix ``matrix_index_offset + b`` of the full leaf. A layer-wise step
  that updates layer l of scanned ``(L, m, n)`` kernels one at a time passes
  ``matrix_index_offset=l`` to draw the projections of the whole-stack update.

  Bias correction, the √scale factor, the norm-growth limiter, weight decay and
  the learning rate are separate transformations; :func:`apollo_optax.apollo`
  chains them. Every leaf given to this transformation must be matrix-like;
  send vectors to Adam with ``optax.partition`` (as ``apollo`` does).

  State per matrix leaf: two arrays of r·max(m, n) numbers of ``mu_dtype``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import apollo_optax
    >>> tx = optax.chain(apollo_optax.scale_by_apollo(rank=4),
    ...                  optax.scale(-1e-2))
    >>> params = {"w": jnp.ones((32, 16))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones((32, 16))}, state)
    >>> state[0].mu["w"].shape
    (32, 4)

  Args:
    rank: projection rank r (clamped to min(m, n) per matrix); static.
    scale_type: "channel" (APOLLO) or "tensor" (APOLLO-Mini).
    update_proj_gap: steps between projection refreshes (T); static.
    b1: decay of the first moment, in [0, 1).
    b2: decay of the second moment, in [0, 1).
    eps: added to √V, >= 0.
    projection: "gaussian" (the paper's), "rademacher" (±1/√r: one random
      bit per entry instead of a normal sample, exact in bfloat16), "svd"
      (top singular vectors of G at each refresh, the paper's ablation; the
      projection is then stored in the state), or a callable
      ``projection(key, shape, dtype) -> array of shape`` with
      ``shape = (r, d)``.
    key: PRNG key of the projections (``jax.random.key``), or an int seed
      standing for ``jax.random.key(seed)``; None: ``0``.
    weight_dimension_numbers: which axes form the matrix (see
      :class:`ApolloDimensionNumbers`); None: the last two axes of each leaf.
    mu_dtype: dtype of both moments; None: the leaf's dtype, at least float32.
    projection_dtype: dtype of G and P in the product R = G Pᵀ (a floating
      dtype, e.g. ``jnp.bfloat16``: about 1.6x faster on CPUs with bfloat16
      dot instructions), which then accumulates in the compute dtype; the
      moments, norms and scaling stay in the compute dtype. None (default):
      the compute dtype, the paper's algorithm. With
      ``optax.inject_hyperparams`` list it in ``static_args`` (a dtype is
      callable, it would be taken for a schedule).
    seed: deprecated, use ``key``.

  Returns:
    A ``GradientTransformationExtraArgs``.

  References:
    Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
    <https://arxiv.org/abs/2412.05270>`_, MLSys 2025

    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection <https://arxiv.org/abs/2403.03507>`_, 2024 (the ``"svd"``
    projection)
  """
  key = utils.deprecated_argument("scale_by_apollo", "seed", seed, "key", key)
  settings = ApolloSettings.create(
      rank,
      scale_type=scale_type,
      update_proj_gap=update_proj_gap,
      b1=b1,
      b2=b2,
      eps=eps,
      projection=projection,
      key=0 if key is None else key,
      mu_dtype=mu_dtype,
      projection_dtype=projection_dtype,
  )
  dn.check_dimension_numbers(weight_dimension_numbers, "weight_dimension_numbers")

  def init_fn(params):
    return init_apollo_state(settings, params, weight_dimension_numbers)

  def update_fn(updates, state, params=None, *, matrix_index_offset=0,
                **extra_args):
    del params, extra_args
    leaves, treedef = matrix_leaves(updates, weight_dimension_numbers)
    steps = _leaf_steps(settings, leaves, treedef, state, matrix_index_offset)
    new_updates = [
        leaf.layout.from_canonical(step.gradient * step.factor).astype(
            leaf.value.dtype
        )
        for leaf, step in zip(leaves, steps)
    ]
    return treedef.unflatten(new_updates), _next_apollo_state(
        settings, steps, treedef, state
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def apollo_matrix_chain(
    rank: int,
    *,
    sqrt_scale: ArrayLike,
    scale_front: bool,
    norm_growth_limit: Optional[ArrayLike],
    weight_dimension_numbers: dn.DimensionNumbersOrFn = None,
    **apollo_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """APOLLO's update of the matrix leaves as a chain of its parts.

  ``optax.chain(scale_by_apollo(...), optax.scale(√scale),
  norm_growth_limiter(γ))``, with √scale after the limiter unless
  ``scale_front``, and no limiter when ``norm_growth_limit`` is None.
  :func:`fused_apollo_matrix_chain` computes the same in one pass.

  Args:
    rank: projection rank.
    sqrt_scale: the factor √scale multiplying the update.
    scale_front: apply √scale before the limiter.
    norm_growth_limit: γ of the limiter, or None for no limiter.
    weight_dimension_numbers: which axes form the matrix.
    **apollo_kwargs: the other arguments of :func:`scale_by_apollo`.

  Returns:
    The ``optax.chain``.
  """
  parts = [scale_by_apollo(
      rank, weight_dimension_numbers=weight_dimension_numbers, **apollo_kwargs
  )]
  if scale_front:
    parts.append(optax.scale(sqrt_scale))
  if norm_growth_limit is not None:
    parts.append(limiter.norm_growth_limiter(
        norm_growth_limit, weight_dimension_numbers=weight_dimension_numbers
    ))
  if not scale_front:
    parts.append(optax.scale(sqrt_scale))
  return optax.chain(*parts)


def _is_own_state(path: Any, value: Any) -> bool:
  del path
  return isinstance(value, (ScaleByApolloState, limiter.NormGrowthLimiterState))


def fused_apollo_matrix_chain(
    rank: int,
    *,
    sqrt_scale: ArrayLike,
    scale_front: bool,
    norm_growth_limit: Optional[ArrayLike],
    weight_dimension_numbers: dn.DimensionNumbersOrFn = None,
    **apollo_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """:func:`apollo_matrix_chain` in one pass over each gradient.

  Its ``init`` is the chain's, so the state is the chain's own; ``update``
  finds the :class:`ScaleByApolloState` and the limiter's
  :class:`NormGrowthLimiterState` in it by type (``optax.tree.get``) and
  writes them back with ``optax.tree.set``. It makes no full-size pass it does
  not need: the limiter's norm comes from channel norms of G,
  ‖G·s‖² = Σⱼ sⱼ² ‖Gⱼ‖², and the scaling factor, √scale and the limiter's
  factor multiply G once. Used by :func:`apollo_optax.apollo`.

  Args: as :func:`apollo_matrix_chain`.

  Returns:
    A ``GradientTransformationExtraArgs`` with the chain's state.
  """
  chain = apollo_matrix_chain(
      rank,
      sqrt_scale=sqrt_scale,
      scale_front=scale_front,
      norm_growth_limit=norm_growth_limit,
      weight_dimension_numbers=weight_dimension_numbers,
      **apollo_kwargs,
  )
  settings = ApolloSettings.create(rank, **apollo_kwargs)
  has_limiter = norm_growth_limit is not None
  pre_scale = sqrt_scale if scale_front else 1.0
  post_scale = 1.0 if scale_front else sqrt_scale

  def limited_factor(leaf, step, previous_norm):
    """(limiter factor per matrix, broadcastable; norm to remember)."""
    s = step.factor
    g_squared = jnp.square(step.gradient.astype(s.dtype))
    if settings.scale_type == "tensor":
      norm_squared = jnp.square(s[:, 0, 0]) * jnp.sum(g_squared, axis=(1, 2))
    else:
      channel_axis = 2 if leaf.layout.tall else 1
      channel_norms = jnp.sum(g_squared, axis=channel_axis, keepdims=True)
      norm_squared = jnp.sum(jnp.square(s) * channel_norms, axis=(1, 2))
    norm = pre_scale * jnp.sqrt(norm_squared).reshape(previous_norm.shape)
    factor, remembered = limiter.growth_limit(
        norm, previous_norm.astype(norm.dtype), norm_growth_limit
    )
    return factor.reshape(-1, 1, 1), remembered.astype(previous_norm.dtype)

  def update_fn(updates, state, params=None, *, matrix_index_offset=0,
                **extra_args):
    del params, extra_args
    apollo_state = optax.tree.get(state, "ScaleByApolloState", None, _is_own_state)
    leaves, treedef = matrix_leaves(updates, weight_dimension_numbers)
    steps = _leaf_steps(
        settings, leaves, treedef, apollo_state, matrix_index_offset
    )
    new_states = {
        "ScaleByApolloState": _next_apollo_state(
            settings, steps, treedef, apollo_state
        )
    }
    if has_limiter:
      limiter_state = optax.tree.get(
          state, "NormGrowthLimiterState", None, _is_own_state
      )
      previous = treedef.flatten_up_to(limiter_state.previous_norm)
    else:
      previous = [None] * len(leaves)
    new_updates, remembered = [], []
    for leaf, step, previous_norm in zip(leaves, steps, previous):
      total = pre_scale * post_scale
      if has_limiter:
        factor, norm = limited_factor(leaf, step, previous_norm)
        total = total * factor
        remembered.append(norm)
      new_updates.append(
          leaf.layout.from_canonical(
              step.gradient * (step.factor * total)
          ).astype(leaf.value.dtype)
      )
    if has_limiter:
      new_states["NormGrowthLimiterState"] = limiter.NormGrowthLimiterState(
          treedef.unflatten(remembered)
      )
    return treedef.unflatten(new_updates), optax.tree.set(
        state, _is_own_state, **new_states
    )

  return optax.GradientTransformationExtraArgs(chain.init, update_fn)
