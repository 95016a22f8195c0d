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
"""LLaMA model configurations used in the APOLLO paper's experiments.

The sizes follow the `configs/llama_*.json` files of the GaLore and APOLLO
reference repositories (jiaweizzhao/GaLore, zhuhanqing/APOLLO), which is what
the paper's runs actually instantiated. Besides them, the shapes of a few
published checkpoints (Qwen3-0.6B, Qwen3-8B, Gemma-3-1B) are registered under
:data:`PUBLISHED_CONFIG_NAMES`, with their ``config.json`` values.
"""

import dataclasses
from typing import Any, Final

import jax.numpy as jnp

# name -> (hidden_size, intermediate_size, num_heads, num_layers).
#
# Where the paper's model table (APOLLO Table 11, copied from GaLore's Table 5)
# and the json files disagree we follow the json files, because those are the
# models that were trained:
#   * 1b: the table lists 24 heads and 32 layers; llama_1b.json has 32 heads
#     and 24 layers (2048 / 24 would not even give an integer head size).
#   * 100m: llama_100m.json sets vocab_size=32100 (the T5 tokenizer's size with
#     its extra ids); every other file uses 32000. Vocabulary size is not part
#     of this table: it comes from the tokenizer via `get_config(vocab_size=)`.
# "tiny" is not from the paper: it is the 9m shape, small enough to train a
# few hundred steps of batch 16 x 128 tokens on two CPU cores in minutes.
_SHAPES: Final[dict[str, tuple[int, int, int, int]]] = {
    "tiny": (128, 352, 4, 4),
    "9m": (128, 352, 4, 4),
    "20m": (256, 688, 4, 4),
    "35m": (384, 1024, 8, 6),
    "60m": (512, 1376, 8, 8),
    "71m": (512, 1368, 8, 12),
    "100m": (640, 1708, 10, 12),
    "130m": (768, 2048, 12, 12),
    "250m": (768, 2560, 16, 24),
    "350m": (1024, 2736, 16, 24),
    "1b": (2048, 5461, 32, 24),
    "3b": (2560, 6848, 32, 32),
    "7b": (4096, 11008, 32, 32),
    "13b": (5120, 13824, 40, 40),
}

CONFIG_NAMES: Final[tuple[str, ...]] = tuple(_SHAPES)


def gemma3_layer_types(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
  """HF's expansion of Gemma 3's ``sliding_window_pattern``: every
  ``pattern``-th layer is global, the others slide."""
  return tuple("full_attention" if (i + 1) % pattern == 0
               else "sliding_attention" for i in range(num_layers))


# Published checkpoints' shapes, as their config.json on the Hugging Face Hub
# states them (`apollo_lm.hf.config_from_hf` of that file gives the same
# config, apart from `name`):
#   qwen3-0.6b: huggingface.co/Qwen/Qwen3-0.6B/blob/main/config.json
#   qwen3-8b:   huggingface.co/Qwen/Qwen3-8B/blob/main/config.json
#   gemma-3-1b: huggingface.co/google/gemma-3-1b-it/blob/main/config.json
#     (text-only Gemma3ForCausalLM; sliding_window_pattern 6, no rope_scaling)
_PUBLISHED: Final[dict[str, dict[str, Any]]] = {
    "qwen3-0.6b": dict(
        hidden_size=1024, intermediate_size=3072, num_heads=16, num_layers=28,
        num_kv_heads=8, head_dim=128, vocab_size=151936,
        max_seq_len=40960, rope_theta=1e6, norm_eps=1e-6,
        tie_embeddings=True, qk_norm=True),
    "qwen3-8b": dict(
        hidden_size=4096, intermediate_size=12288, num_heads=32, num_layers=36,
        num_kv_heads=8, head_dim=128, vocab_size=151936,
        max_seq_len=40960, rope_theta=1e6, norm_eps=1e-6,
        tie_embeddings=False, qk_norm=True),
    "gemma-3-1b": dict(
        hidden_size=1152, intermediate_size=6912, num_heads=4, num_layers=26,
        num_kv_heads=1, head_dim=256, vocab_size=262144,
        max_seq_len=32768, rope_theta=1e6, rope_local_theta=1e4,
        norm_eps=1e-6, tie_embeddings=True, qk_norm=True,
        sliding_window=512, layer_types=gemma3_layer_types(26),
        hidden_act="gelu_pytorch_tanh", norm_plus_one=True, post_norms=True,
        scale_embeddings=True, query_pre_attn_scalar=256.0),
}

PUBLISHED_CONFIG_NAMES: Final[tuple[str, ...]] = tuple(_PUBLISHED)


ROPE_SCALING_TYPES: Final[tuple[str, ...]] = ("llama3", "linear")
ACTIVATIONS: Final[tuple[str, ...]] = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES: Final[tuple[str, ...]] = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  r"""RoPE frequency scaling: ``llama3`` (Llama 3.1 / 3.2) or ``linear``.

  ``linear`` (Gemma 3's global layers) divides every frequency by ``factor``
  and needs no other field. ``llama3`` rescales by wavelength:

  each rotary frequency :math:`f_i = \theta^{-2i/D}` with wavelength
  :math:`\lambda_i = 2\pi / f_i` is rescaled, with
  :math:`L` = ``original_max_position_embeddings``:

  .. math::

    f_i' = \begin{cases}
      f_i & \lambda_i < L / \text{high\_freq\_factor} \\
      f_i / \text{factor} & \lambda_i > L / \text{low\_freq\_factor} \\
      (1 - s) f_i / \text{factor} + s f_i & \text{otherwise,}
    \end{cases}
    \quad s = \frac{L / \lambda_i - \text{low\_freq\_factor}}
                  {\text{high\_freq\_factor} - \text{low\_freq\_factor}}.

  Example::

    scaling = RopeScaling(factor=32.0, low_freq_factor=1.0,
                          high_freq_factor=4.0,
                          original_max_position_embeddings=8192)
    gemma3_global = RopeScaling(factor=8.0, rope_type="linear")

  Attributes:
    factor: Divisor of the (low) frequencies.
    low_freq_factor: Wavelengths above ``L / low_freq_factor`` are scaled
      (``llama3`` only).
    high_freq_factor: Wavelengths below ``L / high_freq_factor`` are kept
      (``llama3`` only).
    original_max_position_embeddings: Context length ``L`` of pre-training
      (``llama3`` only).
    rope_type: One of :data:`ROPE_SCALING_TYPES`.
  """

  factor: float
  low_freq_factor: float | None = None
  high_freq_factor: float | None = None
  original_max_position_embeddings: int | None = None
  rope_type: str = "llama3"

  def __post_init__(self):
    if self.rope_type not in ROPE_SCALING_TYPES:
      raise ValueError(
          f"RopeScaling: unsupported `rope_type` {self.rope_type!r}; supported "
          f"RoPE scaling types: {', '.join(ROPE_SCALING_TYPES)} (or no "
          f"scaling).")
    fields = ("factor",) if self.rope_type == "linear" else (
        "factor", "low_freq_factor", "high_freq_factor",
        "original_max_position_embeddings")
    for field in fields:
      value = getattr(self, field)
      if value is None or not value > 0:
        raise ValueError(
            f"RopeScaling: `{field}` must be > 0 for rope_type "
            f"{self.rope_type!r}, got {value!r}.")
    if self.rope_type == "llama3" and not (
        self.high_freq_factor > self.low_freq_factor):
      raise ValueError(
          f"RopeScaling: `high_freq_factor`={self.high_freq_factor} must be > "
          f"`low_freq_factor`={self.low_freq_factor}.")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyper-parameters of a LLaMA-family decoder (pre-norm, RoPE, SwiGLU).

  The defaults are the paper's LLaMA (multi-head attention, untied output
  head, no biases); the optional fields cover Llama 2/3.x, Mistral, Qwen2,
  Qwen3 and Gemma 3 (text) checkpoints (see :mod:`apollo_lm.hf`).

  ``num_kv_heads`` and ``head_dim`` given as ``None`` are resolved at
  construction (to ``num_heads`` and ``hidden_size // num_heads``), as in
  Hugging Face ``transformers``; ``dataclasses.replace`` keeps the resolved
  values, so pass them again when changing ``num_heads`` or ``hidden_size``.

  Attributes:
    name: Registry name of the shape, e.g. ``"60m"``; informational only.
    hidden_size: Model width ``d``.
    intermediate_size: SwiGLU hidden width ``f``.
    num_heads: Attention (query) heads ``H``.
    num_layers: Number of transformer blocks ``L``.
    vocab_size: Vocabulary size ``V``; set it from the tokenizer.
    max_seq_len: Longest sequence the model accepts (the paper uses 256).
    rope_theta: Base of the rotary embedding frequencies.
    norm_eps: Epsilon of every RMSNorm.
    init_std: Standard deviation of the normal init of every weight matrix
      (HF LLaMA's ``initializer_range``).
    dtype: Compute dtype of activations and matmuls.
    param_dtype: Storage dtype of the (master) parameters.
    remat: Rematerialise each block in the backward pass (saves activation
      memory at the cost of recomputing the forward pass of each block).
    scan_layers: Compile the layer stack as one ``lax.scan`` loop body. When
      False the same stacked parameters are applied in a fully unrolled loop,
      which compiles more slowly but lets XLA optimise across layers.
    num_kv_heads: Key/value heads ``K`` (``H`` = multi-head, fewer =
      grouped-query, 1 = multi-query attention); must divide ``num_heads``.
    head_dim: Size ``D`` of each attention head (even, for RoPE).
    tie_embeddings: Compute the logits with the transposed input embedding
      instead of a separate ``lm_head``.
    rope_scaling: Optional :class:`RopeScaling` (Llama 3.1 / 3.2).
    qkv_bias: Biases on the query, key and value projections (Qwen2).
    sliding_window: Attention window ``w`` of the sliding-window layers: a
      query at index ``i`` sees keys ``i - w + 1 .. i`` (HF's rule). Which
      layers slide: ``layer_types``, else all (Mistral). A window of at least
      ``max_seq_len`` changes nothing and compiles as full attention.
    layer_types: Optional per-layer ``"full_attention"`` /
      ``"sliding_attention"`` (HF ``layer_types``; Gemma 3 interleaves 5
      sliding layers with 1 global one). The layer stack stays one scanned
      block: the per-layer windows and RoPE frequencies are scanned arrays.
    rope_local_theta: RoPE base of the sliding layers (Gemma 3's
      ``rope_local_base_freq``), which then get no ``rope_scaling``; default:
      every layer uses ``rope_theta`` and ``rope_scaling``.
    qk_norm: RMSNorm over ``head_dim`` of every query and key head before
      RoPE, one scale per layer shared by the heads (Qwen3, Gemma 3).
    hidden_act: MLP gate activation, one of :data:`ACTIVATIONS` (``silu``:
      SwiGLU; ``gelu_pytorch_tanh``: GeGLU with tanh-approximate GELU).
    norm_plus_one: RMSNorm scales are stored as ``w`` (initialised to 0) and
      applied as ``1 + w``, in float32 before rounding (Gemma).
    post_norms: RMSNorms also on the attention and MLP outputs, before the
      residual adds (Gemma 2/3 "sandwich" norms).
    scale_embeddings: Multiply the input embeddings by ``sqrt(hidden_size)``
      rounded to the compute dtype (Gemma).
    query_pre_attn_scalar: Attention logits are scaled by
      ``query_pre_attn_scalar ** -0.5`` instead of ``head_dim ** -0.5``.
  """

  name: str
  hidden_size: int
  intermediate_size: int
  num_heads: int
  num_layers: int
  vocab_size: int = 32000
  max_seq_len: int = 256
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  init_std: float = 0.02
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32
  remat: bool = False
  scan_layers: bool = True
  num_kv_heads: int | None = None
  head_dim: int | None = None
  tie_embeddings: bool = False
  rope_scaling: RopeScaling | None = None
  qkv_bias: bool = False
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None
  rope_local_theta: float | None = None
  qk_norm: bool = False
  hidden_act: str = "silu"
  norm_plus_one: bool = False
  post_norms: bool = False
  scale_embeddings: bool = False
  query_pre_attn_scalar: float | None = None

  def __post_init__(self):
    for field in ("hidden_size", "intermediate_size", "num_heads",
                  "num_layers", "vocab_size", "max_seq_len"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(
            f"LlamaConfig({self.name!r}): `{field}` must be a positive int, "
            f"got {value!r}.")
    for field in ("num_kv_heads", "head_dim", "sliding_window"):
      value = getattr(self, field)
      if value is not None and (not isinstance(value, int) or
                                isinstance(value, bool) or value <= 0):
        raise ValueError(
            f"LlamaConfig({self.name!r}): `{field}` must be None or a "
            f"positive int, got {value!r}.")
    for field in ("rope_theta", "norm_eps", "init_std"):
      if not getattr(self, field) > 0:
        raise ValueError(
            f"LlamaConfig({self.name!r}): `{field}` must be > 0, got "
            f"{getattr(self, field)!r}.")
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(
            f"LlamaConfig({self.name!r}): `hidden_size`={self.hidden_size} "
            f"must be divisible by `num_heads`={self.num_heads} (or give "
            f"`head_dim`).")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.num_kv_heads is None:
      object.__setattr__(self, "num_kv_heads", self.num_heads)
    if self.head_dim % 2:
      raise ValueError(
          f"LlamaConfig({self.name!r}): the head size `head_dim` = "
          f"{self.head_dim} must be even for rotary embeddings.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"LlamaConfig({self.name!r}): `num_heads`={self.num_heads} must be "
          f"divisible by `num_kv_heads`={self.num_kv_heads}.")
    if self.rope_scaling is not None and not isinstance(
        self.rope_scaling, RopeScaling):
      raise ValueError(
          f"LlamaConfig({self.name!r}): `rope_scaling` must be None or a "
          f"RopeScaling, got {self.rope_scaling!r}.")
    if self.layer_types is not None:
      if isinstance(self.layer_types, list):
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
      if (len(self.layer_types) != self.num_layers or
          set(self.layer_types) - set(LAYER_TYPES)):
        raise ValueError(
            f"LlamaConfig({self.name!r}): `layer_types` must be None or "
            f"`num_layers`={self.num_layers} entries from {LAYER_TYPES}, got "
            f"{self.layer_types!r}.")
      if "sliding_attention" in self.layer_types and (
          self.sliding_window is None):
        raise ValueError(
            f"LlamaConfig({self.name!r}): `layer_types` has sliding_attention "
            f"layers but `sliding_window` is None.")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(
          f"LlamaConfig({self.name!r}): unsupported `hidden_act` "
          f"{self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}.")
    for field in ("rope_local_theta", "query_pre_attn_scalar"):
      value = getattr(self, field)
      if value is not None and not value > 0:
        raise ValueError(
            f"LlamaConfig({self.name!r}): `{field}` must be None or > 0, got "
            f"{value!r}.")
    for field in ("dtype", "param_dtype"):
      if not jnp.issubdtype(getattr(self, field), jnp.floating):
        raise ValueError(
            f"LlamaConfig({self.name!r}): `{field}` must be a floating dtype, "
            f"got {getattr(self, field)!r}.")

  @property
  def sliding_types(self) -> tuple[bool, ...]:
    """Per layer: is it a sliding-window layer (by ``layer_types``)?"""
    if self.layer_types is not None:
      return tuple(t == "sliding_attention" for t in self.layer_types)
    return (self.sliding_window is not None,) * self.num_layers

  @property
  def windowed(self) -> bool:
    """Does any layer's window bind (shorter than ``max_seq_len``)?"""
    return any(self.sliding_types) and self.sliding_window < self.max_seq_len

  @property
  def local_rope(self) -> bool:
    """Do the sliding layers use their own RoPE base (``rope_local_theta``)?"""
    return self.rope_local_theta is not None and any(self.sliding_types)


def get_config(name: str, **overrides: Any) -> LlamaConfig:
  """Returns the registered LLaMA configuration ``name`` with ``overrides``.

  Args:
    name: One of :data:`CONFIG_NAMES` (``"tiny"``, ``"60m"``, ..., ``"13b"``,
      the paper's) or :data:`PUBLISHED_CONFIG_NAMES` (``"qwen3-0.6b"``,
      ``"qwen3-8b"``, ``"gemma-3-1b"``: published checkpoints' shapes).
    **overrides: Values for any other :class:`LlamaConfig` field, typically
      ``vocab_size`` (from the tokenizer), ``max_seq_len``, ``dtype`` or
      ``remat``.

  Returns:
    The validated, frozen configuration.

  Raises:
    ValueError: if ``name`` is not registered or the result is inconsistent.
    TypeError: if an override is not a :class:`LlamaConfig` field.
  """
  if name not in _SHAPES and name not in _PUBLISHED:
    raise ValueError(
        f"get_config: unknown `name` {name!r}; allowed names: "
        f"{', '.join(CONFIG_NAMES + PUBLISHED_CONFIG_NAMES)}.")
  fields = {f.name for f in dataclasses.fields(LlamaConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise TypeError(
        f"get_config: unknown override(s) {unknown}; LlamaConfig fields are "
        f"{sorted(fields)}.")
  if name in _PUBLISHED:
    kwargs = dict(name=name, **_PUBLISHED[name])
  else:
    hidden, intermediate, heads, layers = _SHAPES[name]
    kwargs = dict(name=name, hidden_size=hidden,
                  intermediate_size=intermediate, num_heads=heads,
                  num_layers=layers)
  kwargs.update(overrides)
  return LlamaConfig(**kwargs)
