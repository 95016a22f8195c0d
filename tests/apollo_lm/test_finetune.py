"""Tests of fine-tuning: freezing parts of the model, the finetune entry point."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import apollo_optax
from apollo_lm import optimizers
from tests.apollo_lm.conftest import init_params
from tests.apollo_lm.conftest import small_config


def _params():
  keys = jax.random.split(jax.random.key(0), 4)
  return {
      "embed": {"embedding": jax.random.normal(keys[0], (11, 8))},
      "layers": {"attn": {"q_proj": {"kernel": jax.random.normal(keys[1], (2, 8, 8))}},
                 "attn_norm": {"scale": jnp.ones((2, 8))}},
      "final_norm": {"scale": jnp.ones((8,))},
      "lm_head": {"kernel": jax.random.normal(keys[2], (8, 11))},
  }


def _drop(tree, parts):
  """``tree`` without the frozen parts (same paths for the other leaves)."""
  names = {"embedding": "embed", "head": "lm_head"}
  return {k: v for k, v in tree.items() if k not in {names[p] for p in parts}}


@pytest.mark.parametrize("parts", [["embedding"], ["head"], ["embedding", "head"]])
@pytest.mark.parametrize("name", ["adamw", "apollo_mini"])
def test_freeze_keeps_parts_and_runs_tx_on_the_rest(parts, name):
  params = _params()
  inner = (optax.adamw(1e-2, weight_decay=0.1) if name == "adamw"
           else apollo_optax.apollo_mini(1e-2))
  tx = optimizers.freeze(inner, parts)
  mask = optimizers.frozen_mask(params, parts)
  assert sum(jax.tree.leaves(mask)) == len(parts)
  state = tx.init(params)
  # The trainable leaves alone, through `inner`: the reference.
  ref_params = _drop(params, parts)
  ref_state = inner.init(ref_params)
  new = params
  for i in range(3):
    grads = jax.tree.map(lambda x: jnp.cos(x + i), new)
    updates, state = tx.update(grads, state, new)
    new = optax.apply_updates(new, updates)
    ref_grads = jax.tree.map(lambda x: jnp.cos(x + i), ref_params)
    ref_updates, ref_state = inner.update(ref_grads, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, ref_updates)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6),
               _drop(new, parts), ref_params)
  for p, x, f in zip(jax.tree.leaves(params), jax.tree.leaves(new), jax.tree.leaves(mask)):
    if f:
      np.testing.assert_array_equal(x, p)
  # No optimizer state for frozen leaves.
  assert apollo_optax.state_bytes(state) == apollo_optax.state_bytes(ref_state)


def test_freeze_nothing_is_tx():
  tx = optax.adamw(1e-3)
  assert optimizers.freeze(tx, []) is tx


def test_freeze_unknown_part():
  with pytest.raises(ValueError, match=r"freeze: unknown part\(s\) \['norms'\]; allowed: embedding, head"):
    optimizers.frozen_mask(_params(), ["norms"])


# ---------------------------------------------------------------------------
# The finetune entry point, on the Llama-3-style fixture (GQA, tied, llama3
# RoPE; tests/fixtures/hf/llama3) with a character tokenizer of its 64 ids.

import json

from tests.apollo_lm.conftest import write_hf_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return write_hf_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama3")


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
  rng = np.random.default_rng(0)
  path = tmp_path_factory.mktemp("data") / "train.jsonl"
  lines = []
  for _ in range(96):
    a, b = rng.integers(0, 50, 2)
    lines.append(json.dumps({"prompt": f"{a}+{b}=", "completion": f"{a + b}."}))
  path.write_text("\n".join(lines) + "\n")
  return path


@pytest.mark.parametrize("tied", [False, True])
def test_layerwise_step_on_packed_rows_matches_ordinary_step(tied):
  """Packed SFT rows (mask, segment ids, positions) through the layer-wise
  step, with a frozen embedding: the ordinary step's updates."""
  import chex
  from flax import nnx
  from apollo_lm import layerwise, sft, steps

  config = small_config(vocab_size=300, max_seq_len=16,
                        tie_embeddings=tied, num_kv_heads=2)
  graphdef, params = init_params(config)
  rng = np.random.default_rng(0)
  examples = [sft.Example(rng.integers(4, 300, n).astype(np.int32),
                          rng.random(n) < 0.6, i)
              for i, n in enumerate([5, 7, 9, 4, 6, 8, 3, 10])]
  rows = sft.pack_examples(examples, 16, seed=0)
  assert rows.segment_ids.max() > 1
  batch = steps.Batch(*(jnp.asarray(f) for f in rows))
  tx = optimizers.freeze(apollo_optax.apollo(1e-2, rank=4), ["embedding"])
  ordinary = jax.jit(steps.make_train_step(graphdef, tx, with_grad_norm=False))
  lw = jax.jit(steps.make_layerwise_train_step(config, tx))
  p1, s1 = params, tx.init(params)
  p2, s2 = params, layerwise.init_layerwise_state(tx, params)
  for _ in range(2):
    p1, s1, m1 = ordinary(p1, s1, batch)
    p2, s2, m2 = lw(p2, s2, batch)
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
  chex.assert_trees_all_close(p2, p1, atol=1e-6, rtol=0)
  np.testing.assert_array_equal(p1["embed"]["embedding"],
                                params["embed"]["embedding"])


def _run(checkpoint, sft_file, tmp_path, *extra):
  from apollo_lm import finetune
  args = ["--checkpoint", str(checkpoint), "--data", str(sft_file),
          "--steps", "6", "--batch-size", "4", "--seq-len", "32",
          "--eval-every", "0", "--no-progress", "--num-devices", "1",
          "--out", str(tmp_path / "out"), *extra]
  config = finetune.cli.parse_or_exit(
      finetune.cli.build_parser(finetune.FinetuneConfig), args,
      finetune.FinetuneConfig)
  return config, finetune.finetune(config)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, extra", [
    ("apollo_mini", ["--lr", "1e-2"]),
    ("adamw", ["--lr", "1e-2", "--layerwise", "--freeze-embedding"]),
])
def test_a_few_steps_reduce_the_completion_loss(checkpoint, sft_file, tmp_path,
                                                optimizer, extra):
  from apollo_lm import hf
  config, result = _run(checkpoint, sft_file, tmp_path, "--optimizer",
                        optimizer, "--save-hf", str(tmp_path / "hf"), *extra)
  assert result.step == 6
  assert result.losses[-1] < result.losses[0] - 0.1, result.losses
  assert result.eval_loss is not None and np.isfinite(result.eval_loss)
  # The saved folder loads and holds the trained (changed) weights.
  tuned, _ = hf.load_pretrained(tmp_path / "hf")
  base, _ = hf.load_pretrained(checkpoint)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (tmp_path / "hf" / name).is_file()
  # The checkpoint's context length (64), not the run's --seq-len (32).
  saved = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert saved["max_position_embeddings"] == 64
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a[...]) != np.asarray(b[...]))),
                         nnx_params(tuned), nnx_params(base))
  assert changed["layers"]["attn"]["q_proj"]["kernel"]
  assert changed["embed"]["embedding"] == ("--freeze-embedding" not in extra)


def nnx_params(model):
  from flax import nnx
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_prompt_tokens_get_no_gradient(checkpoint, sft_file):
  """The loss counts completion tokens only: changing what the targets are at
  prompt positions changes neither the loss nor the gradient."""
  from flax import nnx
  from apollo_lm import hf, sft, steps
  from apollo_lm import tokenizer as tokenizer_lib
  model, _ = hf.load_pretrained(checkpoint)
  graphdef, state = nnx.split(model, nnx.Param)
  tok = tokenizer_lib.load_checkpoint_tokenizer(checkpoint)
  examples, _ = sft.read_records(sft_file, tok, max_tokens=33)
  rows = sft.pack_examples(examples[:12], 32, seed=0)
  batch = steps.Batch(*(jnp.asarray(f) for f in rows))
  assert 0 < float(batch.loss_mask.mean()) < 1
  other = batch._replace(targets=jnp.where(
      batch.loss_mask > 0, batch.targets, (batch.targets + 7) % 64))
  grad = jax.jit(jax.value_and_grad(steps.loss_fn(graphdef)))
  (l1, g1), (l2, g2) = grad(state, batch), grad(state, other)
  assert float(l1) == float(l2)
  jax.tree.map(np.testing.assert_array_equal, g1, g2)
  # ... while a changed completion target does change the loss.
  third = batch._replace(targets=jnp.where(
      batch.loss_mask > 0, (batch.targets + 7) % 64, batch.targets))
  assert float(grad(state, third)[0]) != float(l1)


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    # Broken checkpoints: tests/apollo_lm/test_cli.py (through main()).
    ([], "--checkpoint: a Hugging Face model folder or Hub id is required"),
    (["--checkpoint", "CKPT"], "--data: fine-tuning data is required"),
    (["--checkpoint", "CKPT", "--data", "DATA", "--freeze-head"],
     "--freeze-head: this checkpoint ties the head to the embedding"),
    (["--checkpoint", "CKPT", "--data", "DATA", "--eval-fraction", "1.5"],
     r"--eval-fraction: must be in \(0, 1\)"),
    (["--checkpoint", "CKPT", "--data", "DATA", "--optimizer", "adafactor",
      "--mu-dtype", "bfloat16"], "--mu-dtype: adafactor has no first moment"),
])
def test_errors_name_the_flag(checkpoint, sft_file, tmp_path, args, message):
  from apollo_lm import finetune
  from apollo_lm.errors import ConfigError
  names = {"CKPT": checkpoint, "DATA": sft_file}
  args = [str(names.get(a, a)) for a in args]
  with pytest.raises(ConfigError, match=message):
    config = finetune.FinetuneConfig(**vars(
        finetune.cli.build_parser(finetune.FinetuneConfig).parse_args(
            args + ["--steps", "4", "--num-devices", "1", "--seq-len", "32",
                    "--batch-size", "4"])))
    finetune.finetune(config)


def test_defaults_are_the_papers_fine_tuning_recipe(checkpoint, sft_file):
  from apollo_lm import finetune
  # The paper's Table 12 (see apollo_lm.optimizers.RECIPES).
  table = {"adamw": (2e-5, None, None), "apollo": (3e-4, 32, 5.0),
           "apollo_mini": (3e-4, None, 128.0), "galore": (3e-4, 32, 0.25),
           "adafactor": (2e-5, None, None)}
  assert set(table) == set(optimizers.RECIPES)
  for name, expected in table.items():
    config = finetune.FinetuneConfig(checkpoint=str(checkpoint),
                                     data=(str(sft_file),), optimizer=name)
    assert (config.lr, config.rank, config.scale) == expected
    assert config.warmup == 100  # min(100, 10% of the default 1000 steps)
  schedule = finetune.linear_schedule(3e-4, 1000, 100)
  np.testing.assert_allclose([schedule(0), schedule(50), schedule(100),
                              schedule(550), schedule(1000)],
                             [0, 1.5e-4, 3e-4, 1.5e-4, 0], atol=1e-12)


@pytest.mark.slow
def test_finetune_benchmarks_smoke(tmp_path):
  """The memory benchmark compiles one variant of a small model and writes
  its report; the quality benchmark's instruction set is deterministic and
  its held-out prompts are not in the training set."""
  import json
  from benchmarks import finetune_memory, finetune_quality
  results = finetune_memory.main([
      "--smoke", "--models", "llama-3.2-1b", "--variants", "apollo_mini_lw",
      "--seq-len", "32", "--out-dir", str(tmp_path)])
  entry = results["models"]["llama-3.2-1b"]
  variant = entry["variants"]["apollo_mini_lw"]
  assert variant["total_bytes"] >= variant["params_bytes"] > 0
  assert entry["lora_base_bytes"] == 2 * entry["param_count"]
  assert "APOLLO-Mini + layer-wise" in (tmp_path / "finetune_memory.md").read_text()
  held = finetune_quality.instruction_records(40, 1)
  train = finetune_quality.instruction_records(
      200, 0, exclude={r["prompt"] for r in held})
  assert train == finetune_quality.instruction_records(
      200, 0, exclude={r["prompt"] for r in held})
  assert not {r["prompt"] for r in held} & {r["prompt"] for r in train}
  assert {r["prompt"].split("\n")[0] for r in train} == {
      f"# task: {t}" for t in finetune_quality.TASKS}
  add = next(r for r in train if "task: add" in r["prompt"])
  a, b = map(int, add["prompt"].split("input: ")[1].split("\n")[0].split(" + "))
  assert add["completion"] == f" {a + b}"
