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
no biases. The ``L`` blocks are created once with ``nnx.vmap`` so every block
weight carries a leading layer axis, and applied with ``nnx.scan``; one block
is compiled instead of ``L``, and optimizers see one ``(L, m, n)`` array per
weight kind.

Parameter paths (the contract that optimizer labelling and sharding code rely
on; ``nnx.Linear`` kernels are ``(in, out)``)::

  embed/embedding                                (V, d)
  layers/attn/{q,k,v,o}_proj/kernel              (L, d, d)
  layers/mlp/{gate,up}_proj/kernel               (L, d, f)
  layers/mlp/down_proj/kernel                    (L, f, d)
  layers/{attn,mlp}_norm/scale                   (L, d)
  final_norm/scale                               (d,)
  lm_head/kernel                                 (d, V)
"""

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from apollo_lm.configs import get_config
from apollo_lm.configs import LlamaConfig
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
            sharding: tuple[Any, ...], rngs: nnx.Rngs, **kwargs) -> nnx.Linear:
  """Bias-free ``(din, dout)`` projection in the config's dtypes."""
  return nnx.Linear(
      din, dout, use_bias=False, dtype=config.dtype,
      param_dtype=config.param_dtype,
      kernel_init=_normal(config, sharding), rngs=rngs, **kwargs)


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


def rotary_embedding(x: jax.Array, theta: float) -> jax.Array:
  """Rotates ``x[B, T, H, D]`` by position-dependent angles (RoPE).

  Uses the "rotate half" layout of HF LLaMA, which pairs feature ``i`` with
  ``i + D/2``; the angles are computed and applied in float32.
  """
  seq_len, head_dim = x.shape[1], x.shape[-1]
  inv_freq = theta ** -(jnp.arange(0, head_dim, 2, jnp.float32) / head_dim)
  angles = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
  return rotated.astype(x.dtype)


class Attention(nnx.Module):
  """Causal multi-head self-attention with rotary positions on q and k."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    d = config.hidden_size
    self.num_heads = config.num_heads
    self.head_dim = config.head_dim
    self.rope_theta = config.rope_theta
    self.q_proj = _linear(config, d, d, ("fsdp", "tensor"), rngs)
    self.k_proj = _linear(config, d, d, ("fsdp", "tensor"), rngs)
    self.v_proj = _linear(config, d, d, ("fsdp", "tensor"), rngs)
    self.o_proj = _linear(config, d, d, ("tensor", "fsdp"), rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, seq_len, _ = x.shape

    def heads(proj: nnx.Linear) -> jax.Array:
      out = proj(x).reshape(batch, seq_len, self.num_heads, self.head_dim)
      return constrain(out, _HEADS)

    q = rotary_embedding(heads(self.q_proj), self.rope_theta)
    k = rotary_embedding(heads(self.k_proj), self.rope_theta)
    # Logits and softmax are computed in float32 by the XLA implementation.
    out = jax.nn.dot_product_attention(q, k, heads(self.v_proj), is_causal=True)
    return self.o_proj(out.reshape(batch, seq_len, -1))


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

  def __call__(self, x: jax.Array) -> jax.Array:
    x = constrain(x + self.attn(self.attn_norm(x)), _RESIDUAL)
    return constrain(x + self.mlp(self.mlp_norm(x)), _RESIDUAL)


class Llama(nnx.Module):
  """LLaMA causal language model; see the module docstring for the params.

  Example::

    model = Llama(get_config("tiny", vocab_size=512), rngs=nnx.Rngs(0))
    logits = model(tokens)  # int32[B, T] -> float32[B, T, V]
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
    self.lm_head = _linear(
        config, config.hidden_size, config.vocab_size, ("fsdp", "tensor"),
        rngs, preferred_element_type=jnp.float32)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Maps ``int32[B, T]`` token ids to ``float32[B, T, V]`` logits."""
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(
          f"Llama: `tokens` must be an integer array [batch, seq_len], got "
          f"{tokens.dtype}{list(tokens.shape)}.")
    if tokens.shape[1] > self.config.max_seq_len:
      raise ValueError(
          f"Llama: sequence length {tokens.shape[1]} exceeds "
          f"`max_seq_len`={self.config.max_seq_len} of config "
          f"{self.config.name!r}.")
    x = constrain(self.embed(tokens), _RESIDUAL)

    def apply_block(x: jax.Array, block: Block) -> jax.Array:
      return block(x)

    if self.config.remat:
      apply_block = nnx.remat(apply_block)
    x = nnx.scan(
        apply_block, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry,
        unroll=1 if self.config.scan_layers else True,
        transform_metadata={nnx.PARTITION_NAME: None})(x, self.layers)
    return self.lm_head(self.final_norm(x)).astype(jnp.float32)


def cross_entropy_loss(logits: jax.Array, targets: jax.Array,
                       mask: jax.Array | None = None) -> jax.Array:
  """Mean next-token cross-entropy in float32.

  Args:
    logits: ``[B, T, V]`` predictions for the token after each position.
    targets: ``int[B, T]``, the token that follows each position, i.e. the
      inputs shifted left by one (the caller does the shift).
    mask: Optional ``[B, T]`` weights (1 = count, 0 = ignore, e.g. padding).

  Returns:
    The (masked) mean loss over positions; 0 if the mask is all zero.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)
  if mask is None:
    return jnp.mean(losses)
  mask = mask.astype(jnp.float32)
  # An all-zero mask gives 0 / tiny = 0 rather than NaN.
  return jnp.sum(losses * mask) / jnp.maximum(
      jnp.sum(mask), jnp.finfo(jnp.float32).tiny)


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
