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
"""LLaMA decoder in Flax NNX with stacked, scanned layers.

The architecture is HF ``LlamaForCausalLM`` as used by the APOLLO/GaLore
pre-training runs: token embedding, ``L`` pre-norm blocks of rotary causal
self-attention and a SwiGLU MLP, a final RMSNorm and an untied output head,
no biases. Optional config fields add what Llama 2/3.x, Mistral, Qwen2, Qwen3
and Gemma 3 checkpoints need: grouped-/multi-query attention
(``num_kv_heads``), an explicit ``head_dim``, tied embeddings (no
``lm_head``), llama3/linear RoPE scaling, q/k/v biases (``qkv_bias``),
per-head q/k RMSNorms (``qk_norm``), sliding-window layers with their own
RoPE base (``sliding_window``, ``layer_types``, ``rope_local_theta``) and
Gemma's GeGLU, ``1 + w`` norms, post-norms, scaled embeddings and
``query_pre_attn_scalar``. The ``L`` blocks are created once with
``nnx.vmap`` so every block weight carries a leading layer axis, and applied
with ``nnx.scan``; one block is compiled instead of ``L``, and optimizers see
one ``(L, m, n)`` array per weight kind. What differs between layers (window,
RoPE frequencies) is a :class:`LayerSpec` of ``(L, ...)`` arrays scanned
alongside.

Parameter paths (the contract that optimizer labelling and sharding code rely
on; ``nnx.Linear`` kernels are ``(in, out)``)::

  embed/embedding                                (V, d)
  layers/attn/q_proj/kernel                      (L, d, H*D)
  layers/attn/{k,v}_proj/kernel                  (L, d, K*D)
  layers/attn/o_proj/kernel                      (L, H*D, d)
  layers/attn/{q,k,v}_proj/bias                  (L, H*D | K*D)  (qkv_bias)
  layers/mlp/{gate,up}_proj/kernel               (L, d, f)
  layers/mlp/down_proj/kernel                    (L, f, d)
  layers/attn/{q,k}_norm/scale                   (L, D)  (qk_norm)
  layers/{attn,mlp}_norm/scale                   (L, d)
  layers/post_{attn,mlp}_norm/scale              (L, d)  (post_norms)
  final_norm/scale                               (d,)
  lm_head/kernel                                 (d, V)  (not when tied)

with ``H`` = ``num_heads``, ``K`` = ``num_kv_heads``, ``D`` = ``head_dim``
(the paper's configs: ``K = H``, ``H*D = d``).
"""

from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp

from apollo_lm.configs import get_config
from apollo_lm.configs import LlamaConfig
from apollo_lm.configs import RopeScaling
from apollo_lm.sharding import constrain

# Activation layouts for `constrain`: the batch is split over both the data
# and the fsdp axes (FSDP shards the batch like data parallelism), heads and
# MLP features over the tensor axis.
_BATCH = ("data", "fsdp")
_RESIDUAL = (_BATCH, None, None)
_HEADS = (_BATCH, None, "tensor", None)
_FEATURES = (_BATCH, None, "tensor")


def _normal(config: LlamaConfig, sharding: tuple[Any, ...]):
  """HF LLaMA weight init, normal(0, init_std), annotated with ``sharding``."""
  return nnx.with_partitioning(
      nnx.initializers.normal(config.init_std), sharding)


def _linear(config: LlamaConfig, din: int, dout: int,
            sharding: tuple[Any, ...], rngs: nnx.Rngs, *,
            use_bias: bool = False, **kwargs) -> nnx.Linear:
  """``(din, dout)`` projection in the config's dtypes; bias zero-initialised."""
  return nnx.Linear(
      din, dout, use_bias=use_bias, dtype=config.dtype,
      param_dtype=config.param_dtype,
      kernel_init=_normal(config, sharding),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(),
                                      sharding[1:]),
      rngs=rngs, **kwargs)


class RMSNorm(nnx.Module):
  r"""Root-mean-square norm with a learned scale, statistics in float32.

  :math:`y = x / \sqrt{\overline{x^2} + \epsilon} \cdot s` over the last
  axis (of size ``size``, default ``hidden_size``), with :math:`s` = ``scale``
  (init 1), or :math:`s = 1 + w`, ``scale`` = :math:`w` (init 0) with
  ``config.norm_plus_one`` (Gemma).
  """

  def __init__(self, config: LlamaConfig, size: int | None = None):
    self.eps = config.norm_eps
    self.dtype = config.dtype
    self.plus_one = config.norm_plus_one
    init = jnp.zeros if self.plus_one else jnp.ones
    self.scale = nnx.Param(
        init((size or config.hidden_size,), config.param_dtype),
        out_sharding=(None,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
    if self.plus_one:
      # As HF Gemma: scale in float32, then round.
      return (x32 * (1 + self.scale[...].astype(jnp.float32))).astype(
          self.dtype)
    # As HF LLaMA: normalise in float32, round, then scale in compute dtype.
    return x32.astype(self.dtype) * self.scale[...].astype(self.dtype)


def rope_frequencies(head_dim: int, theta: float,
                     scaling: RopeScaling | None = None) -> jax.Array:
  """The ``head_dim / 2`` rotary frequencies ``theta^(-2i/D)``, float32.

  With ``scaling`` of type llama3 low frequencies are divided by
  ``scaling.factor`` and the band between interpolated; type linear divides
  all of them; see :class:`apollo_lm.configs.RopeScaling`.
  """
  inv_freq = theta ** -(jnp.arange(0, head_dim, 2, jnp.float32) / head_dim)
  if scaling is None:
    return inv_freq
  if scaling.rope_type == "linear":
    return inv_freq / scaling.factor
  context = scaling.original_max_position_embeddings
  wavelength = 2 * jnp.pi / inv_freq
  smooth = (context / wavelength - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
  return jnp.where(
      wavelength < context / scaling.high_freq_factor, inv_freq,
      jnp.where(wavelength > context / scaling.low_freq_factor,
                inv_freq / scaling.factor, interpolated))


def rotary_embedding(x: jax.Array, theta: float,
                     positions: jax.Array | None = None,
                     scaling: RopeScaling | None = None, *,
                     inv_freq: jax.Array | None = None) -> jax.Array:
  """Rotates ``x[B, T, H, D]`` by position-dependent angles (RoPE).

  Uses the "rotate half" layout of HF LLaMA, which pairs feature ``i`` with
  ``i + D/2``; the angles are computed and applied in float32.

  Args:
    x: Queries or keys, ``[B, T, H, D]``.
    theta: Base of the frequencies.
    positions: Optional ``int[B, T]`` position of each token; default
      ``0 .. T-1`` in every row.
    scaling: Optional frequency scaling.
    inv_freq: Optional ``float32[D/2]`` frequencies to use instead of those
      of ``theta`` and ``scaling`` (a traced per-layer row).
  """
  seq_len, head_dim = x.shape[1], x.shape[-1]
  if inv_freq is None:
    inv_freq = rope_frequencies(head_dim, theta, scaling)
  if positions is None:
    angles = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq
    cos = jnp.cos(angles)[None, :, None, :]
    sin = jnp.sin(angles)[None, :, None, :]
  else:
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
  return rotated.astype(x.dtype)


class KVCache(NamedTuple):
  """Keys and values of every layer for incremental decoding.

  Attributes:
    k: ``[L, B, S, K, D]`` rotated keys (``S`` = cache capacity).
    v: ``[L, B, S, K, D]`` values.
    length: ``int32[]``, how many positions are filled (the next position).
    pad: optional ``int32[B]``, how many slots at the start of each row are
      left padding (prompts of different lengths in one batch): they are
      never attended to, and positions of a row start at its first token.
  """

  k: jax.Array
  v: jax.Array
  length: jax.Array
  pad: jax.Array | None = None


class LayerSpec(NamedTuple):
  """What differs between the scanned layers; ``None`` fields are uniform.

  Attributes:
    window: ``int32[L]``: a query at index ``i`` sees keys ``i - w + 1 .. i``
      (``max_seq_len`` for global layers), or None: every layer is global.
    inv_freq: ``float32[L, D/2]`` RoPE frequencies of each layer, or None:
      every layer uses the config's ``rope_theta`` and ``rope_scaling``.
  """

  window: jax.Array | None = None
  inv_freq: jax.Array | None = None


def layer_spec(config: LlamaConfig) -> LayerSpec | None:
  """The per-layer :class:`LayerSpec` of ``config``; None when uniform.

  Uniform configs (the paper's, Llama, Qwen) compile exactly as without
  per-layer settings.

  Example::

    spec = layer_spec(get_config("gemma-3-1b"))
    spec.window[:6]    # [512, 512, 512, 512, 512, 32768]: layer 5 is global
    spec.inv_freq[0]   # base 10k (sliding), spec.inv_freq[5]: base 1M
  """
  if not (config.windowed or config.local_rope):
    return None
  sliding = config.sliding_types
  window = inv_freq = None
  if config.windowed:
    window = jnp.asarray(
        [config.sliding_window if s else config.max_seq_len for s in sliding],
        jnp.int32)
  if config.local_rope:
    local = rope_frequencies(config.head_dim, config.rope_local_theta)
    full = rope_frequencies(config.head_dim, config.rope_theta,
                            config.rope_scaling)
    inv_freq = jnp.stack([local if s else full for s in sliding])
  return LayerSpec(window, inv_freq)


def _window_mask(query_index: jax.Array, key_index: jax.Array,
                 window: jax.Array | None) -> jax.Array | None:
  """``[1, 1, Tq, Tk]``: key within ``window`` tokens of the query."""
  if window is None:
    return None
  return ((query_index[:, None] - key_index[None, :]) < window)[None, None]


def _and(a: jax.Array | None, b: jax.Array | None) -> jax.Array | None:
  return b if a is None else a if b is None else a & b


class Attention(nnx.Module):
  """Causal self-attention with rotary positions on q and k.

  ``num_kv_heads`` key/value heads are shared by groups of
  ``num_heads / num_kv_heads`` query heads (grouped-query attention; equal
  numbers give multi-head, one gives multi-query attention).
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    d, dq = config.hidden_size, config.num_heads * config.head_dim
    dkv = config.num_kv_heads * config.head_dim
    self.num_heads = config.num_heads
    self.num_kv_heads = config.num_kv_heads
    self.head_dim = config.head_dim
    self.rope_theta = config.rope_theta
    self.rope_scaling = config.rope_scaling
    self.scale = (None if config.query_pre_attn_scalar is None
                  else config.query_pre_attn_scalar ** -0.5)
    if config.qk_norm:
      self.q_norm = RMSNorm(config, config.head_dim)
      self.k_norm = RMSNorm(config, config.head_dim)
    bias = config.qkv_bias
    self.q_proj = _linear(config, d, dq, ("fsdp", "tensor"), rngs,
                          use_bias=bias)
    self.k_proj = _linear(config, d, dkv, ("fsdp", "tensor"), rngs,
                          use_bias=bias)
    self.v_proj = _linear(config, d, dkv, ("fsdp", "tensor"), rngs,
                          use_bias=bias)
    self.o_proj = _linear(config, dq, d, ("tensor", "fsdp"), rngs)

  def _qkv(self, x: jax.Array, positions: jax.Array | None,
           inv_freq: jax.Array | None = None):
    batch, seq_len, _ = x.shape

    def heads(proj: nnx.Linear, num: int,
              norm: RMSNorm | None = None) -> jax.Array:
      out = proj(x).reshape(batch, seq_len, num, self.head_dim)
      if norm is not None:
        out = norm(out)
      return constrain(out, _HEADS)

    def rope(y: jax.Array) -> jax.Array:
      return rotary_embedding(y, self.rope_theta, positions, self.rope_scaling,
                              inv_freq=inv_freq)

    return (rope(heads(self.q_proj, self.num_heads,
                       getattr(self, "q_norm", None))),
            rope(heads(self.k_proj, self.num_kv_heads,
                       getattr(self, "k_norm", None))),
            heads(self.v_proj, self.num_kv_heads))

  def __call__(self, x: jax.Array, *, positions: jax.Array | None = None,
               mask: jax.Array | None = None,
               spec: LayerSpec | None = None) -> jax.Array:
    """Causal attention; ``mask`` (bool ``[B, 1, T, T]``) restricts it more.

    ``spec`` is this layer's row of :func:`layer_spec` (window, RoPE).
    """
    batch, seq_len, _ = x.shape
    spec = spec or LayerSpec()
    q, k, v = self._qkv(x, positions, spec.inv_freq)
    index = jnp.arange(seq_len, dtype=jnp.int32)
    mask = _and(mask, _window_mask(index, index, spec.window))
    # Logits and softmax are computed in float32 by the XLA implementation.
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                       scale=self.scale)
    return self.o_proj(out.reshape(batch, seq_len, -1))

  def decode(self, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
             start: jax.Array, spec: LayerSpec | None = None,
             pad: jax.Array | None = None,
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attends ``x[B, T]`` in cache slots ``start..start+T-1`` to the cache.

    Writes this step's keys and values into ``k_cache``/``v_cache``
    (``[B, S, K, D]``) and returns ``(out, k_cache, v_cache)``. With ``pad``
    (``int32[B]``, left padding per row) slot ``s`` of row ``b`` holds
    position ``s - pad[b]`` and slots below ``pad[b]`` are not attended to.
    """
    batch, seq_len, _ = x.shape
    spec = spec or LayerSpec()
    columns = start + jnp.arange(seq_len, dtype=jnp.int32)
    positions = jnp.broadcast_to(columns, (batch, seq_len))
    if pad is not None:
      positions = jnp.maximum(positions - pad[:, None], 0)
    q, k, v = self._qkv(x, positions, spec.inv_freq)
    index = (0, start, 0, 0)
    k_cache = jax.lax.dynamic_update_slice(
        k_cache, k.astype(k_cache.dtype), index)
    v_cache = jax.lax.dynamic_update_slice(
        v_cache, v.astype(v_cache.dtype), index)
    # Query t sees cache slots 0 .. start + t (earlier and its own).
    slots = jnp.arange(k_cache.shape[1], dtype=jnp.int32)
    mask = (slots[None, :] <= columns[:, None])[None, None]
    mask = _and(mask, _window_mask(columns, slots, spec.window))
    if pad is not None:
      # Not the padding slots of its row; a padding query sees itself only,
      # so its (unused) output stays finite.
      real = slots[None, None, :] >= pad[:, None, None]
      own = slots[None, None, :] == columns[None, :, None]
      mask = mask & (real | own)[:, None]
    out = jax.nn.dot_product_attention(
        q, k_cache.astype(q.dtype), v_cache.astype(q.dtype),
        mask=mask, scale=self.scale)
    return self.o_proj(out.reshape(batch, seq_len, -1)), k_cache, v_cache


class MLP(nnx.Module):
  """Gated feed-forward ``down(act(gate(x)) * up(x))``.

  ``act`` is SiLU (SwiGLU) or, with ``hidden_act="gelu_pytorch_tanh"``, the
  tanh approximation of GELU (GeGLU, Gemma).
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    self.gelu = config.hidden_act == "gelu_pytorch_tanh"
    self.gate_proj = _linear(config, d, f, ("fsdp", "tensor"), rngs)
    self.up_proj = _linear(config, d, f, ("fsdp", "tensor"), rngs)
    self.down_proj = _linear(config, f, d, ("tensor", "fsdp"), rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    gate = self.gate_proj(x)
    gate = jax.nn.gelu(gate, approximate=True) if self.gelu else nnx.silu(gate)
    hidden = gate * self.up_proj(x)
    return self.down_proj(constrain(hidden, _FEATURES))


class Block(nnx.Module):
  """Pre-norm transformer block: ``x + attn(norm(x))``, ``h + mlp(norm(h))``.

  With ``config.post_norms`` (Gemma) the attention and MLP outputs are
  normalised too: ``x + post_norm(attn(norm(x)))``, likewise for the MLP.
  A config with per-layer settings (:func:`layer_spec` not None) needs this
  layer's ``spec`` row in every call.
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(config)
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = RMSNorm(config)
    self.mlp = MLP(config, rngs=rngs)
    if config.post_norms:
      self.post_attn_norm = RMSNorm(config)
      self.post_mlp_norm = RMSNorm(config)
    self.needs_spec = config.windowed or config.local_rope

  def _check(self, spec: LayerSpec | None):
    if self.needs_spec and spec is None:
      raise ValueError(
          "Block: this config has per-layer sliding windows or RoPE bases; "
          "pass `spec`, the layer's row of `apollo_lm.model.layer_spec("
          "config)` (Llama.__call__ and Llama.decode do).")

  def _post(self, name: str, y: jax.Array) -> jax.Array:
    norm = getattr(self, name, None)
    return y if norm is None else norm(y)

  def __call__(self, x: jax.Array, *, positions: jax.Array | None = None,
               mask: jax.Array | None = None,
               spec: LayerSpec | None = None) -> jax.Array:
    self._check(spec)
    attn = self.attn(self.attn_norm(x), positions=positions, mask=mask,
                     spec=spec)
    x = constrain(x + self._post("post_attn_norm", attn), _RESIDUAL)
    mlp = self._post("post_mlp_norm", self.mlp(self.mlp_norm(x)))
    return constrain(x + mlp, _RESIDUAL)

  def decode(self, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
             start: jax.Array, spec: LayerSpec | None = None,
             pad: jax.Array | None = None,
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """As ``__call__`` for new tokens at ``start..``, through the KV cache."""
    self._check(spec)
    attn, k_cache, v_cache = self.attn.decode(
        self.attn_norm(x), k_cache, v_cache, start, spec, pad)
    x = x + self._post("post_attn_norm", attn)
    mlp = self._post("post_mlp_norm", self.mlp(self.mlp_norm(x)))
    return x + mlp, k_cache, v_cache


class ScaledEmbed(nnx.Embed):
  """``nnx.Embed`` whose output is multiplied by ``sqrt(features)``, the
  factor rounded to the compute dtype first, as HF Gemma does."""

  def __call__(self, inputs: jax.Array) -> jax.Array:
    scale = jnp.asarray(self.features ** 0.5, self.dtype or jnp.float32)
    return super().__call__(inputs) * scale


def packing_inputs(segment_ids: jax.Array | None,
                   positions: jax.Array | None,
                   ) -> tuple[jax.Array | None, jax.Array | None]:
  """(attention mask, positions) the blocks get for packed rows.

  With ``segment_ids[B, T]`` a token attends only to tokens of its own
  segment (``mask[B, 1, T, T]``, combined with the causal mask) and, unless
  ``positions`` is given, positions restart at 0 in every segment. Without
  segment ids: no extra mask, ``positions`` unchanged. Shared by
  :meth:`Llama.__call__` and the layer-wise step.
  """
  if segment_ids is None:
    return None, positions
  mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
  if positions is None:
    positions = segment_positions(segment_ids)
  return mask, positions


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """Positions that restart at 0 wherever ``segment_ids[B, T]`` changes.

  Example: ``[[1, 1, 1, 2, 2, 3]]`` -> ``[[0, 1, 2, 0, 1, 0]]``.
  """
  index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
  changed = jnp.concatenate([
      jnp.ones_like(segment_ids[:, :1], dtype=bool),
      segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  starts = jax.lax.cummax(jnp.where(changed, index, 0), axis=1)
  return index - starts


class Llama(nnx.Module):
  """LLaMA causal language model (the architecture: the module docstring).

  Args:
    config: the shapes and options, e.g. ``get_config("tiny")``.
    rngs: random streams for the parameter initialisation.

  Example::

    model = Llama(get_config("tiny", vocab_size=512), rngs=nnx.Rngs(0))
    logits = model(tokens)  # int32[B, T] -> float32[B, T, V]
    # Packed examples: no attention across segments, positions restart.
    logits = model(tokens, segment_ids=segment_ids)
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    # Annotations are only recorded here, never applied (Flax would apply them
    # eagerly, which fails without a mesh); `apollo_lm.sharding` places the
    # params. The variables' metadata is part of the state's pytree
    # structure, so this also keeps the state of a model built on a mesh
    # tree-compatible with one built without (e.g. `abstract_state`).
    with nnx.use_eager_sharding(False):
      self._build(config, rngs)

  def _build(self, config: LlamaConfig, rngs: nnx.Rngs):
    embed_cls = ScaledEmbed if config.scale_embeddings else nnx.Embed
    self.embed = embed_cls(
        config.vocab_size, config.hidden_size, dtype=config.dtype,
        param_dtype=config.param_dtype,
        embedding_init=_normal(config, ("tensor", "fsdp")), rngs=rngs)

    # Each call gets its own slice of the split rng streams, so layers are
    # initialised independently; the new leading axis is annotated unsharded.
    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: None})
    def make_layers(rngs: nnx.Rngs) -> Block:
      return Block(config, rngs=rngs)

    self.layers = make_layers(rngs)
    self.final_norm = RMSNorm(config)
    if not config.tie_embeddings:
      self.lm_head = _linear(
          config, config.hidden_size, config.vocab_size, ("fsdp", "tensor"),
          rngs, preferred_element_type=jnp.float32)

  def logits(self, x: jax.Array) -> jax.Array:
    """Final norm and output head (or the tied embedding): float32 logits."""
    x = self.final_norm(x)
    if self.config.tie_embeddings:
      return tied_logits(x, self.embed.embedding[...], self.config.dtype)
    return self.lm_head(x).astype(jnp.float32)

  def __call__(self, tokens: jax.Array, *,
               segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    """Maps ``int32[B, T]`` token ids to ``float32[B, T, V]`` logits.

    Args:
      tokens: ``int[B, T]`` token ids.
      segment_ids: Optional ``int[B, T]`` ids of packed examples: a token
        attends only to earlier tokens with the same id, and (unless
        ``positions`` is given) positions restart at 0 in every segment.
      positions: Optional ``int[B, T]`` rotary positions (default
        ``0 .. T-1``, or per segment with ``segment_ids``).
    """
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(
          f"Llama: `tokens` must be an integer array [batch, seq_len], got "
          f"{tokens.dtype}{list(tokens.shape)}.")
    if tokens.shape[1] > self.config.max_seq_len:
      raise ValueError(
          f"Llama: sequence length {tokens.shape[1]} exceeds "
          f"`max_seq_len`={self.config.max_seq_len} of config "
          f"{self.config.name!r}.")
    for name, value in (("segment_ids", segment_ids),
                        ("positions", positions)):
      if value is not None and value.shape != tokens.shape:
        raise ValueError(
            f"Llama: `{name}` must have the shape of `tokens` "
            f"{list(tokens.shape)}, got {list(value.shape)}.")
    mask, positions = packing_inputs(segment_ids, positions)
    x = constrain(self.embed(tokens), _RESIDUAL)
    spec = layer_spec(self.config)

    def apply_block(x: jax.Array, block: Block, *spec) -> jax.Array:
      return block(x, positions=positions, mask=mask,
                   spec=spec[0] if spec else None)

    if self.config.remat:
      apply_block = nnx.remat(apply_block)
    # Uniform configs scan over the blocks alone (the program they always had).
    xs = (self.layers,) if spec is None else (self.layers, spec)
    x = nnx.scan(
        apply_block, in_axes=(nnx.Carry,) + (0,) * len(xs),
        out_axes=nnx.Carry, unroll=1 if self.config.scan_layers else True,
        transform_metadata={nnx.PARTITION_NAME: None})(x, *xs)
    return self.logits(x)

  def init_cache(self, batch: int, max_len: int, dtype: Any = None,
                 pad: jax.Array | None = None) -> KVCache:
    """An empty :class:`KVCache` for ``batch`` rows of up to ``max_len``.

    ``pad`` (``int[batch]``): left padding of each row's prompt, for prompts
    of different lengths in one batch (see :class:`KVCache`).
    """
    config = self.config
    if not 0 < max_len <= config.max_seq_len:
      raise ValueError(
          f"Llama.init_cache: `max_len` must be in 1..max_seq_len="
          f"{config.max_seq_len}, got {max_len}.")
    shape = (config.num_layers, batch, max_len, config.num_kv_heads,
             config.head_dim)
    dtype = config.dtype if dtype is None else dtype
    if pad is not None:
      pad = jnp.asarray(pad, jnp.int32)
      if pad.shape != (batch,):
        raise ValueError(f"Llama.init_cache: `pad` must have shape ({batch},),"
                         f" got {pad.shape}.")
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((), jnp.int32), pad)

  def decode(self, tokens: jax.Array,
             cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Logits of ``tokens[B, T]`` placed after the ``cache.length`` cached ones.

    Use it for the prompt (prefill, ``T`` = prompt length) and then one token
    at a time; the logits equal those of ``__call__`` on the whole sequence.
    The caller keeps ``cache.length + T`` within the cache capacity.

    Returns:
      ``(float32[B, T, V] logits, updated cache)``.
    """
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(
          f"Llama.decode: `tokens` must be an integer array [batch, seq_len], "
          f"got {tokens.dtype}{list(tokens.shape)}.")
    start = cache.length
    x = self.embed(tokens)
    spec = layer_spec(self.config)

    def apply_block(x, block, k, v, *spec):
      x, k, v = block.decode(x, k, v, start, spec[0] if spec else None,
                             cache.pad)
      return x, (k, v)

    xs = (self.layers, cache.k, cache.v) + (() if spec is None else (spec,))
    x, (k, v) = nnx.scan(
        apply_block, in_axes=(nnx.Carry,) + (0,) * len(xs),
        out_axes=(nnx.Carry, 0),
        transform_metadata={nnx.PARTITION_NAME: None})(x, *xs)
    return self.logits(x), KVCache(k, v, start + tokens.shape[1], cache.pad)


def tied_logits(x: jax.Array, embedding: jax.Array, dtype: Any) -> jax.Array:
  """``x @ embedding.T`` in ``dtype`` with float32 accumulation and output."""
  return jnp.einsum("...d,vd->...v", x.astype(dtype), embedding.astype(dtype),
                    preferred_element_type=jnp.float32)


def _as_config(config: LlamaConfig | str) -> LlamaConfig:
  return get_config(config) if isinstance(config, str) else config


def abstract_state(config: LlamaConfig | str) -> nnx.State:
  """Parameters of ``config`` as ``jax.ShapeDtypeStruct``, nothing allocated.

  The returned ``nnx.State`` keeps the variables' metadata, so
  ``nnx.get_partition_spec`` works on it (memory planning for 7B/13B).
  A registry name is resolved with :func:`get_config` defaults.
  """
  config = _as_config(config)
  model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  return nnx.state(model, nnx.Param)


def count_params(config: LlamaConfig | str) -> int:
  """Exact number of parameters of ``config``, from :func:`abstract_state`."""
  leaves = jax.tree.leaves(abstract_state(config))
  return sum(leaf.size for leaf in leaves)
