"""Every option of the pre-training job, in one frozen dataclass.

:class:`TrainConfig` is the single source of the job's options: their names,
defaults, types and help text (field metadata, from which :mod:`apollo_lm.cli`
builds the command line) and their validation (:meth:`TrainConfig.validate`,
called on construction), which raises :class:`apollo_lm.errors.ConfigError`
with the option's flag as a field. Checks that need the devices or the data
(mesh size, corpus size) live in :mod:`apollo_lm.geometry` and
:mod:`apollo_lm.data` and raise the same error.

Example::

  >>> from apollo_lm.run_config import TrainConfig
  >>> TrainConfig(optimizer="apollo_mini", steps=100).warmup
  10
  >>> TrainConfig(lr=-1.0)
  Traceback (most recent call last):
  ...
  apollo_lm.errors.ConfigError: --lr: must be > 0, got -1.0.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from apollo_lm import configs
from apollo_lm.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16")
QUANTIZE = ("none", "int8")


def option(default: Any, help: str, *, group: str, flag: str | None = None,
           **cli: Any) -> Any:
  """A config field with its command-line metadata (see :mod:`apollo_lm.cli`).

  Subclasses of :class:`TrainConfig` (e.g. ``apollo_lm.finetune``'s) declare
  their own options, or change a default, with it.
  """
  metadata = dict(help=help, group=group, flag=flag, **cli)
  if isinstance(default, (list, dict)):
    raise TypeError("use a tuple or None for sequence defaults")
  return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The options of one pre-training run (``python -m apollo_lm.train``).

  Field names are the command-line flags with underscores (``--batch-size``
  is ``batch_size``), except ``model`` (``--config``) and ``limiter``
  (``--no-limiter``). ``config_overrides`` (a dict of ``LlamaConfig``
  fields) exists only in Python.
  """

  # model
  model: str = option(
      "tiny", f"model size: {', '.join(configs.CONFIG_NAMES)}",
      group="model", flag="--config", metavar="NAME")
  model_override: tuple[str, ...] = option(
      (), "override a LlamaConfig field, e.g. hidden_size=64 (repeatable)",
      group="model", action="append", metavar="FIELD=VALUE")
  config_overrides: Mapping[str, Any] | None = option(
      None, "LlamaConfig fields to override (Python only)", group="model",
      cli=False)
  dtype: str = option(
      "auto", "compute dtype; auto: float32 on CPU (bfloat16 matmuls are "
      "emulated and slow there), bfloat16 on accelerators", group="model",
      choices=DTYPES)
  remat: bool = option(False, "rematerialise each block in the backward pass",
                        group="model")

  # optimizer
  optimizer: str = option(
      "apollo", "a recipe of apollo_lm.optimizers.RECIPES (an unknown name "
      "lists them)", group="optimizer")
  lr: float | None = option(
      None, "peak learning rate (default: per optimizer)", group="optimizer")
  warmup_steps: int | None = option(
      None, "linear warm-up steps (default: 10%% of --steps)",
      group="optimizer")
  rank: int | None = option(
      None, "apollo/galore rank (default: min(hidden_size // 4, 256), "
      "apollo_lm.optimizers.default_rank)", group="optimizer")
  scale: float | None = option(
      None, "apollo/apollo_mini/galore scale (default: per optimizer)",
      group="optimizer")
  scale_type: str | None = option(
      None, "apollo scaling granularity (ablation; default: channel for "
      "apollo, tensor for apollo_mini)", group="optimizer")
  projection: str | None = option(
      None, "apollo/apollo_mini projection (ablation; default: gaussian)",
      group="optimizer")
  projection_dtype: str | None = option(
      None, "apollo/apollo_mini projection product input dtype: bfloat16 "
      "(fast path, float32 accumulation; with --projection rademacher P is "
      "exact) or float32 (default: the gradient's dtype)", group="optimizer",
      choices=("float32", "bfloat16"))
  limiter: bool = option(
      True, "turn apollo's norm-growth limiter off (ablation)",
      group="optimizer", flag="--no-limiter")
  non_lowrank_lr: float | None = option(
      None, "peak lr of the embedding, head and norms (default: --lr); the "
      "official APOLLO code gives them APOLLO's lr", group="optimizer")
  weight_decay: float = option(0.0, "decoupled weight decay (>= 0)",
                                group="optimizer")
  grad_clip: float | None = option(
      None, "clip the global gradient norm to this (> 0)", group="optimizer")

  # memory
  layerwise: bool = option(
      False, "update each layer during the backward pass, as soon as its "
      "gradient exists: only one layer's gradient is held instead of the "
      "whole model's (LLaMA-7B: saves about 13.5 GB of bfloat16 gradients). "
      "Same updates as without it (adafactor: its update clipping becomes "
      "per layer); works on any --mesh and with checkpoints. Not with "
      "--grad-clip (needs the whole gradient's norm) or --grad-accum > 1; "
      "grad_norm is not logged", group="memory")
  quantize_weights: str = option(
      "none", "int8: Q-APOLLO, attention and MLP kernels stored in int8 with "
      "one scale per --quant-group-size input rows, re-quantized with "
      "stochastic rounding after each update (LLaMA-7B: 6.7 GB of int8 "
      "kernels and scales, all parameters 7.2 GB instead of 13.5 GB in "
      "bfloat16); needs --layerwise", group="memory", choices=QUANTIZE)
  quant_group_size: int = option(
      128, "input rows per int8 scale; must divide the input dimension of "
      "every kernel (hidden_size, intermediate_size)", group="memory")

  # run
  steps: int = option(300, "optimizer updates", group="run")
  batch_size: int = option(16, "global batch size (sequences per update)",
                            group="run")
  seq_len: int = option(256, "tokens per sequence", group="run")
  grad_accum: int = option(1, "micro-batches per update (scan in the step)",
                            group="run")
  seed: int = option(0, "seeds the model init, data order and projections",
                      group="run")
  compilation_cache: str | None = option(
      None, "persistent XLA compilation cache: later runs with the same "
      "shapes and settings skip compilation", group="run", metavar="DIR")
  mesh: str | None = option(
      None, "device mesh over the devices used (default: all of them on "
      "data)", group="run", metavar="DATA,FSDP,TENSOR")
  num_devices: int | None = option(
      None, "use only the first N devices (default: all, which "
      "multi-process runs need)", group="run")

  # data
  data: tuple[str, ...] | None = option(
      None, "text files/directories (default: the Python standard library's "
      "sources); one file or a few are split into train and held-out "
      "documents", group="data", nargs="+", metavar="PATH")
  eval_data: tuple[str, ...] | None = option(
      None, "held-out text files/directories (default: held out from "
      "--data)", group="data", nargs="+", metavar="PATH")
  vocab_size: int = option(
      8192, "BPE vocabulary trained on --data (not used by --c4)",
      group="data")
  c4: bool = option(False, "train on C4 (allenai/c4 streamed, or "
                     "--c4-files)", group="data")
  c4_files: tuple[str, ...] | None = option(
      None, "local C4-format *.json.gz train files", group="data",
      nargs="+", metavar="JSON_GZ")
  c4_eval_files: tuple[str, ...] | None = option(
      None, "local C4-format held-out files (default: the validation split "
      "when streaming; no evaluation with --c4-files alone)", group="data",
      nargs="+", metavar="JSON_GZ")
  hf_tokenizer: str = option(
      "t5-base", "tokenizer for --c4: a tokenizer.json path or a Hugging "
      "Face Hub name", group="data")

  # evaluation, logging, checkpoints
  eval_every: int = option(
      100, "evaluate every this many steps (0: only at the end)",
      group="output")
  eval_batches: int = option(
      8, "held-out batches per evaluation (0: no evaluation)", group="output")
  out: str | None = option(
      None, "write metrics.jsonl (and TensorBoard events if tensorboardX is "
      "installed) here", group="output", metavar="DIR")
  checkpoint_dir: str | None = option(None, "checkpoint directory",
                                       group="output", metavar="DIR")
  checkpoint_every: int = option(
      0, "save every this many steps (0: only at the end and on "
      "SIGTERM/Ctrl-C)", group="output")
  stop_at_step: int | None = option(
      None, "stop (with a checkpoint) after this many updates, as if "
      "preempted; the schedule still spans --steps", group="output")
  resume: bool = option(
      False, "continue from the latest checkpoint in --checkpoint-dir; "
      "refused if a structural option (model, optimizer, rank, ...) differs "
      "from the checkpoint's", group="output")
  no_progress: bool = option(False, "no progress bar", group="output")

  # multi-process
  coordinator: str | None = option(
      None, "coordinator address (or $JAX_COORDINATOR_ADDRESS)",
      group="distributed", metavar="HOST:PORT")
  num_processes: int | None = option(None, "number of processes",
                                      group="distributed")
  process_id: int | None = option(None, "this process's index",
                                   group="distributed")

  def __post_init__(self):
    # Sequences given as lists (argparse, JSON) are stored as tuples.
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, list):
        object.__setattr__(self, field.name, tuple(value))
    self.validate()

  # ------------------------------------------------------------------------

  @classmethod
  def flag(cls, name: str) -> str:
    """The flag of field ``name`` (``"batch_size"`` -> ``"--batch-size"``)."""
    field = _FIELDS.get(name)
    if field is not None and field.metadata.get("flag"):
      return field.metadata["flag"]
    return "--" + name.replace("_", "-")

  @classmethod
  def from_options(cls, options: Mapping[str, Any]) -> TrainConfig:
    """From a dict of field names (``"config"`` is accepted for ``model``)."""
    kwargs = {}
    for key, value in options.items():
      key = key.replace("-", "_")
      key = "model" if key == "config" else key
      if key not in _FIELDS:
        raise ConfigError(
            key, f"unknown option {key!r}; options are {sorted(_FIELDS)}.")
      kwargs[key] = value
    return cls(**kwargs)

  @property
  def warmup(self) -> int:
    """Warm-up steps: ``warmup_steps``, or 10% of ``steps``."""
    return self.steps // 10 if self.warmup_steps is None else self.warmup_steps

  @property
  def compute_dtype_name(self) -> str:
    """``dtype`` with ``"auto"`` resolved: float32 on CPU, else bfloat16."""
    if self.dtype != "auto":
      return self.dtype
    import jax  # pylint: disable=g-import-not-at-top
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"

  @property
  def trainable(self) -> Callable[[Any], Any] | None:
    """Which parameters the step trains: None for all of them, or a function
    ``params -> pytree of bools`` (``make_train_step(trainable=)``;
    ``apollo_lm.finetune`` with LoRA: the adapters, the base frozen)."""
    return None

  @property
  def last_step(self) -> int:
    """The step this call stops at (``stop_at_step`` or ``steps``)."""
    return self.steps if self.stop_at_step is None else self.stop_at_step

  def model_overrides(self) -> dict[str, Any]:
    """``config_overrides`` updated with the parsed ``model_override`` items.

    Values are read as JSON (numbers, ``true``/``false``), else kept as
    strings.
    """
    overrides = dict(self.config_overrides or {})
    for item in self.model_override:
      key, sep, value = item.partition("=")
      if not sep:
        raise ConfigError("--model-override",
                          f"expected FIELD=VALUE, got {item!r}.")
      try:
        overrides[key] = json.loads(value)
      except json.JSONDecodeError:
        overrides[key] = value
    return overrides

  def to_json(self) -> dict[str, Any]:
    """The options as JSON values (stored next to each checkpoint)."""
    values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    # Tuples become lists and anything else not JSON (a dtype in
    # config_overrides) its str, as a JSON round trip would store them.
    return json.loads(json.dumps(values, default=str))

  # ------------------------------------------------------------------------

  def validate(self) -> None:
    """Checks every option that needs neither the devices nor the data.

    Raises:
      ConfigError: naming the option's flag, its value and what is allowed.
    """
    self._check_values()
    self._check_combinations()

  def _check_values(self) -> None:
    """Each option alone: names, types and ranges."""
    # The options sit below the training code they configure: its checks
    # are imported when a config is built, not when this module is.
    from apollo_lm import optimizers  # pylint: disable=g-import-not-at-top
    if self.model not in configs.CONFIG_NAMES:
      raise ConfigError("--config", f"unknown config {self.model!r}; "
                        f"allowed: {', '.join(configs.CONFIG_NAMES)}.")
    optimizers.check_name(self.optimizer, flag="--optimizer")
    for name, allowed in (("dtype", DTYPES),
                          ("quantize_weights", QUANTIZE)):
      value = getattr(self, name)
      if value not in allowed:
        raise ConfigError(self.flag(name), f"expected one of "
                          f"{', '.join(allowed)}, got {value!r}.")
    for name in ("steps", "batch_size", "seq_len", "grad_accum",
                 "vocab_size", "quant_group_size"):
      _check_int(self.flag(name), getattr(self, name), minimum=1)
    for name in ("rank", "num_devices", "num_processes"):
      if getattr(self, name) is not None:
        _check_int(self.flag(name), getattr(self, name), minimum=1)
    for name in ("eval_every", "eval_batches", "checkpoint_every", "seed"):
      _check_int(self.flag(name), getattr(self, name), minimum=0)
    for name in ("lr", "non_lowrank_lr", "grad_clip", "scale"):
      value = getattr(self, name)
      if value is not None and not _is_positive(value):
        raise ConfigError(self.flag(name), f"must be > 0, got {value}.")
    if not (_is_number(self.weight_decay) and self.weight_decay >= 0):
      raise ConfigError("--weight-decay",
                        f"must be >= 0, got {self.weight_decay}.")
    if self.warmup_steps is not None:
      _check_int("--warmup-steps", self.warmup_steps, minimum=0)
    self.model_overrides()

  def _check_combinations(self) -> None:
    """Options that depend on each other or on the optimizer."""
    from apollo_lm import layerwise  # pylint: disable=g-import-not-at-top
    from apollo_lm import optimizers  # pylint: disable=g-import-not-at-top
    if not 0 <= self.warmup < self.steps:
      raise ConfigError("--warmup-steps", f"must be in [0, --steps="
                        f"{self.steps}), got {self.warmup}.")
    if not 1 <= self.last_step <= self.steps:
      raise ConfigError("--stop-at-step", f"must be in [1, --steps="
                        f"{self.steps}], got {self.last_step}.")
    if self.resume and not self.checkpoint_dir:
      raise ConfigError("--resume", "needs --checkpoint-dir.")
    # A frozen int8 base (LoRA, `trainable`) has no gradient to hold.
    if (self.quantize_weights != "none" and not self.layerwise
        and self.trainable is None):
      raise ConfigError(
          "--quantize-weights", "int8 weights need --layerwise; the ordinary "
          "step would hold the whole model's dequantized gradient, which "
          "costs more memory than the int8 weights save.")
    if self.layerwise:
      layerwise.check_layerwise_options(grad_clip=self.grad_clip,
                                        grad_accum=self.grad_accum)
    if self.c4:
      for path in (self.c4_files or ()) + (self.c4_eval_files or ()):
        if not os.path.isfile(path):
          raise ConfigError("--c4-files", f"{path}: no such file.")
    elif self.c4_files or self.c4_eval_files:
      raise ConfigError("--c4-files", "needs --c4.")
    try:
      optimizers.resolve_hparams(
          self.optimizer, configs.get_config("tiny"), learning_rate=self.lr,
          rank=self.rank, scale=self.scale, scale_type=self.scale_type,
          projection=self.projection, limiter=self.limiter)
    except ConfigError as e:
      raise e.renamed(self.flag(e.option)) from e


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_positive(value: Any) -> bool:
  return _is_number(value) and value > 0  # NaN > 0 is False


def _check_int(flag: str, value: Any, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(flag, f"must be an int >= {minimum}, got {value!r}.")


# Options that fix the shapes or the meaning of a checkpoint's arrays: a run
# resumed with another value would fail to restore or silently train another
# model. Steps, evaluation cadence and output paths may change.
STRUCTURAL_OPTIONS: tuple[str, ...] = (
    "model", "model_override", "config_overrides", "dtype", "optimizer",
    "rank", "scale_type", "projection", "limiter", "layerwise",
    "quantize_weights", "quant_group_size", "vocab_size", "seq_len", "c4",
    "hf_tokenizer", "grad_clip", "non_lowrank_lr", "seed", "lora_rank",
    "lora_alpha", "lora_targets")


def resume_mismatches(stored: Mapping[str, Any],
                      config: TrainConfig) -> list[str]:
  """``"--flag: checkpoint X, given Y"`` for each structural option that differs."""
  given = config.to_json()
  return [f"{TrainConfig.flag(name)}: checkpoint {stored[name]!r}, given "
          f"{given[name]!r}"
          for name in STRUCTURAL_OPTIONS
          if name in stored and stored[name] != given[name]]
