"""Tests of LoRA fine-tuning (apollo_lm.lora and its finetune options)."""

import functools

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import apollo_optax
from apollo_lm import lora
from apollo_lm import model as model_lib
from apollo_lm import optimizers
from apollo_lm import steps
from apollo_lm.errors import ConfigError
from tests.apollo_lm.conftest import small_config
# The Llama-3-style checkpoint fixture and its SFT file.
from tests.apollo_lm.test_finetune import checkpoint  # noqa: F401
from tests.apollo_lm.test_finetune import sft_file  # noqa: F401

CONFIG = small_config(num_kv_heads=2, vocab_size=97, max_seq_len=16)


def _lora_model(config=CONFIG, spec=lora.LoRAConfig(4, 8.0), wrap_all=False):
  model = model_lib.Llama(config, rngs=nnx.Rngs(0))
  return lora.add_adapters(model, spec, rngs=nnx.Rngs(1), wrap_all=wrap_all)


def _batch(seed=0, batch=2, length=16, vocab=97):
  tokens = jax.random.randint(jax.random.key(seed), (batch, length + 1), 0,
                              vocab)
  return steps.Batch.from_tokens(tokens)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, inputs):
  params = apollo_optax.dequantize_params(params, CONFIG.param_dtype)
  return nnx.merge(graphdef, params)(inputs)


def _split(model):
  graphdef, state = nnx.split(model, nnx.Param)
  return graphdef, nnx.to_pure_dict(state)


@pytest.mark.parametrize("targets, tied", [("all", False), ("q,v", True),
                                           ("down", False)])
def test_zero_adapters_leave_the_model_unchanged(targets, tied):
  config = small_config(num_kv_heads=2, vocab_size=97, max_seq_len=16,
                        tie_embeddings=tied, qkv_bias=True)
  spec = lora.LoRAConfig(4, 8.0, targets)
  plain = model_lib.Llama(config, rngs=nnx.Rngs(0))
  adapted = _lora_model(config, spec)
  inputs = _batch().inputs
  graphdef, params = _split(adapted)
  np.testing.assert_array_equal(_logits(graphdef, params, inputs),
                                _logits(*_split(plain), inputs))
  mask = lora.adapter_mask(params)
  assert sum(jax.tree.leaves(mask)) == 2 * len(spec.targets)
  for name, (block, proj) in lora.TARGETS.items():
    node = params["layers"][block][proj]
    if name not in spec.targets:
      assert set(node) <= {"kernel", "bias"}
      continue
    din, dout = node["kernel"].shape[1:]
    assert node["lora_a"].shape == (2, din, 4)
    assert node["lora_b"].shape == (2, 4, dout)
    np.testing.assert_array_equal(node["lora_b"], 0)
    # PEFT's A: Kaiming-uniform, U(-1/sqrt(in), 1/sqrt(in)), per layer.
    a = np.asarray(node["lora_a"], np.float64)
    assert np.abs(a).max() <= 1 / np.sqrt(din)
    np.testing.assert_allclose(a.std(), 1 / np.sqrt(3 * din), rtol=0.25)
    # The base kernel keeps its path (and value).
    np.testing.assert_array_equal(
        node["kernel"], nnx.state(plain, nnx.Param)["layers"][block][proj]
        ["kernel"][...])


def _train(params, graphdef, tx, num_steps=3, **kwargs):
  step = jax.jit(steps.make_train_step(graphdef, tx,
                                       trainable=lora.adapter_mask, **kwargs))
  state = tx.init(params)
  metrics = []
  for i in range(num_steps):
    params, state, m = step(params, state, _batch(i))
    metrics.append(m)
  return params, state, metrics


def test_steps_update_the_adapters_only():
  graphdef, state = nnx.split(_lora_model(), nnx.Param)
  params = nnx.to_pure_dict(state)
  tx = optimizers.train_only(optax.adamw(1e-2, weight_decay=0.1),
                             lora.adapter_mask)
  new, opt_state, metrics = _train(params, graphdef, tx)
  mask = lora.adapter_mask(params)
  for before, after, is_adapter in zip(jax.tree.leaves(params),
                                       jax.tree.leaves(new),
                                       jax.tree.leaves(mask)):
    if is_adapter:
      assert np.any(np.asarray(before) != np.asarray(after))
    else:
      np.testing.assert_array_equal(after, before)
  # Optimizer state: two float32 moments per adapter parameter (+ counts).
  count = lora.count_adapter_params(params)
  # L r sum(in + out): q, k, v, o (d 32, kv 16), gate, up, down (f 64).
  assert count == 2 * 4 * (64 + 48 + 48 + 64 + 96 + 96 + 96)
  assert 2 * 4 * count <= apollo_optax.state_bytes(opt_state) <= (
      2 * 4 * count + 64)
  # grad_norm is the norm of the adapters' gradient alone.
  loss = steps.loss_fn(graphdef)
  grads = jax.jit(jax.grad(loss))(params, _batch(0))
  expected = np.sqrt(sum(
      np.sum(np.asarray(g, np.float64) ** 2)
      for g, m in zip(jax.tree.leaves(grads), jax.tree.leaves(mask)) if m))
  np.testing.assert_allclose(metrics[0]["grad_norm"], expected, rtol=1e-5)
  assert all(np.isfinite(m["loss"]) for m in metrics)


def test_grad_accum_with_adapters_matches_one_batch():
  graphdef, state = nnx.split(_lora_model(), nnx.Param)
  params = nnx.to_pure_dict(state)
  tx = optimizers.train_only(optax.sgd(1e-1), lora.adapter_mask)
  batch = _batch(0, batch=4)
  one = steps.make_train_step(graphdef, tx, trainable=lora.adapter_mask)
  accum = steps.make_train_step(graphdef, tx, trainable=lora.adapter_mask,
                                grad_accum=2)
  # Micro-batch a is rows a, a + 2 (as apollo_lm.geometry splits them).
  micro = jax.tree.map(lambda x: x.reshape(2, 2, -1).swapaxes(0, 1), batch)
  p1, _, _ = jax.jit(one)(params, tx.init(params), batch)
  p2, _, _ = jax.jit(accum)(params, tx.init(params), micro)
  chex.assert_trees_all_close(p2, p1, atol=1e-6, rtol=1e-5)


def test_merged_params_are_w_plus_scaled_ab_and_give_the_same_logits():
  spec = lora.LoRAConfig(4, 12.0, ("q", "v", "o", "gate", "up", "down"))
  adapted = _lora_model(spec=spec)
  graphdef, state = nnx.split(adapted, nnx.Param)
  params = nnx.to_pure_dict(state)
  tx = optimizers.train_only(optax.adam(1e-2), lora.adapter_mask)
  params, _, _ = _train(params, graphdef, tx)
  merged = lora.merged_params(params, spec.scale, jnp.float32)
  assert not any(jax.tree.leaves(lora.adapter_mask(merged)))
  node = params["layers"]["attn"]["q_proj"]
  assert np.any(np.asarray(node["lora_b"]) != 0)
  a, b, w = (np.asarray(node[k], np.float64)
             for k in ("lora_a", "lora_b", "kernel"))
  np.testing.assert_allclose(merged["layers"]["attn"]["q_proj"]["kernel"],
                             w + 3.0 * a @ b, rtol=1e-6, atol=1e-7)
  # k is not a target: unchanged.
  np.testing.assert_array_equal(merged["layers"]["attn"]["k_proj"]["kernel"],
                                params["layers"]["attn"]["k_proj"]["kernel"])
  plain = nnx.graphdef(model_lib.Llama(CONFIG, rngs=nnx.Rngs(0)))
  batch = _batch(7)
  np.testing.assert_allclose(_logits(plain, merged, batch.inputs),
                             _logits(graphdef, params, batch.inputs),
                             rtol=1e-5, atol=1e-5)


def test_int8_base_stays_frozen_and_dequantizes_inside_the_layers():
  adapted = _lora_model(spec=lora.LoRAConfig(4, 8.0, ("q", "down")),
                        wrap_all=True)
  graphdef, state = nnx.split(adapted, nnx.Param)
  params = lora.quantize_base(nnx.to_pure_dict(state), group_size=16)
  kernels = params["layers"]["attn"]
  assert apollo_optax.is_quantized(kernels["k_proj"]["kernel"])
  assert not apollo_optax.is_quantized(kernels["q_proj"]["lora_a"])
  batch = _batch(3)
  # Dequantized inside the scanned blocks == dequantized beforehand.
  inside = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
  np.testing.assert_allclose(inside(params, batch.inputs),
                             _logits(graphdef, params, batch.inputs),
                             rtol=1e-6, atol=1e-6)
  # ... so the eval step need not dequantize the whole model first.
  eval_lazy = jax.jit(steps.make_eval_step(graphdef, dequantize=False))
  np.testing.assert_allclose(
      eval_lazy(params, batch),
      jax.jit(steps.make_eval_step(graphdef))(params, batch), rtol=1e-6)
  tx = optimizers.train_only(optax.adamw(1e-2), lora.adapter_mask)
  new, _, metrics = _train(params, graphdef, tx, num_steps=4)
  assert metrics[-1]["loss"] < metrics[0]["loss"] + 1.0
  assert all(np.isfinite(m["loss"]) for m in metrics)
  mask = lora.adapter_mask(params)
  for before, after, is_adapter in zip(jax.tree.leaves(params),
                                       jax.tree.leaves(new),
                                       jax.tree.leaves(mask)):
    if not is_adapter:
      assert after.dtype == before.dtype
      np.testing.assert_array_equal(after, before)
  merged = lora.merged_params(new, 2.0, jnp.float32)
  assert not any(apollo_optax.is_quantized(x) for x in jax.tree.leaves(
      merged, is_leaf=apollo_optax.is_quantized))
  plain = nnx.graphdef(model_lib.Llama(CONFIG, rngs=nnx.Rngs(0)))
  np.testing.assert_allclose(_logits(plain, merged, batch.inputs),
                             _logits(graphdef, new, batch.inputs),
                             rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Options and the finetune entry point.


@pytest.mark.parametrize("targets, expected", [
    (None, tuple(lora.TARGETS)), ("all", tuple(lora.TARGETS)),
    ("v,q", ("q", "v")), (("q_proj", "down_proj"), ("q", "down")),
])
def test_parse_targets(targets, expected):
  assert lora.parse_targets(targets) == expected


def _config(checkpoint, sft_file, **kwargs):
  from apollo_lm import finetune
  return finetune.FinetuneConfig(checkpoint=str(checkpoint),
                                 data=(str(sft_file),), **kwargs)


def test_lora_defaults(checkpoint, sft_file):
  config = _config(checkpoint, sft_file, lora_rank=16)
  assert (config.optimizer, config.lr, config.lora_alpha) == (
      "adamw", lora.LEARNING_RATE, 32.0)
  assert config.lora_config == lora.LoRAConfig(16, 32.0, tuple(lora.TARGETS))
  assert _config(checkpoint, sft_file).optimizer == "apollo_mini"
  assert _config(checkpoint, sft_file).trainable is None
  # int8 base without --layerwise: allowed for LoRA only.
  _config(checkpoint, sft_file, lora_rank=4, quantize_weights="int8")
  with pytest.raises(ConfigError, match="--quantize-weights"):
    _config(checkpoint, sft_file, quantize_weights="int8")


@pytest.mark.parametrize("kwargs, message", [
    (dict(lora_alpha=16.0), "--lora-alpha: needs --lora-rank"),
    (dict(lora_targets="q,v"), "--lora-targets: needs --lora-rank"),
    (dict(lora_rank=0), "--lora-rank: must be an int >= 1, got 0"),
    (dict(lora_rank=-2), "--lora-rank: must be an int >= 1"),
    (dict(lora_rank=8, lora_alpha=0.0), "--lora-alpha: must be > 0"),
    (dict(lora_rank=8, lora_targets="q,attn"),
     r"--lora-targets: unknown target\(s\) \['attn'\]; allowed: q, k, v, o, "
     "gate, up, down"),
    (dict(lora_rank=8, optimizer="apollo_mini"),
     "--optimizer: LoRA trains its adapters with adamw.*allowed with "
     "--lora-rank: adamw"),
    (dict(lora_rank=8, layerwise=True), "--layerwise: not with --lora-rank"),
])
def test_lora_errors_name_the_option(checkpoint, sft_file, kwargs, message):
  with pytest.raises(ConfigError, match=message):
    _config(checkpoint, sft_file, **kwargs)


def test_cli_error_is_one_line_and_exit_2(checkpoint, sft_file, capsys):
  from apollo_lm import finetune
  with pytest.raises(SystemExit) as exit_info:
    finetune.main(["--checkpoint", str(checkpoint), "--data", str(sft_file),
                   "--lora-rank", "4", "--lora-targets", "q,x"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].endswith("--lora-targets: unknown target(s) ['x']; allowed: "
                          "q, k, v, o, gate, up, down (comma-separated) or "
                          "all.")


@pytest.mark.slow
def test_finetune_lora_resumes_and_exports_merged_weights(
    checkpoint, sft_file, tmp_path):
  """A QLoRA-like run (int8 base) stopped at step 3 resumes from its Orbax
  checkpoint; its --save-hf folder is an ordinary checkpoint (no adapter
  tensors, float kernels: the dequantized base plus the adapters)."""
  from apollo_lm import finetune, hf
  common = dict(steps=6, batch_size=4, seq_len=32, eval_every=0,
                eval_batches=1, no_progress=True, num_devices=1, lora_rank=4,
                quantize_weights="int8", quant_group_size=16,
                lora_targets="q,k,v,o,gate,up,down", lr=1e-2,
                checkpoint_dir=str(tmp_path / "ckpt"))
  first = finetune.finetune(_config(checkpoint, sft_file, stop_at_step=3,
                                    **common))
  assert first.step == 3
  config = _config(checkpoint, sft_file, resume=True,
                   save_hf=str(tmp_path / "hf"), **common)
  second = finetune.finetune(config)
  assert (second.start_step, second.step) == (3, 6)
  assert second.losses[-1] < first.losses[0]
  assert second.hparams["lora_rank"] == 4
  assert np.isfinite(second.eval_loss)
  # Optimizer state: Adam moments of the adapters only.
  tuned, llama = hf.load_pretrained(tmp_path / "hf")
  base, _ = hf.load_pretrained(checkpoint)
  tuned_params = nnx.to_pure_dict(nnx.state(tuned, nnx.Param))
  base_params = nnx.to_pure_dict(nnx.state(base, nnx.Param))
  assert jax.tree.structure(tuned_params) == jax.tree.structure(base_params)
  np.testing.assert_array_equal(tuned_params["embed"]["embedding"],
                                base_params["embed"]["embedding"])
  # Against the int8 base the run started from: the adapters' change.
  base_int8 = apollo_optax.dequantize_params(
      lora.quantize_base(base_params, 16), jnp.float32)
  for block, proj in lora.TARGETS.values():
    tuned_kernel = tuned_params["layers"][block][proj]["kernel"]
    assert tuned_kernel.dtype == jnp.float32
    assert np.any(np.asarray(tuned_kernel) != np.asarray(
        base_int8["layers"][block][proj]["kernel"]))
  # Optimizer state: two float32 Adam moments per adapter parameter.
  count = sum(4 * x.shape[0] * (x.shape[1] + x.shape[2])
              for x in jax.tree.leaves(tuned_params["layers"]) if x.ndim == 3)
  assert 2 * 4 * count <= second.state_bytes <= 2 * 4 * count + 64
