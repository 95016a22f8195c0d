"""norm_growth_limiter on its own, after any optimizer."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import apollo_optax


def _norm(x):
  return float(jnp.linalg.norm(x.reshape(-1)))


@pytest.mark.parametrize("gamma", [1.01, 1.5])
def test_growth_is_capped_and_shrinking_is_free(gamma):
  tx = apollo_optax.norm_growth_limiter(gamma)
  state = tx.init({"v": jnp.zeros(4)})
  u, state = tx.update({"v": jnp.ones(4)}, state)  # remembered: 2
  np.testing.assert_allclose(_norm(u["v"]), 2.0, rtol=1e-6)
  u, state = tx.update({"v": 10 * jnp.ones(4)}, state)  # capped at 2 gamma
  np.testing.assert_allclose(_norm(u["v"]), 2.0 * gamma, rtol=1e-6)
  np.testing.assert_allclose(u["v"], jnp.full(4, gamma), rtol=1e-6)  # direction kept
  u, state = tx.update({"v": 0.1 * jnp.ones(4)}, state)  # shrinking: untouched
  np.testing.assert_allclose(_norm(u["v"]), 0.2, rtol=1e-6)
  np.testing.assert_allclose(float(state.previous_norm["v"]), 0.2, rtol=1e-6)


def test_matrices_of_a_stack_are_limited_independently():
  tx = apollo_optax.norm_growth_limiter(1.01)
  state = tx.init({"w": jnp.zeros((2, 3, 4))})
  _, state = tx.update({"w": jnp.ones((2, 3, 4))}, state)
  grow = jnp.stack([jnp.ones((3, 4)) * 5.0, jnp.ones((3, 4)) * 0.5])
  u, state = tx.update({"w": grow}, state)
  np.testing.assert_allclose(_norm(u["w"][0]), 1.01 * np.sqrt(12), rtol=1e-6)
  np.testing.assert_allclose(_norm(u["w"][1]), 0.5 * np.sqrt(12), rtol=1e-6)
  assert state.previous_norm["w"].shape == (2,)


def test_zero_first_update_does_not_freeze_later_ones():
  tx = apollo_optax.norm_growth_limiter(1.01)
  state = tx.init({"v": jnp.zeros(3)})
  u, state = tx.update({"v": jnp.zeros(3)}, state)
  assert np.all(np.isfinite(u["v"])) and _norm(u["v"]) == 0.0
  u, state = tx.update({"v": jnp.ones(3)}, state)
  np.testing.assert_allclose(_norm(u["v"]), np.sqrt(3), rtol=1e-6)


def test_with_another_optimizer():
  tx = optax.chain(optax.sgd(0.1), apollo_optax.norm_growth_limiter(1.01))
  params = {"w": jnp.zeros((3, 3)), "b": jnp.zeros(3)}
  state = tx.init(params)
  u, state = tx.update({"w": jnp.ones((3, 3)), "b": jnp.ones(3)}, state)
  u, state = tx.update({"w": 100 * jnp.ones((3, 3)), "b": jnp.ones(3)}, state)
  np.testing.assert_allclose(_norm(u["w"]), 0.1 * 3 * 1.01, rtol=1e-6)
  np.testing.assert_allclose(_norm(u["b"]), 0.1 * np.sqrt(3), rtol=1e-6)


def test_gamma_must_exceed_one():
  with pytest.raises(ValueError, match="`norm_growth_limit` must be > 1"):
    apollo_optax.norm_growth_limiter(0.99)


def test_gamma_is_a_deprecated_name_of_norm_growth_limit():
  with pytest.warns(DeprecationWarning, match="`gamma` is deprecated, use `norm_growth_limit`"):
    old = apollo_optax.norm_growth_limiter(gamma=1.5)
  new = apollo_optax.norm_growth_limiter(norm_growth_limit=1.5)
  for tx in (old, new):
    state = tx.init({"v": jnp.zeros(4)})
    _, state = tx.update({"v": jnp.ones(4)}, state)
    u, _ = tx.update({"v": 10 * jnp.ones(4)}, state)
    np.testing.assert_allclose(_norm(u["v"]), 2.0 * 1.5, rtol=1e-6)
  with pytest.warns(DeprecationWarning), pytest.raises(
      ValueError, match="`norm_growth_limit` must be > 1"):
    apollo_optax.norm_growth_limiter(gamma=0.99)
