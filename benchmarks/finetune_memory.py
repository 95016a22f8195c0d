"""Memory of full-parameter fine-tuning of Llama-3.2-1B and Llama-3.1-8B.

The compiled training step (``apollo_lm.steps``, the step
``python -m apollo_lm.finetune`` runs) for the published shapes of the two
checkpoints (their ``config.json`` values, from ``shared/model_configs.md``;
no weights), batch 1, sequence 1024, remat on, on packed SFT rows (loss mask,
segment ids, positions):
``jax.jit(step, donate_argnums=(0, 1)).lower(abstract inputs).compile()
.memory_analysis()``: argument, output, alias and temporary bytes, total =
argument + output - alias + temp (params and optimizer state are updated in
place). Nothing is allocated.

Variants (``VARIANTS``), each next to the bf16 weights alone of LoRA's frozen
base (2 bytes per parameter, before adapters, their states and activations):

* AdamW with float32 master weights and moments (bf16 compute), as
  Hugging Face ``transformers`` mixed precision;
* AdamW in pure bf16 (weights and moments bf16);
* APOLLO (rank 32, the fine-tuning default) and APOLLO-Mini, pure bf16, bf16
  moments;
* APOLLO-Mini with the layer-wise step (one layer's gradient at a time);
* Q-APOLLO-Mini + layer-wise: int8 attention/MLP kernels (group 128);
* the same with the embedding frozen, and with embedding and head frozen
  (``--freeze-embedding`` / ``--freeze-head``; Llama-3.2-1B ties them, so
  there both are one matrix);
* GaLore (rank 32, ``apollo_lm.optimizers``), pure bf16, bf16 moments;
* LoRA (``apollo_lm.lora``, what ``--lora-rank 16`` runs): rank-16 adapters
  on all seven projections, bf16 base frozen, AdamW (bf16 moments) on the
  bf16 adapters, the step differentiating the adapters only
  (``make_train_step(trainable=)``); and QLoRA-like with the frozen base in
  int8 (group 128), dequantized inside the scanned layers.

Goal of issue 11: Llama-3.1-8B at <= 16 GB (stretch 12 GB), i.e. below
bf16 LoRA's frozen weights alone.

Usage::

  python -m benchmarks.finetune_memory              # both models
  python -m benchmarks.finetune_memory --models llama-3.2-1b --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import optax

import apollo_optax
from apollo_lm import layerwise
from apollo_lm import lora
from apollo_lm import model as model_lib
from apollo_lm import optimizers
from apollo_lm import steps
from apollo_lm.configs import LlamaConfig
from apollo_lm.configs import RopeScaling
from benchmarks import common
from benchmarks import targets

BATCH, SEQ_LEN = 1, 1024
GOAL_BYTES, STRETCH_BYTES = 16e9, 12e9
GROUP_SIZE = 128
FINETUNE_RANK = 32
LORA = lora.LoRAConfig(rank=16, alpha=32.0)


def llama_3_2_1b(**overrides: Any) -> LlamaConfig:
  """Llama-3.2-1B's published ``config.json`` shape."""
  return LlamaConfig(
      name="llama-3.2-1b", hidden_size=2048, intermediate_size=8192,
      num_heads=32, num_kv_heads=8, head_dim=64, num_layers=16,
      vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5,
      tie_embeddings=True,
      rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0,
                               high_freq_factor=4.0,
                               original_max_position_embeddings=8192),
      **overrides)


def llama_3_1_8b(**overrides: Any) -> LlamaConfig:
  """Llama-3.1-8B's published ``config.json`` shape."""
  return LlamaConfig(
      name="llama-3.1-8b", hidden_size=4096, intermediate_size=14336,
      num_heads=32, num_kv_heads=8, head_dim=128, num_layers=32,
      vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5,
      tie_embeddings=False,
      rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0,
                               high_freq_factor=4.0,
                               original_max_position_embeddings=8192),
      **overrides)


MODELS = {"llama-3.2-1b": llama_3_2_1b, "llama-3.1-8b": llama_3_1_8b}


@dataclasses.dataclass(frozen=True)
class Variant:
  label: str
  optimizer: str
  param_dtype: Any = jnp.bfloat16
  layerwise: bool = False
  quantize: bool = False
  freeze: tuple[str, ...] = ()
  lora: bool = False


VARIANTS = {
    "adamw_f32": Variant("AdamW (f32 master weights + moments)", "adamw",
                         param_dtype=jnp.float32),
    "adamw_bf16": Variant("AdamW, pure bf16", "adamw"),
    "apollo": Variant(f"APOLLO (rank {FINETUNE_RANK}), bf16", "apollo"),
    "apollo_mini": Variant("APOLLO-Mini, bf16", "apollo_mini"),
    "apollo_mini_lw": Variant("APOLLO-Mini + layer-wise", "apollo_mini",
                              layerwise=True),
    "q_apollo_mini_lw": Variant("Q-APOLLO-Mini (int8) + layer-wise",
                                "apollo_mini", layerwise=True, quantize=True),
    "q_apollo_mini_lw_fe": Variant(
        "Q-APOLLO-Mini + layer-wise, frozen embedding", "apollo_mini",
        layerwise=True, quantize=True, freeze=("embedding",)),
    "q_apollo_mini_lw_feh": Variant(
        "Q-APOLLO-Mini + layer-wise, frozen embedding and head",
        "apollo_mini", layerwise=True, quantize=True,
        freeze=("embedding", "head")),
    "galore": Variant(f"GaLore (rank {FINETUNE_RANK}), bf16", "galore"),
    "lora_bf16": Variant(f"LoRA (rank {LORA.rank}, all projections), bf16 "
                         "base and adapters", "adamw", lora=True),
    "qlora_int8": Variant(f"QLoRA-like: LoRA rank {LORA.rank}, int8 base",
                          "adamw", lora=True, quantize=True),
}


def make_tx(variant: Variant, config: LlamaConfig):
  """The optimizer of ``variant``: fine-tuning hyper-parameters, bf16 moments
  with bf16 weights, frozen parts, int8 weights outermost."""
  mu_dtype = jnp.bfloat16 if variant.param_dtype == jnp.bfloat16 else None
  if variant.lora:
    # The frozen base (int8 or not) gets no update: no quantized_weights.
    return optimizers.train_only(optax.adamw(lora.LEARNING_RATE,
                                             mu_dtype=mu_dtype),
                                 lora.adapter_mask)
  if variant.optimizer == "galore":
    tx = optimizers.make_optimizer(
        "galore", learning_rate=3e-4, total_steps=1000, warmup_steps=100,
        config=config, rank=FINETUNE_RANK, scale=0.25, mu_dtype=mu_dtype)
  elif variant.optimizer == "adamw":
    tx = optax.adamw(2e-5, mu_dtype=mu_dtype)
  elif variant.optimizer == "apollo":
    tx = apollo_optax.apollo(3e-4, FINETUNE_RANK, scale=5.0, mu_dtype=mu_dtype)
  else:
    tx = apollo_optax.apollo_mini(3e-4, mu_dtype=mu_dtype)
  tx = optimizers.freeze(tx, variant.freeze)
  if variant.quantize:
    tx = apollo_optax.quantized_weights(tx, key=jax.random.key(0))
  return tx


def _model(config: LlamaConfig, variant: Variant) -> model_lib.Llama:
  model = model_lib.Llama(config, rngs=nnx.Rngs(0))
  if variant.lora:
    lora.add_adapters(model, LORA, rngs=nnx.Rngs(1), wrap_all=variant.quantize)
  return model


def measure(config: LlamaConfig, variant: Variant,
            target: targets.Target | None = None, *,
            batch: int = BATCH) -> dict[str, Any]:
  """memory_analysis() of ``variant``'s compiled fine-tuning step on
  ``batch`` rows of ``config.max_seq_len`` tokens, compiled for one device of
  ``target`` (None: this machine's CPU)."""
  config = dataclasses.replace(config, param_dtype=variant.param_dtype)
  abstract = nnx.eval_shape(lambda: _model(config, variant))
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  if variant.quantize:
    quantize = (lora.quantize_base if variant.lora
                else layerwise.quantize_llama_params)
    params = jax.eval_shape(lambda p: quantize(p, GROUP_SIZE), params)
  tx = make_tx(variant, config)
  if variant.layerwise:
    opt_state = jax.eval_shape(
        lambda p: layerwise.init_layerwise_state(tx, p), params)
    step = steps.make_layerwise_train_step(config, tx)
    options = layerwise.compiler_options()
  else:
    opt_state = jax.eval_shape(tx.init, params)
    step = steps.make_train_step(
        nnx.graphdef(abstract), tx, with_grad_norm=False,
        trainable=lora.adapter_mask if variant.lora else None)
    options = None
  tokens = jax.ShapeDtypeStruct((batch, config.max_seq_len), jnp.int32)
  # Packed SFT rows: loss mask, segment ids and positions (apollo_lm.sft).
  rows = steps.Batch(tokens, tokens, jax.ShapeDtypeStruct(
      tokens.shape, jnp.float32), tokens, tokens)
  args = (params, opt_state, rows)
  if target is not None and target.name != "cpu":
    args = targets.on_devices(args, targets.devices(target, 1))
    options = None  # XLA:CPU flags
  t0 = time.perf_counter()
  out = targets.compile_memory(
      lambda: jax.jit(step, donate_argnums=(0, 1), compiler_options=options
                      ).lower(*args))
  out.update(params_bytes=apollo_optax.state_bytes(params),
             opt_state_bytes=apollo_optax.state_bytes(opt_state),
             compile_s=round(time.perf_counter() - t0, 1))
  return out


def report(results: dict[str, Any]) -> str:
  """Markdown: one table per model, the goal line, notes."""
  parts = [
      f"Compiled training step of `apollo_lm.steps` (what `python -m"
      f" apollo_lm.finetune` runs), batch {results['batch']}, sequence"
      f" {results['seq_len']}, remat, bf16 compute, packed SFT rows (loss mask,"
      " segment ids, positions); `memory_analysis()` of"
      f" {_compiled_for(results['target'])}, nothing allocated. total ="
      " argument +"
      " output - alias + temp; GB = 1e9 bytes. Optimizers at the fine-tuning"
      f" defaults (APOLLO rank {FINETUNE_RANK}); bf16 rows keep bf16 moments."]
  capacity = results["target"].get("memory_bytes")
  if capacity:
    parts[0] += (f" Device memory {capacity / 2**30:.0f} GiB"
                 f" ({capacity / 1e9:.1f} GB): ✗ = more than that; OOM = the"
                 " compiler refused the program (bytes it asked for, where"
                 " its message gives them).")
  for name, r in results["models"].items():
    rows = [[VARIANTS[k].label, common.gb(e["params_bytes"]),
             common.gb(e["opt_state_bytes"]),
             "-" if e["oom"] else common.gb(e["temp_bytes"]),
             _total_cell(e, capacity), f"{e['compile_s']:.0f}"]
            for k, e in r["variants"].items()]
    rows.append(["bf16 LoRA: frozen base weights alone",
                 common.gb(r["lora_base_bytes"]), "-", "-",
                 common.gb(r["lora_base_bytes"]), "-"])
    # The goal (issue 11) is about full fine-tuning: LoRA rows not counted.
    full = [k for k, e in r["variants"].items()
            if not VARIANTS[k].lora and not e["oom"]]
    table = common.markdown_table(
        ["variant", "params GB", "opt state GB", "temp GB", "total GB",
         "compile s"], rows)
    parts.append(f"## {name} ({r['param_count'] / 1e9:.2f}B parameters)\n\n"
                 f"{table}\n\n{_smallest(name, r, full)}")
  parts.append(
      "Notes. Embedding and head get Adam moments in every APOLLO variant (as"
      " the official code): at 8B that is 2 x 1.05B bf16 numbers x 2 moments"
      " = 4.2 GB, most of APOLLO-Mini's state, hence the frozen rows. Llama-3.2-1B"
      " ties its head to the embedding, so freezing the embedding freezes both."
      " Int8 weights keep the embedding, head and norms in bf16. The ordinary"
      " (not layer-wise) steps hold the whole gradient."
      f" LoRA rows: rank {LORA.rank}, alpha {LORA.alpha:g}, adapters on all"
      " seven projections; the step differentiates the adapters only, so no"
      " gradient of a frozen weight is computed or held.")
  if results["target"]["name"] == "cpu":
    parts[-1] += (
        " XLA:CPU's buffer assignment is not a GPU allocator's, so totals on a"
        " GPU differ (`--target h100` with the `accel` environment compiles"
        " for one: `make bench-accel`)."
        " On XLA:CPU a bf16 dot is computed in f32 and the bf16 base's layer"
        " stacks are converted to f32 whole, outside the scanned loop"
        " (f32[L, in, out] loop operands in the compiled HLO): most of the"
        " bf16 LoRA row's temp; the int8 base is dequantized inside the loop,"
        " one layer at a time.")
  return "\n\n".join(parts)


def _smallest(name: str, r: dict[str, Any], full: list[str]) -> str:
  """The smallest full fine-tuning variant of model ``name``, against bf16
  LoRA's frozen weights and (for 8B) the goal of issue 11."""
  if not full:
    return "No full fine-tuning variant compiled."
  best_key = min(full, key=lambda k: r["variants"][k]["total_bytes"])
  best = r["variants"][best_key]["total_bytes"]
  goal = ""
  if "8b" in name:
    goal = (f" Goal <= {GOAL_BYTES / 1e9:.0f} GB: "
            f"{'met' if best <= GOAL_BYTES else 'not met'}; stretch <= "
            f"{STRETCH_BYTES / 1e9:.0f} GB: "
            f"{'met' if best <= STRETCH_BYTES else 'not met'}.")
  return (f"Smallest full fine-tuning: {VARIANTS[best_key].label}, "
          f"{common.gb(best)} GB ({best / r['lora_base_bytes']:.2f}x bf16"
          f" LoRA's frozen weights).{goal}")


def _compiled_for(target: dict[str, Any]) -> str:
  """Which compiler made the figures: this CPU, or a target's own."""
  if target["name"] == "cpu":
    return "XLA:CPU"
  versions = ", ".join(f"{k} {v}" for k, v in
                       target.get("compiler_versions", {}).items())
  ptxas = f"; {target['ptxas']}" if target.get("ptxas") else ""
  return (f"XLA's program for one {target.get('device_kind', target['name'])}"
          f" ({versions}{ptxas}; compiled here, no device)")


def _total_cell(entry: dict[str, Any], capacity: int | None) -> str:
  """Total bytes in bold, ✗ above the device memory; OOM when refused."""
  if entry["oom"]:
    asked = entry.get("total_bytes")
    return "OOM" + (f" ({common.gb(asked)})" if asked else "")
  over = " ✗" if capacity and entry["total_bytes"] > capacity else ""
  return f"**{common.gb(entry['total_bytes'])}**{over}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=list(MODELS),
                      choices=list(MODELS))
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                      choices=list(VARIANTS))
  targets.add_argument(parser)
  parser.add_argument("--out-dir", default=str(common.RESULTS_DIR))
  parser.add_argument("--out-name", default="finetune_memory")
  parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
  parser.add_argument("--report-only", action="store_true",
                      help="rewrite the Markdown report from the JSON")
  parser.add_argument("--smoke", action="store_true",
                      help="2 small layers, vocabulary 512 (for tests)")
  parser.add_argument("--add", action="store_true",
                      help="keep the rows of the existing results file and "
                      "add (or re-measure) --variants only; the earlier "
                      "runs' metadata is kept under earlier_runs")
  args = parser.parse_args(argv)
  if args.target != "cpu" and args.out_name == "finetune_memory":
    args.out_name = f"finetune_memory_{args.target}"
  stem = pathlib.Path(args.out_dir, args.out_name)
  if args.report_only:
    results = json.loads(stem.with_suffix(".json").read_text())
    meta = results.pop("metadata")
    stem.with_suffix(".md").write_text(
        f"# {args.out_name}\n\n{common.metadata_markdown(meta)}\n\n"
        f"{report(results).strip()}\n")
    return results
  target = targets.get(args.target)
  results: dict[str, Any] = {"batch": BATCH, "seq_len": args.seq_len, "models": {},
                             "target": targets.describe(target)}
  if args.add and stem.with_suffix(".json").is_file():
    earlier = json.loads(stem.with_suffix(".json").read_text())
    if earlier["target"]["name"] != args.target:
      parser.error(f"--add: {stem.with_suffix('.json')} holds --target "
                   f"{earlier['target']['name']} results, not {args.target}; "
                   "pass --out-name for a separate file.")
    results["models"] = earlier["models"]
    results["earlier_runs"] = (earlier.get("earlier_runs", [])
                               + [earlier["metadata"]])
  for name in args.models:
    overrides = dict(remat=True, dtype=jnp.bfloat16, max_seq_len=args.seq_len)
    config = MODELS[name](**overrides)
    if args.smoke:
      config = dataclasses.replace(config, num_layers=2, vocab_size=512,
                                   hidden_size=256, intermediate_size=512,
                                   num_heads=4, num_kv_heads=2, head_dim=64)
    param_count = model_lib.count_params(config)
    entry = results["models"].setdefault(name, {"variants": {}})
    entry.update(param_count=param_count, lora_base_bytes=2 * param_count)
    for key in args.variants:
      entry["variants"][key] = measure(config, VARIANTS[key], target)
      print(name, key, entry["variants"][key], flush=True)
      common.write_results(args.out_name, results, report(results),
                           args.out_dir)
  return results


if __name__ == "__main__":
  main()
