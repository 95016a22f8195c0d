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
"""Hugging Face checkpoints in and out: Llama, Mistral, Qwen2/3, Gemma 3.

:func:`load_pretrained` reads a local folder as ``transformers`` writes it
(``config.json`` plus ``model.safetensors`` or a sharded
``model.safetensors.index.json``) into a :class:`apollo_lm.model.Llama`,
tensor by tensor: every per-layer tensor is copied into a host buffer of its
stacked ``(L, ...)`` leaf, which then goes to its devices, so host memory
stays at about one stacked leaf, never the whole model. :func:`save_pretrained`
writes a folder that ``transformers`` loads (``save_pretrained`` layout,
shards of at most 5 GB). A Hub model id instead of a folder is resolved by
:mod:`apollo_lm.hub` (the Hugging Face cache, downloaded unless offline). The tokenizer is read by
:func:`apollo_lm.tokenizer.load_checkpoint_tokenizer` (``tokenizer.json``); generation stop ids
by :func:`eos_token_ids`.

Example::

  model, config = load_pretrained("Llama-3.2-1B", dtype=jnp.bfloat16)
  ...  # fine-tune
  save_pretrained(model, config, "Llama-3.2-1B-tuned")

Name mapping (HF ``nn.Linear`` weights are ``(out, in)``, ours ``(in, out)``,
so matrices are transposed; layer ``i`` is row ``i`` of the stacked leaf)::

  model.embed_tokens.weight                     embed/embedding
  model.layers.{i}.input_layernorm.weight       layers/attn_norm/scale[i]
  model.layers.{i}.self_attn.{q,k,v,o}_proj.weight   layers/attn/*_proj/kernel[i]ᵀ
  model.layers.{i}.self_attn.{q,k,v}_proj.bias  layers/attn/*_proj/bias[i]
  model.layers.{i}.post_attention_layernorm.weight   layers/mlp_norm/scale[i]
  model.layers.{i}.mlp.{gate,up,down}_proj.weight    layers/mlp/*_proj/kernel[i]ᵀ
  model.norm.weight                             final_norm/scale
  lm_head.weight                                lm_head/kernel ᵀ (untied only)

plus, for Qwen3 and Gemma 3, ``self_attn.{q,k}_norm.weight`` ->
``layers/attn/{q,k}_norm/scale[i]``; Gemma 3 names its four norms
differently (its ``post_attention_layernorm`` follows attention)::

  input_layernorm.weight                        layers/attn_norm/scale[i]
  post_attention_layernorm.weight               layers/post_attn_norm/scale[i]
  pre_feedforward_layernorm.weight              layers/mlp_norm/scale[i]
  post_feedforward_layernorm.weight             layers/post_mlp_norm/scale[i]

Gemma 3 is its text-only ``Gemma3ForCausalLM`` (e.g. gemma-3-1b); the
multimodal ``Gemma3ForConditionalGeneration`` checkpoints are not read.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any, Final

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from apollo_lm import configs
from apollo_lm import hub
from apollo_lm import model as model_lib
from apollo_lm import sharding as sharding_lib
from apollo_lm.errors import ConfigError

PathLike = str | os.PathLike

SUPPORTED_ARCHITECTURES: Final[tuple[str, ...]] = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
    "Qwen3ForCausalLM", "Gemma3ForCausalLM")
_MODEL_TYPES: Final[dict[str, str]] = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3_text"}
# The LlamaConfig fields each architecture fixes (read and written).
_GEMMA = dict(norm_plus_one=True, post_norms=True, scale_embeddings=True)
_NOT_GEMMA = {field: False for field in _GEMMA}
_ARCH_FEATURES: Final[dict[str, dict[str, bool]]] = {
    "LlamaForCausalLM": dict(qkv_bias=False, qk_norm=False, **_NOT_GEMMA),
    "MistralForCausalLM": dict(qkv_bias=False, qk_norm=False, **_NOT_GEMMA),
    "Qwen2ForCausalLM": dict(qkv_bias=True, qk_norm=False, **_NOT_GEMMA),
    "Qwen3ForCausalLM": dict(qkv_bias=False, qk_norm=True, **_NOT_GEMMA),
    "Gemma3ForCausalLM": dict(qkv_bias=False, qk_norm=True, **_GEMMA),
}
SUPPORTED_ROPE_TYPES: Final[tuple[str, ...]] = ("default", "llama3", "linear")
MAX_SHARD_SIZE: Final[int] = 5 * 10**9

SINGLE_FILE: Final[str] = "model.safetensors"
INDEX_FILE: Final[str] = "model.safetensors.index.json"

# HF name inside ``model.layers.{i}.`` -> (our stacked path, transposed).
_LAYER_TENSORS: Final[dict[str, tuple[str, bool]]] = {
    "input_layernorm.weight": ("layers/attn_norm/scale", False),
    "self_attn.q_norm.weight": ("layers/attn/q_norm/scale", False),
    "self_attn.k_norm.weight": ("layers/attn/k_norm/scale", False),
    "self_attn.q_proj.weight": ("layers/attn/q_proj/kernel", True),
    "self_attn.k_proj.weight": ("layers/attn/k_proj/kernel", True),
    "self_attn.v_proj.weight": ("layers/attn/v_proj/kernel", True),
    "self_attn.o_proj.weight": ("layers/attn/o_proj/kernel", True),
    "self_attn.q_proj.bias": ("layers/attn/q_proj/bias", False),
    "self_attn.k_proj.bias": ("layers/attn/k_proj/bias", False),
    "self_attn.v_proj.bias": ("layers/attn/v_proj/bias", False),
    "post_attention_layernorm.weight": ("layers/mlp_norm/scale", False),
    "mlp.gate_proj.weight": ("layers/mlp/gate_proj/kernel", True),
    "mlp.up_proj.weight": ("layers/mlp/up_proj/kernel", True),
    "mlp.down_proj.weight": ("layers/mlp/down_proj/kernel", True),
}
# Gemma's post-norms: its `post_attention_layernorm` is not the pre-MLP norm.
_POST_NORM_TENSORS: Final[dict[str, tuple[str, bool]]] = {
    "post_attention_layernorm.weight": ("layers/post_attn_norm/scale", False),
    "pre_feedforward_layernorm.weight": ("layers/mlp_norm/scale", False),
    "post_feedforward_layernorm.weight": ("layers/post_mlp_norm/scale", False),
}
_GLOBAL_TENSORS: Final[dict[str, tuple[str, bool]]] = {
    "model.embed_tokens.weight": ("embed/embedding", False),
    "model.norm.weight": ("final_norm/scale", False),
    "lm_head.weight": ("lm_head/kernel", True),
}
# Buffers some older checkpoints carry; they are recomputed, never loaded.
_IGNORED_SUFFIXES: Final[tuple[str, ...]] = ("rotary_emb.inv_freq",)


def _error(option: str, message: str) -> ConfigError:
  """``option`` (a ``config.json`` key, or an argument) is at fault."""
  return ConfigError(option, message)


def _architecture(hf: Mapping[str, Any]) -> str:
  architectures = hf.get("architectures")
  if not architectures:
    by_type = {v: k for k, v in _MODEL_TYPES.items()}
    if hf.get("model_type") in by_type:
      return by_type[hf["model_type"]]
    raise _error(
        "architectures", f"config.json names no `architectures` and an unknown `model_type` "
        f"{hf.get('model_type')!r}; supported architectures: "
        f"{', '.join(SUPPORTED_ARCHITECTURES)}.")
  if len(architectures) != 1 or architectures[0] not in SUPPORTED_ARCHITECTURES:
    raise _error(
        "architectures", f"unsupported architecture {architectures!r}; supported "
        f"architectures: {', '.join(SUPPORTED_ARCHITECTURES)}.")
  return architectures[0]


def _rope(hf: Mapping[str, Any], default_theta: float = 10000.0,
          ) -> tuple[float, configs.RopeScaling | None, float | None]:
  """(rope_theta, scaling, local theta) from transformers 4.x or >= 5 spelling.

  The local theta is the sliding layers' own base (Gemma 3's
  ``rope_local_base_freq``, or ``rope_parameters["sliding_attention"]``),
  None when every layer type shares one.
  """
  params = hf.get("rope_parameters")
  local = hf.get("rope_local_base_freq")
  if params is not None:
    if params and all(isinstance(v, Mapping) for v in params.values()):
      # Per layer type (transformers >= 5).
      if set(params) - {"full_attention", "sliding_attention"}:
        raise _error(
            "rope_parameters", f"`rope_parameters` for layer types {sorted(params)}; supported: "
            f"full_attention, sliding_attention.")
      if "sliding_attention" in params:
        sliding = params["sliding_attention"]
        if sliding.get("rope_type", "default") != "default":
          raise _error(
              "rope_parameters", f"unsupported RoPE scaling type {sliding['rope_type']!r} of the "
              f"sliding_attention layers; supported there: default.")
        local = sliding.get("rope_theta", 10000.0)
      params = params.get("full_attention", {})
    params = dict(params)
  else:
    params = dict(hf.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", default_theta))
  rope_type = params.get("rope_type", params.get("type", "default"))
  theta = float(params.get("rope_theta", hf.get("rope_theta", default_theta)))
  local = None if local is None else float(local)
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise _error(
        "rope_type", f"unsupported RoPE scaling type {rope_type!r}; supported RoPE types: "
        f"{', '.join(SUPPORTED_ROPE_TYPES)}.")
  if rope_type == "default":
    return theta, None, local
  if rope_type == "linear":
    if "factor" not in params:
      raise _error("rope_scaling", "linear RoPE scaling without 'factor'.")
    return theta, configs.RopeScaling(float(params["factor"]),
                                      rope_type="linear"), local
  try:
    scaling = configs.RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(
            params["original_max_position_embeddings"]))
  except KeyError as e:
    raise _error("rope_scaling", f"llama3 RoPE scaling without {e.args[0]!r}.") from None
  return theta, scaling, local


def _layer_types(hf: Mapping[str, Any], arch: str, num_layers: int,
                 ) -> tuple[int | None, tuple[str, ...] | None]:
  """(sliding_window, layer_types) as :class:`~apollo_lm.configs.LlamaConfig` wants them.

  Follows transformers: Qwen2/3 slide only with ``use_sliding_window`` (in
  layers from ``max_window_layers`` on), Gemma 3 every layer but each
  ``sliding_window_pattern``-th, Mistral every layer. Uniform stacks give
  ``layer_types`` None.
  """
  window = hf.get("sliding_window")
  types = hf.get("layer_types")
  if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
    if not hf.get("use_sliding_window", False):
      window = None
    if types is None:
      start = hf.get("max_window_layers", num_layers)
      types = ["sliding_attention" if window is not None and i >= start
               else "full_attention" for i in range(num_layers)]
  elif arch == "Gemma3ForCausalLM":
    if types is None:
      pattern = hf.get("sliding_window_pattern",
                       hf.get("_sliding_window_pattern", 6))
      types = configs.gemma3_layer_types(num_layers, pattern)
  elif arch == "MistralForCausalLM":
    types = None  # transformers' Mistral slides in every layer.
  elif types is not None and set(types) != {"full_attention"}:
    raise _error(
        "layer_types", f"unsupported `layer_types` {sorted(set(types))} for {arch}; "
        f"sliding-window layers are supported for Mistral, Qwen2, Qwen3 and "
        f"Gemma 3.")
  if types is None:
    return window, None
  types = tuple(types)
  if set(types) == {"full_attention"}:
    return None, None
  if set(types) == {"sliding_attention"}:
    return window, None
  return window, types


def config_from_hf(hf: Mapping[str, Any], *, max_seq_len: int | None = None,
                   param_dtype: Any = jnp.float32,
                   dtype: Any = None, **overrides: Any) -> configs.LlamaConfig:
  """A :class:`~apollo_lm.configs.LlamaConfig` from a Hugging Face ``config.json`` dict.

  Args:
    hf: The parsed ``config.json`` of a checkpoint of one of
      :data:`SUPPORTED_ARCHITECTURES`
      (``rope_theta``/``rope_scaling`` at the top level as on the Hub, or
      ``rope_parameters`` as transformers >= 5 writes).
    max_seq_len: Longest sequence to accept; default
      ``max_position_embeddings``.
    param_dtype: Storage dtype of the parameters.
    dtype: Compute dtype; default ``param_dtype``.
    **overrides: Other :class:`~apollo_lm.configs.LlamaConfig` fields, e.g. ``remat=True``.

  Raises:
    ValueError: naming the unsupported feature (architecture, activation,
      RoPE type, attention/MLP biases other than Qwen2's q/k/v, logit
      soft-capping, bidirectional attention) and listing what is supported.

  Example::

    config = config_from_hf(json.load(open("Llama-3.2-1B/config.json")))
  """
  arch = _architecture(hf)
  gemma = arch == "Gemma3ForCausalLM"
  act = (hf.get("hidden_activation") if gemma else None) or hf.get(
      "hidden_act", "silu")
  if act not in configs.ACTIVATIONS:
    raise _error("hidden_act", f"unsupported `hidden_act` {act!r}; supported: "
                 f"{', '.join(configs.ACTIVATIONS)}.")
  for key in ("attention_bias", "mlp_bias"):
    if arch != "Qwen2ForCausalLM" and hf.get(key):
      raise _error(
          key, f"`{key}`=true is not supported for {arch}; supported "
          f"biases: q/k/v biases of Qwen2ForCausalLM.")
  for key in ("attn_logit_softcapping", "final_logit_softcapping"):
    if hf.get(key) is not None:
      raise _error(key, f"`{key}`={hf[key]} is not supported; supported: null.")
  if hf.get("use_bidirectional_attention"):
    raise _error("use_bidirectional_attention", "`use_bidirectional_attention`=true is not supported; "
                 "supported: causal attention.")
  theta, scaling, local_theta = _rope(
      hf, default_theta=1e6 if gemma else 10000.0)
  window, layer_types = _layer_types(hf, arch, hf["num_hidden_layers"])
  if gemma and local_theta is None:
    local_theta = 10000.0  # transformers' default rope_local_base_freq
  if not gemma:
    local_theta = None
  max_positions = hf.get("max_position_embeddings", 2048)
  fields = dict(
      name=arch,
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_heads=hf["num_attention_heads"],
      num_layers=hf["num_hidden_layers"],
      vocab_size=hf["vocab_size"],
      max_seq_len=max_positions if max_seq_len is None else max_seq_len,
      rope_theta=theta,
      rope_scaling=scaling,
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      init_std=float(hf.get("initializer_range", 0.02)),
      num_kv_heads=hf.get("num_key_value_heads"),
      head_dim=hf.get("head_dim"),
      tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
      sliding_window=window,
      layer_types=layer_types,
      rope_local_theta=local_theta,
      hidden_act=act,
      query_pre_attn_scalar=(float(hf.get("query_pre_attn_scalar", 256))
                             if gemma else None),
      param_dtype=param_dtype,
      dtype=param_dtype if dtype is None else dtype,
      **_ARCH_FEATURES[arch])
  fields.update(overrides)
  return configs.LlamaConfig(**fields)


def config_to_hf(config: configs.LlamaConfig,
                 architecture: str | None = None) -> dict[str, Any]:
  """The ``config.json`` dict of ``config`` (transformers 4.x spelling).

  Args:
    config: The model's configuration.
    architecture: One of :data:`SUPPORTED_ARCHITECTURES`; default
      ``config.name`` when it is one (a loaded checkpoint keeps its own), else
      the first whose fixed features (q/k/v biases, q/k norms, Gemma's norms
      and embedding scale) are the config's.

  Raises:
    ValueError: ``architecture`` cannot express a feature of ``config``.
  """
  if architecture is None:
    if config.name in SUPPORTED_ARCHITECTURES:
      architecture = config.name
    else:
      architecture = next(
          (arch for arch, features in _ARCH_FEATURES.items()
           if all(getattr(config, k) == v for k, v in features.items())),
          "LlamaForCausalLM")
  if architecture not in SUPPORTED_ARCHITECTURES:
    raise _error(
        "architecture", f"unsupported `architecture` {architecture!r}; supported "
        f"architectures: {', '.join(SUPPORTED_ARCHITECTURES)}.")
  for field, value in _ARCH_FEATURES[architecture].items():
    if getattr(config, field) != value:
      able = [arch for arch, features in _ARCH_FEATURES.items()
              if features[field] == getattr(config, field)]
      raise _error(
          "architecture", f"{architecture} cannot express {field}={getattr(config, field)}; "
          f"supported as {', '.join(able)}.")
  gemma = architecture == "Gemma3ForCausalLM"
  qwen = architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM")
  sliding = config.sliding_types
  mixed = config.layer_types is not None and len(set(sliding)) > 1
  unexpressed = [
      field for field, bad in (
          ("rope_local_theta", not gemma and config.rope_local_theta is not None),
          ("query_pre_attn_scalar",
           not gemma and config.query_pre_attn_scalar is not None),
          ("layer_types", mixed and not (gemma or qwen)),
          ("sliding_window", architecture == "LlamaForCausalLM" and
           config.windowed)) if bad]
  if unexpressed:
    raise _error(
        "architecture", f"{architecture} cannot express {unexpressed[0]}="
        f"{getattr(config, unexpressed[0])!r}.")
  scaling = config.rope_scaling
  if scaling is None:
    rope_scaling = None
  elif scaling.rope_type == "linear":
    rope_scaling = {"rope_type": "linear", "factor": scaling.factor}
  else:
    rope_scaling = {
        "rope_type": scaling.rope_type, "factor": scaling.factor,
        "low_freq_factor": scaling.low_freq_factor,
        "high_freq_factor": scaling.high_freq_factor,
        "original_max_position_embeddings":
            scaling.original_max_position_embeddings}
  out = {
      "architectures": [architecture],
      "model_type": _MODEL_TYPES[architecture],
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      ("hidden_activation" if gemma else "hidden_act"): config.hidden_act,
      "max_position_embeddings": config.max_seq_len,
      "rms_norm_eps": config.norm_eps,
      "initializer_range": config.init_std,
      "rope_theta": config.rope_theta,
      "rope_scaling": rope_scaling,
      "tie_word_embeddings": config.tie_embeddings,
      "torch_dtype": jnp.dtype(config.param_dtype).name,
      "use_cache": True,
  }
  types = ["sliding_attention" if s else "full_attention" for s in sliding]
  if architecture == "LlamaForCausalLM":
    out.update(attention_bias=False, mlp_bias=False)
  elif architecture == "MistralForCausalLM":
    out.update(sliding_window=config.sliding_window)
  elif qwen:
    out.update(use_sliding_window=any(sliding),
               sliding_window=config.sliding_window,
               max_window_layers=(sliding.index(True) if any(sliding)
                                  else config.num_layers),
               layer_types=types)
    if architecture == "Qwen3ForCausalLM":
      out.update(attention_bias=False)
  else:
    out.update(
        attention_bias=False, sliding_window=config.sliding_window,
        layer_types=types,
        rope_local_base_freq=(config.rope_theta
                              if config.rope_local_theta is None
                              else config.rope_local_theta),
        query_pre_attn_scalar=_int_if_whole(
            config.head_dim if config.query_pre_attn_scalar is None
            else config.query_pre_attn_scalar),
        attn_logit_softcapping=None, final_logit_softcapping=None)
  return out


def _int_if_whole(value: float) -> int | float:
  """transformers types Gemma's ``query_pre_attn_scalar`` as an int."""
  return int(value) if float(value).is_integer() else value


def _hf_names(config: configs.LlamaConfig, path: str) -> list[tuple[str, bool]]:
  """HF tensor names of our param ``path`` (one per layer for stacks)."""
  for name, (ours, transposed) in _GLOBAL_TENSORS.items():
    if ours == path:
      return [(name, transposed)]
  layer_tensors = ({**_LAYER_TENSORS, **_POST_NORM_TENSORS}
                   if config.post_norms else _LAYER_TENSORS)
  for name, (ours, transposed) in layer_tensors.items():
    if ours == path:
      return [(f"model.layers.{i}.{name}", transposed)
              for i in range(config.num_layers)]
  raise _error("path", f"no Hugging Face name for parameter {path!r}.")


class _Reader:
  """Tensors of a single-file or sharded safetensors checkpoint by name."""

  def __init__(self, root: pathlib.Path):
    # Lazily imported: an optional dependency (extra `examples`).
    import safetensors  # pylint: disable=g-import-not-at-top
    self._safe_open = safetensors.safe_open
    self._errors = (OSError, safetensors.SafetensorError)
    if (root / SINGLE_FILE).exists():
      self._files = {root / SINGLE_FILE: None}
      with self._open(root / SINGLE_FILE) as f:
        self.location = {name: root / SINGLE_FILE for name in f.keys()}
    elif (root / INDEX_FILE).exists():
      weight_map = json.loads((root / INDEX_FILE).read_text())["weight_map"]
      self.location = {name: root / file for name, file in weight_map.items()}
    else:
      gguf = sorted(root.glob("*.gguf"))
      if gguf:
        raise FileNotFoundError(hub.gguf_message(gguf[0]))
      raise FileNotFoundError(
          f"{root}: neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors "
          f"checkpoints are supported).")
    self._handles: dict[pathlib.Path, Any] = {}

  def _open(self, file: pathlib.Path):
    # framework="flax": NumPy cannot represent bfloat16 checkpoints.
    try:
      return self._safe_open(str(file), framework="flax", device="cpu")
    except self._errors as e:
      raise ValueError(
          f"{file}: not a readable safetensors file ({e}); expected a "
          f"complete safetensors file as transformers writes it (truncated "
          f"download or conversion?).") from None

  def get(self, name: str) -> np.ndarray:
    file = self.location[name]
    if file not in self._handles:
      self._handles[file] = self._open(file).__enter__()
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
      return np.asarray(self._handles[file].get_tensor(name))

  def close(self):
    for handle in self._handles.values():
      handle.__exit__(None, None, None)
    self._handles.clear()


def load_pretrained(
    path: PathLike, *, dtype: Any = jnp.float32, compute_dtype: Any = None,
    max_seq_len: int | None = None, mesh: jax.sharding.Mesh | None = None,
    shardings: Any = None, revision: str | None = None, **overrides: Any,
) -> tuple[model_lib.Llama, configs.LlamaConfig]:
  """Loads a Hugging Face checkpoint of :data:`SUPPORTED_ARCHITECTURES`.

  Args:
    path: Folder with ``config.json`` and ``model.safetensors`` or
      ``model.safetensors.index.json`` plus its shards, or a Hub model id
      ``org/name`` (:func:`apollo_lm.hub.resolve_checkpoint`: from the
      Hugging Face cache, downloaded unless ``HF_HUB_OFFLINE=1``).
    dtype: Storage dtype of the parameters (e.g. ``jnp.bfloat16``).
    compute_dtype: Compute dtype of the model; default ``dtype``.
    max_seq_len: Longest sequence; default ``max_position_embeddings``.
    mesh: Optional mesh: parameters are placed per the model's sharding
      annotations (see :mod:`apollo_lm.sharding`).
    shardings: Optional ``nnx.State`` of ``jax.sharding.Sharding`` for the
      parameters (as :func:`apollo_lm.sharding.param_shardings` returns),
      instead of ``mesh``.
    revision: Branch, tag or commit of a Hub id (default ``main``).
    **overrides: Other :class:`~apollo_lm.configs.LlamaConfig` fields (``remat=True`` ...).

  Returns:
    ``(model, config)``; ``config.name`` is the checkpoint's architecture.

  Raises:
    FileNotFoundError: no such folder or Hub id, no config or weights in
      it, or a GGUF file.
    ValueError: an unsupported feature (see :func:`config_from_hf`),
      missing, unexpected or mis-shaped tensors (named), or a weight file
      that is not a complete safetensors file (named).

  Example::

    model, config = load_pretrained("ckpt", dtype=jnp.bfloat16,
                                    mesh=sharding.make_mesh(1, 8, 1))
  """
  root = hub.resolve_checkpoint(path, revision=revision)
  config_path = root / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{root}: no config.json (expected a Hugging Face "
                            f"model folder).")
  config = config_from_hf(
      json.loads(config_path.read_text()), max_seq_len=max_seq_len,
      param_dtype=dtype, dtype=compute_dtype, **overrides)
  graphdef, abstract = nnx.split(
      nnx.eval_shape(lambda: model_lib.Llama(config, rngs=nnx.Rngs(0))))
  if mesh is not None and shardings is None:
    shardings = sharding_lib.param_shardings(abstract, mesh)
  flat_shardings = None
  if shardings is not None:
    flat_shardings = {
        "/".join(map(str, p)): s.get_value() if isinstance(s, nnx.Variable)
        else s for p, s in nnx.to_flat_state(shardings)}

  reader = _Reader(root)
  try:
    wanted = set()
    leaves = []
    for key, variable in nnx.to_flat_state(abstract):
      path_str = "/".join(map(str, key))
      names = _hf_names(config, path_str)
      wanted.update(name for name, _ in names)
      shape = tuple(variable.shape)
      # One host buffer per stacked leaf, filled tensor by tensor.
      host = np.empty(shape, jnp.dtype(dtype))
      for i, (name, transposed) in enumerate(names):
        if name not in reader.location:
          raise _error("path", f"{root}: missing tensor {name!r} (for {path_str}).")
        tensor = reader.get(name)
        if transposed:
          tensor = tensor.T
        target = host[i] if len(names) > 1 else host
        if tensor.shape != target.shape:
          raise _error(
              "path", f"{root}: tensor {name!r} has shape {list(tensor.shape)}, the "
              f"config implies {list(target.shape[::-1] if transposed else target.shape)}.")
        target[...] = tensor
        del tensor
      if flat_shardings is not None:
        value = jax.device_put(host, flat_shardings[path_str])
      else:
        value = jax.device_put(host)
      del host
      leaves.append((key, variable.replace(value)))
    unexpected = sorted(
        name for name in reader.location if name not in wanted
        and not name.endswith(_IGNORED_SUFFIXES)
        and not (config.tie_embeddings and name == "lm_head.weight"))
    if unexpected:
      raise _error(
          "path", f"{root}: unexpected tensors {unexpected[:5]}"
          f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)}); "
          f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} weights.")
  finally:
    reader.close()
  model = nnx.merge(graphdef, nnx.from_flat_state(leaves))
  return model, config


def save_pretrained(model: model_lib.Llama, config: configs.LlamaConfig,
                    path: PathLike, *, architecture: str | None = None,
                    max_shard_size: int = MAX_SHARD_SIZE) -> list[str]:
  """Writes ``model`` as a Hugging Face folder that ``transformers`` loads.

  ``config.json`` (see :func:`config_to_hf`) and ``model.safetensors``, or
  ``model-0000i-of-0000N.safetensors`` shards of at most ``max_shard_size``
  bytes with ``model.safetensors.index.json``. Tensors keep the parameters'
  dtype; a tied model writes no ``lm_head.weight``. Host memory: about one
  shard (tensors leave the devices one layer slice at a time).

  Returns:
    The weight file names written.

  Example::

    save_pretrained(model, config, "out")
    # transformers.AutoModelForCausalLM.from_pretrained("out")
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(path)
  root.mkdir(parents=True, exist_ok=True)
  hf_config = config_to_hf(config, architecture)
  state = nnx.state(model, nnx.Param)
  by_name: dict[str, tuple[str, bool, int | None]] = {}
  params = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}
  for path_str in params:
    names = _hf_names(config, path_str)
    for i, (name, transposed) in enumerate(names):
      by_name[name] = (path_str, transposed, i if len(names) > 1 else None)

  # HF order: embedding, layer by layer, final norm, head.
  def order(name: str):
    if name.startswith("model.layers."):
      return (1, int(name.split(".")[2]), name)
    return (0 if "embed" in name else 2 if name == "model.norm.weight" else 3,
            0, name)

  shards: list[dict[str, np.ndarray]] = [{}]
  sizes = [0]
  for name in sorted(by_name, key=order):
    path_str, transposed, index = by_name[name]
    value = params[path_str][...]
    # Only this layer's slice leaves the devices.
    tensor = np.asarray(jax.device_get(value if index is None else value[index]))
    tensor = np.ascontiguousarray(tensor.T if transposed else tensor)
    if sizes[-1] and sizes[-1] + tensor.nbytes > max_shard_size:
      shards.append({})
      sizes.append(0)
    shards[-1][name] = tensor
    sizes[-1] += tensor.nbytes
  files = []
  if len(shards) == 1:
    files.append(SINGLE_FILE)
    save_file(shards[0], str(root / SINGLE_FILE), metadata={"format": "pt"})
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, str(root / file), metadata={"format": "pt"})
      files.append(file)
      weight_map.update({name: file for name in shard})
    (root / INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map},
        indent=2) + "\n")
  (root / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
  return files


def eos_token_ids(path: PathLike, *, revision: str | None = None
                  ) -> tuple[int, ...]:
  """End-of-sequence ids for generation (Llama 3 has several).

  From ``generation_config.json``'s ``eos_token_id`` (an int or a list),
  else ``config.json``'s; empty when neither names one. ``path`` is a folder
  or a Hub id, as for :func:`load_pretrained`.
  """
  root = hub.resolve_checkpoint(path, revision=revision)
  for file in ("generation_config.json", "config.json"):
    if (root / file).exists():
      value = json.loads((root / file).read_text()).get("eos_token_id")
      if value is not None:
        return tuple(value) if isinstance(value, list) else (int(value),)
  return ()
