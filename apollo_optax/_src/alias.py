"""APOLLO and APOLLO-Mini: the optimizers, as chains of small transformations."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import optax

from apollo_optax._src import adam
from apollo_optax._src import coverage
from apollo_optax._src import dimension_numbers as dn
from apollo_optax._src import limiter
from apollo_optax._src import projection as proj
from apollo_optax._src import scale_by_apollo as sba
from apollo_optax._src import utils

# Path keys of leaves that stay on Adam: embeddings and output heads (as in the
# paper: only attention and MLP weights are low-rank), and norm parameters and
# biases (which become 2-D when layers are stacked for scan).
EXCLUDED_KEYS = frozenset(
    {"embed", "embedding", "embeddings", "embed_tokens", "wte", "wpe", "lm_head",
     "bias"}
)
_EXCLUDED_SUBSTRINGS = ("embed", "norm")

MaskOrFn = Union[Any, Callable[[optax.Params], Any]]


def _is_excluded(path: tuple[Any, ...]) -> bool:
  for entry in path:
    name = utils.key_name(entry).lower()
    if name in EXCLUDED_KEYS or any(s in name for s in _EXCLUDED_SUBSTRINGS):
      return True
  return False


def default_lowrank_mask(params: optax.Params) -> Any:
  """Which leaves APOLLO treats as low-rank matrices by default.

  A leaf is low-rank when it has at least two axes and no key on its path
  names an embedding, an output head or a norm: no path key is one of
  ``embed, embedding, embeddings, embed_tokens, wte, wpe, lm_head, bias`` or
  contains ``embed`` or ``norm`` (case-insensitive). Everything else (embeddings, output
  head, norms, biases, scalars) gets AdamW, as in the official code, which
  projects only attention and MLP weights.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {"embed": jnp.zeros((100, 8)), "mlp": {"kernel": jnp.zeros((8, 16)),
    ...           "bias": jnp.zeros(16)}, "norm": {"scale": jnp.zeros((2, 8))}}
    >>> default_lowrank_mask(params)
    {'embed': False, 'mlp': {'bias': False, 'kernel': True}, 'norm': {'scale': False}}

  Args:
    params: a pytree of arrays (or ``jax.ShapeDtypeStruct``).

  Returns:
    A pytree of bools with the structure of ``params``.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, x: len(x.shape) >= 2 and not _is_excluded(path), params
  )


def _resolve_mask(mask: MaskOrFn, params: optax.Params) -> Any:
  if mask is None:
    return default_lowrank_mask(params)
  if callable(mask):
    return mask(params)
  return mask


def apollo(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 256,
    *,
    scale_type: sba.ScaleType = "channel",
    scale: ArrayLike = 1.0,
    scale_front: bool = False,
    norm_growth_limit: Optional[ArrayLike] = 1.01,
    update_proj_gap: int = 200,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-6,
    weight_decay: ArrayLike = 0.0,
    weight_decay_mask: Optional[MaskOrFn] = None,
    adam_learning_rate: Optional[optax.ScalarOrSchedule] = None,
    adam_weight_decay: Optional[ArrayLike] = None,
    lowrank_mask: Optional[MaskOrFn] = None,
    projection: Union[sba.ProjectionName, proj.ProjectionFn] = "gaussian",
    key: Optional[Union[jax.Array, int]] = None,
    weight_dimension_numbers: dn.DimensionNumbersOrFn = None,
    mu_dtype: Optional[Any] = None,
    projection_dtype: Optional[Any] = None,
    seed: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""APOLLO: SGD-like memory, AdamW-level performance (Zhu et al., 2025).

  Matrix leaves (``lowrank_mask``) get APOLLO, all others AdamW:

  - matrices: :math:`U = G \cdot s` from :func:`scale_by_apollo`, then
    :math:`\sqrt{\text{scale}}` (before the limiter if ``scale_front``, after it
    otherwise), then :func:`norm_growth_limiter` (unless
    ``norm_growth_limit=None``);
  - other leaves: :math:`m / (\sqrt v + \epsilon)` (:func:`scale_by_adam_moments`);
  - then, for all leaves, bias correction
    :math:`\sqrt{1-b_2^t}/(1-b_1^t)`, decoupled weight decay on the pre-update
    parameters, and the learning rate:
    :math:`\Delta\theta = -\eta_t (U \sqrt{1-b_2^t}/(1-b_1^t) + \lambda\theta)`,
    where the AdamW leaves use ``adam_learning_rate`` and
    ``adam_weight_decay`` for :math:`\eta_t` and :math:`\lambda` when they
    are given (as ``optax.contrib.muon``).

  ``init`` emits one :class:`LowRankCoverageWarning` when the low-rank leaves
  hold no parameter, or fewer than 5% of them while matrices fell back to
  AdamW (flattened parameters, a mask that matches nothing);
  :func:`lowrank_summary` gives the breakdown.

  This reproduces ``APOLLOAdamW`` of the official ``apollo-torch`` 1.0.3, except
  that weight decay uses the pre-update parameters (as ``optax.adamw``; the
  official code decays the updated ones, a difference of order η²λ) and that an
  all-zero first update does not arm the limiter.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import apollo_optax
    >>> params = {"w": jnp.ones((64, 32)), "b": jnp.zeros(32)}
    >>> tx = apollo_optax.apollo(learning_rate=1e-2, rank=8)
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.sum((jnp.ones(64) @ p["w"] + p["b"]) ** 2)
    >>> grads = jax.grad(loss)(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> bool(loss(params) < 64.0 ** 2 * 32)
    True

  Args:
    learning_rate: a float or an optax schedule.
    rank: projection rank (static); the paper uses 1/4 of the hidden size.
    scale_type: "channel" (APOLLO) or "tensor" (APOLLO-Mini).
    scale: α², the update is multiplied by √scale; > 0.
    scale_front: apply √scale before the norm-growth limiter (recommended for
      APOLLO-Mini with short warm-up).
    norm_growth_limit: γ of the norm-growth limiter (> 1), or None to disable.
    update_proj_gap: steps between projection refreshes (static).
    b1: decay of the first moment, in [0, 1).
    b2: decay of the second moment, in [0, 1).
    eps: added to √v, >= 0.
    weight_decay: decoupled weight decay λ (as ``optax.adamw``).
    weight_decay_mask: which leaves are decayed (pytree of bools or callable);
      None: all.
    adam_learning_rate: learning rate (float or schedule) of the leaves that
      get AdamW (embeddings, head, norms, biases: not ``lowrank_mask``); None:
      ``learning_rate``. At small scale it decides much of the result.
    adam_weight_decay: weight decay of those leaves (within
      ``weight_decay_mask``); None: ``weight_decay``.
    lowrank_mask: which leaves get APOLLO (pytree of bools or callable); None:
      :func:`default_lowrank_mask`. Leaves whose ``weight_dimension_numbers``
      are None stay on Adam too.
    projection: "gaussian", "rademacher", "svd" or a callable, see
      :func:`scale_by_apollo`. ``"rademacher"`` with
      ``projection_dtype=jnp.bfloat16`` is the fast path.
    key: PRNG key of the random projections (``jax.random.key``), or an int
      seed standing for ``jax.random.key(seed)``; None: ``0``.
    weight_dimension_numbers: which axes form the matrix; None: the last two.
    mu_dtype: dtype of all moments; None: the parameter dtype, at least
      float32.
    projection_dtype: input dtype of the projection's product (e.g.
      ``jnp.bfloat16``, accumulated in float32; at rank 1 only P is rounded);
      None: the compute dtype.
    seed: deprecated, use ``key``.

  Returns:
    A ``GradientTransformationExtraArgs``.

  References:
    Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
    <https://arxiv.org/abs/2412.05270>`_, MLSys 2025

    Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024 (the
    norm-growth limiter)

    Loshchilov and Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, ICLR 2019 (AdamW)
  """
  key = utils.deprecated_argument("apollo", "seed", seed, "key", key)
  dn.check_dimension_numbers(weight_dimension_numbers, "weight_dimension_numbers")
  if not isinstance(scale_front, bool):
    raise TypeError(f"`scale_front` must be a bool, got {scale_front!r}.")
  utils.check_real("scale", scale, lambda v: v > 0.0, "> 0")
  utils.check_real(
      "weight_decay", weight_decay, lambda v: v >= 0.0, ">= 0"
  )
  utils.check_learning_rate("learning_rate", learning_rate)
  if adam_learning_rate is None:
    adam_learning_rate = learning_rate
  else:
    utils.check_learning_rate("adam_learning_rate", adam_learning_rate)
  if adam_weight_decay is None:
    adam_weight_decay = weight_decay
  else:
    utils.check_real(
        "adam_weight_decay", adam_weight_decay, lambda v: v >= 0.0, ">= 0"
    )

  def dims_fn(tree):
    return dn.resolve_dimension_numbers(weight_dimension_numbers, tree)

  def leaf_kinds(params):
    """For each leaf: low-rank, or why it falls back to AdamW."""
    mask = _resolve_mask(lowrank_mask, params)
    dims = dims_fn(params)

    def mask_subtree(is_lowrank, subtree):
      if jnp.result_type(is_lowrank) != jnp.bool_:
        raise TypeError(
            "`lowrank_mask` must be a pytree of bools (or a callable returning"
            f" one), got a leaf {is_lowrank!r}."
        )
      return jax.tree.map(lambda _: bool(is_lowrank), subtree)

    def kind(is_lowrank, leaf_dims, leaf):
      if is_lowrank and leaf_dims is not None:
        return coverage.LOWRANK
      if len(leaf.shape) < 2:
        return coverage.ONE_D
      return coverage.MASK if not is_lowrank else coverage.NO_DIMENSION_NUMBERS

    full_mask = jax.tree.map(mask_subtree, mask, params)
    return jax.tree.map(kind, full_mask, dims, params)

  def labels(params):
    return jax.tree.map(
        lambda kind: "apollo" if kind == coverage.LOWRANK else "adam",
        leaf_kinds(params),
    )

  sqrt_scale = (
      math.sqrt(scale) if utils.concrete_float(scale) is not None else jnp.sqrt(scale)
  )
  matrix_transform = sba.fused_apollo_matrix_chain(
      rank,
      sqrt_scale=sqrt_scale,
      scale_front=scale_front,
      norm_growth_limit=norm_growth_limit,
      scale_type=scale_type,
      update_proj_gap=update_proj_gap,
      b1=b1,
      b2=b2,
      eps=eps,
      projection=projection,
      key=0 if key is None else key,
      weight_dimension_numbers=dims_fn,
      mu_dtype=mu_dtype,
      projection_dtype=projection_dtype,
  )

  tx = optax.chain(
      optax.partition(
          {
              "apollo": matrix_transform,
              "adam": adam.scale_by_adam_moments(b1, b2, eps, mu_dtype),
          },
          labels,
      ),
      adam.scale_by_adam_bias_correction(b1, b2),
      optax.partition(
          {
              "apollo": optax.chain(
                  optax.add_decayed_weights(weight_decay, weight_decay_mask),
                  optax.scale_by_learning_rate(learning_rate),
              ),
              "adam": optax.chain(
                  optax.add_decayed_weights(
                      adam_weight_decay, weight_decay_mask
                  ),
                  optax.scale_by_learning_rate(adam_learning_rate),
              ),
          },
          labels,
      ),
  )

  def init_fn(params):
    coverage.report_coverage(
        coverage.coverage_of(leaf_kinds(params), params), "APOLLO"
    )
    return tx.init(params)

  return optax.GradientTransformationExtraArgs(init_fn, tx.update)


def apollo_mini(
    learning_rate: optax.ScalarOrSchedule,
    *,
    scale: ArrayLike = 128.0,
    scale_front: bool = True,
    norm_growth_limit: Optional[ArrayLike] = 1.01,
    update_proj_gap: int = 200,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-6,
    weight_decay: ArrayLike = 0.0,
    weight_decay_mask: Optional[MaskOrFn] = None,
    adam_learning_rate: Optional[optax.ScalarOrSchedule] = None,
    adam_weight_decay: Optional[ArrayLike] = None,
    lowrank_mask: Optional[MaskOrFn] = None,
    projection: Union[sba.ProjectionName, proj.ProjectionFn] = "gaussian",
    key: Optional[Union[jax.Array, int]] = None,
    weight_dimension_numbers: dn.DimensionNumbersOrFn = None,
    mu_dtype: Optional[Any] = None,
    projection_dtype: Optional[Any] = None,
    seed: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  """APOLLO-Mini: rank 1, one scaling factor per matrix, √128 step.

  :func:`apollo` with ``rank=1`` and ``scale_type="tensor"``; its optimizer
  state per matrix is 2·max(m, n) numbers. The defaults follow the paper's
  pre-training scripts: ``scale=128`` (α = √128 compensates for the smaller
  scaling factors of rank 1) applied before the limiter (``scale_front``).

  Example:
    >>> import jax.numpy as jnp
    >>> import apollo_optax
    >>> tx = apollo_optax.apollo_mini(learning_rate=1e-2)
    >>> state = tx.init({"w": jnp.zeros((512, 128))})
    >>> apollo_optax.state_bytes(state) < 2 * 512 * 4 + 64
    True

  Args: as :func:`apollo`.

  Returns:
    A ``GradientTransformationExtraArgs``.

  References:
    Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
    <https://arxiv.org/abs/2412.05270>`_, MLSys 2025
  """
  key = utils.deprecated_argument("apollo_mini", "seed", seed, "key", key)
  return apollo(
      learning_rate,
      1,
      scale_type="tensor",
      scale=scale,
      scale_front=scale_front,
      norm_growth_limit=norm_growth_limit,
      update_proj_gap=update_proj_gap,
      b1=b1,
      b2=b2,
      eps=eps,
      weight_decay=weight_decay,
      weight_decay_mask=weight_decay_mask,
      adam_learning_rate=adam_learning_rate,
      adam_weight_decay=adam_weight_decay,
      lowrank_mask=lowrank_mask,
      projection=projection,
      key=key,
      weight_dimension_numbers=weight_dimension_numbers,
      mu_dtype=mu_dtype,
      projection_dtype=projection_dtype,
  )
