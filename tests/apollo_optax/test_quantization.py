"""Tests of INT8 group-wise weight quantization and quantized_weights."""

import doctest
import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import apollo_optax
from apollo_optax import quantization


def _scales_per_weight(q: quantization.QuantizedArray) -> jax.Array:
  return jnp.repeat(q.scales, q.group_size, axis=-2)


@pytest.mark.parametrize("shape,group_size", [((256, 48), 128),
                                              ((3, 96, 40), 32)])
def test_error_bounds(shape, group_size):
  w = jax.random.normal(jax.random.key(0), shape) * 0.02
  quantize = jax.jit(quantization.quantize, static_argnums=1)
  nearest = quantize(w, group_size)
  chex.assert_shape(nearest.scales, shape[:-2] + (shape[-2] // group_size,
                                                  shape[-1]))
  assert nearest.values.dtype == jnp.int8
  assert int(jnp.max(jnp.abs(nearest.values))) == 127  # absmax hits the grid
  s = _scales_per_weight(nearest)
  err = jnp.abs(w - quantization.dequantize(nearest))
  assert bool(jnp.all(err <= s / 2 * (1 + 1e-6)))
  # Nearest rounding does use most of its error budget.
  assert float(jnp.max(err / s)) > 0.45

  stochastic = quantize(w, group_size, key=jax.random.key(1))
  np.testing.assert_array_equal(stochastic.scales, nearest.scales)
  err = jnp.abs(w - quantization.dequantize(stochastic))
  assert bool(jnp.all(err < s))
  assert float(jnp.max(err / s)) > 0.5  # it does not round to nearest


def test_group_size_must_divide_input_dim():
  with pytest.raises(ValueError, match="does not divide the input dimension"):
    quantization.quantize(jnp.ones((352, 128)), 128)
  with pytest.raises(ValueError, match="only matrices"):
    quantization.quantize(jnp.ones(128), 128)


def test_zero_group_and_dtype():
  w = jnp.zeros((64, 4)).at[32:, 0].set(1.0)
  q = quantization.quantize(w, 32)
  np.testing.assert_allclose(quantization.dequantize(q), w, atol=0)
  assert quantization.dequantize(q, jnp.bfloat16).dtype == jnp.bfloat16


def test_stochastic_rounding_is_unbiased():
  # Every weight sits 0.3 quantization steps above a grid point (the group's
  # largest weight, 127 steps, fixes the step), so nearest and floor rounding
  # are both off by 0.3 steps, while the mean over keys must converge to w.
  group_size, step = 64, 0.01
  grid = jax.random.randint(jax.random.key(0), (128, 32), -100, 100)
  w = (grid + 0.3) * step
  w = w.at[::group_size].set(127 * step)
  keys = jax.random.split(jax.random.key(1), 2000)
  mean = jax.jit(lambda w, keys: jnp.mean(jax.vmap(
      lambda k: quantization.dequantize(
          quantization.quantize(w, group_size, key=k)))(keys), axis=0))
  s = _scales_per_weight(quantization.quantize(w, group_size))
  tolerance = 0.06  # in steps; the mean's standard error is 0.0102 steps
  bias = jnp.abs(mean(w, keys) - w) / s
  assert float(jnp.max(bias)) < tolerance
  nearest = jnp.abs(quantization.dequantize(
      quantization.quantize(w, group_size)) - w) / s
  floor = jnp.abs(jnp.floor(w / s) * s - w) / s
  for biased in (nearest, floor):
    assert float(jnp.max(biased)) > tolerance


def test_quantize_params_default_mask():
  params = {"embed": {"embedding": jnp.ones((64, 32))},
            "layers": {"kernel": jnp.ones((2, 32, 16)),
                       "norm": {"scale": jnp.ones((2, 32))}}}
  q = quantization.quantize_params(params, group_size=16)
  assert quantization.is_quantized(q["layers"]["kernel"])
  assert not quantization.is_quantized(q["embed"]["embedding"])
  assert q["layers"]["norm"]["scale"].dtype == jnp.float32


def _setup():
  w = jax.random.normal(jax.random.key(0), (2, 64, 16)) * 0.02
  params = {"w": quantization.quantize(w, 32), "b": jnp.zeros(16)}
  grads = {"w": jax.random.normal(jax.random.key(1), w.shape),
           "b": jnp.ones(16)}
  return params, grads


def test_quantized_weights_update():
  params, grads = _setup()
  inner = optax.sgd(1e-3)
  tx = quantization.quantized_weights(inner, key=jax.random.key(2))
  state = tx.init(params)
  updates, new_state = tx.update(grads, state, params)
  assert isinstance(updates["w"], quantization.RequantizedWeights)
  with pytest.raises((ValueError, TypeError)):
    optax.apply_updates(params, updates)
  new = quantization.apply_quantized_updates(params, updates)
  expected = quantization.dequantize(params["w"]) - 1e-3 * grads["w"]
  err = jnp.abs(quantization.dequantize(new["w"]) - expected)
  assert bool(jnp.all(err < _scales_per_weight(new["w"])))
  np.testing.assert_allclose(new["b"], -1e-3 * jnp.ones(16))
  # The key advances, and the same key gives the same result.
  assert not np.array_equal(jax.random.key_data(new_state.key),
                            jax.random.key_data(state.key))
  again, _ = tx.update(grads, state, params)
  chex.assert_trees_all_equal(again, updates)
  other_tx = quantization.quantized_weights(inner, key=jax.random.key(3))
  other, _ = other_tx.update(grads, other_tx.init(params), params)
  assert not np.array_equal(other["w"].values, updates["w"].values)


def test_small_updates_survive_in_expectation():
  # An update of 0.1 quantization steps is lost by nearest rounding but kept
  # on average by stochastic rounding.
  params, _ = _setup()
  s = _scales_per_weight(params["w"])
  grads = {"w": -0.1 * s, "b": jnp.zeros(16)}
  inner = optax.sgd(1.0)

  @functools.partial(jax.jit, static_argnums=0)
  def moved(stochastic_round, key):
    tx = quantization.quantized_weights(inner, key=key,
                                        stochastic_round=stochastic_round)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = quantization.apply_quantized_updates(params, updates)
    return jnp.mean(quantization.dequantize(new["w"])
                    - quantization.dequantize(params["w"]))

  keys = jax.random.split(jax.random.key(4), 50)
  mean_move = jnp.mean(jax.vmap(lambda k: moved(True, k))(keys))
  np.testing.assert_allclose(mean_move, 0.1 * jnp.mean(s), rtol=0.1)
  assert abs(float(moved(False, keys[0]))) < 0.01 * float(jnp.mean(s))


def test_matrix_index_offset_slices_the_rounding_noise():
  params, grads = _setup()
  tx = quantization.quantized_weights(optax.sgd(1e-3), key=jax.random.key(2))
  full, _ = tx.update(grads, tx.init(params), params)
  for l in range(2):
    sliced = jax.tree.map(lambda x: x[l], (params, grads))
    part, _ = tx.update(sliced[1], tx.init(sliced[0]), sliced[0],
                        matrix_index_offset=l)
    np.testing.assert_array_equal(part["w"].values, full["w"].values[l])
  part, _ = tx.update(sliced[1], tx.init(sliced[0]), sliced[0])
  assert not np.array_equal(part["w"].values, full["w"].values[1])


def test_top_level_names_are_the_quantization_modules():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for name in quantization.__all__:
      assert getattr(apollo_optax, name) is getattr(quantization, name), name
      assert name not in apollo_optax.__all__, name


def test_quantization_module_example_runs():
  result = doctest.testmod(quantization, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0
  assert result.failed == 0
