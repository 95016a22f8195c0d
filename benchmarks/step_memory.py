"""Memory of a whole compiled training step (forward, backward, update).

``jax.jit(train_step, donate_argnums=(0, 1)).lower(abstract inputs).compile()
.memory_analysis()`` for a LLaMA config (scanned layers, bfloat16 compute,
float32 master weights, remat on, sequence 256): argument, output, alias,
temporary and total bytes for AdamW, APOLLO, APOLLO-Mini and GaLore; the same
for the optimizer update alone (``tx.update`` + ``apply_updates``, params and
state donated), whose temporaries show whether an optimizer materialises
full-size buffers. Nothing is allocated on the CPU.

From the totals at two or more batch sizes a line ``total = a + b·batch`` is
fitted per optimizer and the largest batch with ``total <= 80 GiB`` (the
paper's A100; the target's memory with ``--target``) is extrapolated.
``--target h100|a100|tpu_v5p`` compiles for that accelerator instead of
XLA:CPU (:mod:`benchmarks.targets`; side environment from ``make
accel-env``). On a GPU backend the step is also run on real
arrays and ``device.memory_stats()["peak_bytes_in_use"]`` is reported.

Usage::

  python -m benchmarks.step_memory --configs 1b            # in `make bench`
  python -m benchmarks.step_memory --configs 7b --out-name step_memory_7b
  .venv-accel/bin/python -m benchmarks.step_memory --configs 7b --target h100 \
      --out-name step_memory_h100
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apollo_lm import steps
from apollo_lm.configs import get_config
from apollo_lm.configs import LlamaConfig
from benchmarks import common
from benchmarks import targets

STEP_OPTIMIZERS = ("adamw", "apollo", "apollo_mini", "galore")
SEQ_LEN = 256


def _gpu_peak(step: Any, config: LlamaConfig, tx: Any, batch: int) -> int:
  """Peak device bytes of real steps (GPU backends only)."""
  params = common.init_params(config)
  opt_state = jax.jit(tx.init)(params)
  tokens = jnp.zeros((batch, SEQ_LEN + 1), jnp.int32)
  for _ in range(2):
    params, opt_state, loss = step(params, opt_state, tokens)
  common.block(loss)
  return int(jax.devices()[0].memory_stats()["peak_bytes_in_use"])


def measure(config: LlamaConfig, name: str, batches: list[int],
            target: targets.Target = targets.TARGETS["cpu"]) -> dict[str, Any]:
  """Compiled memory of the train step at each batch and of the update.

  Compiled for one device of ``target`` (see :mod:`benchmarks.targets`).
  """
  tx = common.make_tx(name, config)
  device = targets.devices(target, 1)
  params = targets.on_devices(common.abstract_params(config), device)
  opt_state = targets.on_devices(jax.eval_shape(tx.init, params), device)
  capacity = target.memory_bytes or common.GPU_MEMORY_BYTES
  step = jax.jit(common.make_train_step(config, tx), donate_argnums=(0, 1))
  result: dict[str, Any] = {"by_batch": {}}
  for batch in batches:
    t0 = time.perf_counter()
    compiled = step.lower(
        params, opt_state,
        targets.on_devices(common.token_spec(batch, SEQ_LEN), device)
    ).compile()
    entry = targets.memory_bytes(compiled)
    entry["compile_s"] = time.perf_counter() - t0
    if jax.default_backend() == "gpu" and target.name == "cpu":
      entry["gpu_peak_bytes"] = _gpu_peak(step, config, tx, batch)
    result["by_batch"][str(batch)] = entry
  update = jax.jit(steps.make_update_step(tx), donate_argnums=(0, 1))
  result["update_only"] = targets.memory_bytes(
      update.lower(params, opt_state, params).compile())
  totals = [result["by_batch"][str(b)]["total_bytes"] for b in batches]
  slope, intercept = np.polyfit(np.array(batches, float),
                                np.array(totals, float), 1)
  result["fit"] = {
      "intercept_bytes": float(intercept), "bytes_per_sample": float(slope),
      "capacity_bytes": capacity,
      "max_batch_80gib": int((capacity - intercept) // slope),
  }
  return result


def _max_batch_text(result: dict[str, Any]) -> str:
  """The extrapolated largest batch, or why there is none."""
  smallest = min(result["by_batch"].values(), key=lambda e: e["total_bytes"])
  if smallest["total_bytes"] > result["fit"]["capacity_bytes"]:
    return "does not fit at any batch"
  if result["fit"]["bytes_per_sample"] < 1e6:
    return "unbounded by the fit (< 1 MB per sample)"
  return str(result["fit"]["max_batch_80gib"])


def report(results: dict[str, Any]) -> str:
  """Markdown tables of ``results``."""
  parts = []
  label = results.get("target", {}).get("label", "XLA:CPU")
  capacity = results.get("target", {}).get("memory_bytes") or common.GPU_MEMORY_BYTES
  cap = f"{capacity / common.GIB:.4g} GiB"
  for cfg, by_opt in results["configs"].items():
    rows, upd_rows, fit_rows = [], [], []
    for name, r in by_opt.items():
      for batch, e in r["by_batch"].items():
        rows.append([name, batch, common.gb(e["argument_bytes"]),
                     common.gb(e["output_bytes"]), common.gb(e["alias_bytes"]),
                     common.gb(e["temp_bytes"]), common.gb(e["total_bytes"]),
                     f"{e['compile_s']:.0f}"])
      u = r["update_only"]
      upd_rows.append([name, common.gb(u["argument_bytes"]),
                       common.gb(u["output_bytes"]), common.gb(u["alias_bytes"]),
                       f"{u['temp_bytes'] / 1e6:.1f}",
                       common.gb(u["total_bytes"])])
      fit_rows.append([name, common.gb(r["fit"]["intercept_bytes"]),
                       f"{r['fit']['bytes_per_sample'] / 1e6:.1f}",
                       _max_batch_text(r)])
    parts.append(
        f"## {cfg}: whole train step ({label}, one device; seq {SEQ_LEN}, "
        "bf16 compute, f32 weights, remat, params+state donated)\n\n"
        "total = argument + output − alias + temp (GB = 1e9 bytes).\n\n"
        + common.markdown_table(
            ["optimizer", "batch", "argument", "output", "alias", "temp",
             "total", "compile s"], rows)
        + f"\n\n### {cfg}: optimizer update alone (grads f32, params and "
        "state donated)\n\n"
        + common.markdown_table(
            ["optimizer", "argument GB", "output GB", "alias GB", "temp MB",
             "total GB"], upd_rows)
        + f"\n\n### {cfg}: largest batch in {cap} (linear fit of total "
        f"over batches {results['batches']}, extrapolated; {label} buffer "
        "assignment)\n\n"
        "With remat only each layer's bf16 input is kept for the backward "
        "pass, so a sample of 256 tokens adds little and the extrapolation "
        "reaches far beyond the two compiled batches (a slope near 0 is "
        "buffer-assignment noise, not a real bound).\n\n"
        + common.markdown_table(
            ["optimizer", "fixed GB", "MB per sample", f"max batch ({cap})"],
            fit_rows))
  return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", nargs="+", default=["1b"])
  parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
  parser.add_argument("--optimizers", nargs="+", default=list(STEP_OPTIMIZERS))
  parser.add_argument("--out-dir", default=str(common.RESULTS_DIR))
  parser.add_argument("--out-name", default="step_memory")
  targets.add_argument(parser)
  parser.add_argument("--smoke", action="store_true",
                      help="smoke config, AdamW and APOLLO-Mini, batches 1 and"
                      " 2 (for tests)")
  args = parser.parse_args(argv)
  configs = {name: get_config(name, remat=True, max_seq_len=SEQ_LEN)
             for name in args.configs}
  batches = args.batches
  if args.smoke:
    configs = {"smoke": common.smoke_config(remat=True)}
    batches, args.optimizers = [1, 2], ["adamw", "apollo_mini"]
  target = targets.get(args.target)
  results: dict[str, Any] = {"seq_len": SEQ_LEN, "batches": batches,
                             "target": targets.describe(target), "configs": {}}
  for cfg, config in configs.items():
    results["configs"][cfg] = {
        name: measure(config, name, batches, target)
        for name in args.optimizers}
  common.write_results(args.out_name, results, report(results), args.out_dir)
  return results


if __name__ == "__main__":
  main()
