"""apollo / apollo_mini against the float64 NumPy reference, and defaults."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import apollo_optax
from apollo_optax._src import projection as proj
from tests.apollo_optax import jax_compat
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


def _projection_for(dtype, seed, projection="gaussian"):
  fn = {"gaussian": proj.gaussian_projection,
        "rademacher": proj.rademacher_projection}[projection]

  def projection_for(path, refresh_index, matrix_index, rank, d):
    keys = proj.projection_keys(seed, path, jnp.int32(refresh_index), matrix_index + 1)
    p = fn(keys[matrix_index], (rank, d), dtype)
    if projection == "rademacher":  # exactly ±1/√r in float64
      return np.sign(np.asarray(p, np.float64)) / np.sqrt(rank)
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


def _reference_updates(config, params, grads, dtype, seed=0,
                       projection="gaussian"):
  ref = reference.ReferenceApollo(
      config, params, LOWRANK, _projection_for(dtype, seed, projection)
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


def _make(config, seed=0, **options):
  c = dict(config)
  gamma = c.pop("gamma", 1.01)
  ref_config = reference.ReferenceConfig(lr=1e-2, gap=GAP, gamma=gamma, **c)
  tx = apollo_optax.apollo(
      1e-2, c.pop("rank"), update_proj_gap=GAP, norm_growth_limit=gamma, key=seed,
      **c, **options
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
  with jax_compat.enable_x64(True):
    params, grads = _problem(seed=1)
    tx, ref_config = _make(config, seed=3)
    actual = _run(tx, params, grads, jnp.float64)
    expected = _reference_updates(ref_config, params, grads, jnp.float64, seed=3)
  _assert_close(actual, expected, rtol=1e-10)


@pytest.mark.parametrize("config", CONFIGS[::2], ids=_ids)
def test_rademacher_matches_reference_float32(config):
  params, grads = _problem()
  tx, ref_config = _make(config, projection="rademacher")
  actual = _run(tx, params, grads, jnp.float32)
  expected = _reference_updates(ref_config, params, grads, jnp.float32,
                                projection="rademacher")
  _assert_close(actual, expected, rtol=2e-5)


@pytest.mark.parametrize("config", CONFIGS[1::4], ids=_ids)
def test_rademacher_matches_reference_float64(config):
  with jax_compat.enable_x64(True):
    params, grads = _problem(seed=1)
    tx, ref_config = _make(config, seed=3, projection="rademacher")
    actual = _run(tx, params, grads, jnp.float64)
    expected = _reference_updates(ref_config, params, grads, jnp.float64,
                                  seed=3, projection="rademacher")
  _assert_close(actual, expected, rtol=1e-10)


@pytest.mark.parametrize("projection", ["gaussian", "rademacher"])
@pytest.mark.parametrize("config", CONFIGS[4:8], ids=_ids)
def test_bfloat16_product_stays_near_the_float32_run(config, projection):
  # The update is G·s: only the scaling factors see the bf16 product, through
  # ratios of norms of R (rank 3 here), so they move by bf16 roundings of R's
  # entries (2^-8 of Σ|g||p| each, more relative to a nearly cancelling
  # entry); 20 steps through the moments and the limiter stay within 5%.
  params, grads = _problem()
  tx32, _ = _make(config, projection=projection)
  tx16, _ = _make(config, projection=projection, projection_dtype=jnp.bfloat16)
  u32 = _run(tx32, params, grads, jnp.float32)
  u16 = _run(tx16, params, grads, jnp.float32)
  _assert_close(u16, u32, rtol=5e-2)
  for key in LOWRANK:
    assert not np.array_equal(u16[key], u32[key])  # the option took effect


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


# adam_learning_rate / adam_weight_decay (issue 13 §1): the AdamW leaves
# ("bias", "embed") move by their own rate and decay, the matrices do not
# notice. A schedule is checked against the reference at every step.
def _as_reference_rate(rate):
  """A schedule evaluated as in the update: jitted, at an int32 step count.

  optax's schedules compute in float32, and jitted float32 arithmetic may
  round differently (fused multiply-add) from eager.
  """
  if not callable(rate):
    return rate
  jitted = jax.jit(rate)
  return lambda step: float(jitted(jnp.asarray(step, jnp.int32)))


ADAM_SPLITS = [
    dict(adam_learning_rate=3e-3),
    dict(adam_learning_rate=5e-2, adam_weight_decay=0.2),
    dict(weight_decay=0.1, adam_weight_decay=0.0),
    dict(adam_learning_rate=optax.linear_schedule(1e-3, 4e-2, 10)),
]


@pytest.mark.parametrize("mini", [False, True], ids=["apollo", "apollo_mini"])
@pytest.mark.parametrize("split", ADAM_SPLITS, ids=["lr", "lr-decay", "decay-0", "schedule"])
def test_adam_leaves_move_by_their_own_rate_and_decay(split, mini):
  split = dict(split)
  with jax_compat.enable_x64(True):
    params, grads = _problem(seed=2)
    if mini:
      tx = apollo_optax.apollo_mini(1e-2, update_proj_gap=GAP, **split)
      config = dict(rank=1, scale_type="tensor", scale=128.0, scale_front=True)
    else:
      tx = apollo_optax.apollo(1e-2, 3, update_proj_gap=GAP, **split)
      config = dict(rank=3)
    ref_config = reference.ReferenceConfig(
        lr=1e-2, gap=GAP, weight_decay=split.pop("weight_decay", 0.0),
        adam_lr=_as_reference_rate(split.pop("adam_learning_rate", None)),
        adam_weight_decay=split.pop("adam_weight_decay", None), **config,
    )
    actual = _run(tx, params, grads, jnp.float64)
    expected = _reference_updates(ref_config, params, grads, jnp.float64)
  _assert_close(actual, expected, rtol=1e-10)


def test_adam_learning_rate_leaves_the_matrices_bit_identical():
  params, grads = _problem()
  plain = _run(apollo_optax.apollo(1e-2, 3, update_proj_gap=GAP), params, grads, jnp.float32)
  split = _run(
      apollo_optax.apollo(1e-2, 3, update_proj_gap=GAP, adam_learning_rate=1e-3),
      params, grads, jnp.float32,
  )
  for key in SHAPES:
    if key in LOWRANK:
      np.testing.assert_array_equal(split[key], plain[key], err_msg=key)
    else:  # Adam: ten times smaller steps (same moments, float32 rounding).
      np.testing.assert_allclose(split[key], plain[key] / 10, rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("make", [apollo_optax.apollo, apollo_optax.apollo_mini])
def test_adam_learning_rate_is_an_injectable_hyperparameter(make):
  static = ("rank", "update_proj_gap") if make is apollo_optax.apollo else ("update_proj_gap",)
  tx = optax.inject_hyperparams(make, static_args=static)(
      learning_rate=1e-2, adam_learning_rate=optax.linear_schedule(2e-3, 0.0, 2)
  )
  params = {"w": jnp.ones((16, 8)), "b": jnp.ones(8)}
  grads = {"w": jnp.full((16, 8), 0.5), "b": jnp.full(8, 0.5)}
  state = tx.init(params)
  assert float(state.hyperparams["adam_learning_rate"]) == pytest.approx(2e-3)
  update = jax.jit(tx.update)
  moved = []
  for _ in range(3):
    u, state = update(grads, state, params)
    moved.append((float(jnp.max(jnp.abs(u["w"]))), float(jnp.max(jnp.abs(u["b"])))))
  # The bias follows the schedule (2e-3, 1e-3, 0: an Adam step of size ~lr),
  # the matrix the main rate.
  np.testing.assert_allclose([b for _, b in moved], [2e-3, 1e-3, 0.0], rtol=1e-3, atol=1e-9)
  assert all(w > 1e-4 for w, _ in moved)
  # A float is set by hand like any injected hyperparameter: 0 freezes the
  # AdamW leaves only.
  tx = optax.inject_hyperparams(make, static_args=static)(
      learning_rate=1e-2, adam_learning_rate=5e-3)
  state = tx.init(params)
  state.hyperparams["adam_learning_rate"] = jnp.asarray(0.0)
  u, _ = tx.update(grads, state, params)
  assert float(jnp.max(jnp.abs(u["b"]))) == 0.0
  assert float(jnp.max(jnp.abs(u["w"]))) > 1e-4


NEGATIVE_RATES = [
    (dict(learning_rate=-1e-3), r"`learning_rate` must be >= 0 or a schedule, got -0.001"),
    (dict(adam_learning_rate=-1.0), r"`adam_learning_rate` must be >= 0 or a schedule, got -1.0"),
    (dict(adam_learning_rate=float("nan")), r"`adam_learning_rate` must be >= 0"),
    (dict(adam_learning_rate=lambda step: -0.1 + 0.0 * step),
     r"`adam_learning_rate` is a schedule whose value at step 0 is -0.1"),
    (dict(learning_rate=optax.constant_schedule(-1e-2)),
     r"`learning_rate` is a schedule whose value at step 0 is -0.01"),
    # A warm-up from 0 to a negative peak is 0 at step 0, negative after.
    (dict(learning_rate=optax.warmup_cosine_decay_schedule(0.0, -1.0, 10, 100)),
     r"`learning_rate` is a schedule whose value at step 1 is -0.1"),
    (dict(adam_weight_decay=-0.1), r"`adam_weight_decay` must be >= 0, got -0.1"),
]


@pytest.mark.parametrize("make", [apollo_optax.apollo, apollo_optax.apollo_mini])
@pytest.mark.parametrize("kwargs,match", NEGATIVE_RATES, ids=lambda x: str(x)[:40])
def test_negative_learning_rates_are_refused_with_their_name(kwargs, match, make):
  kwargs = dict(kwargs)
  learning_rate = kwargs.pop("learning_rate", 1e-2)
  with pytest.raises(ValueError, match=match):
    make(learning_rate, **kwargs)


def test_adam_learning_rate_must_be_a_number_or_schedule():
  with pytest.raises(TypeError, match="`adam_learning_rate` must be a number"):
    apollo_optax.apollo(1e-2, adam_learning_rate="fast")


def _three_updates(tx):
  params, grads = _problem(seed=4)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = tx.init(params)
  for g in grads[:3]:
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g)
    updates, state = tx.update(g, state, params)
  return updates


@pytest.mark.parametrize("make", [
    functools.partial(apollo_optax.apollo, rank=2),
    apollo_optax.apollo_mini,
])
def test_key_is_an_int_or_a_prng_key_and_seed_is_deprecated(make):
  by_int = _three_updates(make(1e-2, key=3, update_proj_gap=2))
  by_key = _three_updates(make(1e-2, key=jax.random.key(3), update_proj_gap=2))
  by_raw_key = _three_updates(
      make(1e-2, key=jax.random.PRNGKey(3), update_proj_gap=2))
  with pytest.warns(DeprecationWarning, match="`seed` is deprecated, use `key`"):
    tx = make(1e-2, seed=3, update_proj_gap=2)
  by_seed = _three_updates(tx)
  other = _three_updates(make(1e-2, key=4, update_proj_gap=2))
  for updates in (by_key, by_raw_key, by_seed):
    jax.tree.map(np.testing.assert_array_equal, updates, by_int)
  assert not np.array_equal(other["tall"], by_int["tall"])
  with pytest.warns(DeprecationWarning), pytest.raises(
      ValueError, match="pass `key` or the deprecated `seed`"):
    make(1e-2, key=3, seed=3)
  with pytest.raises(TypeError, match="`key` must be a PRNG key"):
    make(1e-2, key="3")
