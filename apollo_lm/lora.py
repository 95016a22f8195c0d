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
r"""LoRA (Hu et al. 2021) on the scanned layer stacks of :mod:`apollo_lm.model`.

A target projection ``y = x W`` (``W`` of a layer, ``(in, out)``) becomes

.. math::
  y = x W + \frac{\alpha}{r}\,(x A)\,B, \qquad
  A \in \mathbb{R}^{in \times r},\ B \in \mathbb{R}^{r \times out},

with ``W`` frozen and only ``A``, ``B`` trained. As in Hugging Face PEFT,
``B`` starts at zero (the model is unchanged at step 0) and ``A`` is
Kaiming-uniform, ``U(-1/sqrt(in), 1/sqrt(in))`` (``nn.Linear``'s init).
Every layer has its own adapters: ``lora_a`` is ``(L, in, r)`` and
``lora_b`` ``(L, r, out)``, next to the ``(L, in, out)`` kernel, and both are
sliced by the model's ``nnx.scan`` like the kernel, so the adapter product is
computed inside the scanned block and no merged ``W + (alpha/r) A B`` exists
during training.

The frozen base may be int8 (:func:`quantize_base`, QLoRA-like): a
:class:`LoRALinear` whose kernel holds an :class:`apollo_optax.quantization.QuantizedArray`
dequantizes it inside the scanned block, one layer at a time (and again in
the backward pass, which needs ``W`` for the activations' gradient only).

Parameter paths (``nnx.to_pure_dict``)::

  layers/attn/q_proj/kernel                 (L, d, H*D)   frozen (or int8)
  layers/attn/q_proj/lora_a                 (L, d, r)     trained
  layers/attn/q_proj/lora_b                 (L, r, H*D)   trained

The adapters are ``nnx.LoRAParam`` variables (Flax's LoRA type, a
``nnx.Param``), so ``nnx.state(model, nnx.LoRAParam)`` selects them;
``flax.nnx.LoRA``/``LoRALinear`` themselves are not used: they have no
``alpha / r`` scale, initialise ``A`` with fan-in counted over the stacked
layers, would move the kernel to ``base_module/kernel`` and cannot read an
int8 kernel.

Training: :func:`adapter_mask` is the ``trainable`` mask of
:func:`apollo_lm.steps.make_train_step` (only the adapters are
differentiated and counted in the gradient norm; the frozen weights' gradients
are never computed) and of :func:`apollo_lm.optimizers.train_only`
(optimizer state for the adapters only; a ``--grad-clip`` chained inside
clips the adapters' gradient norm). Export: :func:`merged_params`.

Example::

  model = add_adapters(Llama(config, rngs=nnx.Rngs(0)), LoRAConfig(16, 32.0),
                       rngs=nnx.Rngs(1))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  tx = optimizers.train_only(optax.adamw(1e-4), adapter_mask)
  step = steps.make_train_step(graphdef, tx, trainable=adapter_mask)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Final

from flax import nnx
import jax
import jax.numpy as jnp

import apollo_optax
from apollo_lm.errors import ConfigError

TARGETS: Final[dict[str, tuple[str, str]]] = {
    "q": ("attn", "q_proj"), "k": ("attn", "k_proj"),
    "v": ("attn", "v_proj"), "o": ("attn", "o_proj"),
    "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"),
    "down": ("mlp", "down_proj"),
}
"""LoRA target names (``--lora-targets``) and the projection each names."""

ADAPTER_KEYS: Final[tuple[str, str]] = ("lora_a", "lora_b")

LEARNING_RATE: Final[float] = 1e-4
"""Default peak lr of LoRA fine-tuning (LLaMA-Factory's LoRA examples)."""


def parse_targets(targets: str | Sequence[str] | None) -> tuple[str, ...]:
  """``"q,v"``, ``("q", "v")``, ``"all"`` or None -> target names, in
  :data:`TARGETS` order. PEFT's module names (``q_proj``) are accepted.

  Raises:
    ConfigError: ``lora_targets``, an unknown or empty target list.
  """
  if targets is None:
    return tuple(TARGETS)
  if isinstance(targets, str):
    targets = targets.split(",")
  names = {t.strip().removesuffix("_proj") for t in targets}
  names.discard("")
  if "all" in names:
    return tuple(TARGETS)
  unknown = sorted(names - set(TARGETS))
  if unknown or not names:
    raise ConfigError(
        "lora_targets", f"unknown target(s) {unknown or list(targets)}; "
        f"allowed: {', '.join(TARGETS)} (comma-separated) or all.")
  return tuple(t for t in TARGETS if t in names)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Rank, alpha and targets of the adapters.

  Attributes:
    rank: ``r``, the adapters' inner dimension (>= 1).
    alpha: the adapters' output is scaled by ``alpha / rank``.
    targets: names from :data:`TARGETS`.
  """

  rank: int
  alpha: float
  targets: tuple[str, ...] = tuple(TARGETS)

  def __post_init__(self):
    if (isinstance(self.rank, bool) or not isinstance(self.rank, int)
        or self.rank < 1):
      raise ConfigError("lora_rank", f"must be an int >= 1, got "
                        f"{self.rank!r}.")
    if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
        or not self.alpha > 0):
      raise ConfigError("lora_alpha", f"must be > 0, got {self.alpha!r}.")
    object.__setattr__(self, "targets", parse_targets(self.targets))

  @property
  def scale(self) -> float:
    """``alpha / rank``."""
    return self.alpha / self.rank


def _kaiming_uniform(key: jax.Array, shape: tuple[int, ...],
                     dtype: Any) -> jax.Array:
  """PEFT's ``A`` init per layer of an ``(L, in, r)`` stack: U(+-1/sqrt(in))."""
  init = jax.nn.initializers.variance_scaling(
      1 / 3, "fan_in", "uniform", in_axis=-2, out_axis=-1, batch_axis=(0,))
  return init(key, shape, dtype)


class LoRALinear(nnx.Module):
  r"""A frozen stacked projection, with a low-rank adapter if ``rank`` is set.

  Takes over the kernel (and bias) variables of an ``nnx.Linear`` whose
  kernel is an ``(L, in, out)`` layer stack, so the kernel keeps its path;
  called inside the model's scan, it sees one layer:
  ``x W + b + scale (x A) B``. The kernel may hold an
  :class:`apollo_optax.quantization.QuantizedArray` (dequantized to the base's
  ``param_dtype`` when called).
  """

  def __init__(self, base: nnx.Linear, *, rank: int | None = None,
               scale: float = 1.0, rngs: nnx.Rngs | None = None):
    self.kernel = base.kernel
    self.bias = base.bias
    self.dtype = base.dtype
    self.param_dtype = base.param_dtype
    self.scale = scale
    if rank is None:
      self.lora_a = self.lora_b = None
    else:
      num_layers, din, dout = base.kernel.shape
      # Sharded as the kernel's input and output axes (leading layer axis
      # unsharded, as nnx.vmap annotates the stacks).
      spec = base.kernel.get_metadata().get("out_sharding") or (None,) * 3
      self.lora_a = nnx.LoRAParam(
          _kaiming_uniform(rngs.params(), (num_layers, din, rank),
                           self.param_dtype), out_sharding=(None, spec[1], None))
      self.lora_b = nnx.LoRAParam(
          jnp.zeros((num_layers, rank, dout), self.param_dtype),
          out_sharding=(None, None, spec[2]))

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel.get_value()
    if apollo_optax.is_quantized(kernel):
      kernel = apollo_optax.dequantize(kernel, self.param_dtype)
    bias = None if self.bias is None else self.bias[...]
    x, kernel, bias = nnx.nn.dtypes.promote_dtype((x, kernel, bias),
                                                  dtype=self.dtype)
    # As nnx.Linear, so that a zero adapter leaves the output bit-identical.
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    if bias is not None:
      y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    if self.lora_a is not None:
      a = self.lora_a[...].astype(x.dtype)
      b = self.lora_b[...].astype(x.dtype)
      y += self.scale * ((x @ a) @ b)
    return y


def add_adapters(model: Any, config: LoRAConfig, *, rngs: nnx.Rngs,
                 wrap_all: bool = False) -> Any:
  """Replaces the target projections of ``model.layers`` by
  :class:`LoRALinear` with adapters, in place; returns ``model``.

  Args:
    model: an :class:`apollo_lm.model.Llama` (or one built under
      ``nnx.eval_shape``).
    config: rank, alpha and targets.
    rngs: draws the ``A`` matrices.
    wrap_all: also wrap the other projections (without adapters), which an
      int8 base (:func:`quantize_base`) needs: ``nnx.Linear`` cannot read
      a quantized kernel.
  """
  with nnx.use_eager_sharding(False):
    for name, (block, proj) in TARGETS.items():
      parent = getattr(model.layers, block)
      base = getattr(parent, proj)
      if name in config.targets:
        setattr(parent, proj, LoRALinear(base, rank=config.rank,
                                         scale=config.scale, rngs=rngs))
      elif wrap_all:
        setattr(parent, proj, LoRALinear(base))
  return model


def _is_adapter(path: Any) -> bool:
  key = path[-1] if path else None
  return getattr(key, "key", None) in ADAPTER_KEYS


def adapter_mask(params: Any) -> Any:
  """A pytree of bools: True for the adapter leaves (``lora_a``/``lora_b``)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _is_adapter(path), params)


def quantize_base(params: Any, group_size: int = 128) -> Any:
  """The attention and MLP kernels of ``params`` in int8 (adapters and the
  rest unchanged), as :func:`apollo_lm.layerwise.quantize_llama_params`."""

  def mask(tree: Any) -> Any:
    return jax.tree.map(lambda low, adapter: low and not adapter,
                        apollo_optax.default_lowrank_mask(tree),
                        adapter_mask(tree))

  return apollo_optax.quantize_params(params, group_size, mask=mask)


def merged_params(params: Any, scale: float, dtype: Any) -> Any:
  r"""The plain model's parameters: ``W + scale A B`` per layer, in ``dtype``.

  ``params`` is a LoRA model's parameter dict (int8 kernels are dequantized
  first); the result has no adapter leaves, so it fits the graph of the model
  without adapters (e.g. for :func:`apollo_lm.hf.save_pretrained`). The
  product is taken in float32.
  """

  def merge(node: Any) -> Any:
    if not isinstance(node, dict):
      return node
    if "lora_a" in node:
      node = dict(node)
      a, b = node.pop("lora_a"), node.pop("lora_b")
      kernel = node["kernel"]
      if apollo_optax.is_quantized(kernel):
        kernel = apollo_optax.dequantize(kernel, jnp.float32)
      delta = jnp.einsum("lir,lro->lio", a.astype(jnp.float32),
                         b.astype(jnp.float32))
      node["kernel"] = (kernel.astype(jnp.float32) + scale * delta
                        ).astype(dtype)
      return node
    return {k: merge(v) for k, v in node.items()}

  return apollo_optax.dequantize_params(merge(params), dtype)


def count_adapter_params(params: Any) -> int:
  """Number of adapter parameters in ``params``."""
  return sum(x.size for x, m in zip(jax.tree.leaves(params),
                                    jax.tree.leaves(adapter_mask(params))) if m)
