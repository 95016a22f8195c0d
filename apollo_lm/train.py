"""Pre-trains a LLaMA model with AdamW, APOLLO, APOLLO-Mini, GaLore or Adafactor.

Command line (``python -m apollo_lm.train --help``)::

  python -m apollo_lm.train --config tiny --optimizer apollo --steps 300 \\
      --batch-size 16 --seq-len 128 --out results/run

Python::

  from apollo_lm.run_config import TrainConfig
  from apollo_lm.train import train_and_evaluate
  result = train_and_evaluate(TrainConfig(optimizer="apollo", steps=300))
  result.eval_loss, result.to_json()

This module is the loop only: data -> step -> evaluation -> checkpoint ->
metrics. The options are :class:`apollo_lm.run_config.TrainConfig` (command line:
:mod:`apollo_lm.cli`), the steps :mod:`apollo_lm.steps`, the mesh and batch
layout :mod:`apollo_lm.geometry`, signals and multi-process start
:mod:`apollo_lm.runtime`, the metrics file and the typed result
:mod:`apollo_lm.metrics`.

Design:

* Functional step. ``nnx.split`` turns the model into a graph definition and
  a plain dict of parameters; parameters, optimizer state and batch are
  pytrees of (sharded) arrays passed to one ``jax.jit`` function that donates
  the old parameters and state, with output shardings pinned to the inputs'.
* Sharding: the parameters follow the model's annotations over the
  ``(data, fsdp, tensor)`` mesh; the optimizer state is initialised under
  ``jit`` and inherits them; the batch is split over ``("data", "fsdp")``.
* Gradient accumulation: ``--grad-accum A`` averages ``A`` micro-batch
  gradients inside the step (:func:`apollo_lm.steps.make_train_step`);
  micro-batch ``a`` is global rows ``a, a + A, ...``.
* Data position: the step. ``TrainBatches.batches_from(step)`` is pure in the
  step, so a checkpoint (params, optimizer state, step) resumes bit-exactly.
  The run's options are saved with every checkpoint; ``--resume`` with a
  different structural option (model, optimizer, rank, ...) is refused,
  naming each differing flag.
* Multi-host: with ``--num-processes N`` (or ``JAX_COORDINATOR_ADDRESS``)
  every process reads only its own rows of each global batch.
* Memory: ``--layerwise`` (one layer's gradient alive at a time) and
  ``--quantize-weights int8`` (Q-APOLLO) with :mod:`apollo_lm.layerwise`.
* SIGTERM / Ctrl-C: the current step finishes, a checkpoint is written (with
  ``--checkpoint-dir``) and the result has ``interrupted`` set.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

import apollo_optax
from apollo_lm import checkpoint as checkpoint_lib
from apollo_lm import cli
from apollo_lm import configs
from apollo_lm import data as data_lib
from apollo_lm import geometry as geometry_lib
from apollo_lm import layerwise
from apollo_lm import metrics as metrics_lib
from apollo_lm import model as model_lib
from apollo_lm import optimizers
from apollo_lm import runtime
from apollo_lm import sharding as sharding_lib
from apollo_lm import steps
from apollo_lm import tokenizer as tokenizer_lib
from apollo_lm.batch import Batch
from apollo_lm.run_config import resume_mismatches
from apollo_lm.run_config import TrainConfig
from apollo_lm.errors import ConfigError
from apollo_lm.metrics import TrainResult

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

build_parser = cli.build_parser  # The command line, for --help and tests.


# ---------------------------------------------------------------------------
# Data and model.


@dataclasses.dataclass(frozen=True)
class RunData:
  """Where batches come from: resumable train batches, fixed eval batches."""

  train: data_lib.TrainBatches
  eval_batches: list[Batch]
  vocab_size: int
  description: str


def _load_tokenizer(name: str):
  try:
    return tokenizer_lib.load_tokenizer(name, encode_special_tokens=False)
  except ValueError as e:
    raise ConfigError("--hf-tokenizer", str(e)) from e


def load_data(config: TrainConfig, geometry: geometry_lib.Geometry) -> RunData:
  """Opens the corpus named by ``config`` (local files or C4)."""
  local = dict(process_index=geometry.process_index,
               process_count=geometry.process_count)
  eval_size = geometry.micro_batch
  if config.c4:
    tokenizer = _load_tokenizer(config.hf_tokenizer)
    # `datasets` takes a list (not a tuple) of data files.
    files, eval_files = (list(f) if f else None
                         for f in (config.c4_files, config.c4_eval_files))
    train = data_lib.C4Batches(tokenizer, geometry.batch_size,
                               geometry.seq_len, data_files=files, **local)
    eval_batches = []
    if config.eval_batches and (eval_files or not files):
      stream = data_lib.c4_batches(
          tokenizer, eval_size, geometry.seq_len, split="validation",
          data_files=eval_files, **local)
      eval_batches = [b for _, b in zip(range(config.eval_batches), stream)]
    source = (", ".join(config.c4_files) if config.c4_files
              else "allenai/c4 (en)")
    return RunData(train, eval_batches, tokenizer.get_vocab_size(),
                   f"C4 from {source}, tokenizer {config.hf_tokenizer}")
  try:
    corpus = data_lib.load_corpus(config.data, eval_paths=config.eval_data,
                                  vocab_size=config.vocab_size)
  except (OSError, ValueError) as e:
    raise ConfigError("--data", str(e)) from e
  try:
    train = corpus.batches(geometry.batch_size, geometry.seq_len,
                           seed=config.seed, **local)
    eval_batches = (corpus.eval_batches(config.eval_batches, eval_size,
                                        geometry.seq_len, **local)
                    if config.eval_batches else [])
  except ValueError as e:
    raise ConfigError("--data", f"corpus too small for these options: {e}"
                      ) from e
  return RunData(train, eval_batches, corpus.vocab_size, corpus.description)


def build_model(config: TrainConfig, llama: configs.LlamaConfig,
                geometry: geometry_lib.Geometry) -> tuple[nnx.GraphDef, Any]:
  """(graphdef, sharded plain-dict params), int8 kernels with Q-APOLLO."""
  model = sharding_lib.create_sharded(
      lambda: model_lib.Llama(llama, rngs=nnx.Rngs(config.seed)),
      geometry.mesh)
  graphdef, state = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(state)
  if config.quantize_weights == "int8":
    try:
      params = layerwise.quantize_llama_params(params,
                                               config.quant_group_size)
    except ValueError as e:
      raise ConfigError("--quant-group-size", str(e)) from e
  return graphdef, params


def _llama_config(config: TrainConfig, vocab_size: int) -> configs.LlamaConfig:
  overrides = config.model_overrides()
  overrides.setdefault("vocab_size", vocab_size)
  overrides.setdefault("max_seq_len", config.seq_len)
  overrides.setdefault("dtype", DTYPES[config.compute_dtype_name])
  overrides.setdefault("remat", config.remat)
  return configs.get_config(config.model, **overrides)


def _optimizer(config: TrainConfig, llama: configs.LlamaConfig):
  """(tx, resolved hyper-parameters, lr schedule) of the run."""
  options = dict(learning_rate=config.lr, rank=config.rank, scale=config.scale,
                 scale_type=config.scale_type, projection=config.projection,
                 limiter=config.limiter)
  try:
    hparams = optimizers.resolve_hparams(config.optimizer, llama, **options)
    tx = optimizers.make_optimizer(
        config.optimizer, total_steps=config.steps,
        warmup_steps=config.warmup, config=llama,
        weight_decay=config.weight_decay, grad_clip=config.grad_clip,
        seed=config.seed, non_lowrank_lr=config.non_lowrank_lr,
        projection_dtype=(None if config.projection_dtype is None
                          else DTYPES[config.projection_dtype]),
        **options)
  except ConfigError as e:
    raise e.renamed(TrainConfig.flag(e.option)) from e
  if config.quantize_weights == "int8":
    tx = apollo_optax.quantized_weights(tx, key=jax.random.key(config.seed))
  schedule = optimizers.make_schedule(hparams["learning_rate"], config.steps,
                                      config.warmup)
  return tx, hparams, schedule


# ---------------------------------------------------------------------------
# Steps and evaluation.


def _make_steps(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                param_shardings: Any, opt_shardings: Any,
                geometry: geometry_lib.Geometry,
                llama: configs.LlamaConfig, layer_wise: bool,
                trainable: Callable[[Any], Any] | None = None):
  """The jitted :mod:`apollo_lm.steps` ``train_step`` and ``eval_step``.

  Both take a ``steps.Batch`` of ``(A, B / A, T)`` arrays (``A`` =
  ``--grad-accum``; 1 with ``layer_wise`` and for evaluation).
  """
  first = lambda batch: jax.tree.map(lambda x: x[0], batch)
  if layer_wise:
    step_fn = steps.make_layerwise_train_step(llama, tx)
    train_step = lambda params, state, batch: step_fn(params, state,
                                                      first(batch))
    compiler_options = layerwise.compiler_options()
  else:
    train_step = steps.make_train_step(graphdef, tx,
                                       grad_accum=geometry.grad_accum,
                                       trainable=trainable)
    compiler_options = None
  train_step = jax.jit(
      train_step, donate_argnums=(0, 1),
      out_shardings=(param_shardings, opt_shardings, None),
      compiler_options=compiler_options)
  # A frozen int8 base (`trainable`: LoRA) is dequantized by its layers.
  eval_fn = steps.make_eval_step(graphdef, llama.param_dtype,
                                 dequantize=trainable is None)
  eval_step = jax.jit(lambda params, batch: eval_fn(params, first(batch)))
  return train_step, eval_step


def evaluate(eval_step, params, batches: Sequence[Batch],
             geometry: geometry_lib.Geometry) -> float:
  """Held-out loss: the token-weighted mean of the batches' mean losses.

  Each batch's mean is taken in float32 (like the step's loss); batches of
  equal token counts (pre-training) are averaged plainly, which keeps the
  committed results bit-identical.
  """
  geometry = geometry.for_eval()
  sums, counts = zip(*(eval_step(params, geometry_lib.global_batch(b, geometry))
                       for b in batches))
  counts = np.array([float(c) for c in counts])
  means = [float(np.float32(s) / np.float32(c)) for s, c in zip(sums, counts)]
  if np.all(counts == counts[0]):
    return float(np.mean(means))
  return float(np.average(means, weights=counts))


# ---------------------------------------------------------------------------
# Checkpoints.


def _open_checkpoints(config: TrainConfig
                      ) -> tuple[checkpoint_lib.Checkpointer | None, int]:
  """The checkpointer and the step to start at; refuses a mismatched resume."""
  if not config.checkpoint_dir:
    return None, 0
  checkpointer = checkpoint_lib.Checkpointer(
      config.checkpoint_dir,
      save_interval_steps=config.checkpoint_every or config.steps)
  if not config.resume:
    return checkpointer, 0
  start_step = checkpointer.latest_step()
  if start_step is None:
    checkpointer.close()
    raise ConfigError("--resume", f"no checkpoint in --checkpoint-dir "
                      f"{config.checkpoint_dir}.")
  stored = checkpointer.metadata(start_step).get("config")
  differing = resume_mismatches(stored or {}, config)
  if differing:
    checkpointer.close()
    raise ConfigError(
        "--resume", f"the checkpoint at step {start_step} in "
        f"{config.checkpoint_dir} was written with other options: "
        f"{'; '.join(differing)}. Resume with the checkpoint's values, or "
        "start a new run in another --checkpoint-dir.")
  return checkpointer, start_step


# ---------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class _Run:
  """Everything the loop needs, built by :func:`_setup`."""

  config: TrainConfig
  geometry: geometry_lib.Geometry
  data: RunData
  llama: configs.LlamaConfig
  params: Any
  opt_state: Any
  train_step: Callable[..., Any]
  eval_step: Callable[..., Any]
  schedule: optax.Schedule
  hparams: dict[str, Any]
  checkpointer: checkpoint_lib.Checkpointer | None
  start_step: int
  param_count: int
  state_bytes: int
  log: Callable[[str], None]
  writer: metrics_lib.MetricsWriter
  graphdef: nnx.GraphDef | None = None


def _setup(config: TrainConfig, data_fn, model_fn, llama_fn,
           optimizer_fn) -> _Run:
  runtime.initialize(config)
  geometry = geometry_lib.make_geometry(config)
  checkpointer, start_step = _open_checkpoints(config)
  data = data_fn(config, geometry)
  llama = llama_fn(config, data.vocab_size)
  graphdef, params = model_fn(config, llama, geometry)
  param_count = model_lib.count_params(llama)
  tx, hparams, schedule = optimizer_fn(config, llama)
  init = (lambda p: layerwise.init_layerwise_state(tx, p)) if config.layerwise \
      else tx.init
  with jax.set_mesh(geometry.mesh):
    opt_state = jax.jit(init)(params)
  shardings = jax.tree.map(lambda x: x.sharding, (params, opt_state))
  if start_step:
    params, opt_state, _ = checkpointer.restore(start_step, params, opt_state)
  train_step, eval_step = _make_steps(graphdef, tx, *shardings, geometry,
                                      llama, config.layerwise,
                                      config.trainable)
  is_main = geometry.process_index == 0
  log = ((lambda msg: tqdm.tqdm.write(msg, file=sys.stderr)) if is_main
         else (lambda msg: None))
  run = _Run(config, geometry, data, llama, params, opt_state, train_step,
             eval_step, schedule, hparams, checkpointer, start_step,
             param_count, apollo_optax.state_bytes(opt_state), log,
             metrics_lib.MetricsWriter(config.out, enabled=is_main), graphdef)
  log(f"{config.optimizer} on {llama.name} ({param_count:,} params, "
      f"{config.compute_dtype_name}), optimizer state {run.state_bytes:,} B, "
      f"hparams {hparams}; {data.description}; mesh "
      f"{dict(geometry.mesh.shape)}, {jax.process_count()} process(es); "
      f"steps {start_step}->{config.steps}")
  return run


def _run_eval(run: _Run, step: int, history: list[dict[str, float]]) -> None:
  if not run.data.eval_batches:
    return
  with jax.set_mesh(run.geometry.mesh):
    loss = evaluate(run.eval_step, run.params, run.data.eval_batches,
                    run.geometry)
  record = {"step": step, "eval_loss": loss, "eval_ppl": math.exp(loss)}
  history.append(record)
  run.writer.write(record)
  run.log(f"step {step}: eval loss {loss:.4f}, ppl {math.exp(loss):.2f}")


def _save(run: _Run, step: int, force: bool = False) -> None:
  if run.checkpointer is not None:
    run.checkpointer.save(step, run.params, run.opt_state, force=force,
                          metadata={"optimizer": run.config.optimizer,
                                    "config": run.config.to_json()})


def train_and_evaluate(
    config: TrainConfig, *,
    data_fn: Callable[[TrainConfig, geometry_lib.Geometry], RunData] = load_data,
    model_fn: Callable[..., tuple[nnx.GraphDef, Any]] = build_model,
    llama_fn: Callable[[TrainConfig, int], configs.LlamaConfig] | None = None,
    optimizer_fn: Callable[..., tuple[Any, dict[str, Any], Any]] | None = None,
    end_fn: Callable[[nnx.GraphDef, Any], None] | None = None,
) -> TrainResult:
  """Runs (or resumes) a pre-training run.

  Args:
    config: the run's options.
    data_fn: ``(config, geometry) -> RunData``; :func:`load_data` by default.
    model_fn: ``(config, llama_config, geometry) -> (graphdef, params)``;
      :func:`build_model` by default.
    llama_fn: ``(config, vocab_size) -> LlamaConfig``; default: the
      registry shape ``--config`` (fine-tuning: the checkpoint's).
    optimizer_fn: ``(config, llama_config) -> (tx, hparams, schedule)``;
      default: the pre-training recipe (``apollo_lm.optimizers``).
    end_fn: called with ``(graphdef, params)`` after a run that reached
      ``--steps`` (fine-tuning: ``--save-hf``).

  Returns:
    The :class:`apollo_lm.metrics.TrainResult`.

  Raises:
    ConfigError: an option is invalid for these devices, data or checkpoint.
  """
  wall_start = time.perf_counter()
  run = _setup(config, data_fn, model_fn, llama_fn or _llama_config,
               optimizer_fn or _optimizer)
  c, step = config, run.start_step
  losses, history, timing, interrupted = [], [], [0.0, 0], None
  progress = tqdm.tqdm(total=c.steps, initial=step, unit="step",
                       dynamic_ncols=True, disable=(
                           c.no_progress or run.geometry.process_index != 0))
  try:
    with runtime.stop_on_signals() as stop, jax.set_mesh(run.geometry.mesh):
      batches = run.data.train.batches_from(step)
      while step < c.last_step and interrupted is None:
        batch = geometry_lib.global_batch(next(batches), run.geometry)
        t0 = time.perf_counter()
        run.params, run.opt_state, metrics = run.train_step(
            run.params, run.opt_state, batch)
        losses.append(float(metrics["loss"]))
        if step > run.start_step:  # The first step of a call compiles.
          timing = [timing[0] + time.perf_counter() - t0, timing[1] + 1]
        step += 1
        _log_step(run, progress, step, losses[-1], metrics, timing)
        if c.eval_every and step % c.eval_every == 0 and step < c.steps:
          _run_eval(run, step, history)
        if step < c.steps:
          _save(run, step)
        interrupted = stop["signal"]
    if interrupted is not None:
      run.log(f"{interrupted} at step {step}: saving a checkpoint and "
              "stopping.")
    elif step == c.steps:
      _run_eval(run, step, history)
      if end_fn is not None:
        end_fn(run.graphdef, run.params)
    if run.checkpointer is not None and run.checkpointer.latest_step() != step:
      _save(run, step, force=True)
  finally:
    progress.close()
    run.writer.close()
    if run.checkpointer is not None:
      run.checkpointer.close()
  return _result(run, step, losses, history, timing, interrupted, wall_start)


def _tokens_per_s(run: _Run, timing: list[float]) -> float | None:
  tokens = run.geometry.batch_size * run.geometry.seq_len
  return timing[1] * tokens / timing[0] if timing[0] else None


def _log_step(run: _Run, progress, step: int, loss: float,
              metrics: Mapping[str, Any], timing: list[float]) -> None:
  tokens_per_s = _tokens_per_s(run, timing)
  memory, _ = runtime.memory_in_use()
  run.writer.write({
      "step": step, "loss": loss,
      "grad_norm": (float(metrics["grad_norm"]) if "grad_norm" in metrics
                    else None),
      "lr": float(run.schedule(step - 1)), "tokens_per_s": tokens_per_s,
      "memory_bytes": memory})
  progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s or 0:.0f}",
                       mem=f"{memory / 2**20:.0f}MiB", refresh=False)
  progress.update()


def _result(run: _Run, step: int, losses: list[float],
            history: list[dict[str, float]], timing: list[float],
            interrupted: str | None, wall_start: float) -> TrainResult:
  c, last_eval = run.config, (history[-1] if history else {})
  return TrainResult(
      optimizer=c.optimizer,
      config=dataclasses.asdict(run.llama) | {
          "dtype": c.compute_dtype_name,
          "param_dtype": jnp.dtype(run.llama.param_dtype).name},
      hparams=run.hparams | {
          "warmup_steps": c.warmup, "total_steps": c.steps,
          "non_lowrank_lr": c.non_lowrank_lr, "weight_decay": c.weight_decay,
          "grad_clip": c.grad_clip, "layerwise": c.layerwise,
          "quantize_weights": c.quantize_weights,
          "quant_group_size": c.quant_group_size},
      step=step, start_step=run.start_step, losses=losses,
      eval_loss=last_eval.get("eval_loss"), eval_ppl=last_eval.get("eval_ppl"),
      eval_history=history, state_bytes=run.state_bytes,
      param_count=run.param_count, tokens_per_s=_tokens_per_s(run, timing),
      memory_bytes=runtime.memory_in_use()[0],
      wall_time_s=time.perf_counter() - wall_start, interrupted=interrupted,
      checkpoint=(str(run.checkpointer.directory) if run.checkpointer
                  else None))


def train(options: TrainConfig | Mapping[str, Any] | Sequence[str] | None
          = None) -> TrainResult:
  """:func:`train_and_evaluate` on a TrainConfig, a dict of options or argv.

  A dict uses field names (``{"optimizer": "apollo", "steps": 300}``;
  ``"config"`` is accepted for ``model``).
  """
  return train_and_evaluate(cli.as_config(options))


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; option errors exit with status 2."""
  return cli.run_main(train_and_evaluate, argv)


if __name__ == "__main__":
  sys.exit(main())
