"""apollo / apollo_mini against the float64 NumPy reference, and defaults."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import apollo_optax
from apollo_optax._src import projection as proj
from tests.apollo_optax import reference

SHAPES = {
    "tall": (12, 5),
    "wide": (5, 12),
    "square": (8, 8),
    "stack": (3, 6, 10),  # three independent (6, 10) matrices
    "bias": (7,),
    "embed": (20, 6),  # 2-D but an embedding: AdamW by the default mask
}
LOWRANK = {"tall", "wide", "square", "stack"}
STEPS = 20
GAP = 7  # refreshes at t = 1, 8, 15


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {k: rng.normal(size=s) for k, s in SHAPES.items()}
  # Gradient norms that grow and shrink, so the limiter is exercised.
  grads = [
      {k: rng.normal(size=s) * (1.0 + 0.6 * (t % 4)) for k, s in SHAPES.items()}
      for t in range(STEPS)
  ]
  return params, grads


def _projection_for(dtype, seed):
  def projection_for(path, refresh_index, matrix_index, rank, d):
    keys = proj.projection_keys(seed, path, jnp.int32(refresh_index), matrix_index + 1)
    p = proj.gaussian_projection(keys[matrix_index], (rank, d), dtype)
    return np.asarray(p, np.float64)

  return projection_for


def _run(tx, params, grads, dtype):
  params = {k: jnp.asarray(v, dtype) for k, v in params.items()}
  stacked = {k: jnp.asarray(np.stack([g[k] for g in grads]), dtype) for k in params}

  @jax.jit
  def run(params, stacked):
    def step(carry, g):
      p, s = carry
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), u

    _, updates = jax.lax.scan(step, (params, tx.init(params)), stacked)
    return updates

  return {k: np.asarray(v, np.float64) for k, v in run(params, stacked).items()}


def _reference_updates(config, params, grads, dtype, seed=0):
  ref = reference.ReferenceApollo(
      config, params, LOWRANK, _projection_for(dtype, seed)
  )
  steps = [ref.step(g) for g in grads]
  return {k: np.stack([s[k] for s in steps]) for k in params}


def _assert_close(actual, expected, rtol):
  for key in expected:
    scale = np.max(np.abs(expected[key]), axis=tuple(range(1, expected[key].ndim)), keepdims=True)
    np.testing.assert_allclose(
        actual[key] / scale, expected[key] / scale, rtol=0, atol=rtol,
        err_msg=f"leaf {key}",
    )


# An L8 orthogonal array over (rank, scale_type, scale_front, weight decay and
# scale): every pair of settings appears together, in 8 runs instead of 16.
_L8 = [(0, 0, 0, 0), (0, 0, 1, 1), (0, 1, 0, 1), (0, 1, 1, 0),
       (1, 0, 0, 1), (1, 0, 1, 0), (1, 1, 0, 0), (1, 1, 1, 1)]
CONFIGS = [
    dict(
        rank=(1, 3)[a],
        scale_type=("channel", "tensor")[b],
        scale_front=(False, True)[c],
        weight_decay=(0.0, 0.1)[d],
        scale=(1.0, 4.0)[d],
    )
    for a, b, c, d in _L8
] + [
    # rank above min(m, n) is clamped per matrix.
    dict(rank=16, scale_type="channel", scale_front=False, weight_decay=0.0, scale=1.0),
    dict(rank=3, scale_type="channel", scale_front=False, weight_decay=0.0, scale=1.0, gamma=None),
]


def _ids(c):
  return "-".join(f"{k}={v}" for k, v in c.items())


def _make(config, seed=0):
  c = dict(config)
  gamma = c.pop("gamma", 1.01)
  ref_config = reference.ReferenceConfig(lr=1e-2, gap=GAP, gamma=gamma, **c)
  tx = apollo_optax.apollo(
      1e-2, c.pop("rank"), update_proj_gap=GAP, norm_growth_limit=gamma, seed=seed, **c
  )
  return tx, ref_config


@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
def test_apollo_matches_reference_float32(config):
  params, grads = _problem()
  tx, ref_config = _make(config)
  actual = _run(tx, params, grads, jnp.float32)
  expected = _reference_updates(ref_config, params, grads, jnp.float32)
  _assert_close(actual, expected, rtol=2e-5)


@pytest.mark.parametrize("config", CONFIGS[::3], ids=_ids)
def test_apollo_matches_reference_float64(config):
  with jax.enable_x64(True):
    params, grads = _problem(seed=1)
    tx, ref_config = _make(config, seed=3)
    actual = _run(tx, params, grads, jnp.float64)
    expected = _reference_updates(ref_config, params, grads, jnp.float64, seed=3)
  _assert_close(actual, expected, rtol=1e-10)


def test_apollo_mini_is_rank_one_tensor_scaling():
  params, grads = _problem()
  tx = apollo_optax.apollo_mini(1e-2, update_proj_gap=GAP)
  ref_config = reference.ReferenceConfig(
      lr=1e-2, rank=1, scale_type="tensor", scale=128.0, scale_front=True, gap=GAP
  )
  actual = _run(tx, params, grads, jnp.float32)
  expected = _reference_updates(ref_config, params, grads, jnp.float32)
  _assert_close(actual, expected, rtol=2e-5)


def test_the_reference_is_not_trivially_satisfied():
  """A different rank gives different updates: the comparison can fail."""
  params, grads = _problem()
  tx, _ = _make(CONFIGS[0])
  actual = _run(tx, params, grads, jnp.float32)
  _, other = _make(dict(CONFIGS[0], rank=3))
  expected = _reference_updates(other, params, grads, jnp.float32)
  with pytest.raises(AssertionError):
    _assert_close(actual, expected, rtol=2e-5)


def test_default_lowrank_mask_rules():
  params = {
      "embed": {"embedding": jnp.zeros((10, 4))},
      "wte": jnp.zeros((10, 4)),
      "lm_head": {"kernel": jnp.zeros((4, 10))},
      "layers": {
          "attn_norm": {"scale": jnp.zeros((3, 4))},
          "mlp": {"kernel": jnp.zeros((3, 4, 8)), "bias": jnp.zeros((3, 8))},
      },
      "dense": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)},
      "scalar": jnp.zeros(()),
  }
  mask = apollo_optax.default_lowrank_mask(params)
  assert mask == {
      "embed": {"embedding": False},
      "wte": False,
      "lm_head": {"kernel": False},
      "layers": {
          "attn_norm": {"scale": False},
          # A stacked bias is 2-D but still a bias (Qwen2's q/k/v biases).
          "mlp": {"kernel": True, "bias": False},
      },
      "dense": {"kernel": True, "bias": False},
      "scalar": False,
  }


def test_lowrank_mask_override_and_callable():
  params = {"a": jnp.ones((8, 4)), "b": jnp.ones((8, 4))}
  for mask in ({"a": True, "b": False}, lambda p: {"a": True, "b": False}):
    state = apollo_optax.apollo(1e-2, rank=2, lowrank_mask=mask).init(params)
    apollo_state = optax.tree.get(state, "ScaleByApolloState")
    assert apollo_state.mu["a"].shape == (8, 2)
    assert isinstance(apollo_state.mu["b"], optax.MaskedNode)
    adam_state = optax.tree.get(state, "ScaleByAdamMomentsState")
    assert adam_state.mu["b"].shape == (8, 4)
