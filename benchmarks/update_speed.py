"""Time of one optimizer update on real LLaMA parameter trees, as ratios.

One jitted ``tx.update`` + ``optax.apply_updates`` with params and state
donated (gradients fixed, not donated), for AdamW, APOLLO (rank hidden/4),
APOLLO-Mini, GaLore (steady step, a refresh step with its SVDs, and amortised
over gap 200) and Adafactor, on the 60M/130M/350M trees. All optimizers run
interleaved in each round (each round allocates a fresh params copy and state,
warms up, then times ``--calls`` updates); per round the median call, over
rounds the best median. A donated ``x + 1`` copy measures the memory bandwidth
in the same rounds, and each optimizer's minimal memory traffic
(:func:`traffic_bytes`) divided by it gives a bandwidth floor and the fraction
of it achieved. For APOLLO rows the projection's matmul rate, measured in the
same rounds (every R = G Pᵀ of the tree at its rank, float32 and bfloat16
inputs), adds the product's time to the floor.

Issue 12's fast projection: ``apollo_rademacher`` (``projection=
"rademacher"``), ``apollo_bf16`` (``projection_dtype=jnp.bfloat16``),
``apollo_fast`` (both), and the same three for ``apollo_mini``.

With ``--torch-python .venv-torch/bin/python`` (``make bench-torch``) the
official ``apollo_torch.APOLLOAdamW`` (and ``torch.optim.AdamW``) on the same
60M shapes in torch layout run in a worker process, interleaved in the same
rounds (see ``update_speed_torch.py``).

Usage::

  python -m benchmarks.update_speed [--configs 60m 130m 350m]
  python -m benchmarks.update_speed --configs 60m --variants adamw apollo \
      apollo_fast apollo_mini apollo_mini_fast --out-name update_speed_fast
  python -m benchmarks.update_speed --configs 60m \
      --torch-python .venv-torch/bin/python --out-name update_speed_torch
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
from typing import Any, Callable

import jax
import jax.numpy as jnp

import apollo_optax
from apollo_lm import optimizers
from apollo_lm import steps
from apollo_lm.configs import get_config
from apollo_lm.configs import LlamaConfig
from benchmarks import common
from benchmarks import projection_profile

# name -> optimizer of common.make_tx; "galore_refresh" is GaLore with its
# counters reset before every update, so every timed update runs the SVDs.
VARIANTS: dict[str, str] = {
    "adamw": "adamw",
    "apollo": "apollo",
    "apollo_mini": "apollo_mini",
    "galore": "galore",
    "galore_refresh": "galore",
    "adafactor": "adafactor",
}
# Issue 12's fast projection options: variant -> apollo_optax options.
OPTIONS: dict[str, dict[str, Any]] = {}
for _base in ("apollo", "apollo_mini"):
  for _suffix, _options in (
      ("rademacher", {"projection": "rademacher"}),
      ("bf16", {"projection_dtype": jnp.bfloat16}),
      ("fast", {"projection": "rademacher", "projection_dtype": jnp.bfloat16}),
  ):
    VARIANTS[f"{_base}_{_suffix}"] = _base
    OPTIONS[f"{_base}_{_suffix}"] = _options
GAP = 200
COPY_BYTES = 256 * 2**20
TORCH_WORKER = pathlib.Path(__file__).with_name("update_speed_torch.py")


def traffic_bytes(variant: str, params: Any, rank: int) -> int:
  """Minimal bytes an update must read and write from/to memory (float32).

  Counting per leaf of size S (low-rank: APOLLO's matrix leaves, L matrices
  of m×n each; r the rank clamped to min(m, n)):

  * Adam leaves (AdamW everywhere, the non-matrix leaves of APOLLO and
    GaLore): read g, p, m, v and write p, m, v: 7·S.
  * APOLLO / APOLLO-Mini matrices: read G twice (the projection R = G Pᵀ, and
    the final scaled update, whose channel norms can share one of the two
    passes), read p, write p: 4·S, plus read and write M, V:
    4·L·r·max(m, n). The projection P is regenerated, never read.
  * GaLore matrices (steady step): read G once (projection), read p, write p:
    3·S, plus the projector L·r·max(m, n) and the low-rank moments read and
    written 4·L·r·min(m, n). The refresh step adds SVDs (compute-bound) and
    has the same floor.
  * Adafactor, factored leaves: read g twice (statistics, update), p twice
    (parameter scale, update), write p: 5·S; other leaves 7·S.
  """
  mask = apollo_optax.default_lowrank_mask(params)
  total = 0
  for lowrank, p in zip(jax.tree.leaves(mask), jax.tree.leaves(params)):
    size, shape = p.size, p.shape
    count = math.prod(shape[:-2])
    if variant == "adafactor":
      factored = len(shape) >= 2 and sorted(shape)[-2] >= 128
      total += (5 if factored else 7) * size
    elif variant == "adamw" or not lowrank:
      total += 7 * size
    else:
      m, n = shape[-2], shape[-1]
      r = min(1 if variant == "apollo_mini" else rank, m, n)
      if variant in ("apollo", "apollo_mini"):
        total += 4 * size + 4 * count * r * max(m, n)
      else:
        total += 3 * size + count * r * max(m, n) + 4 * count * r * min(m, n)
  return total * 4


def _jax_runner(config: LlamaConfig, variant: str, params: Any, grads: Any,
                calls: int, warmup: int) -> Callable[[int], list[float]]:
  """A runner for :func:`common.interleaved_medians` timing one variant."""
  tx = common.make_tx(VARIANTS[variant], config, **OPTIONS.get(variant, {}))
  plain_step = steps.make_update_step(tx)

  def update_step(params, state, grads):
    if variant == "galore_refresh":
      state = common.force_galore_refresh(state)
    return plain_step(params, state, grads)

  update = jax.jit(update_step, donate_argnums=(0, 1))
  init = jax.jit(tx.init)
  copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t))

  def run(round_index: int) -> list[float]:
    del round_index
    box = {"params": copy(params)}
    box["state"] = init(box["params"])

    def step():
      box["params"], box["state"] = update(box["params"], box["state"], grads)
      return box["params"]

    common.time_calls(step, warmup)
    times = common.time_calls(step, calls)
    del box
    return times

  return run


def _copy_runner(calls: int) -> Callable[[int], list[float]]:
  """A runner timing the bandwidth copy (per-call seconds of 256 MiB x+1)."""
  fn = jax.jit(lambda x: x + 1.0, donate_argnums=0)

  def run(round_index: int) -> list[float]:
    del round_index
    box = {"x": jnp.zeros((COPY_BYTES // 4,), jnp.float32)}

    def step():
      box["x"] = fn(box["x"])
      return box["x"]

    common.time_calls(step, 2)
    return common.time_calls(step, calls)

  return run


class TorchWorker:
  """A persistent ``update_speed_torch.py`` process in the torch venv."""

  def __init__(self, python: str, config: LlamaConfig, rank: int):
    spec = {"hidden": config.hidden_size,
            "intermediate": config.intermediate_size,
            "layers": config.num_layers, "vocab": config.vocab_size,
            "rank": rank}
    # Passive OpenMP waiting: spinning torch threads collapse on a shared,
    # oversubscribed CPU (measured 0.29 s vs 0.13 s per AdamW step, 9M).
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    self._proc = subprocess.Popen(
        [python, str(TORCH_WORKER), json.dumps(spec)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, env=env)
    self.info = json.loads(self._proc.stdout.readline())

  def runner(self, variant: str, calls: int,
             warmup: int) -> Callable[[int], list[float]]:
    def run(round_index: int) -> list[float]:
      del round_index
      self._proc.stdin.write(json.dumps([variant, calls, warmup]) + "\n")
      self._proc.stdin.flush()
      return json.loads(self._proc.stdout.readline())
    return run

  def close(self) -> None:
    self._proc.stdin.close()
    self._proc.wait(timeout=60)


def measure(config: LlamaConfig, variants: list[str], rounds: int, calls: int, warmup: int,
            refresh_calls: int, torch_python: str | None) -> dict[str, Any]:
  """Interleaved timings, ratios to AdamW and bandwidth floors for one tree."""
  params = common.init_params(config)
  grads = common.random_grads(params)
  rank = optimizers.default_rank(config.hidden_size)
  runners = {"copy_256MiB": _copy_runner(calls)}
  # The projections' matmul rate in the same rounds (R = G Pᵀ of every
  # low-rank matrix at the tree's rank; float32, and bfloat16 inputs).
  lowrank = any(VARIANTS[v] in ("apollo", "apollo_mini") for v in variants)
  if lowrank:
    _, mats_g = projection_profile.lowrank_matrices(params, grads)
    ps = projection_profile.generate_projections(mats_g, rank)(jnp.int32(0))
    for dtype, name in ((jnp.float32, "f32"), (jnp.bfloat16, "bf16")):
      runners[f"matmul_{name}"] = projection_profile.timed(
          projection_profile.products(dtype), lambda: (mats_g, ps), calls,
          warmup)
  for variant in variants:
    # Every GaLore refresh call runs the SVDs: fewer calls, one warm-up.
    refresh = variant == "galore_refresh"
    runners[variant] = _jax_runner(
        config, variant, params, grads, refresh_calls if refresh else calls,
        1 if refresh else warmup)
  worker = None
  if torch_python:
    worker = TorchWorker(torch_python, config, rank)
    for variant in ("torch_adamw", "torch_apollo", "torch_apollo_mini"):
      runners[variant] = worker.runner(variant, calls, warmup)
  try:
    timings = common.interleaved_medians(runners, rounds)
  finally:
    if worker:
      worker.close()
  bandwidth = 2 * COPY_BYTES / timings.pop("copy_256MiB")["best_median_s"]
  matmul_gflops = {}
  if lowrank:
    flops = projection_profile.projection_flops(mats_g, rank)
    for name in ("f32", "bf16"):
      matmul_gflops[name] = (
          flops / timings.pop(f"matmul_{name}")["best_median_s"] / 1e9)
  adamw = timings["adamw"]["best_median_s"]
  if "galore" in timings and "galore_refresh" in timings:
    steady = timings["galore"]["best_median_s"]
    refresh = timings["galore_refresh"]["best_median_s"]
    timings["galore_amortised"] = {
        "best_median_s": ((GAP - 1) * steady + refresh) / GAP,
        "note": f"({GAP - 1}·steady + refresh) / {GAP}"}
  for variant, t in timings.items():
    t["vs_adamw"] = t["best_median_s"] / adamw
    base = variant.removeprefix("torch_")
    base = "galore" if base.startswith("galore") else base
    if base in VARIANTS:
      t["traffic_bytes"] = traffic_bytes(VARIANTS[base], params, rank)
      t["floor_s"] = t["traffic_bytes"] / bandwidth
      t["floor_fraction"] = t["floor_s"] / t["best_median_s"]
    if not variant.startswith("torch_") and VARIANTS.get(variant) in (
        "apollo", "apollo_mini"):
      # Plus the projection at the matmul rate measured in this run (its
      # flops at rank 1 are 2 per parameter: negligible).
      r = 1 if VARIANTS[variant] == "apollo_mini" else rank
      dtype = ("bf16" if OPTIONS.get(variant, {}).get("projection_dtype")
               is not None else "f32")
      t["matmul_s"] = projection_profile.projection_flops(mats_g, r) / (
          matmul_gflops[dtype] * 1e9)
      t["floor_with_matmul_s"] = t["floor_s"] + t["matmul_s"]
      t["floor_with_matmul_fraction"] = (
          t["floor_with_matmul_s"] / t["best_median_s"])
  result = {"params": sum(p.size for p in jax.tree.leaves(params)),
            "rank": rank, "copy_bandwidth_gbs": bandwidth / 1e9,
            "matmul_gflops": matmul_gflops,
            "load_average_after": os.getloadavg(),
            "timings": timings}
  if worker:
    result["torch"] = worker.info
    for name in ("apollo", "apollo_mini", "adamw"):
      result[f"torch_{name}_over_ours"] = (
          timings[f"torch_{name}"]["best_median_s"]
          / timings[name]["best_median_s"])
  return result


# The issues' targets (× AdamW) per config and variant.
TARGETS = {
    "60m": {"apollo_mini": 0.85, "apollo": 1.2, "apollo_fast": 1.3,
            "apollo_mini_rademacher": 0.85, "apollo_mini_bf16": 0.85,
            "apollo_mini_fast": 0.85},
    "130m": {"apollo_fast": 2.5},
    "350m": {"apollo_fast": 3.0},
}


def report(results: dict[str, Any]) -> str:
  """Markdown tables of ``results``."""
  parts = []
  for cfg, r in results["configs"].items():
    rows = []
    for variant, t in r["timings"].items():
      target = TARGETS.get(cfg, {}).get(variant)
      verdict = "-" if target is None else (
          f"≤ {target}: {'met' if t['vs_adamw'] <= target else 'NOT met'}")
      rows.append([
          variant, f"{t['best_median_s'] * 1e3:.2f}",
          f"{t['vs_adamw']:.3f}",
          f"{t['traffic_bytes'] / 1e6:.0f}" if "traffic_bytes" in t else "-",
          f"{t['floor_s'] * 1e3:.2f}" if "floor_s" in t else "-",
          f"{t['floor_fraction']:.2f}" if "floor_fraction" in t else "-",
          f"{t['floor_with_matmul_s'] * 1e3:.2f}"
          if "floor_with_matmul_s" in t else "-",
          f"{t['floor_with_matmul_fraction']:.2f}"
          if "floor_with_matmul_fraction" in t else "-",
          verdict])
    text = (
        f"## {cfg} ({r['params'] / 1e6:.1f}M params, rank {r['rank']}), copy "
        f"bandwidth {r['copy_bandwidth_gbs']:.1f} GB/s"
        + (f", projection matmul {r['matmul_gflops']['f32']:.0f} GFLOP/s "
           f"float32, {r['matmul_gflops']['bf16']:.0f} GFLOP/s bfloat16 inputs"
           if r.get("matmul_gflops") else "")
        + (", load average {:.1f} {:.1f} {:.1f} (1/5/15 min, after)".format(
            *r["load_average_after"]) if "load_average_after" in r else "")
        + "\n\n"
        + common.markdown_table(
            ["optimizer", "best median ms", "× AdamW", "traffic MB",
             "bandwidth floor ms", "floor / measured",
             "+ matmul floor ms", "floor / measured", "target"], rows))
    if "torch" in r:
      text += (
          "\n\napollo_torch / ours (same shapes, torch layout (out, in), "
          f"torch {r['torch']['torch_version']}, "
          f"{r['torch']['threads']} threads, OMP_WAIT_POLICY=PASSIVE): APOLLO "
          f"{r['torch_apollo_over_ours']:.2f}×, APOLLO-Mini "
          f"{r['torch_apollo_mini_over_ours']:.2f}×, torch.optim.AdamW vs "
          f"optax.adamw {r['torch_adamw_over_ours']:.2f}× "
          "(target: ≥ 1.3× for APOLLO)")
    parts.append(text)
  return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", nargs="+", default=["60m", "130m", "350m"])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--calls", type=int, default=15)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--refresh-calls", type=int, default=1)
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
  parser.add_argument("--torch-python", default=None)
  parser.add_argument("--out-dir", default=str(common.RESULTS_DIR))
  parser.add_argument("--out-name", default="update_speed")
  parser.add_argument("--smoke", action="store_true",
                      help="smoke config, AdamW and APOLLO-Mini, 2 rounds of"
                      " 3 calls (for tests)")
  args = parser.parse_args(argv)
  configs = {name: get_config(name) for name in args.configs}
  if args.smoke:
    configs = {"smoke": common.smoke_config()}
    args.rounds, args.calls, args.warmup = 2, 3, 1
    args.variants = ["adamw", "apollo_mini"]
  results: dict[str, Any] = {
      "rounds": args.rounds, "calls": args.calls, "warmup": args.warmup,
      "configs": {}}
  for name, config in configs.items():
    results["configs"][name] = measure(
        config, args.variants, args.rounds, args.calls, args.warmup,
        args.refresh_calls, args.torch_python)
  common.write_results(args.out_name, results, report(results), args.out_dir)
  return results


if __name__ == "__main__":
  main()
