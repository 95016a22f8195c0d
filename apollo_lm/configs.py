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
the paper's runs actually instantiated.
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


ROPE_SCALING_TYPES: Final[tuple[str, ...]] = ("llama3",)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  r"""RoPE frequency scaling of type ``llama3`` (Llama 3.1 / 3.2 checkpoints).

  Each rotary frequency :math:`f_i = \theta^{-2i/D}` with wavelength
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

  Attributes:
    factor: Divisor of the low frequencies.
    low_freq_factor: Wavelengths above ``L / low_freq_factor`` are scaled.
    high_freq_factor: Wavelengths below ``L / high_freq_factor`` are kept.
    original_max_position_embeddings: Context length ``L`` of pre-training.
    rope_type: Only ``"llama3"`` is supported.
  """

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int
  rope_type: str = "llama3"

  def __post_init__(self):
    if self.rope_type not in ROPE_SCALING_TYPES:
      raise ValueError(
          f"RopeScaling: unsupported `rope_type` {self.rope_type!r}; supported "
          f"RoPE scaling types: {', '.join(ROPE_SCALING_TYPES)} (or no "
          f"scaling).")
    for field in ("factor", "low_freq_factor", "high_freq_factor",
                  "original_max_position_embeddings"):
      if not getattr(self, field) > 0:
        raise ValueError(
            f"RopeScaling: `{field}` must be > 0, got "
            f"{getattr(self, field)!r}.")
    if not self.high_freq_factor > self.low_freq_factor:
      raise ValueError(
          f"RopeScaling: `high_freq_factor`={self.high_freq_factor} must be > "
          f"`low_freq_factor`={self.low_freq_factor}.")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyper-parameters of a LLaMA-family decoder (pre-norm, RoPE, SwiGLU).

  The defaults are the paper's LLaMA (multi-head attention, untied output
  head, no biases); the optional fields cover Llama 2/3.x, Mistral (without
  sliding windows) and Qwen2 checkpoints (see :mod:`apollo_lm.hf`).

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
    sliding_window: The checkpoint's sliding attention window, if any; only
      windows at least ``max_seq_len`` long are supported (then it changes
      nothing), so every position attends to all earlier ones.
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
    if self.sliding_window is not None and (
        self.sliding_window < self.max_seq_len):
      raise ValueError(
          f"LlamaConfig({self.name!r}): sliding-window attention shorter than "
          f"the sequence is not supported: `sliding_window`="
          f"{self.sliding_window} < `max_seq_len`={self.max_seq_len}; use "
          f"max_seq_len <= {self.sliding_window} (supported: full causal "
          f"attention, or a window at least max_seq_len long).")
    for field in ("dtype", "param_dtype"):
      if not jnp.issubdtype(getattr(self, field), jnp.floating):
        raise ValueError(
            f"LlamaConfig({self.name!r}): `{field}` must be a floating dtype, "
            f"got {getattr(self, field)!r}.")


def get_config(name: str, **overrides: Any) -> LlamaConfig:
  """Returns the registered LLaMA configuration ``name`` with ``overrides``.

  Args:
    name: One of :data:`CONFIG_NAMES` (``"tiny"``, ``"60m"``, ..., ``"13b"``).
    **overrides: Values for any other :class:`LlamaConfig` field, typically
      ``vocab_size`` (from the tokenizer), ``max_seq_len``, ``dtype`` or
      ``remat``.

  Returns:
    The validated, frozen configuration.

  Raises:
    ValueError: if ``name`` is not registered or the result is inconsistent.
    TypeError: if an override is not a :class:`LlamaConfig` field.
  """
  if name not in _SHAPES:
    raise ValueError(
        f"get_config: unknown `name` {name!r}; allowed names: "
        f"{', '.join(CONFIG_NAMES)}.")
  fields = {f.name for f in dataclasses.fields(LlamaConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise TypeError(
        f"get_config: unknown override(s) {unknown}; LlamaConfig fields are "
        f"{sorted(fields)}.")
  hidden, intermediate, heads, layers = _SHAPES[name]
  kwargs = dict(name=name, hidden_size=hidden, intermediate_size=intermediate,
                num_heads=heads, num_layers=layers)
  kwargs.update(overrides)
  return LlamaConfig(**kwargs)
