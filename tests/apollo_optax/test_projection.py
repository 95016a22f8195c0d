"""Tests of ``apollo_optax._src.projection``: the Gaussian and Rademacher bits."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apollo_optax._src import projection as proj
from tests.apollo_optax import jax_compat

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


# --- Rademacher projection (issue 12) -------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (4, 64), (2, 3, 33)])
@pytest.mark.parametrize("make_key", [
    lambda: jax.random.key(5),
    lambda: jax.random.key(5, impl="rbg"),
    lambda: jax.random.PRNGKey(5),
])
def test_random_bits_are_jax_random_bits(shape, make_key):
  key = make_key()
  np.testing.assert_array_equal(
      np.asarray(jax.jit(proj._random_bits, static_argnums=1)(key, shape)),
      np.asarray(jax.random.bits(key, shape, jnp.uint32)))


def _numpy_signs(key, shape):
  """float64 NumPy reference: bit k of word w is entry 32·w + k of a row."""
  *rows, d = shape
  words = np.asarray(jax.random.bits(key, (*rows, -(-d // 32)), jnp.uint32))
  bits = (words[..., :, None] >> np.arange(32, dtype=np.uint32)) & 1
  bits = bits.reshape(*rows, -1)[..., :d]
  return np.where(bits == 1, 1.0, -1.0)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (4, 64), (128, 512),
                                   (5, 1376), (2, 4, 31)])
@pytest.mark.parametrize("seed", [0, 2**31 - 1])
def test_rademacher_signs_unpack_the_words_of_jax_random_bits(shape, seed):
  key = jax.random.fold_in(jax.random.key(seed), 12345)
  got = jax.jit(proj.rademacher_signs, static_argnums=1)(key, shape)
  np.testing.assert_array_equal(np.asarray(got, np.float64),
                                _numpy_signs(key, shape))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16,
                                   jnp.float64])
@pytest.mark.parametrize("rank", [1, 3, 128])
def test_rademacher_entries_are_exactly_plus_minus_one_over_sqrt_rank(
    dtype, rank):
  with jax_compat.enable_x64(dtype == jnp.float64):
    _check_rademacher_entries(dtype, rank)


def _check_rademacher_entries(dtype, rank):
  key = jax.random.key(rank)
  p = proj.rademacher_projection(key, (rank, 200), dtype)
  assert p.dtype == dtype and p.shape == (rank, 200)
  value = np.asarray(jnp.asarray(1 / math.sqrt(rank), dtype), np.float64)
  np.testing.assert_array_equal(
      np.asarray(p, np.float64), _numpy_signs(key, (rank, 200)) * value)
  # Reproducible from the key alone.
  np.testing.assert_array_equal(
      np.asarray(p, np.float64),
      np.asarray(proj.rademacher_projection(key, (rank, 200), dtype),
                 np.float64))


def test_rademacher_signs_are_balanced_and_uncorrelated_over_keys():
  keys = jax.random.split(jax.random.key(0), 2000)
  s = np.asarray(jax.jit(jax.vmap(
      lambda k: proj.rademacher_signs(k, (4, 70))))(keys), np.float64)
  # Every position (and so every bit of a word) is fair: 2000 draws each,
  # sampling sd of a mean 0.022; the max over 280 positions stays < 0.1.
  assert np.max(np.abs(s.mean(axis=0))) < 0.1
  assert abs(s.mean()) < 0.01  # 560,000 draws, sd 0.0013
  # Neighbouring bits of one word, and the same bit of consecutive words and
  # rows, are uncorrelated (sd of each mean 0.0013-0.0015).
  for a, b in [(s[:, :, :-1], s[:, :, 1:]), (s[:, :, :38], s[:, :, 32:]),
               (s[:, :-1], s[:, 1:])]:
    assert abs(np.mean(a * b)) < 0.01


@pytest.mark.parametrize("rank", [4, 32])
def test_rademacher_projection_preserves_norms_in_expectation(rank):
  # E‖Px‖² = ‖x‖² (E[PᵀP] = I) and Var(‖Px‖²/‖x‖²) = 2/r·(1 − Σx⁴/‖x‖⁴)
  # for ±1/√r entries; both against float64 NumPy over 4000 keys.
  x = np.asarray(jax.random.normal(jax.random.key(9), (96,)), np.float64)
  keys = jax.random.split(jax.random.key(1), 4000)
  p = np.asarray(jax.jit(jax.vmap(
      lambda k: proj.rademacher_projection(k, (rank, 96))))(keys), np.float64)
  ratio = np.sum((p @ x) ** 2, axis=1) / np.sum(x**2)
  var = 2 / rank * (1 - np.sum(x**4) / np.sum(x**2) ** 2)
  assert abs(ratio.mean() - 1) < 5 * math.sqrt(var / 4000)
  assert abs(ratio.var() / var - 1) < 0.15
  gram = np.mean(np.einsum("krd,kre->kde", p[:500], p[:500]), axis=0)
  np.testing.assert_allclose(gram, np.eye(96), atol=0.1)


def test_rademacher_stack_matches_layer_by_layer():
  keys = proj.projection_keys(3, "['layers']['q']", jnp.int32(2), 8)
  stacked = jax.jit(jax.vmap(
      lambda k: proj.rademacher_projection(k, (16, 96))))(keys)
  for layer in range(8):
    one = proj.projection_keys(3, "['layers']['q']", jnp.int32(2), 1,
                               first_matrix=layer)[0]
    np.testing.assert_array_equal(
        stacked[layer], _numpy_signs(one, (16, 96)) / 4.0)  # exact: 1/4
  assert not np.array_equal(stacked[0], stacked[1])


@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("tall", [True, False])
@pytest.mark.parametrize("scale", [None, 0.5])
def test_reduced_precision_product_is_the_rounded_product_in_float64(
    rank, tall, scale):
  # With projection_dtype=bfloat16 the product is of bf16-rounded G and P,
  # summed in float32; at rank 1 only P is rounded (a matrix-vector product
  # gains nothing from a rounded copy of G). It must equal the float64
  # product of those inputs up to float32 summation error, and differ from
  # the product of the unrounded inputs.
  m, n = (96, 40) if tall else (40, 96)
  d = min(m, n)
  g = jax.random.normal(jax.random.key(0), (3, m, n), jnp.float32)
  p = jax.random.normal(jax.random.key(1), (3, rank, d), jnp.float32)
  got = jax.jit(lambda g, p: proj.project(
      g, p, tall=tall, compute_dtype=jnp.float32,
      projection_dtype=jnp.bfloat16, scale=scale))(g, p)
  g64 = np.asarray(g if rank == 1 else g.astype(jnp.bfloat16), np.float64)
  p64 = np.asarray(p.astype(jnp.bfloat16), np.float64)
  want = (np.einsum("bmn,brn->bmr", g64, p64) if tall
          else np.einsum("brm,bmn->brn", p64, g64)) * (scale or 1.0)
  assert got.dtype == jnp.float32
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  unrounded = (np.einsum("bmn,brn->bmr", np.asarray(g, np.float64),
                         np.asarray(p, np.float64)) if tall
               else np.einsum("brm,bmn->brn", np.asarray(p, np.float64),
                              np.asarray(g, np.float64))) * (scale or 1.0)
  assert np.max(np.abs(unrounded - want)) > 1e-3
