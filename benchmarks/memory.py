"""Optimizer-state memory of LLaMA 60M–13B, exact, nothing allocated.

For each model size and optimizer the state is built with
``jax.eval_shape(tx.init, abstract_params)`` and measured with
``apollo_optax.state_bytes``; a closed-form count is printed next to it
(measured − formula = scalar counters, seeds and limiter norms). Float32 and
bfloat16 states; weights and gradients bytes for context; and the paper's
Table 2/3 memory columns for comparison.

Usage::

  python -m benchmarks.memory [--configs 60m 130m ...] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import apollo_optax
from apollo_lm import optimizers
from apollo_lm.configs import get_config
from apollo_lm.configs import LlamaConfig
from benchmarks import common

CONFIGS = ("60m", "130m", "350m", "1b", "7b", "13b")
MEMORY_OPTIMIZERS = ("adamw", "apollo", "apollo_mini", "galore", "adafactor",
                     "sgd_momentum")
# Paper Table 2 (weights + optimizer states, BF16, "G") and Table 3 (7B,
# optimizer states only; AdamW and GaLore are their 8-bit variants there).
PAPER_WEIGHTS_PLUS_STATES_G = {
    "60m": {"adamw": 0.36, "galore": 0.24, "apollo": 0.24, "apollo_mini": 0.12},
    "130m": {"adamw": 0.76, "galore": 0.52, "apollo": 0.52, "apollo_mini": 0.25},
    "350m": {"adamw": 2.06, "galore": 1.22, "apollo": 1.22, "apollo_mini": 0.69},
    "1b": {"adamw": 7.80, "galore": 4.38, "apollo": 4.38, "apollo_mini": 2.60},
}
PAPER_STATES_ONLY_G = {
    "7b": {"adamw (8-bit)": 13.0, "galore (8-bit)": 4.9, "apollo": 1.6,
           "apollo_mini": 0.0},
    "350m": {"adamw": 1.37, "apollo": 0.34, "apollo_mini": 0.0},
}


def _leaves(params: Any) -> list[tuple[bool, tuple[int, ...]]]:
  """(is APOLLO low-rank, shape) of every parameter leaf."""
  mask = apollo_optax.default_lowrank_mask(params)
  return [(bool(m), tuple(p.shape)) for m, p in zip(
      jax.tree.leaves(mask), jax.tree.leaves(params))]


def _matrices(shape: tuple[int, ...]) -> tuple[int, int, int]:
  """(number of matrices, m, n) of a leaf whose last two axes form matrices."""
  return math.prod(shape[:-2]), shape[-2], shape[-1]


def formula_numbers(name: str, params: Any, rank: int) -> int:
  """Closed-form number of state elements (no scalars) of optimizer ``name``.

  AdamW 2·P; APOLLO 2·r·max(m, n) per low-rank matrix (r clamped to
  min(m, n)) + 2·size of the Adam leaves; APOLLO-Mini the same with r = 1;
  GaLore as ``optax.contrib.galore`` codes it: a projector of r·max(m, n)
  plus Adam moments of 2·r·min(m, n) per matrix (it projects the longer
  side; the original GaLore projects the shorter one: 2·r·max + r·min);
  Adafactor: row and column statistics (size/d1 + size/d2, d1, d2 the two
  largest axes) for leaves whose two largest axes are >= 128, a full second
  moment otherwise; SGD momentum P.
  """
  total = 0
  for lowrank, shape in _leaves(params):
    size = math.prod(shape)
    if name == "adamw":
      total += 2 * size
    elif name == "sgd_momentum":
      total += size
    elif name == "adafactor":
      dims = sorted(shape)[-2:] if len(shape) >= 2 else []
      if len(dims) == 2 and dims[0] >= 128:
        total += size // dims[1] + size // dims[0]
      else:
        total += size
    elif not lowrank:
      total += 2 * size
    else:
      count, m, n = _matrices(shape)
      if name in ("apollo", "apollo_mini"):
        r = min(rank if name == "apollo" else 1, m, n)
        total += count * 2 * r * max(m, n)
      elif name == "galore":
        r = min(rank, m, n)
        total += count * (r * max(m, n) + 2 * r * min(m, n))
      else:
        raise ValueError(name)
  return total


def measure(config: LlamaConfig, dtype: Any) -> dict[str, Any]:
  """State bytes (measured and formula) of every optimizer for ``config``."""
  params = common.abstract_params(config, dtype)
  itemsize = np.dtype(dtype).itemsize
  num_params = sum(p.size for p in jax.tree.leaves(params))
  rank = optimizers.default_rank(config.hidden_size)
  mu_dtype = None if dtype == jnp.float32 else dtype
  row = {"params": num_params, "rank": rank,
         "weights_bytes": num_params * itemsize,
         "grads_bytes": num_params * itemsize, "optimizers": {}}
  for name in MEMORY_OPTIMIZERS:
    tx = common.make_tx(name, config, mu_dtype=mu_dtype)
    state = jax.eval_shape(tx.init, params)
    measured = apollo_optax.state_bytes(state)
    formula = formula_numbers(name, params, rank) * itemsize
    row["optimizers"][name] = {
        "state_bytes": measured, "formula_bytes": formula,
        "scalars_bytes": measured - formula,
        "vs_adamw": None,
    }
  adamw = row["optimizers"]["adamw"]["state_bytes"]
  for entry in row["optimizers"].values():
    entry["vs_adamw"] = entry["state_bytes"] / adamw
  return row


def lowrank_split(config: LlamaConfig, name: str, itemsize: int) -> int:
  """Bytes of the low-rank part only (matrices) of APOLLO(-Mini)'s state."""
  params = common.abstract_params(config)
  rank = optimizers.default_rank(config.hidden_size) if name == "apollo" else 1
  total = 0
  for lowrank, shape in _leaves(params):
    if lowrank:
      count, m, n = _matrices(shape)
      total += count * 2 * min(rank, m, n) * max(m, n)
  return total * itemsize


def report(results: dict[str, Any]) -> str:
  """Markdown tables of ``results``."""
  parts = []
  for dtype_name in ("float32", "bfloat16"):
    rows = []
    for cfg, row in results[dtype_name].items():
      for name, e in row["optimizers"].items():
        rows.append([cfg, f"{row['params'] / 1e6:.1f}M", name,
                     row["rank"] if name in ("apollo", "galore") else
                     (1 if name == "apollo_mini" else "-"),
                     f"{e['state_bytes']:,}", f"{e['formula_bytes']:,}",
                     e["scalars_bytes"], common.gb(e["state_bytes"]),
                     f"{e['vs_adamw']:.3f}",
                     common.gb(row["weights_bytes"]),
                     common.gb(row["grads_bytes"])])
    parts.append(
        f"## Optimizer state, {dtype_name} states\n\n"
        "Measured = `state_bytes(jax.eval_shape(tx.init, params))`; formula = "
        "closed form of `formula_numbers` (elements × itemsize); the "
        "difference is scalars (counters, seeds, limiter norms).\n\n"
        + common.markdown_table(
            ["config", "params", "optimizer", "rank", "state bytes (measured)",
             "formula bytes", "measured − formula", "state GB", "× AdamW",
             "weights GB", "grads GB"], rows))
  rows = []
  bf16 = results["bfloat16"]
  for cfg, paper in PAPER_WEIGHTS_PLUS_STATES_G.items():
    if cfg not in bf16:
      continue
    row = bf16[cfg]
    for name, paper_g in paper.items():
      ours = row["weights_bytes"] + row["optimizers"][name]["state_bytes"]
      rows.append([cfg, name, f"{paper_g:.2f}", common.gb(ours),
                   f"{ours / common.GIB:.2f}"])
  parts.append(
      "## Comparison with paper Table 2 (weights + states, BF16)\n\n"
      + common.markdown_table(
          ["config", "optimizer", "paper Table 2 (G)", "ours (GB, 1e9)",
           "ours (GiB)"], rows))
  rows = []
  for cfg, paper in PAPER_STATES_ONLY_G.items():
    if cfg not in bf16:
      continue
    row = bf16[cfg]
    for name, paper_g in paper.items():
      key = name.split(" ")[0]
      ours = row["optimizers"][key]["state_bytes"]
      low = (common.gb(results["lowrank_only_bf16"][cfg][key])
             if key in ("apollo", "apollo_mini") else "-")
      rows.append([cfg, name, f"{paper_g:.2f}", common.gb(ours),
                   f"{ours / common.GIB:.2f}", low])
  parts.append(
      "## Comparison with paper Table 3 (7B) and Table 4 (350M): states "
      "only, BF16\n\n"
      + common.markdown_table(
          ["config", "optimizer", "paper (G)", "ours all leaves (GB)",
           "ours (GiB)", "ours low-rank matrices only (GB)"], rows))
  return "\n\n".join(parts)


PLOTTED = ("adamw", "apollo", "apollo_mini", "galore", "adafactor",
           "sgd_momentum")


def plot(results: dict[str, Any], path: pathlib.Path) -> None:
  """Weights + gradients + optimizer state in bfloat16, one panel per model.

  The paper's memory figure counts the same three terms in BF16.
  """
  plt = common.pyplot()
  configs = results["configs"]
  fig, axes = plt.subplots(1, len(configs), figsize=(3.2 * len(configs), 4),
                           squeeze=False)
  for ax, cfg in zip(axes[0], configs):
    row = results["bfloat16"][cfg]
    x = range(len(PLOTTED))
    weights = [row["weights_bytes"] / 1e9] * len(PLOTTED)
    grads = [row["grads_bytes"] / 1e9] * len(PLOTTED)
    states = [row["optimizers"][n]["state_bytes"] / 1e9 for n in PLOTTED]
    ax.bar(x, weights, label="weights", color="#9bb7d4")
    ax.bar(x, grads, bottom=weights, label="gradients", color="#c9d9a6")
    ax.bar(x, states, bottom=[w + g for w, g in zip(weights, grads)],
           label="optimizer state", color="#e07b5f")
    ax.set_xticks(list(x), PLOTTED, rotation=60, ha="right", fontsize=8)
    ax.set_title(f"LLaMA-{cfg} (bf16)")
    ax.set_ylabel("GB")
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
  parser.add_argument("--out-dir", default=str(common.RESULTS_DIR))
  parser.add_argument("--smoke", action="store_true",
                      help="configs tiny and 20m only (for tests)")
  args = parser.parse_args(argv)
  configs = ["tiny", "20m"] if args.smoke else args.configs
  results: dict[str, Any] = {"configs": configs}
  for dtype_name, dtype in (("float32", jnp.float32),
                            ("bfloat16", jnp.bfloat16)):
    results[dtype_name] = {
        cfg: measure(get_config(cfg), dtype) for cfg in configs}
  results["lowrank_only_bf16"] = {
      cfg: {name: lowrank_split(get_config(cfg), name, 2)
            for name in ("apollo", "apollo_mini")} for cfg in configs}
  markdown = report(results) + (
      "\n\nWeights + gradients + state in bfloat16: [memory.png](memory.png).")
  common.write_results("memory", results, markdown, args.out_dir)
  plot(results, pathlib.Path(args.out_dir) / "memory.png")
  return results


if __name__ == "__main__":
  main()
