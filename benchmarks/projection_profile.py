"""Where APOLLO's update time goes: the projection's parts, timed apart.

On the low-rank matrix leaves of a LLaMA tree (60M by default: 56 matrices in
7 stacked leaves), each part of APOLLO's update runs as its own jitted
function, all interleaved in the same rounds with AdamW's and APOLLO's whole
update (best of per-round medians):

* ``gen_gaussian`` / ``gen_rademacher``: regenerate every P (r × d) from its
  key (the Gaussian's erf-inverse per entry against one random bit per entry);
* ``product_f32`` / ``product_bf16``: R = G Pᵀ (or P G) for every matrix, in
  float32 and with bfloat16 inputs and float32 accumulation (the cast of G
  included); their GFLOP/s is the matmul rate of this machine in this run;
* ``norm_pass``: the channel norms of G (one read of G);
* ``apply_pass``: p ← p − c·(G·s) with p donated (read p, G, write p);
* ``copy``: a donated 256 MiB ``x + 1`` (the memory bandwidth).

It also counts, in the compiled HLO of one whole update (``update`` +
``apply_updates``, params and state donated), how many instructions read each
gradient matrix: the number of full-size passes over G the update makes
(AdamW: 1 fused pass; APOLLO: the product, the limiter's norm, the update).

Usage::

  python -m benchmarks.projection_profile [--config 60m] [--rounds 4]
"""

from __future__ import annotations

import argparse
import math
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

import apollo_optax
from apollo_optax._src import projection as proj
from apollo_lm import optimizers
from apollo_lm import steps
from apollo_lm.configs import get_config
from benchmarks import common

COPY_BYTES = 256 * 2**20
# Whole-update variants whose compiled HLO is inspected and timed:
# name -> (common.make_tx optimizer, apollo options).
UPDATES: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw": ("adamw", {}),
    "apollo": ("apollo", {}),
    "apollo_fast": ("apollo", {"projection": "rademacher",
                               "projection_dtype": jnp.bfloat16}),
    "apollo_mini": ("apollo_mini", {}),
}


def lowrank_matrices(params: Any, grads: Any,
                     ) -> tuple[list[jax.Array], list[jax.Array]]:
  """(params, grads) of the default low-rank leaves, as (batch, m, n) stacks."""
  mask = jax.tree.leaves(apollo_optax.default_lowrank_mask(params))
  keep = lambda tree: [x.reshape(-1, *x.shape[-2:])
                       for x, m in zip(jax.tree.leaves(tree), mask) if m]
  return keep(params), keep(grads)


def projection_flops(mats_g: list[jax.Array], rank: int) -> int:
  """2·m·n·r flops of R = G Pᵀ (or P G) per matrix, r clamped to min(m, n)."""
  return sum(2 * g.size * min(rank, *g.shape[1:]) for g in mats_g)


def generate_projections(mats_g: list[jax.Array], rank: int,
                         generator: Callable[..., jax.Array] = (
                             proj.gaussian_projection),
                         ) -> Callable[[jax.Array], list[jax.Array]]:
  """A jitted ``refresh_index -> [P of every stack]`` (float32, as APOLLO)."""

  def fn(refresh):
    out = []
    for i, g in enumerate(mats_g):
      shape = (min(rank, *g.shape[1:]), min(g.shape[1:]))
      keys = proj.projection_keys(0, str(i), refresh, g.shape[0])
      out.append(jax.vmap(lambda k, s=shape: generator(k, s, jnp.float32))(keys))
    return out

  return jax.jit(fn)


def _product(g: jax.Array, p: jax.Array, dtype: Any) -> jax.Array:
  g, p = g.astype(dtype), p.astype(dtype)
  if g.shape[1] >= g.shape[2]:
    return jnp.einsum("bmn,brn->bmr", g, p, preferred_element_type=jnp.float32)
  return jnp.einsum("brm,bmn->brn", p, g, preferred_element_type=jnp.float32)


def products(dtype: Any) -> Callable[..., list[jax.Array]]:
  """A jitted ``(gs, ps) -> [R]``: the projections with ``dtype`` inputs
  (the cast of G included) and float32 accumulation."""
  return jax.jit(lambda gs, ps: [_product(g, p, dtype) for g, p in zip(gs, ps)])


def timed(fn: Callable[..., Any], make_args: Callable[[], tuple[Any, ...]],
          calls: int, warmup: int, donated: bool = False,
          ) -> Callable[[int], list[float]]:
  """A runner for :func:`common.interleaved_medians`.

  With ``donated`` the first argument is donated and replaced by the result
  after every call.
  """

  def run(round_index: int) -> list[float]:
    del round_index
    args = list(make_args())

    def step():
      out = fn(*args)
      if donated:
        args[0] = out
      return out

    common.time_calls(step, warmup)
    return common.time_calls(step, calls)

  return run


def gradient_passes(hlo_text: str, grad_names: list[str]) -> dict[str, int]:
  """How many instructions of the ENTRY computation read each gradient.

  ``grad_names`` are the entry parameters' names (``grads...``); bitcasts and
  reshapes of them are followed. Returns name -> count.
  """
  entry = hlo_text[hlo_text.index("\nENTRY"):]
  lines = entry.splitlines()[1:]
  instruction = re.compile(r"\s*(?:ROOT )?(%[\w.\-]+) = \S+ ([\w\-]+)\((.*)")
  parsed = []
  for line in lines:
    m = instruction.match(line)
    if m:
      operands = re.findall(r"%[\w.\-]+", m.group(3).split("), ")[0])
      parsed.append((m.group(1), m.group(2), operands))
  counts = {}
  for name in grad_names:
    aliases, count = {name}, 0
    for result, kind, operands in parsed:
      if not aliases.intersection(operands):
        continue
      if kind in ("bitcast", "reshape", "get-tuple-element"):
        aliases.add(result)
      elif kind != "tuple":
        count += 1
    counts[name] = count
  return counts


def hlo_passes(config: Any, params: Any, grads: Any, updates: list[str],
               ) -> dict[str, Any]:
  """Full-size passes over each low-rank gradient in each compiled update."""
  mask = jax.tree.leaves(apollo_optax.default_lowrank_mask(params))
  paths = [jax.tree_util.keystr(path) for path, _ in
           jax.tree_util.tree_flatten_with_path(params)[0]]
  result = {}
  for variant in updates:
    name, options = UPDATES[variant]
    tx = common.make_tx(name, config, **options)
    step = jax.jit(steps.make_update_step(tx), donate_argnums=(0, 1))
    state = jax.eval_shape(tx.init, params)
    text = step.lower(params, state, grads).compile().as_text()
    header = text[text.index("\nENTRY") + 1:].splitlines()[0]
    names = ["%" + n for n in re.findall(r"(grads[\w.]*): ", header)]
    # Entry parameters follow the flattened argument order: params, state,
    # grads; the gradient names are in the tree's leaf order.
    counts = gradient_passes(text, names)
    per_leaf = {path: counts[n] for path, n, m in zip(paths, names, mask) if m}
    result[variant] = {"passes_per_lowrank_leaf": per_leaf,
                       "mean": sum(per_leaf.values()) / len(per_leaf)}
  return result


def measure(config_name: str, rounds: int, calls: int, warmup: int,
            updates: list[str]) -> dict[str, Any]:
  config = get_config(config_name) if config_name != "smoke" else (
      common.smoke_config())
  rank = optimizers.default_rank(config.hidden_size)
  params = common.init_params(config)
  grads = common.random_grads(params)
  mats_p, mats_g = lowrank_matrices(params, grads)
  ps = generate_projections(mats_g, rank)(jnp.int32(0))
  factors = [jnp.ones((g.shape[0], g.shape[1] if g.shape[1] >= g.shape[2]
                       else 1, 1 if g.shape[1] >= g.shape[2] else g.shape[2]))
             for g in mats_g]
  norm_pass = jax.jit(lambda gs: [
      jnp.sum(jnp.square(g), axis=2 if g.shape[1] >= g.shape[2] else 1)
      for g in gs])
  apply_pass = jax.jit(
      lambda ps, gs, ss: [p - 1e-3 * (g * s) for p, g, s in zip(ps, gs, ss)],
      donate_argnums=0)
  copy = jax.jit(lambda x: x + 1.0, donate_argnums=0)
  copy_list = lambda: [p + 0.0 for p in mats_p]

  runners = {
      "copy": timed(copy, lambda: (jnp.zeros(COPY_BYTES // 4),), calls,
                    warmup, donated=True),
      "gen_gaussian": timed(generate_projections(mats_g, rank),
                            lambda: (jnp.int32(1),), calls, warmup),
      "gen_rademacher": timed(
          generate_projections(mats_g, rank, proj.rademacher_projection),
          lambda: (jnp.int32(1),), calls, warmup),
      "product_f32": timed(products(jnp.float32), lambda: (mats_g, ps),
                           calls, warmup),
      "product_bf16": timed(products(jnp.bfloat16), lambda: (mats_g, ps),
                            calls, warmup),
      "norm_pass": timed(norm_pass, lambda: (mats_g,), calls, warmup),
      "apply_pass": timed(apply_pass, lambda: (copy_list(), mats_g, factors),
                           calls, warmup, donated=True),
  }
  for variant in updates:
    name, options = UPDATES[variant]
    tx = common.make_tx(name, config, **options)
    update = jax.jit(steps.make_update_step(tx), donate_argnums=(0, 1))

    def make_args(tx=tx):
      fresh = jax.tree.map(lambda x: x + 0.0, params)
      return fresh, tx.init(fresh), grads

    def step(p, s, g, update=update):
      return update(p, s, g)

    runners[f"update_{variant}"] = _whole_update(step, make_args, calls,
                                                 warmup)
  load_before = os.getloadavg()
  timings = common.interleaved_medians(runners, rounds)
  load_after = os.getloadavg()
  best = {k: v["best_median_s"] for k, v in timings.items()}
  flops = projection_flops(mats_g, rank)
  g_bytes = sum(g.size * 4 for g in mats_g)
  bandwidth = 2 * COPY_BYTES / best["copy"]
  return {
      "config": config_name, "rank": rank,
      "matrices": sum(g.shape[0] for g in mats_g),
      "matrix_params": sum(g.size for g in mats_g),
      "product_gflop": flops / 1e9,
      "copy_bandwidth_gbs": bandwidth / 1e9,
      "matmul_gflops": {k: flops / best[f"product_{k}"] / 1e9
                        for k in ("f32", "bf16")},
      "floors_ms": {
          "product_f32_at_copy_bandwidth": g_bytes / bandwidth * 1e3,
          "norm_pass": g_bytes / bandwidth * 1e3,
          "apply_pass": 3 * g_bytes / bandwidth * 1e3,
      },
      "load_average_before_after": [load_before, load_after],
      "timings": timings,
      "hlo_passes_over_g": hlo_passes(config, params, grads, updates),
  }


def _whole_update(step, make_args, calls, warmup):
  def run(round_index: int) -> list[float]:
    del round_index
    box = list(make_args())

    def call():
      box[0], box[1] = step(*box)
      return box[0]

    common.time_calls(call, warmup)
    return common.time_calls(call, calls)

  return run


def report(r: dict[str, Any]) -> str:
  rows = []
  adamw = r["timings"].get("update_adamw", {}).get("best_median_s")
  for name, t in r["timings"].items():
    ms = t["best_median_s"] * 1e3
    rows.append([name, f"{ms:.2f}",
                 f"{t['best_median_s'] / adamw:.2f}" if adamw else "-"])
  passes = [[v, f"{p['mean']:.2f}", ", ".join(
      f"{k.split(']')[-3].strip('[')}: {n}" if k.count("]") >= 3 else f"{k}: {n}"
      for k, n in p["passes_per_lowrank_leaf"].items())]
            for v, p in r["hlo_passes_over_g"].items()]
  load = r["load_average_before_after"]
  return (
      f"## {r['config']}: {r['matrices']} matrices, "
      f"{r['matrix_params'] / 1e6:.1f}M matrix parameters, rank {r['rank']}\n\n"
      f"Load average (1, 5, 15 min) before {load[0][0]:.1f}, {load[0][1]:.1f}, "
      f"{load[0][2]:.1f}; after {load[1][0]:.1f}, {load[1][1]:.1f}, "
      f"{load[1][2]:.1f} (2 CPUs).\n\n"
      + common.markdown_table(["part", "best median ms", "× AdamW update"],
                              rows)
      + f"\n\nProduct: {r['product_gflop']:.2f} GFLOP; matmul rate float32 "
      f"{r['matmul_gflops']['f32']:.0f} GFLOP/s, bfloat16 inputs "
      f"{r['matmul_gflops']['bf16']:.0f} GFLOP/s; copy bandwidth "
      f"{r['copy_bandwidth_gbs']:.1f} GB/s (one read of every G: "
      f"{r['floors_ms']['norm_pass']:.2f} ms, the apply pass's floor "
      f"{r['floors_ms']['apply_pass']:.2f} ms).\n\n"
      "Instructions reading each low-rank gradient in the compiled update "
      "(full-size passes over G):\n\n"
      + common.markdown_table(["update", "mean per leaf", "per leaf"], passes))


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="60m")
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--calls", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--updates", nargs="+", default=list(UPDATES),
                      choices=list(UPDATES),
                      help="whole updates to time and inspect")
  parser.add_argument("--out-dir", default=str(common.RESULTS_DIR))
  parser.add_argument("--out-name", default="projection_profile")
  parser.add_argument("--smoke", action="store_true",
                      help="smoke config, 2 rounds of 2 calls, AdamW and"
                      " APOLLO only (for tests)")
  args = parser.parse_args(argv)
  if args.smoke:
    args.config, args.rounds, args.calls, args.warmup = "smoke", 2, 2, 1
    args.updates = ["adamw", "apollo"]
  results = measure(args.config, args.rounds, args.calls, args.warmup,
                    args.updates)
  results.update(rounds=args.rounds, calls=args.calls, warmup=args.warmup)
  common.write_results(args.out_name, results, report(results), args.out_dir)
  return results


if __name__ == "__main__":
  main()
