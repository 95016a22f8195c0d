"""The optimizer update's cost as the compiler sees it: a MODEL, not a timing.

For one optimizer update (``tx.update`` + ``optax.apply_updates``, params
and state donated; parameters, gradients and moments in bfloat16 as the
paper's runs) of LLaMA-1B and LLaMA-7B:

* flops: ``cost_analysis()`` of the lowered program (the compiled GPU
  program and the GPU plugin's lowered one report none, so it is lowered for
  the CPU: the unoptimized HLO is the same);
* bytes: what the kernels of the program compiled for the target read and
  write (:func:`kernel_bytes`, after XLA:GPU's fusion), beside the lowered
  program's unfused ``bytes accessed``;
* predicted time t = max(kernel bytes / HBM bandwidth, flops / dense bf16
  peak) and its ratio to AdamW's, next to the paper's measured A100 ratios
  (Table 7, LLaMA-7B: APOLLO 0.92x, APOLLO-Mini 0.82x, GaLore 16.6x).

A roofline MODEL, not a measurement: no launch overheads, full bandwidth.
GaLore's steady step is modelled; its SVD refresh is not counted (free here),
which is why the model cannot reproduce the paper's 16.6x.

Usage::

  JAX_PLATFORMS=cpu .venv-accel/bin/python -m benchmarks.update_cost \\
      --targets h100 a100
  python -m benchmarks.update_cost --smoke        # CPU, tiny (for tests)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from apollo_lm import steps
from apollo_lm.configs import get_config
from apollo_lm.configs import LlamaConfig
from benchmarks import common
from benchmarks import sharding_report
from benchmarks import targets
from benchmarks import update_speed

# apollo_fast: issue 12's fast projection (Rademacher, bf16 product), the
# options of update_speed.OPTIONS.
OPTIMIZERS = ("adamw", "apollo", "apollo_fast", "apollo_mini", "galore")
PAPER_RATIO_7B = {"adamw": 1.0, "apollo": 0.92, "apollo_mini": 0.82,
                  "galore": 16.6}
LABELS = {"adamw": "AdamW", "apollo": "APOLLO (rank 256)",
          "apollo_fast": "APOLLO, fast projection (Rademacher, bf16)",
          "apollo_mini": "APOLLO-Mini", "galore": "GaLore (rank 256, steady)"}


# Instructions that move no data by themselves.
_NO_TRAFFIC = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast",
               "after-all", "partition-id", "replica-id")


_Instr = tuple[str, str, str, list[str], str]


def _computations(hlo_text: str) -> dict[str, list[_Instr]]:
  """``(name, type, opcode, operand names, called computation)`` per
  instruction of each computation (the entry one under ``"ENTRY"``)."""
  comps: dict[str, list[_Instr]] = {}
  current: list[_Instr] | None = None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head and not line.startswith(" "):
      current = comps.setdefault(
          "ENTRY" if line.startswith("ENTRY") else head.group(1), [])
      continue
    match = sharding_report._INSTRUCTION.match(line)  # pylint: disable=protected-access
    if match and current is not None:
      name, type_text, opcode, operands = match.groups()
      calls = re.search(r"calls=%?([\w.\-]+)", line)
      # Last field: the called computation, or a parameter's number.
      current.append((name, type_text, opcode,
                      re.findall(r"%([\w.\-]+)", operands),
                      operands.strip() if opcode == "parameter"
                      else calls.group(1) if calls else ""))
  return comps


def _size(type_text: str) -> int:
  return sum(sharding_report._array_sizes(type_text))  # pylint: disable=protected-access


def _fusion_traffic(body: list[_Instr],
                    operand_sizes: list[int], result_size: int) -> int:
  """Bytes a fusion reads and writes, slices and in-place updates aware.

  A parameter used only by (dynamic-)slices is read as those slices; one used
  only as the buffer of a dynamic-update-slice is not read (updated in
  place), and such a root writes only its update.
  """
  by_name = {ins[0]: ins for ins in body}
  users: dict[str, list[_Instr]] = {}
  for ins in body:
    for op in ins[3]:
      users.setdefault(op, []).append(ins)
  read = 0
  for ins in body:
    if ins[2] != "parameter":
      continue
    index = int(ins[4])
    size = operand_sizes[index] if index < len(operand_sizes) else _size(ins[1])
    uses = users.get(ins[0], [])
    if uses and all(u[2] in ("dynamic-slice", "slice") and u[3][0] == ins[0]
                    for u in uses):
      read += sum(_size(u[1]) for u in uses)
    elif uses and all(u[2] == "dynamic-update-slice" and u[3][0] == ins[0]
                      for u in uses):
      pass
    else:
      read += size
  root = body[-1]
  outputs = ([by_name[o] for o in root[3] if o in by_name]
             if root[2] == "tuple" else [root])
  write = 0
  for out in outputs:
    if out[2] == "dynamic-update-slice" and out[3][1] in by_name:
      write += _size(by_name[out[3][1]][1])
    else:
      write += _size(out[1])
  return read + (write if outputs else result_size)


def kernel_bytes(hlo_text: str, by_opcode: dict[str, float] | None = None,
                 ) -> float:
  """Bytes the top-level kernels of an optimized HLO module read and write.

  Every instruction of the ENTRY computation except those in
  :data:`_NO_TRAFFIC` is one kernel (a fusion, a GEMM, a copy, ...): it reads
  its operands from and writes its results to device memory; a fusion that
  only slices an operand reads the slices, one that updates a buffer in place
  (dynamic-update-slice) writes only the update. The sum over them is the
  memory traffic of the compiled program, which the lowered (unfused)
  program's ``bytes accessed`` overstates. ``by_opcode``, if given, receives
  the bytes per opcode.
  """
  comps = _computations(hlo_text)
  sizes: dict[str, int] = {}
  total = 0
  for name, type_text, opcode, operands, calls in comps.get("ENTRY", []):
    sizes[name] = _size(type_text)
    if opcode in _NO_TRAFFIC:
      continue
    operand_sizes = [sizes.get(op, 0) for op in operands]
    body = comps.get(calls) if opcode == "fusion" else None
    if body:
      traffic = _fusion_traffic(body, operand_sizes, sizes[name])
    else:
      traffic = sum(operand_sizes) + sizes[name]
    total += traffic
    if by_opcode is not None:
      by_opcode[opcode] = by_opcode.get(opcode, 0.0) + traffic
  return float(total)


def measure(config: LlamaConfig, name: str, target: targets.Target,
            ) -> dict[str, Any]:
  """Flops and bytes of one update of ``name`` on one ``target`` device.

  ``flops`` and ``lowered_bytes``: XLA's cost analysis of the lowered
  (unoptimized, hardware-independent) program, lowered for the CPU because
  the GPU plugin's lowered and compiled programs report no cost analysis.
  ``kernel_bytes``: :func:`kernel_bytes` of the program compiled for
  ``target`` (its fusions). The predicted time uses ``kernel_bytes``.
  """
  tx = common.make_tx(update_speed.VARIANTS[name], config,
                      mu_dtype=jnp.bfloat16, **update_speed.OPTIONS.get(name, {}))
  abstract = common.abstract_params(config, jnp.bfloat16)
  t0 = time.perf_counter()
  out: dict[str, Any] = {}
  for lowered_only, backend in ((True, "cpu"), (False, target.name)):
    device = targets.devices(backend, 1)
    params = targets.on_devices(abstract, device)
    state = targets.on_devices(jax.eval_shape(tx.init, params), device)
    lowered = jax.jit(steps.make_update_step(tx),
                      donate_argnums=(0, 1)).lower(params, state, params)
    if lowered_only:
      cost = lowered.cost_analysis() or {}
      out["flops"] = float(cost.get("flops", 0.0))
      out["lowered_bytes"] = float(cost.get("bytes accessed", 0.0))
    else:
      by_opcode: dict[str, float] = {}
      out["kernel_bytes"] = kernel_bytes(lowered.compile().as_text(),
                                         by_opcode)
      out["kernel_bytes_by_opcode"] = dict(
          sorted(by_opcode.items(), key=lambda kv: -kv[1]))
  out["seconds"] = round(time.perf_counter() - t0, 1)
  if target.hbm_bytes_per_s:
    out["memory_s"] = out["kernel_bytes"] / target.hbm_bytes_per_s
    out["compute_s"] = out["flops"] / target.peak_flops
    out["predicted_s"] = max(out["memory_s"], out["compute_s"])
  return out


def report(results: dict[str, Any]) -> str:
  parts = []
  for tname, by_cfg in results["targets"].items():
    t = by_cfg["target"]
    for cfg, by_opt in by_cfg["configs"].items():
      ref = by_opt.get("adamw", {}).get("predicted_s")
      rows = []
      for name, e in by_opt.items():
        ratio = (f"**{e['predicted_s'] / ref:.2f}x**"
                 if ref and "predicted_s" in e else "—")
        paper = (f"{PAPER_RATIO_7B[name]:.2f}x"
                 if cfg == "7b" and name in PAPER_RATIO_7B else "—")
        rows.append([
            LABELS[name], f"{e['flops'] / 1e9:.1f}",
            f"{e['lowered_bytes'] / 1e9:.2f}",
            f"{e['kernel_bytes'] / 1e9:.2f}",
            f"{e.get('memory_s', 0) * 1e3:.2f}",
            f"{e.get('compute_s', 0) * 1e3:.3f}",
            f"{e.get('predicted_s', 0) * 1e3:.2f}", ratio, paper])
      parts.append(
          f"## {t['label']}, LLaMA-{cfg}: one optimizer update (model)\n\n"
          f"HBM {t['hbm_bytes_per_s'] / 1e12:.3g} TB/s, bf16 peak "
          f"{t['peak_flops'] / 1e12:.4g} TFLOPS ({t['source']}).\n\n"
          + common.markdown_table(
              ["optimizer", "GFLOP", "GB unfused", "GB kernels", "memory ms",
               "compute ms", "predicted ms", "× AdamW",
               "paper (A100, measured)"], rows))
  return ("Predicted time = max(GB kernels / HBM bandwidth, GFLOP / dense "
          "bf16 peak). GFLOP and GB unfused: XLA's `cost_analysis()` of the "
          "lowered (unoptimized) update; GB kernels: operands + results of "
          "every top-level kernel (fusion, GEMM, copy) of the update compiled "
          "for the target (the traffic after fusion). A roofline MODEL of the "
          "update alone, not a measurement: no launch overheads, full "
          "bandwidth. GaLore's SVD refresh is not counted (steady step "
          "only), so its 16.6x in the paper (which includes SVDs every 200 "
          "steps, amortised, and PyTorch's per-tensor kernels) is out of the "
          "model's reach.\n\n" + "\n\n".join(parts))


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--targets", nargs="+", default=["h100", "a100"],
                      choices=[t for t in targets.TARGETS if t != "cpu"])
  parser.add_argument("--configs", nargs="+", default=["1b", "7b"])
  parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                      choices=OPTIMIZERS)
  parser.add_argument("--out-dir", default=str(common.RESULTS_DIR))
  parser.add_argument("--out-name", default="update_cost")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny config, CPU compile, no prediction (tests)")
  parser.add_argument("--report-from", nargs="+", default=None,
                      help="only merge these result JSONs into <out-name>")
  args = parser.parse_args(argv)
  if args.report_from:
    merged: dict[str, Any] = {"targets": {}, "runs": []}
    for path in args.report_from:
      old = json.loads(pathlib.Path(path).read_text())
      merged["runs"].append(old.pop("metadata"))
      for tname, entry in old["targets"].items():
        mine = merged["targets"].setdefault(
            tname, {"target": entry["target"], "configs": {}})
        for cfg, by_opt in entry["configs"].items():
          mine["configs"].setdefault(cfg, {}).update(by_opt)
    for entry in merged["targets"].values():
      for cfg, by_opt in entry["configs"].items():
        entry["configs"][cfg] = {n: by_opt[n] for n in OPTIMIZERS
                                 if n in by_opt}
    common.write_results(args.out_name, merged, report(merged), args.out_dir)
    return merged
  configs = {c: get_config(c, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
             for c in args.configs}
  names = args.targets
  if args.smoke:
    configs = {"smoke": common.smoke_config(dtype=jnp.bfloat16,
                                            param_dtype=jnp.bfloat16)}
    names = ["cpu"]
    args.optimizers = ["adamw", "apollo_mini"]
  results: dict[str, Any] = {"targets": {}}
  for tname in names:
    target = targets.get(tname)
    entry = {"target": targets.describe(target), "configs": {}}
    for cfg, config in configs.items():
      entry["configs"][cfg] = {}
      for name in args.optimizers:
        entry["configs"][cfg][name] = measure(config, name, target)
        print(tname, cfg, name, entry["configs"][cfg][name], flush=True)
    results["targets"][tname] = entry
  markdown = report(results) if not args.smoke else ""
  common.write_results(args.out_name, results, markdown, args.out_dir)
  return results


if __name__ == "__main__":
  main()
