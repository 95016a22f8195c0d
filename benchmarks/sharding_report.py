"""Communication and per-device memory of a sharded APOLLO update.

For one LLaMA-60M block (scanned ``(L, m, n)`` kernels, L = 1, shapes from
``apollo_lm.model``) on an 8-device CPU mesh, and three parameter layouts:

* ``fsdp_rows``: kernels sharded along m (the input axis) over 8 devices;
* ``fsdp_cols``: kernels sharded along n (the output axis) over 8 devices;
* ``fsdp_x_tensor``: the model's own annotations on a 4 x 2 (fsdp, tensor)
  mesh ((fsdp, tensor) for q/k/v/gate/up, (tensor, fsdp) for o/down).

Norm scales are sharded over all devices, so that the per-device state is
total / devices up to replicated scalars. Each layout compiles one
``tx.update`` + ``optax.apply_updates`` and parses the optimized HLO for
collectives, summing the bytes each one moves (the larger of its operands' and
results' sizes). The bound is what reducing every projected gradient R once
costs: Σ rank·max(m, n)·4 bytes over the low-rank matrices. No collective may
move a gradient, parameter or update: besides reductions of R only the
per-channel factors (Σ max(m, n)·4 bytes) may be gathered.

State creation modes:

* ``auto``: ``Auto`` mesh axes, state placed by
  ``apollo_optax.state_shardings`` (``out_shardings`` of ``jax.jit(tx.init)``);
* ``explicit``: ``Explicit`` mesh axes, ``jax.jit(tx.init)`` (sharding in
  types);
* ``replicated_state``: ``Auto`` axes with the whole state replicated, which
  is what ``jax.jit(tx.init)`` returned before the state followed the
  parameters' sharding (for comparison).

Usage::

  python -m benchmarks.sharding_report [--out-dir DIR]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import optax

import apollo_optax
from apollo_lm import model as model_lib
from apollo_lm import optimizers
from apollo_lm import steps
from apollo_lm.configs import get_config
from benchmarks import common

if jax.config.jax_num_cpu_devices != 8:  # Older JAX refuses even a no-op update.
  jax.config.update("jax_num_cpu_devices", 8)

LAYOUTS = ("fsdp_rows", "fsdp_cols", "fsdp_x_tensor")
MODES = ("auto", "explicit", "replicated_state")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2,
                "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8,
                "u64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*?)\)")


def _array_sizes(type_text: str) -> list[int]:
  """Bytes of each array in an HLO type, e.g. ``(f32[2,3]{1,0}, s32[])``."""
  return [
      _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
      for dtype, dims in _ARRAY.findall(type_text)
  ]


def collectives(hlo_text: str) -> list[dict[str, Any]]:
  """Every collective of an optimized HLO module and the bytes it moves.

  ``bytes`` is the larger of the summed operand and result sizes (all-gather:
  the gathered result, reduce-scatter: the unscattered operand, all-reduce:
  either); ``largest_array`` is the largest single array among them.
  """
  shapes: dict[str, list[int]] = {}
  found = []
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, type_text, opcode, operands = match.groups()
    shapes[name] = _array_sizes(type_text)
    base = opcode.removesuffix("-start")
    if base not in COLLECTIVES or opcode.endswith("-done"):
      continue
    operand_sizes = [
        size for operand in re.findall(r"%([\w.\-]+)", operands)
        for size in shapes.get(operand, [])
    ]
    result_sizes = shapes[name]
    found.append({
        "op": base,
        "bytes": max(sum(operand_sizes), sum(result_sizes)),
        "largest_array": max(operand_sizes + result_sizes, default=0),
    })
  return found


def block_params(config_name: str = "60m") -> dict[str, Any]:
  """Abstract parameters of one scanned block (L = 1), keyed by path."""
  config = get_config(config_name, num_layers=1)
  state = model_lib.abstract_state(config)["layers"]
  flat = jax.tree_util.tree_leaves_with_path(state)
  return {
      "/".join(str(getattr(k, "key", k)) for k in path): leaf
      for path, leaf in flat
  }


def layout_spec(layout: str, path: str, ndim: int) -> P:
  """The PartitionSpec of the block parameter at ``path`` in ``layout``."""
  everything = "fsdp" if layout != "fsdp_x_tensor" else ("fsdp", "tensor")
  if ndim == 2:  # Norm scales (L, d).
    return P(None, everything)
  if layout == "fsdp_rows":
    return P(None, "fsdp", None)
  if layout == "fsdp_cols":
    return P(None, None, "fsdp")
  if path.endswith(("o_proj/kernel", "down_proj/kernel")):
    return P(None, "tensor", "fsdp")
  return P(None, "fsdp", "tensor")


def make_mesh(layout: str, axis_type: AxisType) -> jax.sharding.Mesh:
  shape = (4, 2) if layout == "fsdp_x_tensor" else (8, 1)
  return jax.make_mesh(shape, ("fsdp", "tensor"), axis_types=(axis_type,) * 2)


def lowrank_bound(params: dict[str, Any], rank: int) -> int:
  """Σ rank·max(m, n)·4 bytes over the matrices APOLLO projects."""
  mask = apollo_optax.default_lowrank_mask(params)
  return sum(
      4 * p.shape[0] * min(rank, *p.shape[1:]) * max(p.shape[1:])
      for key, p in params.items() if mask[key]
  )


def channel_bound(params: dict[str, Any]) -> int:
  """Σ max(m, n)·4 bytes over the projected matrices: one factor per channel."""
  mask = apollo_optax.default_lowrank_mask(params)
  return sum(4 * p.shape[0] * max(p.shape[1:])
             for key, p in params.items() if mask[key])


def per_device_bytes(tree: Any) -> int:
  """Bytes one device holds: the first addressable shard of each array."""
  return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


def measure(tx: optax.GradientTransformation, layout: str, mode: str,
            abstract: dict[str, Any]) -> dict[str, Any]:
  """Compiles one update in ``layout``/``mode``; its collectives and memory."""
  axis_type = AxisType.Explicit if mode == "explicit" else AxisType.Auto
  mesh = make_mesh(layout, axis_type)
  shardings = {
      k: NamedSharding(mesh, layout_spec(layout, k, len(p.shape)))
      for k, p in abstract.items()
  }
  params = {
      k: jax.device_put(jnp.full(p.shape, 0.01, p.dtype), shardings[k])
      for k, p in abstract.items()
  }
  with jax.set_mesh(mesh):
    if mode == "explicit":
      state = jax.jit(tx.init)(params)
      compiled = jax.jit(steps.make_update_step(tx)).lower(params, state, params).compile()
    else:
      state_sh = apollo_optax.state_shardings(tx, params)
      if mode == "replicated_state":
        state_sh = jax.tree.map(lambda _: NamedSharding(mesh, P()), state_sh)
      state = jax.jit(tx.init, out_shardings=state_sh)(params)
      compiled = jax.jit(
          steps.make_update_step(tx), in_shardings=(shardings, state_sh, shardings),
          out_shardings=(shardings, state_sh),
      ).lower(params, state, params).compile()
  found = collectives(compiled.as_text())
  by_op = {op: sum(c["bytes"] for c in found if c["op"] == op)
           for op in COLLECTIVES}
  return {
      "collective_bytes": sum(by_op.values()),
      "reduction_bytes": by_op["all-reduce"] + by_op["reduce-scatter"],
      "movement_bytes": (by_op["all-gather"] + by_op["all-to-all"]
                         + by_op["collective-permute"]),
      "collective_bytes_by_op": by_op,
      "num_collectives": len(found),
      "largest_collective_array_bytes": max(
          (c["largest_array"] for c in found), default=0),
      "state_bytes_total": apollo_optax.state_bytes(state),
      "state_bytes_per_device": per_device_bytes(state),
      "devices": mesh.size,
  }


def run() -> dict[str, Any]:
  abstract = block_params("60m")
  config = get_config("60m")
  rank = optimizers.default_rank(config.hidden_size)
  optimizers = {
      "apollo": (apollo_optax.apollo(1e-3, rank=rank), rank),
      "apollo_mini": (apollo_optax.apollo_mini(1e-3), 1),
  }
  rows = []
  for name, (tx, tx_rank) in optimizers.items():
    for layout in LAYOUTS:
      for mode in MODES:
        row = {"optimizer": name, "rank": tx_rank, "layout": layout,
               "mode": mode, **measure(tx, layout, mode, abstract)}
        row["lowrank_bound_bytes"] = lowrank_bound(abstract, tx_rank)
        row["channel_vector_bytes"] = channel_bound(abstract)
        rows.append(row)
        print({k: v for k, v in row.items() if k != "collective_bytes_by_op"},
              flush=True)
  return {
      "model": "60m, one block (L=1)",
      "param_shapes": {k: list(p.shape) for k, p in abstract.items()},
      "param_bytes": sum(4 * math.prod(p.shape) for p in abstract.values()),
      "rows": rows,
  }


def markdown(results: dict[str, Any]) -> str:
  headers = ["optimizer", "layout", "state creation", "collective bytes",
             "reductions (all-reduce + reduce-scatter)", "low-rank bound",
             "gather/all-to-all/permute", "channel vectors", "largest array",
             "state/device", "state total/devices"]
  rows = [
      [r["optimizer"], r["layout"], r["mode"], f"{r['collective_bytes']:,}",
       f"{r['reduction_bytes']:,}", f"{r['lowrank_bound_bytes']:,}",
       f"{r['movement_bytes']:,}", f"{r['channel_vector_bytes']:,}",
       f"{r['largest_collective_array_bytes']:,}",
       f"{r['state_bytes_per_device']:,}",
       f"{r['state_bytes_total'] / r['devices']:,.0f}"]
      for r in results["rows"]
  ]
  return (
      f"Model: {results['model']}; parameters {results['param_bytes']:,} "
      f"bytes.\n\n"
      "Collective bytes: per collective in the compiled update + "
      "apply_updates, the larger of its operands' and results' sizes, summed. "
      "Low-rank bound: Σ rank·max(m, n)·4 over the projected matrices. "
      "Array sizes in the partitioned HLO are per device. Reductions of R "
      "are the expected communication; gather/all-to-all/permute bytes "
      "should only be channel-factor vectors (Σ max(m, n)·4). Largest array: "
      "the largest single buffer any collective carries. State/device: the "
      "first addressable shard of every state array.\n\n"
      + common.markdown_table(headers, rows) + "\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out-dir", default=str(common.RESULTS_DIR))
  args = parser.parse_args()
  results = run()
  path = common.write_results("sharding", results, markdown(results),
                              args.out_dir)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
