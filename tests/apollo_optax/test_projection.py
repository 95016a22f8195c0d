"""Tests of ``apollo_optax._src.projection``: the Gaussian projection's bits."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apollo_optax._src import projection as proj

pytestmark = pytest.mark.xdist_group("apollo_optax_projection")


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (4, 64), (1, 1376),
                                   (128, 512)])
@pytest.mark.parametrize("seed", [0, 2**31 - 1])
def test_gaussian_projection_is_jax_random_normal_bit_for_bit(shape, seed):
  key = jax.random.fold_in(jax.random.key(seed), 12345)
  np.testing.assert_array_equal(
      proj._standard_normal(key, shape, jnp.float32),
      jax.random.normal(key, shape, jnp.float32))
  # Scaled, both jitted (XLA folds √2·(1/√rank) into one constant in both).
  scale = 1 / math.sqrt(shape[0])
  want = jax.jit(lambda k: jax.random.normal(k, shape) * scale)(key)
  got = jax.jit(lambda k: proj.gaussian_projection(k, shape))(key)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_batched_keys_of_a_stack_match_layer_by_layer():
  keys = proj.projection_keys(3, "['layers']['q']", jnp.int32(2), 8)
  stacked = jax.jit(jax.vmap(
      lambda k: proj.gaussian_projection(k, (16, 96), jnp.float32)))(keys)
  for layer in range(8):
    one = proj.projection_keys(3, "['layers']['q']", jnp.int32(2), 1,
                               first_matrix=layer)[0]
    np.testing.assert_array_equal(
        stacked[layer], jax.random.normal(one, (16, 96)) / 4.0)  # exact: 1/4
  assert not np.allclose(stacked[0], stacked[1])


@pytest.mark.parametrize("make_key, dtype", [
    (lambda: jax.random.key(1, impl="rbg"), jnp.float32),
    (lambda: jax.random.PRNGKey(1), jnp.float32),  # raw uint32 key data
    (lambda: jax.random.key(1), jnp.bfloat16),
    (lambda: jax.random.key(1), jnp.float16),
])
def test_other_keys_and_dtypes_fall_back_to_jax_random_normal(make_key, dtype):
  key = make_key()
  got = proj.gaussian_projection(key, (8, 40), dtype)
  assert got.dtype == dtype
  want = jax.random.normal(key, (8, 40), dtype) * (1.0 / math.sqrt(8))
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(want, np.float32))


def test_entries_are_standard_normal_over_rank():
  rank, d = 64, 4096
  p = np.asarray(proj.gaussian_projection(jax.random.key(0), (rank, d)),
                 np.float64) * math.sqrt(rank)
  # 262,144 draws: sampling sd of the mean is 0.002, of the variance 0.003.
  assert abs(p.mean()) < 0.01
  assert abs(p.var() - 1.0) < 0.015
  assert abs(np.mean(p**4) - 3.0) < 0.06  # Gaussian kurtosis
  assert abs(np.mean(np.abs(p) > 1.959964) - 0.05) < 0.003
