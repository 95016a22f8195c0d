"""Tests of the layer-wise train step, Q-APOLLO training and its memory."""

import dataclasses
import pathlib
import sysconfig

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import apollo_optax
from apollo_lm import configs
from apollo_lm import data
from apollo_lm import layerwise
from apollo_lm import model as model_lib
from apollo_lm import steps
from tests.apollo_lm.conftest import init_params
from tests.apollo_lm.conftest import small_config

SMALL = small_config(remat=True)
# Checkpoint-family features: the head is the transposed embedding, q/k/v
# biases, grouped-query attention.
TIED = dataclasses.replace(SMALL, tie_embeddings=True, qkv_bias=True,
                           num_kv_heads=2)


def _ordinary_step(graphdef, tx):
  """Whole gradient, then ``tx.update``: the reference."""
  return steps.make_train_step(graphdef, tx, with_grad_norm=False)


def test_matrix_index_offset_draws_the_stack_projection():
  w = jax.random.normal(jax.random.key(0), (3, 16, 8))
  g = jax.random.normal(jax.random.key(1), (3, 16, 8))
  with_norm = lambda x: {"layers": {"w": x, "norm": jnp.ones((3, 8))}}
  cases = [(apollo_optax.apollo(1e-2, rank=2), with_norm),
           (apollo_optax.apollo_mini(1e-2), with_norm),
           (apollo_optax.scale_by_apollo(rank=2), lambda x: {"layers": {"w": x}})]
  for tx, tree in cases:

    @jax.jit
    def run(params, grads):
      full, _ = tx.update(grads, tx.init(params), params)
      parts = []
      for l in (1, 2):
        p_l, g_l = jax.tree.map(lambda x: x[l], (params, grads))
        state = tx.init(p_l)
        shifted, _ = tx.update(g_l, state, p_l, matrix_index_offset=l)
        unshifted, _ = tx.update(g_l, state, p_l)
        parts.append((shifted, unshifted))
      return full, parts

    full, parts = run(tree(w), tree(g))
    for l, (shifted, unshifted) in zip((1, 2), parts):
      np.testing.assert_allclose(shifted["layers"]["w"],
                                 full["layers"]["w"][l], rtol=1e-6, atol=1e-7)
      assert not np.allclose(unshifted["layers"]["w"], full["layers"]["w"][l])


# Gemma 3 style: sliding and global layers with their own RoPE bases, q/k
# norms, post-norms, (1 + w) norms, GeGLU and scaled embeddings.
GEMMA_LIKE = small_config(
    remat=True, tie_embeddings=True, qk_norm=True, post_norms=True,
    norm_plus_one=True, scale_embeddings=True, hidden_act="gelu_pytorch_tanh",
    sliding_window=5, layer_types=("sliding_attention", "full_attention"),
    rope_local_theta=1e4, query_pre_attn_scalar=8.0)


@pytest.mark.parametrize("name, config", [
    ("adamw", SMALL), ("apollo", SMALL), ("apollo_mini", SMALL),
    ("apollo", TIED), ("apollo", GEMMA_LIKE)])
def test_layerwise_matches_ordinary_step(name, config):
  graphdef, params = init_params(config)
  assert ("lm_head" in params) == (not config.tie_embeddings)
  schedule = optax.linear_schedule(1e-2, 5e-3, 4)
  tx = {
      "adamw": optax.adamw(schedule, weight_decay=0.1),
      # update_proj_gap=2: the projections are refreshed during the test.
      "apollo": apollo_optax.apollo(schedule, rank=4, update_proj_gap=2,
                                    weight_decay=0.1),
      "apollo_mini": apollo_optax.apollo_mini(schedule, update_proj_gap=2),
  }[name]
  ordinary = jax.jit(_ordinary_step(graphdef, tx))
  lw = jax.jit(steps.make_layerwise_train_step(config, tx))
  p1, s1 = params, jax.jit(tx.init)(params)
  p2, s2 = params, jax.jit(layerwise.init_layerwise_state,
                           static_argnums=0)(tx, params)
  all_tokens = jax.random.randint(jax.random.key(1), (4, 2, 17), 0, 64)
  for tokens in all_tokens:
    batch = steps.Batch.from_tokens(tokens)
    p1, s1, metrics1 = ordinary(p1, s1, batch)
    p2, s2, metrics2 = lw(p2, s2, batch)
    np.testing.assert_allclose(metrics2["loss"], metrics1["loss"], rtol=1e-6)
  chex.assert_trees_all_close(p2, p1, atol=1e-6, rtol=0)
  # The parameters did move (well beyond the tolerance).
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), p1, params)
  assert min(jax.tree.leaves(moved)) > 1e-4
  if name != "adamw":
    # The limiter's remembered norms are the ordinary state's, per layer.
    limiter = lambda s: optax.tree.get(
        s, "NormGrowthLimiterState").previous_norm["layers"]
    chex.assert_trees_all_close(limiter(s2.layers), limiter(s1), rtol=1e-5)


def test_check_layerwise_options():
  layerwise.check_layerwise_options(grad_clip=None, grad_accum=1)
  with pytest.raises(ValueError, match="global gradient norm"):
    layerwise.check_layerwise_options(grad_clip=1.0)
  with pytest.raises(ValueError, match="accumulate"):
    layerwise.check_layerwise_options(grad_accum=4)
  with pytest.raises(ValueError, match="parameter keys"):
    layerwise.split_params({"embed": {}})


def _corpus(tmp_path, monkeypatch):
  monkeypatch.setenv("APOLLO_LM_CACHE", str(tmp_path / "cache"))
  lib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  train = [lib / f for f in ("argparse.py", "dataclasses.py", "textwrap.py",
                             "inspect.py", "enum.py")]
  return data.load_corpus(train + [lib / "typing.py"],
                          eval_paths=[lib / "typing.py"], vocab_size=512)


@pytest.mark.slow
def test_q_apollo_mini_trains_like_apollo_mini(tmp_path, monkeypatch):
  corpus = _corpus(tmp_path, monkeypatch)
  config = configs.get_config("tiny", vocab_size=corpus.vocab_size,
                              dtype=jnp.float32, max_seq_len=64)
  graphdef, params = init_params(config)
  num_steps, batches = 60, corpus.batches(8, 64, seed=0)
  evals = corpus.eval_batches(4, 8, 64)
  eval_step = steps.make_eval_step(graphdef)

  @jax.jit
  def eval_loss(params):
    sums, counts = zip(*(eval_step(params, batch) for batch in evals))
    return sum(sums) / sum(counts)

  def train(quantized):
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 10, num_steps,
                                                  1e-3)
    tx = apollo_optax.apollo_mini(schedule)
    p = jax.tree.map(jnp.copy, params)  # the step donates its inputs
    if quantized:
      # tiny's down_proj has 352 input rows: groups of 32 divide it.
      p = layerwise.quantize_llama_params(p, group_size=32)
      tx = apollo_optax.quantized_weights(tx, key=jax.random.key(0))
    state = layerwise.init_layerwise_state(tx, p)
    step = jax.jit(steps.make_layerwise_train_step(config, tx),
                   donate_argnums=(0, 1))
    start = float(eval_loss(p))
    for i in range(num_steps):
      p, state, _ = step(p, state, jax.tree.map(jnp.asarray,
                                                batches.batch(i)))
    return start, float(eval_loss(p)), p

  start_q, end_q, pq = train(True)
  start, end, _ = train(False)
  assert apollo_optax.is_quantized(pq["layers"]["attn"]["q_proj"]["kernel"])
  assert pq["layers"]["attn"]["q_proj"]["kernel"].values.dtype == jnp.int8
  assert end < start - 1.0 and end_q < start_q - 1.0
  print(f"held-out loss: APOLLO-Mini {start:.3f} -> {end:.3f}, Q-APOLLO-Mini"
        f" {start_q:.3f} -> {end_q:.3f}")
  assert end_q <= 1.1 * end, (end_q, end)


def _step_memory(config, tx, step_fn, params, opt_state):
  tokens = jax.ShapeDtypeStruct((1, 64), jnp.int32)
  compiled = jax.jit(step_fn, donate_argnums=(0, 1)).lower(
      params, opt_state, steps.Batch(tokens, tokens)).compile()
  return compiled.memory_analysis()


@pytest.mark.slow
def test_layerwise_needs_less_temporary_memory_60m():
  config = configs.get_config("60m", remat=True)
  abstract = nnx.eval_shape(lambda: model_lib.Llama(config, rngs=nnx.Rngs(0)))
  graphdef = nnx.graphdef(abstract)
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  tx = apollo_optax.apollo_mini(1e-2)
  ordinary = _step_memory(config, tx, _ordinary_step(graphdef, tx), params,
                          jax.eval_shape(tx.init, params))
  lw = _step_memory(
      config, tx, steps.make_layerwise_train_step(config, tx), params,
      jax.eval_shape(lambda p: layerwise.init_layerwise_state(tx, p), params))
  # The ordinary step holds every gradient at once: at least the size of the
  # layer weights more temporary memory than the layer-wise step.
  layer_bytes = sum(x.size * 4 for x in jax.tree.leaves(params["layers"]))
  assert lw.temp_size_in_bytes < ordinary.temp_size_in_bytes
  assert ordinary.temp_size_in_bytes - lw.temp_size_in_bytes > layer_bytes // 2
