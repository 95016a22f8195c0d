"""The paper's system claims, compiled for H100, A100 and TPU v5p (issue 15).

Every figure is ``memory_analysis()`` of a training step compiled with the
target's own compiler for devices that are not present
(:mod:`benchmarks.targets`): bytes per device, nothing allocated, nothing
run. Setting as the paper's runs: LLaMA (``apollo_lm``), sequence 256,
parameters, activations and optimizer moments in bfloat16 (AdamW:
``optax.adamw(mu_dtype=bfloat16)``; APOLLO rank 256 and APOLLO-Mini with
``mu_dtype=bfloat16``; GaLore rank 256 keeps the parameters' dtype), params
and optimizer state donated. "Fits" means the program compiled (libtpu
refuses programs larger than the chip) and its total (argument + output −
alias + temp) is at most the device memory of :class:`targets.Target`.

Claims (the paper's numbers in brackets):

a. ``--claims batch``: the largest micro-batch per device whose LLaMA-7B step
   fits, 8 devices, remat off, for AdamW, APOLLO, APOLLO-Mini, GaLore
   (paper, 8xA100-80GB: AdamW 4, APOLLO 16, "4x"). Found by search over the
   micro-batch: two compiles (1 and 2) give a first guess by a straight line,
   then :func:`targets.largest_fitting` compiles until the answer is pinned
   (the reported batch fits and batch + 1 does not, both compiled).
   ``ddp``: parameters and state replicated on every device (naive DDP, as
   the paper); ``fsdp``: both sharded over the 8 devices by the model's
   annotations and :func:`apollo_optax.state_shardings`.
b. ``--claims 13b``: LLaMA-13B, micro-batch 1, remat on, one 80 GB device
   under naive DDP (each device holds everything, so one device decides):
   which optimizers and options fit (paper: APOLLO makes 13B trainable with
   naive DDP on A100-80GB). Also layer-wise updates
   (:mod:`apollo_lm.layerwise`) and Q-APOLLO-Mini (int8 weights, group 128).
   With ``fsdp``: the per-device bytes with everything sharded over 8.
c. ``--claims q7b``: LLaMA-7B, Q-APOLLO-Mini + layer-wise, micro-batch 1,
   remat on, one device (paper: under 12 GB), and FSDP over 8.

Usage (side environment: ``make accel-env``; ``make bench-accel`` runs all)::

  JAX_PLATFORMS=cpu .venv-accel/bin/python -m benchmarks.accel_claims \\
      --targets h100 a100 tpu_v5p --claims q7b 13b batch
  python -m benchmarks.accel_claims --smoke      # CPU only, tiny model (tests)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import time
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import apollo_optax
from apollo_lm import layerwise
from apollo_lm import model as model_lib
from apollo_lm import sharding as sharding_lib
from apollo_lm import steps
from apollo_lm.configs import get_config
from apollo_lm.configs import LlamaConfig
from benchmarks import common
from benchmarks import qapollo_memory
from benchmarks import targets

# The CPU (``--smoke``) runs use host devices for the 8-way layouts.
jax.config.update("jax_num_cpu_devices", 8)

SEQ_LEN = 256
BATCH_METHODS = ("adamw", "apollo", "apollo_mini", "galore")
ONE_DEVICE_METHODS = ("adamw", "apollo", "apollo_mini", "galore",
                      "apollo_mini_layerwise", "q_apollo_mini_layerwise")
LABELS = {**qapollo_memory.LABELS, "galore": "GaLore (rank 256)"}
LAYOUTS = ("ddp", "fsdp")
CLAIMS = ("q7b", "13b", "batch")
PAPER_BATCH = {"adamw": 4, "apollo": 16}


def _tx(method: str, config: LlamaConfig) -> Any:
  if method == "galore":
    return common.make_tx("galore", config)
  return qapollo_memory._tx(method.removesuffix("_layerwise"), config)  # pylint: disable=protected-access


class _Init:
  """``init`` as an object with an ``init`` attribute (state_shardings)."""

  def __init__(self, init):
    self.init = init


def build(config: LlamaConfig, method: str, devices: list[Any], layout: str,
          micro_batch: int) -> tuple[Any, tuple[Any, ...], Any]:
  """``(step function, abstract args on devices, mesh)`` of one program.

  ``method``: one of :data:`ONE_DEVICE_METHODS`; ``layout``: ``ddp``
  (replicated parameters and state, batch split over devices) or ``fsdp``
  (parameters and state sharded over the devices too).
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout: must be one of {LAYOUTS}, got {layout!r}.")
  if method not in ONE_DEVICE_METHODS:
    raise ValueError(
        f"method: must be one of {ONE_DEVICE_METHODS}, got {method!r}.")
  n = len(devices)
  abstract = nnx.eval_shape(lambda: model_lib.Llama(config, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  tx = _tx(method, config)
  quantize = (lambda p: layerwise.quantize_llama_params(
      p, qapollo_memory.GROUP_SIZE)) if method.startswith("q_") else None
  if method.endswith("layerwise"):
    init = lambda p: layerwise.init_layerwise_state(tx, p)
    step = common.on_tokens(steps.make_layerwise_train_step(config, tx))
  else:
    init = tx.init
    step = common.make_train_step(config, tx)
  tokens = jax.ShapeDtypeStruct((micro_batch * n, SEQ_LEN + 1), jnp.int32)
  if layout == "ddp":
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    if quantize:
      params = jax.eval_shape(quantize, params)
    state = jax.eval_shape(init, params)
    place = lambda tree, spec=P(): jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=NamedSharding(mesh, spec)),
        tree)
    args = (place(params), place(state), place(tokens, P("data")))
  else:
    mesh = sharding_lib.make_mesh(1, n, 1, devices)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(
        nnx.state(abstract, nnx.Param)))
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                          sharding=NamedSharding(mesh, s)),
        params, specs)
    if quantize:
      params = jax.tree.map(
          lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
          jax.eval_shape(quantize, params),
          apollo_optax.state_shardings(_Init(quantize), params))
    state_shardings = apollo_optax.state_shardings(_Init(init), params)
    state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(init, params), state_shardings)
    batch_axes = tuple(a for a in sharding_lib.MESH_AXES if a != "tensor")
    args = (params, state, jax.ShapeDtypeStruct(
        tokens.shape, tokens.dtype,
        sharding=NamedSharding(mesh, P(batch_axes))))
  return step, args, mesh


def compile_step(config: LlamaConfig, method: str, target: targets.Target,
                 n_devices: int, layout: str, micro_batch: int,
                 ) -> dict[str, Any]:
  """Per-device memory of one compiled step (see :func:`build`), or OOM."""
  devices = targets.devices(target, n_devices)
  t0 = time.perf_counter()
  step, args, mesh = build(config, method, devices, layout, micro_batch)
  options = (layerwise.compiler_options()
             if method.endswith("layerwise") and target.platform == "cpu"
             else {})

  def lower():
    with jax.set_mesh(mesh):
      return jax.jit(step, donate_argnums=(0, 1),
                     compiler_options=options or None).lower(*args)

  out = targets.compile_memory(lower)
  out["compile_s"] = round(time.perf_counter() - t0, 1)
  # Global (unsharded) sizes.
  out["params_bytes"] = apollo_optax.state_bytes(args[0])
  out["state_bytes"] = apollo_optax.state_bytes(args[1])
  capacity = target.memory_bytes
  out["fits"] = (not out["oom"]) and (
      capacity is None or out["total_bytes"] <= capacity)
  return out


def _config(name: str, remat: bool, smoke: bool) -> LlamaConfig:
  """``name`` in bfloat16, sequence 256; ``smoke``: a 2-layer tiny."""
  if smoke:
    # tiny with an MLP width that group 128 divides (for Q-APOLLO).
    return get_config("tiny", vocab_size=512, intermediate_size=384,
                      num_layers=2, remat=remat, dtype=jnp.bfloat16,
                      param_dtype=jnp.bfloat16, max_seq_len=SEQ_LEN)
  return get_config(name, remat=remat, dtype=jnp.bfloat16,
                    param_dtype=jnp.bfloat16, max_seq_len=SEQ_LEN)


def largest_batch(config: LlamaConfig, method: str, target: targets.Target,
                  layout: str, n_devices: int = 8, limit: int = 512,
                  log: Any = print, bounds: tuple[int, int] | None = None,
                  guess: int | None = None) -> dict[str, Any]:
  """Claim (a) for one method: the largest micro-batch that fits.

  ``bounds=(lo, hi)``: an earlier run compiled ``lo`` (fits) and ``hi``
  (does not); the search compiles only between them, from ``guess`` if
  given (else by bisection), instead of starting with batches 1 and 2.
  """
  compiles: dict[int, dict[str, Any]] = {}

  def fits(micro: int) -> bool:
    compiles[micro] = compile_step(config, method, target, n_devices, layout,
                                   micro)
    log(f"  {target.name} {layout} {method} micro {micro}: "
        f"{compiles[micro].get('total_bytes', 0) / 1e9:.2f} GB "
        f"fits={compiles[micro]['fits']} ({compiles[micro]['compile_s']} s)")
    return compiles[micro]["fits"]

  if bounds is None and fits(1) and fits(2):
    one, two = compiles[1]["total_bytes"], compiles[2]["total_bytes"]
    capacity = target.memory_bytes or common.GPU_MEMORY_BYTES
    if two > one and guess is None:
      guess = int((capacity - one) // (two - one)) + 1
  found, tried = targets.largest_fitting(
      lambda m: compiles[m]["fits"] if m in compiles else fits(m),
      start=1, limit=limit, guess=guess, bounds=bounds)
  out = {"largest_micro_batch": found, "guess": guess,
         "tried": {str(k): v for k, v in sorted(tried.items())},
         "compiles": {str(k): v for k, v in sorted(compiles.items())}}
  if bounds is not None:
    out["bounds"] = list(bounds)
  return out


def run_claims(target: targets.Target, claims: list[str], layouts: list[str],
               smoke: bool, methods: list[str] | None = None,
               log: Any = print, out: dict[str, Any] | None = None,
               done: Any = lambda: None,
               batch_bounds: tuple[int, int] | None = None,
               batch_guess: int | None = None) -> dict[str, Any]:
  """All requested claims on ``target``: {claim: {layout: {method: ...}}}.

  Entries go into ``out`` (a new dict by default) as they finish, and
  ``done()`` is called after each (to save partial results).
  ``batch_bounds`` / ``batch_guess``: see :func:`largest_batch` (for every
  method of claim a).
  """
  out = {} if out is None else out
  n = 2 if smoke else 8
  for claim in claims:
    out.setdefault(claim, {})
    for layout in layouts:
      entry: dict[str, Any] = out[claim].setdefault(layout, {})
      if claim == "batch":
        config = _config("7b", remat=False, smoke=smoke)
        for method in methods or BATCH_METHODS:
          try:
            entry[method] = largest_batch(
                config, method, target, layout, n, limit=8 if smoke else 512,
                log=log, bounds=batch_bounds, guess=batch_guess)
          except Exception as e:  # pylint: disable=broad-except
            if smoke:
              raise
            entry[method] = {"error": repr(e)[:1000]}
            log(f"  {target.name} batch {layout} {method}: ERROR {e!r:.300}")
          done()
      else:
        config = _config("13b" if claim == "13b" else "7b", remat=True,
                         smoke=smoke)
        names = (["q_apollo_mini_layerwise"] if claim == "q7b"
                 else methods or ONE_DEVICE_METHODS)
        for method in names:
          devices = 1 if layout == "ddp" else n
          try:
            entry[method] = compile_step(config, method, target, devices,
                                         layout, 1)
          except Exception as e:  # pylint: disable=broad-except
            if smoke:
              raise
            entry[method] = {"error": repr(e)[:1000], "fits": False,
                             "compile_s": 0}
          log(f"  {target.name} {claim} {layout} {method}: "
              f"{entry[method].get('total_bytes', 0) / 1e9:.2f} GB "
              f"fits={entry[method]['fits']} ({entry[method]['compile_s']} s)")
          done()
  return out


# ----------------------------------------------------------------- report --


def _gb(entry: dict[str, Any]) -> str:
  if entry.get("oom"):
    needed = entry.get("total_bytes")
    return "OOM" + (f" ({common.gb(needed)})" if needed else "")
  if "error" in entry:
    return "error (see JSON)"
  mark = " †" if entry.get("source") == "log" else ""
  return common.gb(entry["total_bytes"]) + mark + ("" if entry["fits"]
                                                   else " ✗")


def report(results: dict[str, Any]) -> str:
  """Markdown tables of ``results`` (all targets side by side)."""
  names = list(results["targets"])
  labels = [results["targets"][t]["target"]["label"] for t in names]
  parts = []
  caps = ", ".join(
      f"{results['targets'][t]['target']['label']}: "
      f"{results['targets'][t]['target']['memory_bytes'] / 2**30:.4g} GiB"
      for t in names if results["targets"][t]["target"]["memory_bytes"])
  parts.append(
      "Per-device bytes from `memory_analysis()` of the step compiled by each "
      "target's compiler for compile-only devices (no hardware; nothing run). "
      "GB = 1e9 bytes. ✗ = more than the device memory; OOM = the compiler "
      f"refused it. Device memory: {caps}. XLA:GPU without a device does no "
      "autotuning: GEMMs are the compiler's default fusions and no cuBLAS "
      "workspace is counted; a real run adds the CUDA context and allocator "
      "fragmentation (a few hundred MB to a few GB). † = from the log "
      "line of a run stopped before it wrote its JSON (the total only, to "
      "10 MB; the log is kept in the JSON under `logs`).")

  def claim_rows(claim, layout, methods):
    rows = []
    for m in methods:
      row = [LABELS.get(m, m)]
      for t in names:
        entry = results["targets"][t]["claims"].get(claim, {}).get(
            layout, {}).get(m)
        row.append("—" if entry is None else _gb(entry))
      rows.append(row)
    return rows

  # Every claim, layout and method any target has, in order of appearance.
  first: dict[str, dict[str, dict[str, None]]] = {}
  for t in names:
    for claim, by_layout in results["targets"][t]["claims"].items():
      for layout, by_method in by_layout.items():
        first.setdefault(claim, {}).setdefault(layout, {}).update(
            dict.fromkeys(by_method))
  if "q7b" in first:
    for layout in first["q7b"]:
      where = ("one device" if layout == "ddp"
               else "FSDP over 8 devices, per device")
      parts.append(
          f"## (c) LLaMA-7B, Q-APOLLO-Mini + layer-wise, {where}\n\n"
          "Micro-batch 1, sequence 256, remat, bfloat16; int8 attention/MLP "
          "weights (group 128). Paper: under 12 GB.\n\n"
          + common.markdown_table(["method", *labels], claim_rows(
              "q7b", layout, ["q_apollo_mini_layerwise"])))
  if "13b" in first:
    for layout in first["13b"]:
      where = ("one 80 GB device (naive DDP: every device holds all of it)"
               if layout == "ddp" else "FSDP over 8 devices, per device")
      methods = list(first["13b"][layout])
      parts.append(
          f"## (b) LLaMA-13B, {where}\n\n"
          "Micro-batch 1, sequence 256, remat, bfloat16 weights and moments. "
          "Paper: 13B trains with naive DDP on A100-80GB with APOLLO.\n\n"
          + common.markdown_table(["method", *labels],
                                  claim_rows("13b", layout, methods)))
  if "batch" in first:
    for layout in first["batch"]:
      where = ("naive DDP (parameters and state replicated)"
               if layout == "ddp" else "FSDP (parameters and state sharded)")
      methods = list(first["batch"][layout])
      rows = []
      for m in methods:
        row = [LABELS.get(m, m)]
        for t in names:
          e = results["targets"][t]["claims"].get("batch", {}).get(
              layout, {}).get(m)
          if e is None or "error" in e:
            row.append("—" if e is None else "error (see JSON)")
            continue
          ref = results["targets"][t]["claims"]["batch"][layout].get("adamw")
          n = e["largest_micro_batch"]
          ratio = (f" ({n / ref['largest_micro_batch']:.2f}x)"
                   if ref and ref["largest_micro_batch"] else "")
          row.append(f"{n}{ratio}")
        row.append(str(PAPER_BATCH.get(m, "—")) if layout == "ddp" else "—")
        rows.append(row)
      parts.append(
          f"## (a) LLaMA-7B, largest micro-batch per device, 8 devices, "
          f"{where}\n\n"
          "Sequence 256, remat off, bfloat16. Found by compiling (the batch "
          "shown fits, one more does not; every compile is in the JSON). "
          "Ratio to AdamW in brackets. Paper (8xA100-80GB): AdamW 4, APOLLO "
          "16 (4x).\n\n"
          + common.markdown_table(["method", *labels, "paper (A100)"], rows))
  return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--targets", nargs="+", default=["h100", "a100",
                                                        "tpu_v5p"],
                      choices=list(targets.TARGETS))
  parser.add_argument("--claims", nargs="+", default=list(CLAIMS),
                      choices=CLAIMS)
  parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS),
                      choices=LAYOUTS)
  parser.add_argument("--methods", nargs="+", default=None,
                      choices=ONE_DEVICE_METHODS,
                      help="subset of methods (default: all of each claim)")
  parser.add_argument("--out-dir", default=str(common.RESULTS_DIR))
  parser.add_argument("--out-name", default="accel_claims")
  parser.add_argument("--merge", action="store_true",
                      help="add to an existing <out-name>.json instead of "
                      "replacing it (targets and claims run separately)")
  parser.add_argument("--report-from", nargs="+", default=None,
                      help="only merge these result JSONs (e.g. one per "
                      "target, run in parallel) into <out-name>")
  parser.add_argument("--batch-bounds", nargs=2, type=int, default=None,
                      metavar=("LO", "HI"),
                      help="claim a: micro-batch LO fits and HI does not "
                      "(compiled by an earlier run); search only between")
  parser.add_argument("--batch-guess", type=int, default=None, metavar="N",
                      help="claim a: first micro-batch to compile (default: "
                      "a line through batches 1 and 2, or bisection of "
                      "--batch-bounds)")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny model, CPU, 2 devices (for tests)")
  args = parser.parse_args(argv)
  if args.batch_bounds and not 1 <= args.batch_bounds[0] < args.batch_bounds[1]:
    parser.error(f"--batch-bounds: need 1 <= LO < HI, got {args.batch_bounds}")
  if args.smoke:
    args.targets = ["cpu"]
  json_path = pathlib.Path(args.out_dir) / f"{args.out_name}.json"
  results: dict[str, Any] = {"seq_len": SEQ_LEN, "targets": {}}
  if args.merge and json_path.exists():
    old = json.loads(json_path.read_text())
    results["targets"] = old.get("targets", {})
  if args.report_from:
    for path in args.report_from:
      text = pathlib.Path(path).read_text()
      if path.endswith(".log"):  # A stopped run's log lines.
        for tname, claims in entries_from_log(text).items():
          entry = results["targets"].setdefault(
              tname, {"target": targets.describe(targets.get(tname)),
                      "claims": {}})
          for claim, by_layout in claims.items():
            for layout, by_method in by_layout.items():
              entry["claims"].setdefault(claim, {}).setdefault(
                  layout, {}).update(by_method)
        results.setdefault("logs", []).append(text)
        continue
      old = json.loads(text)
      for tname, entry in old["targets"].items():
        mine = results["targets"].setdefault(
            tname, {"target": entry["target"], "claims": {}})
        for claim, by_layout in entry["claims"].items():
          for layout, by_method in by_layout.items():
            mine["claims"].setdefault(claim, {}).setdefault(
                layout, {}).update(by_method)
      results.setdefault("runs", []).append(old["metadata"])
    common.write_results(args.out_name, results, report(results),
                         args.out_dir)
    return results
  for name in args.targets:
    target = targets.get(name)
    reason = targets.missing_runtime(target)
    if reason:
      raise SystemExit(reason)
    entry = results["targets"].setdefault(name, {"claims": {}})
    entry["target"] = targets.describe(target)
    run_claims(target, args.claims, args.layouts, args.smoke, args.methods,
               log=lambda s: print(s, flush=True), out=entry["claims"],
               done=lambda: common.write_results(
                   args.out_name, results, report(results), args.out_dir),
               batch_bounds=(tuple(args.batch_bounds) if args.batch_bounds
                             else None),
               batch_guess=args.batch_guess)
  common.write_results(args.out_name, results, report(results), args.out_dir)
  return results


_LOG_LINE = re.compile(
    r"^\s+(\w+) (q7b|13b) (ddp|fsdp) (\w+): ([0-9.]+) GB fits=(True|False) "
    r"\(([0-9.]+) s\)")


_BATCH_LINE = re.compile(
    r"^\s+(\w+) (ddp|fsdp) (\w+) micro (\d+): ([0-9.]+) GB "
    r"fits=(True|False) \(([0-9.]+) s\)")


def entries_from_log(text: str) -> dict[str, Any]:
  """{target: {claim: {layout: {method: entry}}}} from a run's log lines.

  For runs stopped before they wrote their JSON: each logged line keeps the
  total (to 10 MB), the verdict and the compile time, marked
  ``"source": "log"``. A micro-batch search counts only once it is pinned
  (a fitting batch n and a failing n + 1 both logged).
  """
  out: dict[str, Any] = {}
  for line in text.splitlines():
    m = _BATCH_LINE.match(line)
    if m:
      target, layout, method, micro, gb, fits, secs = m.groups()
      entry = out.setdefault(target, {}).setdefault("batch", {}).setdefault(
          layout, {}).setdefault(method, {"compiles": {}, "tried": {},
                                          "source": "log"})
      entry["compiles"][micro] = {
          "total_bytes": int(round(float(gb) * 1e9)), "fits": fits == "True",
          "compile_s": float(secs), "source": "log"}
      entry["tried"][micro] = fits == "True"
      continue
    m = _LOG_LINE.match(line)
    if m:
      target, claim, layout, method, gb, fits, secs = m.groups()
      out.setdefault(target, {}).setdefault(claim, {}).setdefault(
          layout, {})[method] = {
              "total_bytes": int(round(float(gb) * 1e9)),
              "fits": fits == "True", "oom": False,
              "compile_s": float(secs), "source": "log"}
  for by_claim in out.values():
    for layout, by_method in list(by_claim.get("batch", {}).items()):
      for method, entry in list(by_method.items()):
        tried = {int(k): v for k, v in entry["tried"].items()}
        pinned = [n for n, ok in tried.items() if ok and tried.get(n + 1) is False]
        if pinned:
          entry["largest_micro_batch"] = max(pinned)
        else:
          del by_method[method]
  return out


if __name__ == "__main__":
  main()
