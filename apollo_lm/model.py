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
no biases. Optional config fields add what Llama 2/3.x, Mistral and Qwen2
checkpoints need: grouped-/multi-query attention (``num_kv_heads``), an
explicit ``head_dim``, tied embeddings (no ``lm_head``), llama3 RoPE scaling
and q/k/v biases (``qkv_bias``). The ``L`` blocks are created once with ``nnx.vmap`` so every block
weight carries a leading layer axis, and applied with ``nnx.scan``; one block
is compiled instead of ``L``, and optimizers see one ``(L, m, n)`` array per
weight kind.

Parameter paths (the contract that optimizer labelling and sharding code rely
on; ``nnx.Linear`` kernels are ``(in, out)``)::

  embed/embedding                                (V, d)
  layers/attn/q_proj/kernel                      (L, d, H*D)
  layers/attn/{k,v}_proj/kernel                  (L, d, K*D)
  layers/attn/o_proj/kernel                      (L, H*D, d)
  layers/attn/{q,k,v}_proj/bias                  (L, H*D | K*D)  (qkv_bias)
  layers/mlp/{gate,up}_proj/kernel               (L, d, f)
  layers/mlp/down_proj/kernel                    (L, f, d)
  layers/{attn,mlp}_norm/scale                   (L, d)
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
  """Root-mean-square norm with a learned scale, statistics in float32."""

  def __init__(self, config: LlamaConfig):
    self.eps = config.norm_eps
    self.dtype = config.dtype
    self.scale = nnx.Param(
        jnp.ones((config.hidden_size,), config.param_dtype),
        out_sharding=(None,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
    # As HF LLaMA: normalise in float32, round, then scale in compute dtype.
    return x32.astype(self.dtype) * self.scale[...].astype(self.dtype)


def rope_frequencies(head_dim: int, theta: float,
                     scaling: RopeScaling | None = None) -> jax.Array:
  """The ``head_dim / 2`` rotary frequencies ``theta^(-2i/D)``, float32.

  With ``scaling`` (type llama3) low frequencies are divided by
  ``scaling.factor`` and the band between interpolated; see
  :class:`apollo_lm.configs.RopeScaling` for the rule.
  """
  inv_freq = theta ** -(jnp.arange(0, head_dim, 2, jnp.float32) / head_dim)
  if scaling is None:
    return inv_freq
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
                     scaling: RopeScaling | None = None) -> jax.Array:
  """Rotates ``x[B, T, H, D]`` by position-dependent angles (RoPE).

  Uses the "rotate half" layout of HF LLaMA, which pairs feature ``i`` with
  ``i + D/2``; the angles are computed and applied in float32.

  Args:
    x: Queries or keys, ``[B, T, H, D]``.
    theta: Base of the frequencies.
    positions: Optional ``int[B, T]`` position of each token; default
      ``0 .. T-1`` in every row.
    scaling: Optional llama3 frequency scaling.
  """
  seq_len, head_dim = x.shape[1], x.shape[-1]
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
    bias = config.qkv_bias
    self.q_proj = _linear(config, d, dq, ("fsdp", "tensor"), rngs,
                          use_bias=bias)
    self.k_proj = _linear(config, d, dkv, ("fsdp", "tensor"), rngs,
                          use_bias=bias)
    self.v_proj = _linear(config, d, dkv, ("fsdp", "tensor"), rngs,
                          use_bias=bias)
    self.o_proj = _linear(config, dq, d, ("tensor", "fsdp"), rngs)

  def _qkv(self, x: jax.Array, positions: jax.Array | None):
    batch, seq_len, _ = x.shape

    def heads(proj: nnx.Linear, num: int) -> jax.Array:
      out = proj(x).reshape(batch, seq_len, num, self.head_dim)
      return constrain(out, _HEADS)

    def rope(y: jax.Array) -> jax.Array:
      return rotary_embedding(y, self.rope_theta, positions, self.rope_scaling)

    return (rope(heads(self.q_proj, self.num_heads)),
            rope(heads(self.k_proj, self.num_kv_heads)),
            heads(self.v_proj, self.num_kv_heads))

  def __call__(self, x: jax.Array, *, positions: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    """Causal attention; ``mask`` (bool ``[B, 1, T, T]``) restricts it more."""
    batch, seq_len, _ = x.shape
    q, k, v = self._qkv(x, positions)
    # Logits and softmax are computed in float32 by the XLA implementation.
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)
    return self.o_proj(out.reshape(batch, seq_len, -1))

  def decode(self, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
             start: jax.Array, pad: jax.Array | None = None,
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attends ``x[B, T]`` in cache slots ``start..start+T-1`` to the cache.

    Writes this step's keys and values into ``k_cache``/``v_cache``
    (``[B, S, K, D]``) and returns ``(out, k_cache, v_cache)``. With ``pad``
    (``int32[B]``, left padding per row) slot ``s`` of row ``b`` holds
    position ``s - pad[b]`` and slots below ``pad[b]`` are not attended to.
    """
    batch, seq_len, _ = x.shape
    columns = start + jnp.arange(seq_len, dtype=jnp.int32)
    positions = jnp.broadcast_to(columns, (batch, seq_len))
    if pad is not None:
      positions = jnp.maximum(positions - pad[:, None], 0)
    q, k, v = self._qkv(x, positions)
    index = (0, start, 0, 0)
    k_cache = jax.lax.dynamic_update_slice(
        k_cache, k.astype(k_cache.dtype), index)
    v_cache = jax.lax.dynamic_update_slice(
        v_cache, v.astype(v_cache.dtype), index)
    # Query t sees cache slots 0 .. start + t (earlier and its own).
    slots = jnp.arange(k_cache.shape[1], dtype=jnp.int32)
    mask = (slots[None, :] <= columns[:, None])[None, None]
    if pad is not None:
      # Not the padding slots of its row; a padding query sees itself only,
      # so its (unused) output stays finite.
      real = slots[None, None, :] >= pad[:, None, None]
      own = slots[None, None, :] == columns[None, :, None]
      mask = mask & (real | own)[:, None]
    out = jax.nn.dot_product_attention(
        q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask=mask)
    return self.o_proj(out.reshape(batch, seq_len, -1)), k_cache, v_cache


class MLP(nnx.Module):
  """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    self.gate_proj = _linear(config, d, f, ("fsdp", "tensor"), rngs)
    self.up_proj = _linear(config, d, f, ("fsdp", "tensor"), rngs)
    self.down_proj = _linear(config, f, d, ("tensor", "fsdp"), rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = nnx.silu(self.gate_proj(x)) * self.up_proj(x)
    return self.down_proj(constrain(hidden, _FEATURES))


class Block(nnx.Module):
  """Pre-norm transformer block: ``x + attn(norm(x))``, ``h + mlp(norm(h))``."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(config)
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = RMSNorm(config)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x: jax.Array, *, positions: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    x = constrain(
        x + self.attn(self.attn_norm(x), positions=positions, mask=mask),
        _RESIDUAL)
    return constrain(x + self.mlp(self.mlp_norm(x)), _RESIDUAL)

  def decode(self, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
             start: jax.Array, pad: jax.Array | None = None,
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """As ``__call__`` for new tokens at ``start..``, through the KV cache."""
    attn, k_cache, v_cache = self.attn.decode(
        self.attn_norm(x), k_cache, v_cache, start, pad)
    x = x + attn
    return x + self.mlp(self.mlp_norm(x)), k_cache, v_cache


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
  """LLaMA causal language model; see the module docstring for the params.

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
    self.embed = nnx.Embed(
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

    def apply_block(x: jax.Array, block: Block) -> jax.Array:
      return block(x, positions=positions, mask=mask)

    if self.config.remat:
      apply_block = nnx.remat(apply_block)
    x = nnx.scan(
        apply_block, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry,
        unroll=1 if self.config.scan_layers else True,
        transform_metadata={nnx.PARTITION_NAME: None})(x, self.layers)
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

    def apply_block(x, block, k, v):
      x, k, v = block.decode(x, k, v, start, cache.pad)
      return x, (k, v)

    x, (k, v) = nnx.scan(
        apply_block, in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0),
        transform_metadata={nnx.PARTITION_NAME: None})(
            x, self.layers, cache.k, cache.v)
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
