"""Pre-trains a LLaMA model with AdamW, APOLLO, APOLLO-Mini, GaLore or Adafactor.

Command line (``python -m apollo_lm.train --help``)::

  python -m apollo_lm.train --config tiny --optimizer apollo --steps 300 \\
      --batch-size 16 --seq-len 128 --out results/run

Python: ``train(args)`` with an ``argparse.Namespace``, a list of command-line
strings, or a dict of flag names (``{"optimizer": "apollo", "steps": 300}``;
``config_overrides`` sets model config fields). It returns a dict of results.

Design:

* Functional train step. ``nnx.split`` turns the model into a graph
  definition and a plain dict of parameters, so the parameters, the optimizer
  state and the batch are ordinary pytrees of (sharded) arrays passed to one
  ``jax.jit`` function that donates the old parameters and optimizer state.
  The output shardings are pinned to the input ones, so the layout never
  drifts between steps.
* Sharding: the parameters follow the model's annotations over the
  ``(data, fsdp, tensor)`` mesh of ``apollo_lm.sharding``; the optimizer state
  is initialised under ``jit`` and inherits them; the batch is split over
  ``("data", "fsdp")``.
* Gradient accumulation: ``--grad-accum A`` splits the global batch into
  ``A`` micro-batches and sums their gradients in a ``lax.scan`` inside the
  step, so every step is one optimizer update on the full batch (unlike
  ``optax.MultiSteps``, which would count micro-steps in the schedule and
  the APOLLO projection gap). Micro-batch ``a`` is global rows ``a, a + A,
  a + 2A, ...``, a partition that does not depend on the number of processes.
* Data position: the step. ``TokenBatches.batch(step)`` is pure in the step
  and C4 resumes from it, so a checkpoint (params, optimizer state, step)
  resumes a run bit-exactly.
* Multi-host: with ``--num-processes N`` (or ``JAX_COORDINATOR_ADDRESS`` in
  the environment) every process calls ``jax.distributed.initialize``, reads
  only its own rows of each global batch and contributes them with
  ``jax.make_array_from_process_local_data``.
* Memory: ``--layerwise`` runs :mod:`apollo_lm.layerwise`'s step, which
  updates each layer during the backward pass (one layer's gradient alive
  instead of the model's; the optimizer state is a ``LayerwiseState``), and
  ``--quantize-weights int8`` (Q-APOLLO, with ``--layerwise``) stores the
  attention and MLP kernels as int8 ``QuantizedArray`` leaves updated
  through ``apollo_optax.quantized_weights``; both checkpoint and resume
  bit-exactly.
* SIGTERM / Ctrl-C: the current step finishes, a checkpoint is written (with
  ``--checkpoint-dir``) and ``train`` returns normally with
  ``interrupted`` set.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import pathlib
import resource
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np
import optax
import tqdm

import apollo_optax
from apollo_lm import checkpoint as checkpoint_lib
from apollo_lm import configs
from apollo_lm import data as data_lib
from apollo_lm import layerwise
from apollo_lm import model as model_lib
from apollo_lm import optimizers
from apollo_lm import sharding as sharding_lib
from apollo_lm import steps

_BATCH_AXES = ("data", "fsdp")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_parser() -> argparse.ArgumentParser:
  """The command-line interface of ``python -m apollo_lm.train``."""
  p = argparse.ArgumentParser(
      prog="python -m apollo_lm.train",
      description=("Pre-train a LLaMA model (APOLLO paper setup: warm-up + "
                   "cosine to 10%% of the peak lr) on a local corpus or C4."),
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  model = p.add_argument_group("model")
  model.add_argument("--config", default="tiny",
                     help=f"model size: {', '.join(configs.CONFIG_NAMES)}")
  model.add_argument(
      "--model-override", action="append", default=[], metavar="FIELD=VALUE",
      help="override a LlamaConfig field, e.g. hidden_size=64 (repeatable)")
  model.add_argument(
      "--dtype", default="auto", choices=("auto", *_DTYPES),
      help="compute dtype; auto: float32 on CPU (bfloat16 matmuls are "
      "emulated and slow there), bfloat16 on accelerators")
  model.add_argument("--remat", action="store_true",
                     help="rematerialise each block in the backward pass")

  opt = p.add_argument_group("optimizer (defaults: apollo_lm.optimizers)")
  opt.add_argument("--optimizer", default="apollo",
                   help=f"one of {', '.join(optimizers.OPTIMIZER_NAMES)}")
  opt.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: per optimizer)")
  opt.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up steps (default: 10%% of --steps)")
  opt.add_argument("--rank", type=int, default=None,
                   help="apollo/galore rank (default: min(hidden_size // 4, 256))")
  opt.add_argument("--scale", type=float, default=None,
                   help="apollo/apollo_mini/galore scale (default: per "
                   "optimizer)")
  opt.add_argument("--scale-type", default=None,
                   choices=optimizers.SCALE_TYPES,
                   help="apollo scaling granularity (ablation; default: "
                   "channel for apollo, tensor for apollo_mini)")
  opt.add_argument("--projection", default=None,
                   choices=optimizers.PROJECTIONS,
                   help="apollo/apollo_mini projection (ablation; default: "
                   "gaussian)")
  opt.add_argument("--no-limiter", dest="limiter", action="store_false",
                   help="turn apollo's norm-growth limiter off (ablation)")
  opt.add_argument("--non-lowrank-lr", type=float, default=None,
                   help="peak lr of the embedding, head and norms (default: "
                   "--lr); the official APOLLO code gives them APOLLO's lr")
  opt.add_argument("--weight-decay", type=float, default=0.0)
  opt.add_argument("--grad-clip", type=float, default=None,
                   help="clip the global gradient norm to this")

  memory = p.add_argument_group(
      "memory (layer-wise updates, Q-APOLLO; apollo_lm.layerwise)")
  memory.add_argument(
      "--layerwise", action="store_true",
      help="update each layer during the backward pass, as soon as its "
      "gradient exists: only one layer's gradient is held instead of the "
      "whole model's (LLaMA-7B: saves about 13.5 GB of bfloat16 gradients). "
      "Same updates as without it (adafactor: its update clipping becomes "
      "per layer); works on any --mesh and with checkpoints. Not with "
      "--grad-clip (needs the whole gradient's norm) or --grad-accum > 1; "
      "grad_norm is not logged")
  memory.add_argument(
      "--quantize-weights", default="none", choices=("none", "int8"),
      help="int8: Q-APOLLO, attention and MLP kernels stored in int8 with "
      "one scale per --quant-group-size input rows, re-quantized with "
      "stochastic rounding after each update (LLaMA-7B: 6.7 GB of int8 "
      "kernels and scales, all parameters 7.2 GB instead of 13.5 GB in "
      "bfloat16); needs --layerwise")
  memory.add_argument(
      "--quant-group-size", type=int, default=128,
      help="input rows per int8 scale; must divide the input dimension of "
      "every kernel (hidden_size, intermediate_size)")

  run = p.add_argument_group("run")
  run.add_argument("--steps", type=int, default=300, help="optimizer updates")
  run.add_argument("--batch-size", type=int, default=16,
                   help="global batch size (sequences per update)")
  run.add_argument("--seq-len", type=int, default=256)
  run.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per update (scan in the step)")
  run.add_argument("--seed", type=int, default=0,
                   help="seeds the model init, data order and projections")
  run.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="persistent XLA compilation cache: later runs with "
                   "the same shapes and settings skip compilation")
  run.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                   help="device mesh over the devices used (default: all of "
                   "them on data)")
  run.add_argument("--num-devices", type=int, default=None,
                   help="use only the first N devices (default: all, which "
                   "multi-process runs need)")

  data = p.add_argument_group("data")
  data.add_argument("--data", nargs="+", default=None, metavar="PATH",
                    help="text files/directories (default: the Python "
                    "standard library's sources)")
  data.add_argument("--vocab-size", type=int, default=8192,
                    help="BPE vocabulary trained on --data (not used by --c4)")
  data.add_argument("--c4", action="store_true",
                    help="train on C4 (allenai/c4 streamed, or --c4-files)")
  data.add_argument("--c4-files", nargs="+", default=None, metavar="JSON_GZ",
                    help="local C4-format *.json.gz train files")
  data.add_argument("--c4-eval-files", nargs="+", default=None,
                    metavar="JSON_GZ", help="local C4-format held-out files "
                    "(default: the validation split when streaming; no "
                    "evaluation with --c4-files alone)")
  data.add_argument("--hf-tokenizer", default="t5-base",
                    help="tokenizer for --c4: a tokenizer.json path or a "
                    "Hugging Face Hub name")

  out = p.add_argument_group("evaluation, logging, checkpoints")
  out.add_argument("--eval-every", type=int, default=100,
                   help="evaluate every this many steps (0: only at the end)")
  out.add_argument("--eval-batches", type=int, default=8,
                   help="held-out batches per evaluation (0: no evaluation)")
  out.add_argument("--out", default=None, metavar="DIR",
                   help="write metrics.jsonl (and TensorBoard events if "
                   "tensorboardX is installed) here")
  out.add_argument("--checkpoint-dir", default=None, metavar="DIR")
  out.add_argument("--checkpoint-every", type=int, default=0,
                   help="save every this many steps (0: only at the end and "
                   "on SIGTERM/Ctrl-C)")
  out.add_argument("--stop-at-step", type=int, default=None,
                   help="stop (with a checkpoint) after this many updates, "
                   "as if preempted; the schedule still spans --steps")
  out.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in "
                   "--checkpoint-dir")
  out.add_argument("--no-progress", action="store_true",
                   help="no progress bar")

  dist = p.add_argument_group("multi-process (one process per host)")
  dist.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                    help="coordinator address (or $JAX_COORDINATOR_ADDRESS)")
  dist.add_argument("--num-processes", type=int, default=None)
  dist.add_argument("--process-id", type=int, default=None)
  return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Parses command-line flags (``sys.argv[1:]`` when ``argv`` is None)."""
  return build_parser().parse_args(argv)


def _as_namespace(args: argparse.Namespace | Mapping[str, Any]
                  | Sequence[str] | None) -> argparse.Namespace:
  """Flag values from a Namespace, a dict of flag names, or argv strings."""
  if isinstance(args, argparse.Namespace):
    return args
  if args is None or (isinstance(args, Sequence) and not isinstance(args, str)):
    namespace = parse_args(list(args or []))
    namespace.config_overrides = {}
    return namespace
  namespace = parse_args([])
  namespace.config_overrides = {}
  for key, value in args.items():
    key = key.replace("-", "_")
    if not hasattr(namespace, key):
      raise ValueError(
          f"train: unknown option {key!r}; options are "
          f"{sorted(vars(namespace))}.")
    setattr(namespace, key, value)
  return namespace


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Mesh and batch geometry of a run, validated against the devices."""

  mesh: jax.sharding.Mesh
  batch_size: int
  grad_accum: int
  seq_len: int
  process_index: int
  process_count: int

  @property
  def micro_batch(self) -> int:
    return self.batch_size // self.grad_accum

  @property
  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec(None, _BATCH_AXES, None))


def _maybe_initialize_distributed(args: argparse.Namespace) -> None:
  """``jax.distributed.initialize`` when launched as several processes."""
  coordinator = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
  wanted = coordinator is not None or (args.num_processes or 1) > 1
  if not wanted or jax.distributed.is_initialized():
    return
  # Cross-process collectives of the CPU backend (a no-op elsewhere).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=coordinator, num_processes=args.num_processes,
      process_id=args.process_id)


def _devices(num_devices: int | None) -> list[jax.Device]:
  devices = jax.devices()
  if num_devices is None:
    return devices
  if not 1 <= num_devices <= len(devices):
    raise ValueError(
        f"--num-devices: must be in [1, {len(devices)}], got {num_devices}.")
  return devices[:num_devices]


def _parse_mesh(spec: str | None, num_devices: int) -> tuple[int, int, int]:
  if spec is None:
    return num_devices, 1, 1
  try:
    sizes = tuple(int(s) for s in spec.split(","))
  except ValueError:
    sizes = ()
  if len(sizes) != 3 or min(sizes) < 1:
    raise ValueError(
        f"--mesh: expected three positive ints DATA,FSDP,TENSOR, got "
        f"{spec!r}.")
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"--mesh: {spec} multiplies to {math.prod(sizes)}, but {num_devices} "
        "devices are used; DATA*FSDP*TENSOR must equal the device count.")
  return sizes


def _make_layout(args: argparse.Namespace) -> _Layout:
  """Checks the mesh and batch flags and builds the mesh."""
  devices = _devices(args.num_devices)
  data, fsdp, tensor = _parse_mesh(args.mesh, len(devices))
  for flag, value in (("--batch-size", args.batch_size),
                      ("--grad-accum", args.grad_accum),
                      ("--seq-len", args.seq_len),
                      ("--steps", args.steps)):
    if value < 1:
      raise ValueError(f"{flag}: must be >= 1, got {value}.")
  if args.batch_size % args.grad_accum:
    raise ValueError(
        f"--batch-size: {args.batch_size} is not divisible by --grad-accum "
        f"{args.grad_accum}.")
  micro = args.batch_size // args.grad_accum
  if micro % (data * fsdp):
    raise ValueError(
        f"--batch-size: each of the {args.grad_accum} micro-batch(es) has "
        f"{micro} sequences, not divisible by the data-parallel size "
        f"data*fsdp = {data * fsdp}; use a multiple of "
        f"{data * fsdp * args.grad_accum}.")
  count = jax.process_count()
  if args.batch_size % (count * args.grad_accum):
    raise ValueError(
        f"--batch-size: {args.batch_size} must be divisible by the number of "
        f"processes times --grad-accum, {count} * {args.grad_accum}.")
  return _Layout(
      mesh=sharding_lib.make_mesh(data, fsdp, tensor, devices),
      batch_size=args.batch_size, grad_accum=args.grad_accum,
      seq_len=args.seq_len, process_index=jax.process_index(),
      process_count=count)


def _check_warmup(args: argparse.Namespace) -> int:
  warmup = (args.steps // 10 if args.warmup_steps is None
            else args.warmup_steps)
  if not 0 <= warmup < args.steps:
    raise ValueError(
        f"--warmup-steps: must be in [0, --steps={args.steps}), got {warmup}.")
  return warmup


def _check_memory_flags(args: argparse.Namespace) -> None:
  """Refuses combinations of --layerwise / --quantize-weights it cannot run."""
  if args.quantize_weights not in ("none", "int8"):
    raise ValueError(
        f"--quantize-weights: expected none or int8, got "
        f"{args.quantize_weights!r}.")
  if args.quantize_weights != "none" and not args.layerwise:
    raise ValueError(
        "--quantize-weights: int8 weights need --layerwise; the ordinary "
        "step would hold the whole model's dequantized gradient, which costs "
        "more memory than the int8 weights save.")
  if args.layerwise:
    layerwise.check_layerwise_options(grad_clip=args.grad_clip,
                                      grad_accum=args.grad_accum)


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
  """``["hidden_size=64", "norm_eps=1e-5"]`` -> ``{"hidden_size": 64, ...}``.

  Values are read as JSON (numbers, ``true``/``false``), else kept as strings.
  """
  overrides = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(
          f"--model-override: expected FIELD=VALUE, got {item!r}.")
    try:
      overrides[key] = json.loads(value)
    except json.JSONDecodeError:
      overrides[key] = value
  return overrides


# ---------------------------------------------------------------------------
# Data.


@dataclasses.dataclass
class _Data:
  """Where batches come from: ``batch(step)`` and fixed eval batches."""

  train_batches: Iterator[data_lib.Batch] | data_lib.TokenBatches
  eval_batches: list[data_lib.Batch]
  vocab_size: int
  description: str

  def batches_from(self, step: int) -> Iterator[data_lib.Batch]:
    if isinstance(self.train_batches, data_lib.TokenBatches):
      return self.train_batches.iterate(step)
    return self.train_batches


def _load_tokenizer(name: str):
  import tokenizers  # pylint: disable=g-import-not-at-top
  if os.path.isfile(name):
    return tokenizers.Tokenizer.from_file(name)
  try:
    return tokenizers.Tokenizer.from_pretrained(name)
  except Exception as e:  # Any hub/network failure; name the flag.
    raise ValueError(
        f"--hf-tokenizer: {name!r} is neither a tokenizer.json file nor a "
        f"loadable Hugging Face Hub tokenizer ({e}).") from e


def _load_data(args: argparse.Namespace, layout: _Layout,
               start_step: int) -> _Data:
  """Opens the corpus named by the flags at data position ``start_step``."""
  local = dict(process_index=layout.process_index,
               process_count=layout.process_count)
  eval_size = layout.micro_batch
  if args.c4:
    for path in (args.c4_files or []) + (args.c4_eval_files or []):
      if not os.path.isfile(path):
        raise ValueError(f"--c4-files: {path}: no such file.")
    tokenizer = _load_tokenizer(args.hf_tokenizer)
    train = data_lib.c4_batches(
        tokenizer, layout.batch_size, layout.seq_len,
        data_files=args.c4_files, start_step=start_step, **local)
    eval_batches = []
    if args.eval_batches and (args.c4_eval_files or not args.c4_files):
      stream = data_lib.c4_batches(
          tokenizer, eval_size, layout.seq_len, split="validation",
          data_files=args.c4_eval_files, **local)
      eval_batches = [b for _, b in zip(range(args.eval_batches), stream)]
    source = ", ".join(args.c4_files) if args.c4_files else "allenai/c4 (en)"
    return _Data(train, eval_batches, tokenizer.get_vocab_size(),
                 f"C4 from {source}, tokenizer {args.hf_tokenizer}")
  try:
    corpus = data_lib.load_corpus(args.data, vocab_size=args.vocab_size)
  except (OSError, ValueError) as e:
    raise ValueError(f"--data: {e}") from e
  try:
    train = corpus.batches(layout.batch_size, layout.seq_len, seed=args.seed,
                           **local)
    eval_batches = (corpus.eval_batches(args.eval_batches, eval_size,
                                        layout.seq_len, **local)
                    if args.eval_batches else [])
  except ValueError as e:
    raise ValueError(f"--data: corpus too small for these flags: {e}") from e
  return _Data(train, eval_batches, corpus.vocab_size, corpus.description)


def _global_batch(batch: data_lib.Batch, layout: _Layout) -> steps.Batch:
  """This process's rows -> global ``(A, B / A, T)`` arrays over the mesh.

  Local row ``i`` goes to micro-batch ``i % A``: with every process holding
  a multiple of ``A`` consecutive global rows, micro-batch ``a`` is global
  rows ``a, a + A, ...`` whatever the number of processes.
  """
  a = layout.grad_accum
  shape = (a, layout.micro_batch, layout.seq_len)

  def put(rows: np.ndarray) -> jax.Array:
    local = rows.reshape(-1, a, layout.seq_len).swapaxes(0, 1)
    return jax.make_array_from_process_local_data(
        layout.batch_sharding, np.ascontiguousarray(local), shape)

  return steps.Batch(put(batch[0]), put(batch[1]))


# ---------------------------------------------------------------------------
# Steps.


def _make_steps(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                param_shardings: Any, opt_shardings: Any, layout: _Layout,
                config: configs.LlamaConfig, layer_wise: bool):
  """The jitted :mod:`apollo_lm.steps` ``train_step`` and ``eval_step``.

  Both take a ``steps.Batch`` of ``(A, B / A, T)`` arrays (``A`` =
  ``--grad-accum``; 1 with ``layer_wise`` and for evaluation).
  """
  if layer_wise:
    step_fn = steps.make_layerwise_train_step(config, tx)

    def train_step(params, opt_state, batch):
      return step_fn(params, opt_state, jax.tree.map(lambda x: x[0], batch))

    compiler_options = layerwise.compiler_options()
  else:
    train_step = steps.make_train_step(graphdef, tx,
                                       grad_accum=layout.grad_accum)
    compiler_options = None

  train_step = jax.jit(
      train_step, donate_argnums=(0, 1),
      out_shardings=(param_shardings, opt_shardings, None),
      compiler_options=compiler_options)
  eval_fn = steps.make_eval_step(graphdef, config.param_dtype)
  eval_step = jax.jit(
      lambda params, batch: eval_fn(params,
                                    jax.tree.map(lambda x: x[0], batch)))
  return train_step, eval_step


def _evaluate(eval_step, params, batches: Sequence[data_lib.Batch],
              layout: _Layout) -> float:
  """Held-out loss: the token-weighted mean of the batches' losses.

  Each batch's mean is taken in float32 (as the step's loss), and batches of
  equal token counts are averaged plainly, which keeps the committed
  pre-training results bit-identical.
  """
  eval_layout = dataclasses.replace(layout, batch_size=layout.micro_batch,
                                    grad_accum=1)
  sums, counts = zip(*(eval_step(params, _global_batch(b, eval_layout))
                       for b in batches))
  counts = np.array([float(c) for c in counts])
  means = [float(np.float32(s) / np.float32(c)) for s, c in zip(sums, counts)]
  if np.all(counts == counts[0]):
    return float(np.mean(means))
  return float(np.average(means, weights=counts))


def memory_in_use() -> tuple[int, str]:
  """(bytes, what): device 0's bytes in use, else this process's peak RSS."""
  stats = jax.local_devices()[0].memory_stats()
  if stats and "bytes_in_use" in stats:
    return int(stats["bytes_in_use"]), "device"
  # Linux reports ru_maxrss in KiB.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_rss"


# ---------------------------------------------------------------------------
# Logging and signals.


class _MetricsWriter:
  """metrics.jsonl (and TensorBoard, if available) under ``--out``."""

  def __init__(self, out: str | None, enabled: bool):
    self._file = None
    self._tb = None
    if out is None or not enabled:
      return
    directory = pathlib.Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    self._file = open(directory / "metrics.jsonl", "a", encoding="utf-8")
    try:
      import tensorboardX  # pylint: disable=g-import-not-at-top
    except ImportError:
      return
    self._tb = tensorboardX.SummaryWriter(str(directory / "tensorboard"))

  def write(self, record: dict[str, Any]) -> None:
    if self._file is not None:
      self._file.write(json.dumps(record) + "\n")
      self._file.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
          self._tb.add_scalar(key, value, record["step"])

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[dict[str, Any]]:
  """Yields a dict whose ``"signal"`` is set by SIGTERM/SIGINT meanwhile.

  Handlers can only be installed from the main thread; elsewhere (e.g. a
  training thread of a notebook) signals keep their default behaviour.
  """
  flag: dict[str, Any] = {"signal": None}
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return

  def handler(signum, frame):
    del frame
    flag["signal"] = signal.Signals(signum).name

  previous = {s: signal.signal(s, handler)
              for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield flag
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


# ---------------------------------------------------------------------------
# The run.


def train(args: argparse.Namespace | Mapping[str, Any] | Sequence[str]
          | None = None) -> dict[str, Any]:
  """Runs (or resumes) a pre-training run; see ``--help`` for the options.

  Args:
    args: Flags as a Namespace (from :func:`parse_args`), a dict of flag
      names with underscores (plus ``config_overrides``, a dict of model
      config fields), or a list of command-line strings.

  Returns:
    A dict with ``optimizer``, ``config``, ``hparams``, ``step`` (updates
    done in total), ``start_step``, ``losses`` (train loss of each step run
    by this call), ``eval_loss``/``eval_ppl`` (last evaluation, None if
    none), ``eval_history``, ``state_bytes`` (optimizer state,
    ``apollo_optax.state_bytes``), ``param_count``, ``tokens_per_s``
    (excluding the first, compiling step and evaluations), ``memory_bytes``,
    ``wall_time_s``, ``interrupted`` (signal name or None), ``checkpoint``.

  Raises:
    ValueError: a flag is invalid; the message names it.
  """
  args = _as_namespace(args)
  wall_start = time.perf_counter()
  if args.config not in configs.CONFIG_NAMES:
    raise ValueError(
        f"--config: unknown config {args.config!r}; allowed: "
        f"{', '.join(configs.CONFIG_NAMES)}.")
  optimizers.check_name(args.optimizer, flag="--optimizer")
  if args.resume and not args.checkpoint_dir:
    raise ValueError("--resume: needs --checkpoint-dir.")
  overrides = dict(getattr(args, "config_overrides", None) or {})
  overrides.update(_parse_overrides(args.model_override))
  warmup = _check_warmup(args)
  _check_memory_flags(args)
  last_step = args.steps if args.stop_at_step is None else args.stop_at_step
  if not 1 <= last_step <= args.steps:
    raise ValueError(
        f"--stop-at-step: must be in [1, --steps={args.steps}], got "
        f"{last_step}.")

  _maybe_initialize_distributed(args)
  if args.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
  layout = _make_layout(args)
  is_main = layout.process_index == 0

  checkpointer = None
  start_step = 0
  if args.checkpoint_dir:
    checkpointer = checkpoint_lib.Checkpointer(
        args.checkpoint_dir,
        save_interval_steps=args.checkpoint_every or args.steps)
    if args.resume:
      start_step = checkpointer.latest_step()
      if start_step is None:
        raise ValueError(
            f"--resume: no checkpoint in --checkpoint-dir "
            f"{args.checkpoint_dir}.")

  data = _load_data(args, layout, start_step)
  dtype = args.dtype
  if dtype == "auto":
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  overrides.setdefault("vocab_size", data.vocab_size)
  overrides.setdefault("max_seq_len", args.seq_len)
  overrides.setdefault("dtype", _DTYPES[dtype])
  overrides.setdefault("remat", args.remat)
  config = configs.get_config(args.config, **overrides)

  model = sharding_lib.create_sharded(
      lambda: model_lib.Llama(config, rngs=nnx.Rngs(args.seed)), layout.mesh)
  graphdef, state = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(state)
  del model, state
  param_count = sum(x.size for x in jax.tree.leaves(params))
  if args.quantize_weights == "int8":
    try:
      params = layerwise.quantize_llama_params(params, args.quant_group_size)
    except ValueError as e:
      raise ValueError(f"--quant-group-size: {e}") from e

  ablation = dict(scale_type=args.scale_type, projection=args.projection,
                  limiter=args.limiter)
  try:
    hparams = optimizers.resolve_hparams(
        args.optimizer, config, learning_rate=args.lr, rank=args.rank,
        scale=args.scale, **ablation)
    tx = optimizers.make_optimizer(
        args.optimizer, learning_rate=args.lr, total_steps=args.steps,
        warmup_steps=warmup, config=config, rank=args.rank, scale=args.scale,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        seed=args.seed, non_lowrank_lr=args.non_lowrank_lr, **ablation)
  except ValueError as e:
    # The optimizer code names its arguments; the CLI names the flags.
    option, _, message = str(e).partition(":")
    flag = "no-limiter" if option == "limiter" else option.replace("_", "-")
    raise ValueError(f"--{flag}:{message}") from e
  if args.quantize_weights == "int8":
    tx = apollo_optax.quantized_weights(tx, key=jax.random.key(args.seed))
  schedule = optimizers.make_schedule(hparams["learning_rate"], args.steps,
                                      warmup)
  init = (functools.partial(layerwise.init_layerwise_state, tx)
          if args.layerwise else tx.init)
  with jax.set_mesh(layout.mesh):
    opt_state = jax.jit(init)(params)
  param_shardings = jax.tree.map(lambda x: x.sharding, params)
  opt_shardings = jax.tree.map(lambda x: x.sharding, opt_state)
  if start_step:
    params, opt_state, _ = checkpointer.restore(start_step, params, opt_state)

  train_step, eval_step = _make_steps(graphdef, tx, param_shardings,
                                      opt_shardings, layout, config,
                                      args.layerwise)
  tokens_per_step = layout.batch_size * layout.seq_len
  state_bytes = apollo_optax.state_bytes(opt_state)
  writer = _MetricsWriter(args.out, enabled=is_main)
  log = ((lambda msg: tqdm.tqdm.write(msg, file=sys.stderr)) if is_main
         else (lambda msg: None))
  log(f"{args.optimizer} on {config.name} ({param_count:,} params, "
      f"{dtype}), optimizer state {state_bytes:,} B, hparams {hparams}; "
      f"{data.description}; mesh {dict(layout.mesh.shape)}, "
      f"{jax.process_count()} process(es); steps {start_step}->{args.steps}")

  losses: list[float] = []
  eval_history: list[dict[str, float]] = []
  train_time, timed_steps = 0.0, 0
  interrupted = None
  step = start_step
  progress = tqdm.tqdm(total=args.steps, initial=start_step, unit="step",
                       disable=args.no_progress or not is_main,
                       dynamic_ncols=True)

  def run_eval() -> None:
    if not data.eval_batches:
      return
    with jax.set_mesh(layout.mesh):
      loss = _evaluate(eval_step, params, data.eval_batches, layout)
    record = {"step": step, "eval_loss": loss, "eval_ppl": math.exp(loss)}
    eval_history.append(record)
    writer.write(record)
    log(f"step {step}: eval loss {loss:.4f}, ppl {math.exp(loss):.2f}")

  try:
    with _stop_on_signals() as stop, jax.set_mesh(layout.mesh):
      batches = data.batches_from(start_step)
      while step < last_step:
        batch = _global_batch(next(batches), layout)
        t0 = time.perf_counter()
        params, opt_state, metrics = train_step(params, opt_state, batch)
        loss = float(metrics["loss"])
        if step > start_step:  # The first step of a call compiles.
          train_time += time.perf_counter() - t0
          timed_steps += 1
        step += 1
        losses.append(loss)
        tokens_per_s = (timed_steps * tokens_per_step / train_time
                        if train_time else None)
        memory, _ = memory_in_use()
        writer.write({
            "step": step, "loss": loss,
            "grad_norm": (float(metrics["grad_norm"])
                          if "grad_norm" in metrics else None),
            "lr": float(schedule(step - 1)), "tokens_per_s": tokens_per_s,
            "memory_bytes": memory})
        progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s or 0:.0f}",
                             mem=f"{memory / 2**20:.0f}MiB", refresh=False)
        progress.update()
        if args.eval_every and step % args.eval_every == 0 \
            and step < args.steps:
          run_eval()
        if checkpointer is not None and step < args.steps:
          checkpointer.save(step, params, opt_state,
                            metadata={"optimizer": args.optimizer})
        if stop["signal"] is not None:
          interrupted = stop["signal"]
          log(f"{interrupted} at step {step}: saving a checkpoint and "
              "stopping.")
          break
    if interrupted is None and step == args.steps:
      run_eval()
    if checkpointer is not None and checkpointer.latest_step() != step:
      checkpointer.save(step, params, opt_state, force=True,
                        metadata={"optimizer": args.optimizer})
  finally:
    progress.close()
    writer.close()
    if checkpointer is not None:
      checkpointer.close()

  last_eval = eval_history[-1] if eval_history else {}
  return {
      "optimizer": args.optimizer,
      "config": dataclasses.asdict(config) | {
          "dtype": dtype, "param_dtype": jnp.dtype(config.param_dtype).name},
      "hparams": hparams | {"warmup_steps": warmup, "total_steps": args.steps,
                            "non_lowrank_lr": args.non_lowrank_lr,
                            "weight_decay": args.weight_decay,
                            "grad_clip": args.grad_clip,
                            "layerwise": args.layerwise,
                            "quantize_weights": args.quantize_weights,
                            "quant_group_size": args.quant_group_size},
      "step": step,
      "start_step": start_step,
      "losses": losses,
      "eval_loss": last_eval.get("eval_loss"),
      "eval_ppl": last_eval.get("eval_ppl"),
      "eval_history": eval_history,
      "state_bytes": state_bytes,
      "param_count": param_count,
      "tokens_per_s": (timed_steps * tokens_per_step / train_time
                       if train_time else None),
      "memory_bytes": memory_in_use()[0],
      "wall_time_s": time.perf_counter() - wall_start,
      "interrupted": interrupted,
      "checkpoint": str(checkpointer.directory) if checkpointer else None,
  }


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; flag errors exit with status 2."""
  parser = build_parser()
  args = parser.parse_args(argv)
  args.config_overrides = {}
  try:
    result = train(args)
  except ValueError as e:
    if not str(e).startswith("--"):
      raise
    parser.error(str(e))
  if jax.process_index() == 0:
    summary = {k: v for k, v in result.items()
               if k not in ("losses", "eval_history", "config")}
    print(json.dumps(summary, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
