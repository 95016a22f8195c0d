"""Training throughput (tokens/s) of AdamW, APOLLO and APOLLO-Mini.

The whole jitted train step (forward, backward, optimizer update; params and
state donated) on the same model and batch for every optimizer, interleaved
in rounds (each round: fresh params copy and state, warm-up, ``--calls``
timed steps; per round the median, over rounds the best median).

On CPU (``make bench``): configs ``tiny`` and ``20m`` at batch 8 × 256. On a
GPU backend the default is 350M and 1B with, per optimizer, the largest batch
found by ``step_memory.py`` (``--batch-from results/step_memory.json``),
which is how the paper's Fig. 1 compares throughput; the code path is the
same.

Usage::

  python -m benchmarks.throughput [--configs tiny 20m] [--batch 8]
  python -m benchmarks.throughput --configs 350m 1b \
      --batch-from benchmarks/results/step_memory.json      # on a GPU
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp

from apollo_lm.configs import get_config
from apollo_lm.configs import LlamaConfig
from benchmarks import common

THROUGHPUT_OPTIMIZERS = ("adamw", "apollo", "apollo_mini")
SEQ_LEN = 256


def _runner(config: LlamaConfig, name: str, params: Any, batch: int,
            calls: int, warmup: int) -> Callable[[int], list[float]]:
  """A runner for :func:`common.interleaved_medians` of one optimizer."""
  tx = common.make_tx(name, config)
  step = jax.jit(common.make_train_step(config, tx), donate_argnums=(0, 1))
  init = jax.jit(tx.init)
  copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t))
  tokens = jax.random.randint(jax.random.key(2), (batch, SEQ_LEN + 1), 0,
                              config.vocab_size, jnp.int32)

  def run(round_index: int) -> list[float]:
    del round_index
    box = {"params": copy(params)}
    box["state"] = init(box["params"])

    def call():
      box["params"], box["state"], loss = step(box["params"], box["state"],
                                               tokens)
      return loss

    common.time_calls(call, warmup)
    return common.time_calls(call, calls)

  return run


def measure(config: LlamaConfig, batches: dict[str, int], rounds: int,
            calls: int, warmup: int) -> dict[str, Any]:
  """Interleaved tokens/s of each optimizer at its batch size."""
  params = common.init_params(config)
  runners = {name: _runner(config, name, params, batch, calls, warmup)
             for name, batch in batches.items()}
  timings = common.interleaved_medians(runners, rounds)
  for name, t in timings.items():
    t["batch"] = batches[name]
    t["tokens_per_s"] = batches[name] * SEQ_LEN / t["best_median_s"]
  adamw = timings["adamw"]["tokens_per_s"]
  for t in timings.values():
    t["vs_adamw"] = t["tokens_per_s"] / adamw
  return {"params": sum(p.size for p in jax.tree.leaves(params)),
          "timings": timings}


def report(results: dict[str, Any]) -> str:
  """Markdown tables of ``results``."""
  parts = []
  for cfg, r in results["configs"].items():
    rows = [[name, t["batch"], f"{t['best_median_s'] * 1e3:.1f}",
             f"{t['tokens_per_s']:.0f}", f"{t['vs_adamw']:.3f}"]
            for name, t in r["timings"].items()]
    parts.append(
        f"## {cfg} ({r['params'] / 1e6:.1f}M params), seq {SEQ_LEN}, "
        f"{results['compute_dtype']} compute\n\n"
        + common.markdown_table(
            ["optimizer", "batch", "best median step ms", "tokens/s",
             "× AdamW tokens/s"], rows))
  return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  gpu = jax.default_backend() == "gpu"
  parser.add_argument("--configs", nargs="+",
                      default=["350m", "1b"] if gpu else ["tiny", "20m"])
  parser.add_argument("--batch", type=int, default=8,
                      help="the same batch for every optimizer")
  parser.add_argument("--batch-from", default=None,
                      help="step_memory JSON: per optimizer its largest batch")
  parser.add_argument("--optimizers", nargs="+",
                      default=list(THROUGHPUT_OPTIMIZERS))
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--calls", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument(
      "--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
      help="compute dtype; auto: float32 on CPU (bfloat16 matmuls are "
      "emulated there, as in apollo_lm.train), bfloat16 on accelerators")
  parser.add_argument("--out-dir", default=str(common.RESULTS_DIR))
  parser.add_argument("--smoke", action="store_true",
                      help="smoke config, AdamW and APOLLO-Mini, batch 2, 2 rounds of"
                      " 2 calls (for tests)")
  args = parser.parse_args(argv)
  dtype = args.dtype
  if dtype == "auto":
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  configs = {name: get_config(name, max_seq_len=SEQ_LEN,
                              dtype=jnp.dtype(dtype))
             for name in args.configs}
  if args.smoke:
    configs = {"smoke": common.smoke_config(dtype=jnp.dtype(dtype))}
    args.batch, args.rounds, args.calls, args.warmup = 2, 2, 2, 1
    args.optimizers = ["adamw", "apollo_mini"]
  largest = (json.loads(open(args.batch_from).read())["configs"]
             if args.batch_from else {})
  results: dict[str, Any] = {"seq_len": SEQ_LEN, "compute_dtype": dtype,
                             "rounds": args.rounds,
                             "calls": args.calls, "configs": {}}
  for cfg, config in configs.items():
    batches = {
        name: (largest[cfg][name]["fit"]["max_batch_80gib"] if cfg in largest
               else args.batch) for name in args.optimizers}
    results["configs"][cfg] = measure(config, batches, args.rounds,
                                      args.calls, args.warmup)
  common.write_results("throughput", results, report(results), args.out_dir)
  return results


if __name__ == "__main__":
  main()
