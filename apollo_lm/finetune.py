# Copyright 2025 The apollo_optax Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Full-parameter fine-tuning of a Hugging Face checkpoint with APOLLO.

Usage::

  python -m apollo_lm.finetune --checkpoint Llama-3.2-1B-Instruct \\
      --data train.jsonl --optimizer apollo_mini --steps 1000 \\
      --batch-size 8 --seq-len 1024 --save-hf out/llama-ft

Fine-tuning defaults (the ``finetune`` column of
:data:`apollo_lm.optimizers.RECIPES`) are the APOLLO paper's
(Table 12, commonsense fine-tuning of Llama-3.2-1B): rank 32, APOLLO-Mini
rank 1 and scale 128 (update x sqrt(128)), APOLLO scale 5 (x sqrt(5)),
learning rate 3e-4 for the APOLLO family and GaLore, 2e-5 for AdamW (the
paper sweeps 2e-5..5e-5), a linear schedule with 100 warm-up steps, no weight
decay. LLaMA-Factory's ``use_apollo`` example instead uses rank 16, scale 32,
lr 1e-5, layer-wise updates and pure bf16; pass ``--rank 16 --scale 32 --lr
1e-5 --layerwise --param-dtype bfloat16`` for that recipe.

LoRA (:mod:`apollo_lm.lora`) instead of full fine-tuning: ``--lora-rank 16``
(``--lora-alpha``, default 2 x rank as LLaMA-Factory; ``--lora-targets``,
default all seven projections) trains adapters with AdamW at lr 1e-4 (the
default optimizer and lr with ``--lora-rank``), the base frozen; with
``--quantize-weights int8`` the frozen base is int8 (QLoRA-like, no
``--layerwise`` needed). ``--save-hf`` writes the merged weights.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, Final

from flax import nnx
import jax
import jax.numpy as jnp
import optax

import apollo_optax
from apollo_lm import cli
from apollo_lm import configs
from apollo_lm import geometry as geometry_lib
from apollo_lm import hf
from apollo_lm import hub
from apollo_lm import layerwise
from apollo_lm import lora
from apollo_lm import model as model_lib
from apollo_lm import optimizers
from apollo_lm import sft
from apollo_lm import sharding as sharding_lib
from apollo_lm import tokenizer as tokenizer_lib
from apollo_lm import train as train_lib
from apollo_lm.run_config import option
from apollo_lm.run_config import TrainConfig
from apollo_lm.errors import ConfigError

WARMUP_STEPS: Final[int] = 100


def linear_schedule(peak: float, total_steps: int,
                    warmup_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to ``peak``, then linear decay to 0 at
  ``total_steps`` (``transformers``' ``get_linear_schedule_with_warmup``).

  Raises:
    ValueError: ``warmup_steps`` not in ``[0, total_steps)``.
  """
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f"warmup_steps: {warmup_steps} must be in [0, "
                     f"total_steps={total_steps}).")
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup_steps),
       optax.linear_schedule(peak, 0.0, total_steps - warmup_steps)],
      [warmup_steps])


PARAM_DTYPES: Final[dict[str, Any]] = {"float32": jnp.float32,
                                       "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
  """The options of ``python -m apollo_lm.finetune``: :class:`~apollo_lm.run_config.TrainConfig`
  (same mesh, memory, checkpoint, resume and logging options) plus the
  checkpoint, the SFT data and what to freeze. Pre-training-only options
  (``--config``, ``--vocab-size``, ``--c4*``, ``--hf-tokenizer``) are not on
  its command line.
  """

  # Pre-training options that a checkpoint fixes: off the command line.
  model: str = option("tiny", "unused: the checkpoint fixes the model",
                       group="model", cli=False)
  vocab_size: int = option(8192, "unused: the checkpoint's tokenizer",
                            group="data", cli=False)
  c4: bool = option(False, "unused", group="data", cli=False)
  c4_files: tuple[str, ...] | None = option(None, "unused", group="data",
                                             cli=False)
  c4_eval_files: tuple[str, ...] | None = option(None, "unused",
                                                  group="data", cli=False)
  hf_tokenizer: str = option("t5-base", "unused", group="data", cli=False)
  data: tuple[str, ...] | None = option(
      None, "fine-tuning data: JSON/JSON-lines, csv or parquet files, a "
      "datasets save_to_disk folder or a Hub dataset id, of prompt/completion"
      ", messages, Alpaca or ShareGPT records; or plain text files for "
      "continued pre-training (apollo_lm.sft)", group="data", nargs="+",
      metavar="PATH|ID")
  data_format: str = option(
      "auto", "layout of the records (auto: detected per source)",
      group="data", choices=sft.DATA_FORMATS)
  data_split: str = option(
      "train", "split of a Hub dataset or saved DatasetDict", group="data")
  data_columns: str | None = option(
      None, "map source columns to record keys, e.g. instruction=question,"
      f"output=answer (keys: {', '.join(sft.COLUMNS)})", group="data",
      metavar="KEY=COLUMN,...")
  eval_data: tuple[str, ...] | None = option(
      None, "held-out data of the same kind (default: --eval-fraction of "
      "--data)", group="data", nargs="+", metavar="PATH")
  seq_len: int = option(1024, "positions per packed row", group="run")
  batch_size: int = option(8, "global batch size (packed rows per update)",
                            group="run")
  steps: int = option(1000, "optimizer updates", group="run")
  optimizer: str | None = option(
      None, f"one of {', '.join(optimizers.OPTIMIZER_NAMES)} (default: "
      "apollo_mini; adamw with --lora-rank)", group="optimizer")
  warmup_steps: int | None = option(
      None, f"linear warm-up steps (default: min({WARMUP_STEPS}, 10%% of "
      "--steps)); then linear decay to 0", group="optimizer")

  # Fine-tuning options.
  checkpoint: str | None = option(
      None, "Hugging Face model folder (config.json, *.safetensors, "
      "tokenizer.json) or Hub model id org/name (from the Hugging Face "
      "cache; downloaded unless HF_HUB_OFFLINE=1)", group="finetune",
      metavar="DIR|ID")
  revision: str | None = option(
      None, "branch, tag or commit of a Hub --checkpoint (default: main)",
      group="finetune")
  eval_fraction: float = option(
      0.05, "share of --data held out when there is no --eval-data",
      group="finetune")
  strict_data: bool = option(
      False, "bad records are an error (default: skipped and reported with "
      "their line numbers)", group="finetune")
  save_hf: str | None = option(
      None, "write the fine-tuned model here as a Hugging Face folder (with "
      "the checkpoint's tokenizer files)", group="finetune", metavar="DIR")
  param_dtype: str = option(
      "float32", "storage dtype of the weights (bfloat16: pure bf16 "
      "training, as LLaMA-Factory's pure_bf16)", group="finetune",
      choices=tuple(PARAM_DTYPES))
  mu_dtype: str | None = option(
      None, "dtype of the optimizer's first moments (default: the weights'; "
      "bfloat16 halves APOLLO's low-rank moments)", group="finetune",
      choices=tuple(PARAM_DTYPES))
  freeze_embedding: bool = option(
      False, "do not train the token embedding (no gradient, no state)",
      group="finetune")
  freeze_head: bool = option(
      False, "do not train the output head (tied checkpoints: use "
      "--freeze-embedding, which is the same matrix)", group="finetune")
  lora_rank: int | None = option(
      None, "LoRA instead of full fine-tuning: rank-R adapters on "
      "--lora-targets of every layer, trained with adamw, everything else "
      "frozen (with --quantize-weights int8: an int8 base, QLoRA-like)",
      group="finetune", metavar="R")
  lora_alpha: float | None = option(
      None, "LoRA adapters add (alpha / rank) x A B (default: 2 x "
      "--lora-rank)", group="finetune", metavar="ALPHA")
  lora_targets: tuple[str, ...] | None = option(
      None, f"projections that get LoRA adapters, comma-separated from "
      f"{','.join(lora.TARGETS)} or all (default: all)", group="finetune",
      metavar="NAMES")

  def __post_init__(self):
    if self.optimizer is None:
      object.__setattr__(self, "optimizer",
                         "adamw" if self.lora_rank else "apollo_mini")
    if self.lora_rank is not None and self.lr is None:
      object.__setattr__(self, "lr", lora.LEARNING_RATE)
    if isinstance(self.lora_targets, str):
      object.__setattr__(self, "lora_targets",
                         tuple(self.lora_targets.split(",")))
    if (self.lora_alpha is None and isinstance(self.lora_rank, int)
        and not isinstance(self.lora_rank, bool)):
      object.__setattr__(self, "lora_alpha", 2.0 * self.lora_rank)
    recipe = optimizers.RECIPES.get(self.optimizer)
    if recipe is not None:
      d = recipe.finetune
      for name, value in (("lr", d.learning_rate),
                          ("rank", d.rank if d.has_rank else None),
                          ("scale", d.scale)):
        if getattr(self, name) is None:
          object.__setattr__(self, name, value)
    if self.warmup_steps is None and isinstance(self.steps, int):
      object.__setattr__(self, "warmup_steps",
                         min(WARMUP_STEPS, self.steps // 10))
    super().__post_init__()

  def validate(self) -> None:
    super().validate()
    self._validate_lora()
    if not self.checkpoint:
      raise ConfigError("--checkpoint", "a Hugging Face model folder or Hub "
                        "id is required.")
    local = pathlib.Path(self.checkpoint)
    if local.exists() or not hub.is_repo_id(self.checkpoint):
      checkpoint_dir(self)  # A Hub id is fetched when the run starts.
    if not self.data:
      raise ConfigError("--data", "fine-tuning data is required (records or "
                        "text files).")
    try:
      sft.parse_columns(self.data_columns)
    except ValueError as e:
      raise ConfigError("--data-columns", str(e)) from None
    if self.mu_dtype is not None and self.optimizer == "adafactor":
      raise ConfigError("--mu-dtype", "adafactor has no first moment (no "
                        "momentum) whose dtype could be set.")
    if self.eval_data is None and not 0 < self.eval_fraction < 1:
      raise ConfigError("--eval-fraction", f"must be in (0, 1), got "
                        f"{self.eval_fraction}.")

  def _validate_lora(self) -> None:
    if self.lora_rank is None:
      for name in ("lora_alpha", "lora_targets"):
        if getattr(self, name) is not None:
          raise ConfigError(self.flag(name), "needs --lora-rank (LoRA "
                            "fine-tuning); without it all weights train.")
      return
    try:
      self.lora_config
    except ConfigError as e:
      raise e.renamed(self.flag(e.option)) from e
    if self.optimizer != "adamw":
      raise ConfigError(
          "--optimizer", f"LoRA trains its adapters with adamw, got "
          f"{self.optimizer!r}; allowed with --lora-rank: adamw. (APOLLO, "
          "APOLLO-Mini and GaLore compress full-rank gradients; an adapter's "
          "is already rank R.)")
    if self.layerwise:
      raise ConfigError("--layerwise", "not with --lora-rank: only the "
                        "adapters have gradients, and they are small.")

  @property
  def lora_config(self) -> lora.LoRAConfig | None:
    """The adapters' rank, alpha and targets; None without --lora-rank."""
    if self.lora_rank is None:
      return None
    return lora.LoRAConfig(self.lora_rank, self.lora_alpha,
                           self.lora_targets)

  @property
  def trainable(self):
    """LoRA: the adapters (:func:`apollo_lm.lora.adapter_mask`); else all."""
    return lora.adapter_mask if self.lora_rank is not None else None

  @property
  def frozen_parts(self) -> tuple[str, ...]:
    return (("embedding",) if self.freeze_embedding else ()) + (
        ("head",) if self.freeze_head else ())


def checkpoint_dir(config: FinetuneConfig) -> pathlib.Path:
  """The local folder of ``--checkpoint`` (a Hub id: its cached snapshot).

  Raises:
    ConfigError: no such folder or Hub id, or no ``config.json`` in it.
  """
  try:
    root = _resolve(config.checkpoint, config.revision, hub.hub_cache_dir(),
                    hub.is_offline())
  except OSError as e:
    raise ConfigError("--checkpoint", str(e)) from None
  if not (root / "config.json").is_file():
    raise ConfigError("--checkpoint", f"{root}: no config.json (expected a "
                      "Hugging Face model folder).")
  return root


@functools.cache
def _resolve(checkpoint: str, revision: str | None, cache: pathlib.Path,
             offline: bool) -> pathlib.Path:
  # Once per run (and cache): online, each resolution of a Hub id asks the
  # Hub for its commit.
  del cache, offline  # Only keys: hub.resolve_checkpoint reads them.
  return hub.resolve_checkpoint(checkpoint, revision=revision)


def checkpoint_config(config: FinetuneConfig) -> configs.LlamaConfig:
  """The model config of ``config.checkpoint`` with the run's dtypes."""
  hf_config = json.loads((checkpoint_dir(config) / "config.json").read_text())
  try:
    llama = hf.config_from_hf(
        hf_config, max_seq_len=config.seq_len,
        param_dtype=PARAM_DTYPES[config.param_dtype],
        dtype=train_lib.DTYPES[config.compute_dtype_name],
        remat=config.remat, **config.model_overrides())
  except ValueError as e:
    raise ConfigError("--checkpoint", str(e)) from e
  if config.freeze_head and llama.tie_embeddings:
    raise ConfigError("--freeze-head", "this checkpoint ties the head to the "
                      "embedding; use --freeze-embedding (the same matrix).")
  return llama


def load_data(config: FinetuneConfig,
              geometry: geometry_lib.Geometry) -> train_lib.RunData:
  """The SFT data of ``config`` (``data_fn`` of the loop)."""
  try:
    tok = tokenizer_lib.load_checkpoint_tokenizer(checkpoint_dir(config))
  except (OSError, ValueError) as e:
    raise ConfigError("--checkpoint", str(e)) from e
  try:
    data = sft.load_sft_data(
        list(config.data), tok, geometry.seq_len,
        eval_data=None if config.eval_data is None else list(config.eval_data),
        eval_fraction=config.eval_fraction, strict=config.strict_data,
        seed=config.seed, data_format=config.data_format,
        columns=sft.parse_columns(config.data_columns),
        split=config.data_split)
  except (OSError, ValueError) as e:
    raise ConfigError("--data", str(e)) from e
  local = dict(process_index=geometry.process_index,
               process_count=geometry.process_count)
  for report in data.reports:
    if report.bad and geometry.process_index == 0:
      print(report.summary(), file=sys.stderr)
  try:
    train = sft.RowBatches(data.train, geometry.batch_size, seed=config.seed,
                           **local)
  except ValueError as e:
    raise ConfigError("--batch-size", str(e)) from e
  eval_batches = []
  if config.eval_batches:
    eval_batches = sft.eval_row_batches(data.eval, geometry.micro_batch,
                                        **local)[:config.eval_batches]
  return train_lib.RunData(train, eval_batches, tok.vocab_size,
                           data.description)


def load_model(config: FinetuneConfig, llama: configs.LlamaConfig,
               geometry: geometry_lib.Geometry) -> tuple[nnx.GraphDef, Any]:
  """The checkpoint's weights, sharded (``model_fn`` of the loop)."""
  try:
    model, _ = hf.load_pretrained(
        checkpoint_dir(config), dtype=llama.param_dtype, compute_dtype=llama.dtype,
        max_seq_len=llama.max_seq_len, mesh=geometry.mesh, remat=llama.remat,
        **config.model_overrides())
  except (OSError, ValueError) as e:
    raise ConfigError("--checkpoint", str(e)) from e
  quantize = layerwise.quantize_llama_params
  if config.lora_config is not None:
    lora.add_adapters(model, config.lora_config,
                      rngs=nnx.Rngs(config.seed),
                      wrap_all=config.quantize_weights == "int8")
    sharding_lib.shard_model(model, geometry.mesh)
    quantize = lora.quantize_base
  graphdef, state = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(state)
  if config.quantize_weights == "int8":
    try:
      params = quantize(params, config.quant_group_size)
    except ValueError as e:
      raise ConfigError("--quant-group-size", str(e)) from e
  return graphdef, params


def make_optimizer(config: FinetuneConfig, llama: configs.LlamaConfig):
  """(tx, hyper-parameters, schedule): the fine-tuning recipe.

  :func:`apollo_lm.optimizers.make_optimizer` with the linear schedule,
  ``--mu-dtype``, the frozen parts, and int8 weights outermost.
  """
  schedule = linear_schedule(config.lr, config.steps, config.warmup)
  options = dict(rank=config.rank, scale=config.scale,
                 scale_type=config.scale_type, projection=config.projection,
                 limiter=config.limiter)
  try:
    hparams = optimizers.resolve_hparams(config.optimizer, llama,
                                         learning_rate=config.lr, **options)
    tx = optimizers.make_optimizer(
        config.optimizer, learning_rate=schedule, total_steps=config.steps,
        warmup_steps=config.warmup, config=llama,
        weight_decay=config.weight_decay, grad_clip=config.grad_clip,
        seed=config.seed,
        mu_dtype=PARAM_DTYPES[config.mu_dtype] if config.mu_dtype else None,
        **options)
  except ConfigError as e:
    raise e.renamed(FinetuneConfig.flag(e.option)) from e
  if config.lora_config is not None:
    # The base, int8 or not, is frozen: no quantized_weights.
    tx = optimizers.train_only(tx, lora.adapter_mask)
    hparams |= {"lora_rank": config.lora_rank,
                "lora_alpha": config.lora_alpha,
                "lora_targets": list(config.lora_config.targets)}
  else:
    tx = optimizers.freeze(tx, config.frozen_parts)
  if config.quantize_weights == "int8" and config.lora_config is None:
    tx = apollo_optax.quantized_weights(tx, key=jax.random.key(config.seed))
  hparams |= {"schedule": "linear", "frozen": list(config.frozen_parts),
              "mu_dtype": config.mu_dtype}
  return tx, hparams, schedule


_KEPT_CONFIG_KEYS = ("max_position_embeddings", "bos_token_id", "eos_token_id",
                     "pad_token_id")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "chat_template.jinja",
                    "generation_config.json")


def save_hf(config: FinetuneConfig, llama: configs.LlamaConfig,
            graphdef: nnx.GraphDef, params: Any) -> None:
  """Writes the fine-tuned weights and the checkpoint's tokenizer files."""
  import shutil  # pylint: disable=g-import-not-at-top
  if config.lora_config is not None:
    # The merged weights in the model without adapters.
    params = lora.merged_params(params, config.lora_config.scale,
                                llama.param_dtype)
    graphdef = nnx.graphdef(nnx.eval_shape(
        lambda: model_lib.Llama(llama, rngs=nnx.Rngs(0))))
  params = apollo_optax.dequantize_params(params, llama.param_dtype)
  model = nnx.merge(graphdef, params)
  out = pathlib.Path(config.save_hf)
  hf.save_pretrained(model, llama, out)
  # Metadata the model config does not hold; the context length is the
  # checkpoint's, not this run's --seq-len.
  base = json.loads((checkpoint_dir(config) / "config.json").read_text())
  written = json.loads((out / "config.json").read_text())
  written.update({k: base[k] for k in _KEPT_CONFIG_KEYS if k in base})
  (out / "config.json").write_text(json.dumps(written, indent=2) + "\n")
  for name in _TOKENIZER_FILES:
    source = checkpoint_dir(config) / name
    if source.is_file():
      shutil.copy(source, out / name)


def finetune(config: FinetuneConfig):
  """Runs (or resumes) a fine-tuning run: the pre-training loop
  (:func:`apollo_lm.train.train_and_evaluate`) with the checkpoint's model,
  the SFT data and the fine-tuning optimizer; then ``--save-hf``."""
  llama = checkpoint_config(config)
  end_fn = None
  if config.save_hf:
    end_fn = lambda graphdef, params: save_hf(config, llama, graphdef, params)
  return train_lib.train_and_evaluate(
      config, data_fn=load_data, model_fn=load_model,
      llama_fn=lambda *_: llama, optimizer_fn=make_optimizer, end_fn=end_fn)


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; option errors exit with status 2."""
  return cli.run_main(
      finetune, argv, FinetuneConfig, prog="python -m apollo_lm.finetune",
      description="Fine-tune a Hugging Face Llama/Mistral/Qwen2 checkpoint "
      "with APOLLO, APOLLO-Mini, AdamW, GaLore or Adafactor.")


if __name__ == "__main__":
  sys.exit(main())
