"""apollo / apollo_mini compose with the Optax tools users already use."""

import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import apollo_optax
from tests.apollo_optax import jax_compat

OPTIMIZERS = {
    "apollo": functools.partial(apollo_optax.apollo, rank=4, update_proj_gap=3),
    "apollo_mini": functools.partial(apollo_optax.apollo_mini, update_proj_gap=3),
    # Issue 12's fast path: Rademacher signs, bfloat16 product inputs.
    "apollo_fast": functools.partial(
        apollo_optax.apollo, rank=4, update_proj_gap=3,
        projection="rademacher", projection_dtype=jnp.bfloat16),
    "apollo_mini_fast": functools.partial(
        apollo_optax.apollo_mini, update_proj_gap=3,
        projection="rademacher", projection_dtype=jnp.bfloat16),
}


def _params(dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 4)
  return {
      "dense": {
          "kernel": jax.random.normal(keys[0], (16, 8), dtype),
          "bias": jnp.zeros((8,), dtype),
      },
      "stack": jax.random.normal(keys[1], (2, 6, 10), dtype),
      "embed": jax.random.normal(keys[2], (12, 8), dtype),
  }


def _loss(params):
  x = jnp.ones((16,), jnp.float32)
  h = x @ params["dense"]["kernel"].astype(jnp.float32) + params["dense"]["bias"]
  return (
      jnp.sum(jnp.square(h - 1.0))
      + jnp.sum(jnp.square(params["stack"].astype(jnp.float32) - 0.5))
      + jnp.sum(jnp.square(params["embed"].astype(jnp.float32)))
  )


def _grads(params, scale=1.0):
  return jax.tree.map(lambda g: (g * scale).astype(g.dtype), jax.grad(_loss)(params))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_jit_does_not_recompile(name):
  tx = OPTIMIZERS[name](1e-2)
  params = _params()
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(_loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(4):
    params, state = step(params, state)
  assert step._cache_size() == 1


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_inject_hyperparams(name):
  static = ("update_proj_gap",) if name.startswith("apollo_mini") else (
      "rank", "update_proj_gap")
  # A dtype is callable: inject_hyperparams would take it for a schedule.
  if "projection_dtype" in OPTIMIZERS[name].keywords:
    static += ("projection_dtype",)
  injected = optax.inject_hyperparams(OPTIMIZERS[name].func, static_args=static)
  kwargs = dict(OPTIMIZERS[name].keywords)
  tx = injected(
      learning_rate=optax.linear_schedule(1e-2, 1e-3, 10),
      scale=2.0, b1=0.8, b2=0.99, eps=1e-7, weight_decay=0.1, **kwargs
  )
  reference = OPTIMIZERS[name](
      1e-2, scale=2.0, b1=0.8, b2=0.99, eps=1e-7, weight_decay=0.1
  )
  params = _params()
  s1, s2 = tx.init(params), reference.init(params)
  g = _grads(params)
  u1, s1 = jax.jit(tx.update)(g, s1, params)
  u2, _ = reference.update(g, s2, params)
  chex.assert_trees_all_close(u1, u2, rtol=1e-5, atol=1e-7)
  # The injected hyperparameters can be changed between steps.
  s1.hyperparams["weight_decay"] = jnp.asarray(0.0)
  u3, _ = tx.update(g, s1, params)
  assert not np.allclose(u3["dense"]["kernel"], u1["dense"]["kernel"])


def test_inject_hyperparams_rank_must_be_static():
  tx = optax.inject_hyperparams(apollo_optax.apollo)(learning_rate=1e-2, rank=4)
  with pytest.raises(TypeError, match="static_args"):
    tx.init(_params())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_multisteps_accumulates(name):
  tx = optax.MultiSteps(OPTIMIZERS[name](1e-2), every_k_schedule=2)
  plain = OPTIMIZERS[name](1e-2)
  params = _params()
  g1, g2 = _grads(params, 1.0), _grads(params, 3.0)
  state = tx.init(params)
  u, state = tx.update(g1, state, params)
  chex.assert_trees_all_close(u, jax.tree.map(jnp.zeros_like, u))
  u, state = tx.update(g2, state, params)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  expected, _ = plain.update(mean, plain.init(params), params)
  chex.assert_trees_all_close(u, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_apply_if_finite_skips_nan(name):
  tx = optax.apply_if_finite(OPTIMIZERS[name](1e-2), max_consecutive_errors=3)
  params = _params()
  state = tx.init(params)
  _, state = tx.update(_grads(params), state, params)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), _grads(params))
  updates, new_state = tx.update(bad, state, params)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, updates))
  chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
  assert int(new_state.notfinite_count) == 1


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_chain_with_clipping_and_schedule(name):
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 20, 1e-3)
  tx = optax.chain(optax.clip_by_global_norm(1.0), OPTIMIZERS[name](schedule))
  params = _params()
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(_grads(params, 100.0), state, params)
    params = optax.apply_updates(params, updates)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  # Clipping happens before APOLLO: huge and unit gradients give one update.
  tx2 = optax.chain(optax.clip_by_global_norm(1.0), OPTIMIZERS[name](schedule))
  p = _params()
  u_big, _ = tx2.update(_grads(p, 1e3), tx2.init(p), p)
  u_small, _ = tx2.update(_grads(p, 1e4), tx2.init(p), p)
  chex.assert_trees_all_close(u_big, u_small, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_tree_map_params(name):
  tx = OPTIMIZERS[name](1e-2)
  params = _params()
  state = tx.init(params)
  mapped = optax.tree.map_params(tx, lambda v: v, state)
  chex.assert_trees_all_equal(mapped, state)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_extra_kwargs_to_update(name):
  tx = OPTIMIZERS[name](1e-2)
  params = _params()
  state = tx.init(params)
  u1, _ = tx.update(_grads(params), state, params, loss=jnp.float32(3.0))
  u2, _ = tx.update(_grads(params), state, params)
  chex.assert_trees_all_equal(u1, u2)


@pytest.mark.parametrize(
    "make_tree,lowrank",
    [
        (lambda p: {"a": {"b": p["dense"]["kernel"]}, "empty": {}, "v": p["dense"]["bias"]}, True),
        (lambda p: [p["dense"]["kernel"], (p["stack"], p["dense"]["bias"])], True),
        (lambda p: {"only_vectors": p["dense"]["bias"]}, False),
        (lambda p: {}, None),
    ],
    ids=["nested-dict-with-empty", "lists-and-tuples", "no-matrix", "empty"],
)
def test_any_pytree(make_tree, lowrank):
  tx = apollo_optax.apollo(1e-2, rank=3)
  params = make_tree(_params())
  if lowrank is False:
    # Nothing APOLLO can project: the coverage warning says so.
    with pytest.warns(apollo_optax.LowRankCoverageWarning, match="0 of 8 parameters"):
      state = tx.init(params)
  else:  # Matrices, or nothing at all: no warning.
    with warnings.catch_warnings():
      warnings.simplefilter("error", apollo_optax.LowRankCoverageWarning)
      state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, new_state = jax.jit(tx.update)(grads, state, params)
  chex.assert_trees_all_equal_structs(updates, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)


def test_flax_nnx_state_and_optimizer():
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class Model(nnx.Module):

    def __init__(self, rngs):
      self.embed = nnx.Embed(20, 8, rngs=rngs)
      self.dense = nnx.Linear(8, 16, rngs=rngs)
      self.out = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
      return self.out(jax.nn.relu(self.dense(self.embed(x))))

  model = Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, apollo_optax.apollo(1e-2, rank=2), wrt=nnx.Param)
  x = jnp.arange(6) % 20

  def loss_fn(model):
    return jnp.mean(jnp.square(model(x) - 1.0))

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(30)]
  assert losses[-1] < 0.5 * losses[0]
  mask = nnx.to_pure_dict(
      apollo_optax.default_lowrank_mask(nnx.state(model, nnx.Param))
  )
  assert mask["dense"]["kernel"] and not mask["embed"]["embedding"]
  assert not mask["dense"]["bias"]
  # The low-rank moments really are low-rank inside nnx.Optimizer.
  sizes = [x.size for x in jax.tree.leaves(optimizer.opt_state)]
  assert 2 * 16 in sizes  # (rank 2, 16) moments of the (8, 16) kernel


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_dtypes_are_preserved(name, dtype):
  with jax_compat.enable_x64(dtype == jnp.float64):
    tx = OPTIMIZERS[name](1e-2)
    params = _params(dtype)
    state = tx.init(params)
    updates, new_state = jax.jit(tx.update)(_grads(params), state, params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
      assert u.dtype == p.dtype
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    # Moments are at least float32; float64 stays float64.
    expected = jnp.promote_types(dtype, jnp.float32)
    moments = [
        x for x in jax.tree.leaves(state)
        if x.ndim >= 1 and jnp.issubdtype(x.dtype, jnp.floating)
    ]
    assert {x.dtype for x in moments} == {jnp.dtype(expected)}
    assert all(np.isfinite(np.asarray(u, np.float64)).all() for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_types_stable_under_lax_cond(name):
  tx = OPTIMIZERS[name](1e-2)
  params = _params(jnp.bfloat16)
  state = tx.init(params)
  grads = _grads(params)

  @jax.jit
  def maybe_step(flag, state):
    return jax.lax.cond(
        flag, lambda s: tx.update(grads, s, params)[1], lambda s: s, state
    )

  new_state = maybe_step(True, state)
  chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)


def test_mu_dtype_bfloat16_state():
  tx = apollo_optax.apollo(1e-2, rank=4, mu_dtype=jnp.bfloat16)
  params = _params()
  state = tx.init(params)
  _, new_state = tx.update(_grads(params), state, params)
  moments = [x for x in jax.tree.leaves(new_state) if x.ndim >= 2]
  assert moments and all(x.dtype == jnp.bfloat16 for x in moments)


def test_vmap_over_independent_problems():
  tx = apollo_optax.apollo(1e-2, rank=2)
  params = {"w": jnp.stack([jnp.ones((6, 4)), 2 * jnp.ones((6, 4))])}
  grads = {"w": jnp.stack([jnp.ones((6, 4)), -jnp.ones((6, 4))])}
  states = jax.vmap(tx.init)(params)
  updates, _ = jax.vmap(tx.update)(grads, states, params)
  for i in range(2):
    p_i = {"w": params["w"][i]}
    u_i, _ = tx.update({"w": grads["w"][i]}, tx.init(p_i), p_i)
    np.testing.assert_allclose(updates["w"][i], u_i["w"], rtol=1e-6)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_zero_gradients_give_zero_updates_and_no_nan(name):
  tx = OPTIMIZERS[name](1e-2)
  params = _params()
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for _ in range(3):
    updates, state = tx.update(zeros, state, params)
    chex.assert_trees_all_equal(updates, zeros)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state) if x.dtype != jnp.int32)
  # After zero gradients, a real gradient still gives a real step.
  updates, _ = tx.update(_grads(params), state, params)
  assert float(jnp.abs(updates["dense"]["kernel"]).max()) > 1e-4


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("layout", ["matrix", "mixed"])
def test_converges_on_quadratic(name, layout):
  target = {"w": jnp.linspace(-1.0, 1.0, 24 * 10).reshape(24, 10)}
  if layout == "mixed":
    target["b"] = jnp.linspace(0.0, 1.0, 10)
  params = jax.tree.map(jnp.zeros_like, target)
  loss = lambda p: sum(
      jnp.sum(jnp.square(p[k] - target[k])) for k in target
  )
  # A realistic refresh gap: with a new projection every few steps the moments
  # no longer match R, the scaling factors shrink and the limiter slows the
  # recovery (the paper uses 200).
  tx = OPTIMIZERS[name](
      optax.cosine_decay_schedule(3e-2, 400, alpha=0.01), update_proj_gap=50
  )
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  initial = float(loss(params))
  for _ in range(400):
    params, state = step(params, state)
  assert float(loss(params)) < 1e-2 * initial
