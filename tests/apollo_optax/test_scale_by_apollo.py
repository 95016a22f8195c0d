"""scale_by_apollo: shapes, dimension numbers, projections, the fused path."""

import functools

import chex
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import apollo_optax
from apollo_optax._src import projection as proj
from apollo_optax._src import scale_by_apollo as sba
from tests.apollo_optax import reference


@hypothesis.settings(deadline=None, max_examples=10, derandomize=True)
@hypothesis.given(
    batch=st.integers(1, 3),
    m=st.integers(1, 24),
    n=st.integers(1, 24),
    rank=st.integers(1, 30),
    scale_type=st.sampled_from(["channel", "tensor"]),
)
def test_state_is_two_rank_max_numbers_per_matrix(batch, m, n, rank, scale_type):
  tx = apollo_optax.scale_by_apollo(rank, scale_type=scale_type)
  params = {"w": jnp.ones((batch, m, n))}
  state = jax.eval_shape(tx.init, params)
  r = min(rank, m, n)
  assert state.mu["w"].size == state.nu["w"].size == batch * r * max(m, n)
  assert state.svd_projection is None
  g = {"w": jnp.asarray(np.random.default_rng(m * n).normal(size=(batch, m, n)), jnp.float32)}
  updates, new_state = tx.update(g, tx.init(params))
  assert updates["w"].shape == (batch, m, n)
  assert np.isfinite(updates["w"]).all()
  chex.assert_trees_all_equal_shapes_and_dtypes(new_state, tx.init(params))


def _run_updates(tx, grads_list, params):
  state = tx.init(params)
  out = []
  for g in grads_list:
    u, state = tx.update(g, state, params)
    out.append(u)
  return out


def _random_grads(shape, steps=6, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(steps)]


def test_attention_kernel_is_its_2d_reshape():
  d, heads, head_dim = 12, 3, 8
  dims = apollo_optax.ApolloDimensionNumbers(reduction_axis=0, output_axis=(1, 2))
  tx3 = apollo_optax.scale_by_apollo(4, weight_dimension_numbers={"k": dims})
  tx2 = apollo_optax.scale_by_apollo(4)
  grads = _random_grads((d, heads, head_dim))
  u3 = _run_updates(tx3, [{"k": g} for g in grads], {"k": grads[0]})
  u2 = _run_updates(
      tx2, [{"k": g.reshape(d, -1)} for g in grads], {"k": grads[0].reshape(d, -1)}
  )
  for a, b in zip(u3, u2):
    np.testing.assert_allclose(a["k"].reshape(d, -1), b["k"], rtol=1e-6)
  state = tx3.init({"k": grads[0]})
  assert state.mu["k"].shape == (4, heads, head_dim)  # wide: keeps (heads, head_dim)


def test_swapped_axes_equal_the_transposed_matrix():
  dims = apollo_optax.ApolloDimensionNumbers(reduction_axis=1, output_axis=0)
  tx_t = apollo_optax.scale_by_apollo(3, weight_dimension_numbers=dims)
  tx = apollo_optax.scale_by_apollo(3)
  grads = _random_grads((9, 14))
  u_t = _run_updates(tx_t, [{"w": g} for g in grads], {"w": grads[0]})
  u = _run_updates(tx, [{"w": g.T} for g in grads], {"w": grads[0].T})
  for a, b in zip(u_t, u):
    np.testing.assert_allclose(a["w"], b["w"].T, rtol=1e-6)


def test_layers_of_a_stack_get_different_projections():
  tx = apollo_optax.scale_by_apollo(2)
  g = jnp.tile(jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, 6)), jnp.float32), (2, 1, 1))
  u, state = tx.update({"w": g}, tx.init({"w": g}))
  # Same gradient in both layers, different random projections.
  assert not np.allclose(state.mu["w"][0], state.mu["w"][1])


def test_custom_projection_callable():
  def first_rows(key, shape, dtype):
    del key
    return jnp.eye(shape[0], shape[1], dtype=dtype)

  cfg = reference.ReferenceConfig(lr=1.0, rank=3, gamma=None, gap=200)
  tx = optax.chain(
      apollo_optax.scale_by_apollo(3, projection=first_rows),
      apollo_optax.scale_by_adam_bias_correction(),
      optax.scale(-1.0),
  )
  grads = _random_grads((10, 7))
  ref = reference.ReferenceApollo(
      cfg, {"w": np.zeros((10, 7))}, {"w"},
      lambda path, refresh, index, r, d: np.eye(r, d),
  )
  actual = _run_updates(tx, [{"w": g} for g in grads], {"w": grads[0]})
  for a, g in zip(actual, grads):
    np.testing.assert_allclose(a["w"], ref.step({"w": np.asarray(g)})["w"], rtol=5e-5)


def test_svd_projection_matches_float64_reference():
  gap, steps = 3, 7
  grads = _random_grads((9, 6), steps=steps, seed=4)

  def svd_rows(path, refresh, index, r, d):
    u, _, vh = np.linalg.svd(np.asarray(grads[refresh * gap], np.float64))
    return vh[:r]  # tall: top right singular vectors

  cfg = reference.ReferenceConfig(lr=1e-2, rank=2, gap=gap)
  ref = reference.ReferenceApollo(cfg, {"w": np.zeros((9, 6))}, {"w"}, svd_rows)
  tx = apollo_optax.apollo(1e-2, rank=2, update_proj_gap=gap, projection="svd")
  params = {"w": jnp.zeros((9, 6))}
  state = tx.init(params)
  for g in grads:
    u, state = tx.update({"w": g}, state, params)
    expected = ref.step({"w": np.asarray(g)})["w"]
    # Singular vectors are defined up to sign; the scaling factors are not
    # affected by it.
    np.testing.assert_allclose(u["w"], expected, rtol=1e-4, atol=1e-8)
  stored = optax.tree.get(state, "ScaleByApolloState").svd_projection["w"]
  assert stored.shape == (1, 2, 6)


@pytest.mark.parametrize("norm_growth_limit", [1.01, None])
@pytest.mark.parametrize("scale_front", [False, True])
@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_fused_path_equals_the_composed_chain(scale_front, scale_type, norm_growth_limit):
  dims = lambda tree: jax.tree.map(lambda _: apollo_optax.ApolloDimensionNumbers(1, 2), tree)
  kwargs = dict(
      sqrt_scale=3.0, scale_front=scale_front, norm_growth_limit=norm_growth_limit,
      scale_type=scale_type, update_proj_gap=4, b1=0.9, b2=0.999, eps=1e-6,
      projection="gaussian", key=5, weight_dimension_numbers=dims, mu_dtype=None,
  )
  composed = sba.apollo_matrix_chain(3, **kwargs)
  fused = sba.fused_apollo_matrix_chain(3, **kwargs)
  rng = np.random.default_rng(2)
  params = {"a": jnp.zeros((2, 10, 4)), "b": jnp.zeros((2, 4, 10))}
  s_c, s_f = composed.init(params), fused.init(params)
  chex.assert_trees_all_equal_structs(s_c, s_f)
  expected_types = [sba.ScaleByApolloState, optax.EmptyState]
  if norm_growth_limit is not None:
    expected_types.insert(2 if scale_front else 1, apollo_optax.NormGrowthLimiterState)
  assert [type(s) for s in s_f] == expected_types
  for t in range(9):
    g = {k: jnp.asarray(rng.normal(size=v.shape) * (1 + t % 3), jnp.float32) for k, v in params.items()}
    u_c, s_c = composed.update(g, s_c)
    u_f, s_f = fused.update(g, s_f)
    chex.assert_trees_all_close(u_f, u_c, rtol=2e-6, atol=1e-9)
  chex.assert_trees_all_close(s_f, s_c, rtol=2e-6, atol=1e-9)
  assert int(optax.tree.get(s_f, "ScaleByApolloState").count) == 9


BAD_ARGUMENTS = [
    (dict(rank=0), ValueError, "`rank`"),
    (dict(rank=2.5), TypeError, "`rank`"),
    (dict(rank=True), TypeError, "`rank`"),
    (dict(scale_type="row"), ValueError, "`scale_type` must be one of 'channel', 'tensor'"),
    (dict(projection="qr"), ValueError,
     "`projection` must be one of 'gaussian', 'rademacher', 'svd'"),
    (dict(projection_dtype=jnp.int8), ValueError,
     "`projection_dtype` must be a floating dtype"),
    (dict(projection_dtype="half-ish"), TypeError,
     "`projection_dtype` must be a dtype or None"),
    (dict(update_proj_gap=0), ValueError, "`update_proj_gap`"),
    (dict(b1=1.0), ValueError, r"`b1` must be in \[0, 1\)"),
    (dict(b2=-0.1), ValueError, r"`b2` must be in \[0, 1\)"),
    (dict(eps=-1e-8), ValueError, "`eps` must be >= 0"),
    (dict(norm_growth_limit=1.0), ValueError, "`norm_growth_limit` must be > 1"),
    (dict(scale=0.0), ValueError, "`scale` must be > 0"),
    (dict(scale_front="yes"), TypeError, "`scale_front` must be a bool"),
    (dict(weight_decay=-1.0), ValueError, "`weight_decay` must be >= 0"),
    (dict(mu_dtype=jnp.int32), ValueError, "`mu_dtype` must be a floating dtype"),
    (
        dict(weight_dimension_numbers=apollo_optax.ApolloDimensionNumbers(0, 0)),
        ValueError, "must be disjoint",
    ),
    (
        dict(weight_dimension_numbers=apollo_optax.ApolloDimensionNumbers((), 1)),
        ValueError, "must name at least one axis",
    ),
]


@pytest.mark.parametrize(
    "kwargs,error,match", BAD_ARGUMENTS, ids=[str(b[0]) for b in BAD_ARGUMENTS]
)
def test_bad_arguments_are_rejected_at_construction(kwargs, error, match):
  kwargs = dict(kwargs)
  rank = kwargs.pop("rank", 4)
  with pytest.raises(error, match=match):
    apollo_optax.apollo(1e-2, rank, **kwargs)


@pytest.mark.parametrize(
    "dims,match",
    [
        (apollo_optax.ApolloDimensionNumbers(0, 2), "out of range"),
        (apollo_optax.ApolloDimensionNumbers(0, -2), "disjoint"),
    ],
)
def test_dimension_numbers_checked_against_shapes_at_init(dims, match):
  tx = apollo_optax.apollo(1e-2, 4, weight_dimension_numbers=dims)
  with pytest.raises(ValueError, match=match):
    tx.init({"w": jnp.zeros((4, 5))})


def test_vector_given_to_scale_by_apollo_is_an_error():
  tx = apollo_optax.scale_by_apollo(4)
  with pytest.raises(ValueError, match="'b'.*Route it to Adam"):
    tx.init({"w": jnp.zeros((4, 5)), "b": jnp.zeros(5)})


def test_apollo_mini_defaults():
  tx = apollo_optax.apollo_mini(1e-2)
  state = tx.init({"w": jnp.zeros((40, 16))})
  mu = optax.tree.get(state, "ScaleByApolloState").mu["w"]
  assert mu.shape == (40, 1)


@pytest.mark.parametrize("tall", [True, False])
@pytest.mark.parametrize("projection", ["gaussian", "rademacher"])
def test_bfloat16_product_is_within_bfloat16_rounding(tall, projection):
  """R with bf16 inputs vs float64: each input rounded once (2^-9 relative)
  and float32 accumulation; a Rademacher P (signs) is exact in bf16."""
  shape = (3, 40, 24) if tall else (3, 24, 40)
  g = jax.random.normal(jax.random.key(0), shape, jnp.float32)
  keys = proj.projection_keys(0, "w", jnp.int32(0), 3)
  r, d = 8, 24
  p, scale = proj.regenerate(projection, keys, (r, d), jnp.float32, jnp.bfloat16)
  assert p.dtype == jnp.bfloat16
  got = np.asarray(proj.project(g, p, tall=tall, compute_dtype=jnp.float32,
                                projection_dtype=jnp.bfloat16, scale=scale))
  p32, scale32 = proj.regenerate(projection, keys, (r, d), jnp.float32)
  f32 = np.asarray(proj.project(g, p32, tall=tall, compute_dtype=jnp.float32,
                                scale=scale32))
  g64 = np.asarray(g, np.float64)
  p64 = np.asarray(p32, np.float64) * (scale32 or 1.0)
  gb = np.asarray(g.astype(jnp.bfloat16), np.float64)
  pb = np.asarray(p, np.float64) * (scale or 1.0)
  exact = ((lambda a, b: np.einsum("bmn,brn->bmr", a, b)) if tall
           else (lambda a, b: np.einsum("brm,bmn->brn", b, a)))
  magnitude = exact(np.abs(g64), np.abs(p64))
  # float32 path: accumulation error only.
  np.testing.assert_array_less(np.abs(f32 - exact(g64, p64)),
                               1e-6 * magnitude + 1e-30)
  # bf16 path: equals the product of the bf16-rounded inputs up to float32
  # accumulation, and that is within 2·2^-9 of the float32 one.
  np.testing.assert_array_less(np.abs(got - exact(gb, pb)),
                               1e-6 * magnitude + 1e-30)
  np.testing.assert_array_less(np.abs(got - f32), 2 * 2.0**-9 * magnitude)
  if projection == "rademacher":
    np.testing.assert_array_equal(np.abs(np.asarray(p, np.float64)), 1.0)
  assert not np.array_equal(got, f32)


def test_rademacher_state_and_refresh_keys_match_gaussian_layout():
  params = {"w": jnp.ones((2, 24, 40))}
  g = {"w": jax.random.normal(jax.random.key(1), (2, 24, 40))}
  states = {}
  for projection in ("gaussian", "rademacher"):
    tx = apollo_optax.scale_by_apollo(4, projection=projection,
                                      update_proj_gap=2)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(g, state)
    states[projection] = state
    assert updates["w"].shape == (2, 24, 40)
  chex.assert_trees_all_equal_shapes_and_dtypes(states["gaussian"],
                                                states["rademacher"])
  assert not np.allclose(states["gaussian"].mu["w"],
                         states["rademacher"].mu["w"])


def test_seed_is_deprecated_for_key():
  g = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(8, 6)), jnp.float32)}
  new = apollo_optax.scale_by_apollo(2, key=jax.random.key(7))
  with pytest.warns(DeprecationWarning, match="`seed` is deprecated, use `key`"):
    old = apollo_optax.scale_by_apollo(2, seed=7)
  u_new, _ = new.update(g, new.init(g))
  u_old, _ = old.update(g, old.init(g))
  np.testing.assert_array_equal(u_old["w"], u_new["w"])


def test_state_projection_is_a_deprecated_name_of_svd_projection():
  tx = apollo_optax.scale_by_apollo(2, projection="svd")
  g = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(8, 6)), jnp.float32)}
  _, state = tx.update(g, tx.init(g))
  with pytest.warns(DeprecationWarning, match="svd_projection"):
    old = state.projection
  assert old is state.svd_projection
  assert state.svd_projection["w"].shape == (1, 2, 6)
