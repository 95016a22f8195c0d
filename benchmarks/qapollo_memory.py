"""Compiled memory of LLaMA-7B training steps: is Q-APOLLO-Mini under 12 GB?

For each method, ``jax.jit(step, donate_argnums=(0, 1)).lower(abstract
inputs).compile().memory_analysis()`` on ``jax.ShapeDtypeStruct`` inputs
(nothing is allocated): argument, output, alias, temporary and total bytes,
total = argument + output - alias + temporary (donated params and state are
updated in place). Methods:

* AdamW, APOLLO (rank 256, channel), APOLLO-Mini: the ordinary step (whole
  gradient, then ``tx.update``);
* APOLLO-Mini + layer-wise: :func:`apollo_lm.steps.make_layerwise_train_step`;
* Q-APOLLO-Mini + layer-wise: the same with int8 attention/MLP kernels (group
  128, float32 scales) and :func:`apollo_optax.quantized_weights`.

Setting (the paper's Fig. 1 middle / §5.3): batch 1, sequence 256, remat on,
all parameters and activations in bfloat16 (as the paper's runs), optimizer
moments in bfloat16 (``mu_dtype``); embedding, head and norms stay bfloat16 and
get Adam (as in the official code).

Usage::

  python -m benchmarks.qapollo_memory            # 7B, writes results
  python -m benchmarks.qapollo_memory --config 60m --out-name qapollo_memory_60m
  .venv-accel/bin/python -m benchmarks.qapollo_memory --target h100 \
      --out-name qapollo_memory_h100   # compiled for an H100 (make accel-env)
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

import apollo_optax
from apollo_lm import layerwise
from apollo_lm import optimizers
from apollo_lm import steps
from apollo_lm.configs import get_config
from apollo_lm.configs import LlamaConfig
from benchmarks import common
from benchmarks import targets

METHODS = ("adamw", "apollo", "apollo_mini", "apollo_mini_layerwise",
           "q_apollo_mini_layerwise")
LABELS = {
    "adamw": "AdamW",
    "apollo": "APOLLO (rank 256)",
    "apollo_mini": "APOLLO-Mini",
    "apollo_mini_layerwise": "APOLLO-Mini + layer-wise",
    "q_apollo_mini_layerwise": "Q-APOLLO-Mini (int8, g128) + layer-wise",
}
GROUP_SIZE = 128
BATCH, SEQ_LEN = 1, 256
GOAL_BYTES, STRETCH_BYTES = 12e9, 10e9


def _tx(method: str, config: LlamaConfig) -> optax.GradientTransformation:
  moments = jnp.bfloat16
  if method == "adamw":
    return optax.adamw(1e-3, mu_dtype=moments)
  if method == "apollo":
    return apollo_optax.apollo(
        1e-2, optimizers.default_rank(config.hidden_size), mu_dtype=moments)
  tx = apollo_optax.apollo_mini(1e-2, mu_dtype=moments)
  if method.startswith("q_"):
    tx = apollo_optax.quantized_weights(tx, key=jax.random.key(0))
  return tx


def measure(config: LlamaConfig, method: str,
            target: targets.Target = targets.TARGETS["cpu"]) -> dict[str, Any]:
  """memory_analysis() of ``method``'s compiled step, and its timings.

  Compiled for one device of ``target`` (see :mod:`benchmarks.targets`).
  """
  params = common.abstract_params(config)
  tx = _tx(method, config)
  if method.startswith("q_"):
    params = jax.eval_shape(
        lambda p: layerwise.quantize_llama_params(p, GROUP_SIZE), params)
  if method.endswith("layerwise"):
    opt_state = jax.eval_shape(
        lambda p: layerwise.init_layerwise_state(tx, p), params)
    step = common.on_tokens(steps.make_layerwise_train_step(config, tx))
  else:
    opt_state = jax.eval_shape(tx.init, params)
    step = common.make_train_step(config, tx)
  device = targets.devices(target, 1)
  params, opt_state, tokens = targets.on_devices(
      (params, opt_state, jax.ShapeDtypeStruct((BATCH, SEQ_LEN + 1), jnp.int32)),
      device)
  t0 = time.perf_counter()
  # The layer-wise options are XLA:CPU's (none for other backends).
  options = (layerwise.compiler_options()
             if method.endswith("layerwise") and target.platform == "cpu"
             else None)
  lowered = jax.jit(step, donate_argnums=(0, 1),
                    compiler_options=options).lower(params, opt_state, tokens)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return {
      "params_bytes": apollo_optax.state_bytes(params),
      "opt_state_bytes": apollo_optax.state_bytes(opt_state),
      **targets.memory_bytes(compiled),
      "lower_s": round(t1 - t0, 1),
      "compile_s": round(t2 - t1, 1),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="7b")
  parser.add_argument("--methods", nargs="+", default=list(METHODS),
                      choices=METHODS)
  parser.add_argument("--out-name", default="qapollo_memory")
  targets.add_argument(parser)
  args = parser.parse_args()
  target = targets.get(args.target)
  config = get_config(args.config, remat=True, dtype=jnp.bfloat16,
                      param_dtype=jnp.bfloat16, max_seq_len=SEQ_LEN)
  results = {}
  for method in args.methods:
    results[method] = measure(config, method, target)
    print(method, results[method], flush=True)

  rows = [[LABELS[k], common.gb(r["params_bytes"]),
           common.gb(r["opt_state_bytes"]), common.gb(r["argument_bytes"]),
           common.gb(r["output_bytes"]), common.gb(r["alias_bytes"]),
           common.gb(r["temp_bytes"]), f"**{common.gb(r['total_bytes'])}**",
           f"{r['compile_s']:.0f}"] for k, r in results.items()]
  table = common.markdown_table(
      ["Method", "params", "opt state", "argument", "output", "alias",
       "temp", "total", "compile s"], rows)
  last = results.get("q_apollo_mini_layerwise")
  verdict = ""
  if last is not None:
    total = last["total_bytes"]
    verdict = (
        f"Q-APOLLO-Mini + layer-wise: {common.gb(total)} GB total: "
        f"{'within' if total <= GOAL_BYTES else 'ABOVE'} the 12 GB goal, "
        f"{'within' if total <= STRETCH_BYTES else 'above'} the 10 GB stretch.")
  markdown = f"""
LLaMA-{args.config} (`get_config({args.config!r})`, vocabulary
{config.vocab_size}), batch {BATCH}, sequence {SEQ_LEN}, remat on, bfloat16
parameters, activations and optimizer moments; params, optimizer state and
tokens donated. Bytes from XLA's `memory_analysis()` of the compiled step
({target.label}, one device, nothing allocated); GB = 1e9 bytes; total =
argument + output - alias + temp.

{table}

{verdict}

The paper's Fig. 1 (read off the image, batch 1, GPU): AdamW ≈58 GB,
APOLLO ≈20 GB, APOLLO-Mini ≈17.5 GB, Q-APOLLO-Mini ≈10.5 GB (layer-wise
updates for APOLLO and Q-APOLLO). Differences: XLA's CPU buffer assignment
is not a CUDA caching allocator; the ordinary steps here are not layer-wise.
Notes. The ordinary (non-layer-wise) steps hold the whole gradient and XLA's
CPU backend keeps float32 copies of bfloat16 gradients and updates, hence
temporaries of 3x the bfloat16 weights. APOLLO-Mini + layer-wise in bfloat16
still has 27.8 GB of temporaries: on CPU, XLA converts the bfloat16 layer
stacks that the reverse loop updates in place to float32 (whole-stack
`convert` ops in the optimized HLO); int8 stacks are updated in place. The
layer-wise rows are compiled with `apollo_lm.layerwise.compiler_options()`
(region-analysis copy insertion; without it Q-APOLLO-Mini's temporaries were
4.55 GB, total 12.81 GB), and the int8 re-quantization uses an elementwise
hash for its dither (with `jax.random` bits: 7.74 GB of temporaries, 16.0 GB).
"""
  common.write_results(args.out_name, {
      "config": args.config, "batch": BATCH, "seq_len": SEQ_LEN,
      "target": targets.describe(target),
      "group_size": GROUP_SIZE, "dtype": "bfloat16",
      "moments_dtype": "bfloat16", "results": results}, markdown)


if __name__ == "__main__":
  main()
