"""Tests of ``apollo_lm.steps``: the loss, the train steps and the eval step."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from apollo_lm import steps
from tests.apollo_lm.conftest import init_params
from tests.apollo_lm.conftest import SMALL_CONFIG

pytestmark = pytest.mark.xdist_group("apollo_lm_steps")

CONFIG = SMALL_CONFIG


def _reference_losses(logits, targets) -> np.ndarray:
  """Per-token cross-entropy in float64 NumPy."""
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  log_probs = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -np.take_along_axis(log_probs, np.asarray(targets)[..., None], -1)[
      ..., 0]


MASKS = {
    "none": None,
    "partial": np.array([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 1]]),
    "weights": np.array([[0.5, 1, 0, 2], [0, 1, 1, 1], [1, 0, 0, 1]]),
    "zero": np.zeros((3, 4)),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_next_token_loss_matches_float64_reference(dtype, mask_name):
  logits = jax.random.normal(jax.random.key(0), (3, 4, 7), dtype) * 3
  targets = jax.random.randint(jax.random.key(1), (3, 4), 0, 7)
  mask = MASKS[mask_name]
  batch = steps.Batch(jnp.zeros_like(targets), targets,
                      None if mask is None else jnp.asarray(mask))
  per_token = _reference_losses(logits.astype(jnp.float32), targets)
  weights = np.ones((3, 4)) if mask is None else mask
  expected = (per_token * weights).sum() / max(weights.sum(), 1e-38)
  loss = steps.next_token_loss(logits, batch)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  np.testing.assert_allclose(loss, expected, rtol=1e-6, atol=1e-7)
  total, count = steps.next_token_loss_sum(logits, batch)
  np.testing.assert_allclose(total, (per_token * weights).sum(), rtol=1e-6)
  assert float(count) == weights.sum()


def test_masked_targets_do_not_matter():
  logits = jax.random.normal(jax.random.key(0), (2, 5, 9))
  targets = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 0, 1]])
  mask = jnp.array([[1, 1, 0, 0, 1], [0, 1, 0, 1, 1]])
  other = jnp.where(mask == 1, targets, (targets + 3) % 9)
  assert not np.array_equal(other, targets)
  a = steps.next_token_loss(logits, steps.Batch(targets, targets, mask))
  b = steps.next_token_loss(logits, steps.Batch(targets, other, mask))
  assert float(a) == float(b)
  c = steps.next_token_loss(logits, steps.Batch(targets, other))
  assert float(c) != float(a)


def test_batch_from_tokens_shifts_by_one():
  tokens = jnp.arange(12).reshape(2, 6)
  batch = steps.Batch.from_tokens(tokens)
  np.testing.assert_array_equal(batch.inputs, tokens[:, :-1])
  np.testing.assert_array_equal(batch.targets, tokens[:, 1:])
  assert batch.loss_mask is None and batch.segment_ids is None


@pytest.fixture(scope="module")
def model_and_tokens():
  graphdef, params = init_params(CONFIG)
  tokens = jax.random.randint(jax.random.key(2), (8, 17), 0, CONFIG.vocab_size)
  return graphdef, params, tokens


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


@pytest.mark.parametrize("grad_accum", [1, 2, 4])
def test_grad_accum_matches_one_big_batch(model_and_tokens, grad_accum):
  graphdef, params, tokens = model_and_tokens
  tx = optax.sgd(0.5)  # linear in the gradient: no amplified rounding
  full = jax.jit(steps.make_train_step(graphdef, tx))
  accum = jax.jit(steps.make_train_step(graphdef, tx, grad_accum=grad_accum))
  batch = steps.Batch.from_tokens(tokens)
  # Micro-batch a is rows a, a + A, ... (as apollo_lm.train lays them out).
  micro = jax.tree.map(
      lambda x: x.reshape(-1, grad_accum, x.shape[-1]).swapaxes(0, 1), batch)
  p1, _, m1 = full(_copy(params), tx.init(params), batch)
  p2, _, m2 = accum(_copy(params), tx.init(params), micro)
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               p2, p1)
  moved = max(float(jnp.max(jnp.abs(a - b)))
              for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params)))
  assert moved > 1e-3


def test_train_step_metrics_and_update(model_and_tokens):
  graphdef, params, tokens = model_and_tokens
  batch = steps.Batch.from_tokens(tokens)
  tx = optax.sgd(0.5)
  loss_fn = steps.loss_fn(graphdef)
  loss, grads = jax.value_and_grad(loss_fn)(params, batch)
  new_params, _, metrics = jax.jit(steps.make_train_step(graphdef, tx))(
      _copy(params), tx.init(params), batch)
  norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2)
                     for g in jax.tree.leaves(grads)))
  np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
  jax.tree.map(lambda p, g, n: np.testing.assert_allclose(
      n, p - 0.5 * g, atol=1e-6), params, grads, new_params)
  no_norm = steps.make_train_step(graphdef, tx, with_grad_norm=False)
  _, _, metrics = jax.jit(no_norm)(_copy(params), tx.init(params), batch)
  assert set(metrics) == {"loss"}


def test_update_step_is_tx_update_then_apply(model_and_tokens):
  _, params, _ = model_and_tokens
  tx = optax.adam(1e-2)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  expected = optax.apply_updates(params, updates)
  new_params, _ = jax.jit(steps.make_update_step(tx))(
      params, tx.init(params), grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-7),
               new_params, expected)
  assert not np.allclose(new_params["final_norm"]["scale"],
                         params["final_norm"]["scale"])


def test_eval_step_sum_and_count(model_and_tokens):
  graphdef, params, tokens = model_and_tokens
  batch = steps.Batch.from_tokens(tokens)
  logits = nnx.merge(graphdef, params)(batch.inputs)
  expected = _reference_losses(logits, batch.targets)
  total, count = jax.jit(steps.make_eval_step(graphdef))(params, batch)
  assert float(count) == batch.targets.size
  np.testing.assert_allclose(total, expected.sum(), rtol=1e-5)
  mask = jnp.zeros_like(batch.targets).at[:, -3:].set(1)
  total, count = jax.jit(steps.make_eval_step(graphdef))(
      params, batch._replace(loss_mask=mask))
  assert float(count) == 3 * tokens.shape[0]
  np.testing.assert_allclose(total, expected[:, -3:].sum(), rtol=1e-5)
