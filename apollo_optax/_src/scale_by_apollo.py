"""APOLLO's gradient scaling: low-rank moments estimate a channel-wise scale."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax
from optax._src import base
from optax._src import numerics

from apollo_optax._src import dimension_numbers as dn
from apollo_optax._src import limiter
from apollo_optax._src import projection as proj
from apollo_optax._src import sharding as shd
from apollo_optax._src import utils

SCALE_TYPES = ("channel", "tensor")
PROJECTIONS = ("gaussian", "svd")
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
    projection: stored projections, only for ``projection="svd"`` (the SVD of
      a past gradient cannot be regenerated); None otherwise.
  """

  count: jax.Array
  mu: base.Updates
  nu: base.Updates
  projection: Optional[base.Updates]


def _channel_norm(x: jax.Array, axis: Union[int, tuple[int, ...]]) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))


def apollo_scaling_factor(
    r: jax.Array,
    normalized: jax.Array,
    *,
    tall: bool,
    scale_type: str,
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


def scale_by_apollo(
    rank: int = 256,
    *,
    scale_type: str = "channel",
    update_proj_gap: int = 200,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    projection: Union[str, proj.ProjectionFn] = "gaussian",
    seed: int = 0,
    weight_dimension_numbers: dn.DimensionNumbersOrFn = None,
    mu_dtype: Optional[Any] = None,
) -> base.GradientTransformation:
  r"""Scales each gradient matrix by APOLLO's low-rank estimate of Adam.

  For a gradient matrix G of shape (m, n) and step t = 1, 2, …:

  1. P of shape (r, d), d = min(m, n), r = min(rank, d): for
     ``projection="gaussian"`` entries :math:`\mathcal N(0, 1/r)` drawn from a
     key derived from (``seed``, the leaf's path, the refresh index
     :math:`\lfloor (t-1)/\text{gap} \rfloor`); P is regenerated, not stored.
  2. :math:`R = G P^\top` (m × r) if m ≥ n, else :math:`R = P G` (r × n).
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
    projection: "gaussian", "svd" (top singular vectors of G at each refresh,
      the paper's ablation; the projection is then stored in the state), or a
      callable ``projection(key, shape, dtype) -> array of shape`` with
      ``shape = (r, d)``.
    seed: seed of the projections.
    weight_dimension_numbers: which axes form the matrix (see
      :class:`ApolloDimensionNumbers`); None: the last two axes of each leaf.
    mu_dtype: dtype of both moments; None: the leaf's dtype, at least float32.

  Returns:
    A ``GradientTransformation``.
  """
  core = _build(
      rank,
      scale_type=scale_type,
      update_proj_gap=update_proj_gap,
      b1=b1,
      b2=b2,
      eps=eps,
      projection=projection,
      seed=seed,
      weight_dimension_numbers=weight_dimension_numbers,
      mu_dtype=mu_dtype,
  )
  return base.GradientTransformationExtraArgs(core.init, core.update)


class _Core(NamedTuple):
  """scale_by_apollo's init/update and the per-leaf pieces they are made of."""

  init: Callable[[Any], ScaleByApolloState]
  update: Callable[..., Any]
  layouts: Callable[[Any], Any]
  leaf_factor: Callable[..., Any]
  flat_state: Callable[..., Any]
  unflatten_results: Callable[..., Any]


def _build(
    rank, *, scale_type, update_proj_gap, b1, b2, eps, projection, seed,
    weight_dimension_numbers, mu_dtype,
) -> _Core:
  """Validates the arguments and builds scale_by_apollo's functions."""
  rank = utils.check_static_int("rank", rank, 1)
  update_proj_gap = utils.check_static_int("update_proj_gap", update_proj_gap, 1)
  utils.check_choice("scale_type", scale_type, SCALE_TYPES)
  if not callable(projection):
    utils.check_choice("projection", projection, PROJECTIONS + ("<callable>",))
  utils.check_real("b1", b1, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
  utils.check_real("b2", b2, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
  utils.check_real("eps", eps, lambda v: v >= 0.0, ">= 0")
  dn.check_dimension_numbers(weight_dimension_numbers, "weight_dimension_numbers")
  mu_dtype = utils.canonicalize_dtype(mu_dtype, "mu_dtype")
  stores_projection = projection == "svd"
  projection_fn = proj.gaussian_projection if projection == "gaussian" else projection

  def layouts(tree):
    """(paths, leaves, layouts, treedef) for the leaves of ``tree``."""
    dims = dn.resolve_dimension_numbers(weight_dimension_numbers, tree)
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    dims_leaves = treedef.flatten_up_to(dims)
    paths = [utils.path_str(path) for path, _ in path_leaves]
    leaves = [leaf for _, leaf in path_leaves]
    result = []
    for path, leaf, leaf_dims in zip(paths, leaves, dims_leaves):
      if leaf_dims is None:
        raise ValueError(
            f"scale_by_apollo got the leaf {path!r} of shape"
            f" {tuple(leaf.shape)}, which has no weight_dimension_numbers"
            " (vectors and scalars cannot be projected). Route it to Adam,"
            " e.g. with apollo_optax.apollo's `lowrank_mask` or"
            " optax.partition."
        )
      result.append(dn.MatrixLayout.create(leaf.shape, leaf_dims, path))
    return paths, leaves, result, treedef

  def state_dtype(leaf):
    return mu_dtype if mu_dtype is not None else utils.compute_dtype(leaf.dtype)

  def init_fn(params):
    _, leaves, leaf_layouts, treedef = layouts(params)
    # Sharded like the parameter along its kept and batch axes (see sharding).
    derivations = [shd.lowrank_derivation(layout) for layout in leaf_layouts]
    moments = [
        shd.zeros(leaf, layout.lowrank_shape(rank), state_dtype(leaf), d)
        for leaf, layout, d in zip(leaves, leaf_layouts, derivations)
    ]
    mu = shd.relabel_variables(treedef.unflatten(moments), derivations)
    nu = shd.relabel_variables(
        treedef.unflatten([jnp.zeros_like(m) for m in moments]), derivations
    )
    stored = None
    if stores_projection:
      stored = shd.relabel_variables(treedef.unflatten([
          jnp.zeros(
              (
                  layout.num_matrices,
                  layout.effective_rank(rank),
                  layout.projected_dim,
              ),
              utils.compute_dtype(leaf.dtype),
          )
          for leaf, layout in zip(leaves, leaf_layouts)
      ]), [shd.Derivation((None, None, None))] * len(leaves))
    return ScaleByApolloState(
        count=jnp.zeros([], jnp.int32), mu=mu, nu=nu, projection=stored
    )

  def leaf_factor(path, g, mu, nu, stored, layout, count, first_matrix=0):
    """(G canonical, s broadcastable to it, new mu, new nu, projection)."""
    cdt = utils.compute_dtype(g.dtype)
    r = layout.effective_rank(rank)
    g3 = layout.to_canonical(g)
    if stores_projection:
      p = jax.lax.cond(
          count % update_proj_gap == 0,
          lambda: proj.svd_projection(g3.astype(cdt), r, layout.tall),
          lambda: stored,
      )
    else:
      keys = proj.projection_keys(
          seed, path, count // update_proj_gap, layout.num_matrices,
          first_matrix,
      )
      p = jax.vmap(
          lambda k: projection_fn(k, (r, layout.projected_dim), cdt)
      )(keys).astype(cdt)
    g3c = g3.astype(cdt)
    m = layout.lowrank_to_canonical(mu).astype(cdt)
    v = layout.lowrank_to_canonical(nu).astype(cdt)
    # With sharding in types, R keeps G's sharding on the kept axis: a sharded
    # contracted axis of G is reduced into R, G is never moved. R then takes
    # the moments' sharding (a local slice when they are sharded further).
    out = shd.lowrank_sharding(g3, rank_axis=2 if layout.tall else 1)
    if layout.tall:
      low = jnp.einsum("bmn,brn->bmr", g3c, p, out_sharding=out)
    else:
      low = jnp.einsum("brm,bmn->brn", p, g3c, out_sharding=out)
    if out is not None:
      low = jax.sharding.reshard(low, shd.explicit_sharding(m))
    m = b1 * m + (1.0 - b1) * low
    v = b2 * v + (1.0 - b2) * jnp.square(low)
    normalized = m / (jnp.sqrt(v) + eps)
    factor = apollo_scaling_factor(
        low, normalized, tall=layout.tall, scale_type=scale_type
    )
    # The moments may be sharded where G is not: gather the (small) factors.
    target = shd.broadcast_sharding(factor, g3)
    if target is not None:
      factor = jax.sharding.reshard(factor, target)
    new_mu = layout.lowrank_from_canonical(m).astype(mu.dtype)
    new_nu = layout.lowrank_from_canonical(v).astype(nu.dtype)
    return g3, factor, new_mu, new_nu, p if stores_projection else None

  def flat_state(state, treedef):
    stored = (
        treedef.flatten_up_to(state.projection)
        if stores_projection
        else [None] * treedef.num_leaves
    )
    return (
        treedef.flatten_up_to(state.mu),
        treedef.flatten_up_to(state.nu),
        stored,
    )

  def unflatten_results(results, treedef, state):
    columns = list(zip(*results)) if results else [()] * 4
    unflatten = lambda i: treedef.unflatten(list(columns[i]))
    return unflatten(0), ScaleByApolloState(
        count=numerics.safe_increment(state.count),
        mu=unflatten(1),
        nu=unflatten(2),
        projection=unflatten(3) if stores_projection else None,
    )

  def update_fn(updates, state, params=None, *, matrix_index_offset=0,
                **extra_args):
    del params, extra_args
    paths, leaves, leaf_layouts, treedef = layouts(updates)
    results = []
    for args in zip(paths, leaves, *flat_state(state, treedef), leaf_layouts):
      g3, factor, new_mu, new_nu, p = leaf_factor(
          *args, state.count, matrix_index_offset
      )
      update = args[-1].from_canonical(g3 * factor).astype(args[1].dtype)
      results.append((update, new_mu, new_nu, p))
    return unflatten_results(results, treedef, state)

  return _Core(init_fn, update_fn, layouts, leaf_factor, flat_state,
               unflatten_results)


def scale_by_apollo_limited(
    rank: int,
    *,
    sqrt_scale: Any,
    scale_front: bool,
    norm_growth_limit: Optional[Any],
    **apollo_kwargs: Any,
) -> base.GradientTransformation:
  """scale_by_apollo, √scale and the norm-growth limiter in one pass over G.

  Computes exactly what ``optax.chain(scale_by_apollo(...), optax.scale(√s),
  norm_growth_limiter(γ))`` (√s after the limiter unless ``scale_front``)
  computes, with the same state structure, but makes no full-size pass it does
  not need: the limiter's norm comes from channel norms of G,
  ‖G·s‖² = Σⱼ sⱼ² ‖Gⱼ‖², and the scaling factor, √scale and the limiter's
  factor multiply G once. Used by :func:`apollo_optax.apollo`.
  """
  core = _build(rank, **apollo_kwargs)
  gamma = norm_growth_limit
  dims_spec = apollo_kwargs["weight_dimension_numbers"]
  norm_limiter = (
      limiter.norm_growth_limiter(gamma, weight_dimension_numbers=dims_spec)
      if gamma is not None
      else None
  )
  pre_scale = sqrt_scale if scale_front else 1.0
  post_scale = 1.0 if scale_front else sqrt_scale

  def assemble(apollo_state, limiter_state, params):
    states = [apollo_state]
    if scale_front:
      states.append(optax_scale_state(params))
    if limiter_state is not None:
      states.append(limiter_state)
    if not scale_front:
      states.append(optax_scale_state(params))
    return tuple(states)

  def init_fn(params):
    limiter_state = norm_limiter.init(params) if norm_limiter else None
    return assemble(core.init(params), limiter_state, params)

  def update_fn(updates, state, params=None, *, matrix_index_offset=0,
                **extra_args):
    del params, extra_args
    apollo_state = state[0]
    limiter_state = state[2 if scale_front else 1] if norm_limiter else None
    paths, leaves, leaf_layouts, treedef = core.layouts(updates)
    previous = (
        treedef.flatten_up_to(limiter_state.previous_norm)
        if norm_limiter
        else [None] * len(leaves)
    )
    results, new_previous = [], []
    for args in zip(
        paths, leaves, *core.flat_state(apollo_state, treedef), leaf_layouts,
        previous,
    ):
      layout, prev = args[-2], args[-1]
      g3, s, new_mu, new_nu, p = core.leaf_factor(
          *args[:-1], apollo_state.count, matrix_index_offset
      )
      total = pre_scale * post_scale
      if norm_limiter:
        g_squared = jnp.square(g3.astype(s.dtype))
        if apollo_kwargs["scale_type"] == "tensor":
          norm_squared = jnp.square(s[:, 0, 0]) * jnp.sum(g_squared, axis=(1, 2))
        else:
          channel_axis = 2 if layout.tall else 1
          channel_norms = jnp.sum(g_squared, axis=channel_axis, keepdims=True)
          norm_squared = jnp.sum(jnp.square(s) * channel_norms, axis=(1, 2))
        norm = pre_scale * jnp.sqrt(norm_squared).reshape(prev.shape)
        factor, remembered = limiter.growth_limit(norm, prev.astype(norm.dtype), gamma)
        new_previous.append(remembered.astype(prev.dtype))
        total = total * factor.reshape(-1, 1, 1)
      update = layout.from_canonical(g3 * (s * total)).astype(args[1].dtype)
      results.append((update, new_mu, new_nu, p))
    new_updates, new_apollo_state = core.unflatten_results(
        results, treedef, apollo_state
    )
    new_limiter_state = (
        limiter.NormGrowthLimiterState(treedef.unflatten(new_previous))
        if norm_limiter
        else None
    )
    return new_updates, assemble(new_apollo_state, new_limiter_state, None)

  return base.GradientTransformationExtraArgs(init_fn, update_fn)


def optax_scale_state(params: Any) -> Any:
  """The (empty) state that ``optax.scale`` keeps."""
  return optax.scale(1.0).init(params)
