"""Adam, split the way APOLLO's reference implementation computes it.

The official ``APOLLOAdamW`` puts eps inside the *uncorrected* ratio and
applies the bias correction to the step size:

  update = m / (√v + eps) · √(1 − b2ᵗ) / (1 − b1ᵗ),

which differs from ``optax.scale_by_adam`` (eps added to √v̂ after correction)
early in training. Splitting the two lets APOLLO's matrices and the Adam leaves
share one bias-correction transformation placed after the norm-growth limiter.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import optax

from apollo_optax._src import sharding as shd
from apollo_optax._src import utils


class ScaleByAdamMomentsState(NamedTuple):
  """First and second moments of the gradient, not bias-corrected."""

  mu: optax.Updates
  nu: optax.Updates


def scale_by_adam_moments(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-6,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""Adam's direction without bias correction: :math:`m / (\sqrt v + \epsilon)`.

  :math:`m \leftarrow b_1 m + (1-b_1) g`, :math:`v \leftarrow b_2 v + (1-b_2)
  g^2`. Chain :func:`scale_by_adam_bias_correction` after it to get the
  official APOLLO placement of Adam.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import apollo_optax
    >>> tx = optax.chain(apollo_optax.scale_by_adam_moments(),
    ...                  apollo_optax.scale_by_adam_bias_correction())
    >>> u, _ = tx.update(jnp.ones(2), tx.init(jnp.ones(2)))
    >>> [round(float(x), 4) for x in u]
    [1.0, 1.0]

  Args:
    b1: decay of the first moment, in [0, 1).
    b2: decay of the second moment, in [0, 1).
    eps: added to √v, >= 0.
    mu_dtype: dtype of both moments; None: the leaf's dtype, at least float32.

  Returns:
    A ``GradientTransformation``.

  References:
    Kingma and Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, ICLR 2015

    Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
    <https://arxiv.org/abs/2412.05270>`_, MLSys 2025 (the placement of eps)
  """
  utils.check_real("b1", b1, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
  utils.check_real("b2", b2, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
  utils.check_real("eps", eps, lambda v: v >= 0.0, ">= 0")
  mu_dtype = utils.canonicalize_dtype(mu_dtype, "mu_dtype")

  def init_fn(params):
    def zeros(p):  # Sharded like p.
      dtype = mu_dtype or utils.compute_dtype(p.dtype)
      same_axes = shd.Derivation(tuple(range(len(p.shape))))
      return shd.zeros(p, p.shape, dtype, same_axes)

    mu = jax.tree.map(zeros, params)
    return ScaleByAdamMomentsState(mu=mu, nu=jax.tree.map(jnp.zeros_like, mu))

  def leaf_update(g, mu, nu):
    cdt = utils.compute_dtype(g.dtype)
    gc = g.astype(cdt)
    m = b1 * mu.astype(cdt) + (1.0 - b1) * gc
    v = b2 * nu.astype(cdt) + (1.0 - b2) * jnp.square(gc)
    update = (m / (jnp.sqrt(v) + eps)).astype(g.dtype)
    return update, m.astype(mu.dtype), v.astype(nu.dtype)

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    mus = treedef.flatten_up_to(state.mu)
    nus = treedef.flatten_up_to(state.nu)
    results = [leaf_update(*args) for args in zip(leaves, mus, nus)]
    unzip = lambda i: treedef.unflatten([r[i] for r in results])
    return unzip(0), ScaleByAdamMomentsState(mu=unzip(1), nu=unzip(2))

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleByAdamBiasCorrectionState(NamedTuple):
  """Number of updates taken (int32)."""

  count: jax.Array


def scale_by_adam_bias_correction(
    b1: ArrayLike = 0.9, b2: ArrayLike = 0.999
) -> optax.GradientTransformation:
  r"""Multiplies every update by :math:`\sqrt{1 - b_2^t} / (1 - b_1^t)`.

  t = 1 on the first update. This is Adam's bias correction folded into the
  step size, as in the official APOLLO code (see the module docstring).

  Args:
    b1: decay of the first moment, in [0, 1).
    b2: decay of the second moment, in [0, 1).

  Returns:
    A ``GradientTransformation``.

  References:
    Kingma and Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, ICLR 2015 (Algorithm 1, the
    efficient ordering)
  """
  utils.check_real("b1", b1, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
  utils.check_real("b2", b2, lambda v: 0.0 <= v < 1.0, "in [0, 1)")

  def init_fn(params):
    del params
    return ScaleByAdamBiasCorrectionState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)

    def correct(u):
      cdt = utils.compute_dtype(u.dtype)
      t = count.astype(cdt)
      factor = jnp.sqrt(1.0 - jnp.asarray(b2, cdt) ** t) / (
          1.0 - jnp.asarray(b1, cdt) ** t
      )
      return (u * factor).astype(u.dtype)

    return jax.tree.map(correct, updates), ScaleByAdamBiasCorrectionState(count)

  return optax.GradientTransformation(init_fn, update_fn)
