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
"""Layer-wise training step for the scanned Llama (Lv et al. 2023, LOMO).

The ordinary step materialises the gradient of every parameter, then calls
``tx.update`` once. This step fuses the backward pass with the update, so that
only one layer's gradient exists at a time:

1. forward: embedding, then a ``lax.scan`` over the ``L`` blocks that saves
   only each block's input ``x_l`` (``L × B × T × d`` activations);
2. head: loss and VJP of ``lm_head(final_norm(x_L))``; the head group
   (``final_norm``, ``lm_head``) is updated right away;
3. a reverse ``fori_loop`` over l = L-1 … 0 recomputes block l from ``x_l``,
   takes its VJP (parameter gradient ``g_l`` and the cotangent for ``x_l``),
   runs ``tx.update`` on layer l's parameters and optimizer-state slice with
   ``matrix_index_offset=l`` and writes both back in place;
4. the embedding is updated last, from the cotangent of ``x_0``.

With tied embeddings (``config.tie_embeddings``, no ``lm_head``) the head
group is ``final_norm`` alone; the head's gradient with respect to the
embedding is kept (one embedding-sized buffer through step 3) and added to the
input side's in step 4, so the embedding is still updated once, with its full
gradient.

Peak memory holds one layer's gradient (and one layer's recomputed
activations) instead of the whole model's gradient. For transformations that
act leaf by leaf and matrix by matrix (AdamW, APOLLO, APOLLO-Mini, the
norm-growth limiter, bias correction, weight decay, schedules) the result is
exactly the ordinary step's: each group runs its own copy of ``tx`` and all
copies count steps alike. APOLLO's random projections match because layer l
of a scanned ``(L, m, n)`` kernel is matrix l of that leaf
(``matrix_index_offset``, see :func:`apollo_optax.scale_by_apollo`).

What cannot be layer-wise:

* global gradient clipping (``optax.clip_by_global_norm`` before the
  optimizer) needs the norm of the whole gradient before any update. Chained
  inside ``tx`` it would clip each group (each layer, the head, the
  embedding) separately, i.e. per-layer clipping; :func:`check_layerwise_options`
  refuses a global clip;
* gradient accumulation (the update happens inside the backward pass);
* any transformation that couples leaves (e.g. a global-norm statistic).

Quantized weights (Q-APOLLO): leaves of ``params`` that are
:class:`apollo_optax.QuantizedArray` (int8 + group scales, see
:func:`quantize_llama_params`) are dequantized one layer at a time inside
both loops (to ``config.param_dtype``); wrap ``tx`` in
:func:`apollo_optax.quantized_weights` to update them.

Parameters are the plain dict ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``
(paths ``layers/attn/q_proj/kernel`` …). The optimizer state is a
:class:`LayerwiseState` from :func:`init_layerwise_state`.

Example::

  from apollo_lm import steps
  tx = apollo_optax.apollo_mini(1e-2)
  state = init_layerwise_state(tx, params)
  step = jax.jit(steps.make_layerwise_train_step(config, tx),
                 donate_argnums=(0, 1), compiler_options=compiler_options())
  params, state, metrics = step(params, state, steps.Batch(inputs, targets))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple
import warnings

from flax import nnx
import jax
import jax.numpy as jnp
import optax

import apollo_optax
from apollo_lm import model as model_lib
from apollo_lm.configs import LlamaConfig
from apollo_lm.errors import ConfigError

# Top-level keys of the parameter dict, by group.
EMBED_KEYS = ("embed",)
LAYER_KEYS = ("layers",)
HEAD_KEYS = ("final_norm", "lm_head")


class LayerwiseState(NamedTuple):
  """Optimizer state of the layer-wise step: one copy of ``tx`` per group.

  Attributes:
    embed: ``tx``'s state for ``{"embed": ...}``.
    layers: ``tx``'s state for one layer ``{"layers": <layer l slice>}``,
      stacked along a new leading axis of size L (``jax.vmap(tx.init)``); for
      APOLLO its moments and limiter norms have exactly the leaves of the
      ordinary state's ``layers`` entries, only the step counts gain an L axis.
    head: ``tx``'s state for ``{"final_norm": ..., "lm_head": ...}``.
  """

  embed: optax.OptState
  layers: optax.OptState
  head: optax.OptState


def split_params(params: Any) -> tuple[Any, Any, Any]:
  """(embed, layers, head) sub-dicts of the Llama parameter dict.

  A model with tied embeddings has no ``lm_head``: its head is ``final_norm``.
  """
  expected = set(EMBED_KEYS + LAYER_KEYS + HEAD_KEYS)
  if set(params) not in (expected, expected - {"lm_head"}):
    raise ValueError(
        f"layer-wise step: expected the Llama parameter keys {sorted(expected)}"
        f" (without lm_head when tied), got {sorted(params)}.")
  pick = lambda keys: {k: params[k] for k in keys if k in params}
  return pick(EMBED_KEYS), pick(LAYER_KEYS), pick(HEAD_KEYS)


def init_layerwise_state(tx: optax.GradientTransformation,
                         params: Any) -> LayerwiseState:
  """The :class:`LayerwiseState` of ``tx`` for Llama ``params``."""
  embed, layers, head = split_params(params)
  # The embedding and head groups have no low-rank leaf by design: APOLLO's
  # coverage warning would be a false alarm for them.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", apollo_optax.LowRankCoverageWarning)
    embed_state, head_state = tx.init(embed), tx.init(head)
  return LayerwiseState(
      embed=embed_state, layers=jax.vmap(tx.init)(layers), head=head_state)


def quantize_llama_params(params: Any, group_size: int = 128,
                          scale_dtype: Any = jnp.float32) -> Any:
  """Quantizes the attention and MLP kernels of ``params`` to int8.

  Embedding, output head and norms stay in their float dtype (together
  ``2·V·d + (2L + 1)·d`` numbers: 0.5 GB in bfloat16 for LLaMA-7B).
  Scales are per group of ``group_size`` input rows (``1 + 4/group_size``
  bytes per weight with float32 scales).
  """
  return apollo_optax.quantize_params(params, group_size,
                                      scale_dtype=scale_dtype)


def check_layerwise_options(*, grad_clip: float | None = None,
                            grad_accum: int = 1) -> None:
  """Raises ConfigError for options the layer-wise step cannot honour.

  Args:
    grad_clip: a global gradient-norm clip (needs the whole gradient before
      any update). Per-layer clipping is possible instead: chain
      ``optax.clip_by_global_norm`` inside ``tx`` and each layer (and the
      head and embedding groups) is clipped separately.
    grad_accum: gradient-accumulation steps; the update happens during the
      backward pass, so only 1 is possible.
  """
  if grad_clip is not None and grad_clip > 0:
    raise ConfigError(
        "--grad-clip", "--layerwise cannot clip the global gradient norm: each"
        " layer is updated before the gradients of the layers below it exist."
        " Drop --grad-clip, or clip per layer by chaining"
        " optax.clip_by_global_norm inside the optimizer.")
  if grad_accum != 1:
    raise ConfigError(
        "--grad-accum", f"--layerwise updates each layer during the backward"
        f" pass, so it cannot accumulate gradients over micro-batches (got"
        f" {grad_accum}); use --grad-accum 1.")


def compiler_options() -> dict[str, Any]:
  """XLA options to jit the layer-wise step with (``jax.jit(compiler_options=)``).

  On CPU, XLA's default copy insertion copies some whole layer stacks that the
  reverse loop updates in place (the MLP kernels of LLaMA-7B: gigabytes);
  region-based analysis avoids the copies (measured with ``memory_analysis``,
  see ``benchmarks/qapollo_memory.py``). Other backends: no options.
  """
  if jax.default_backend() == "cpu":
    return {"xla_cpu_copy_insertion_use_region_analysis": True}
  return {}


def _tree_index(tree: Any, index: jax.Array) -> Any:
  return jax.tree.map(
      lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), tree)


def _tree_set(tree: Any, value: Any, index: jax.Array) -> Any:
  return jax.tree.map(
      lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v, index, 0),
      tree, value)


def make_step(config: LlamaConfig, tx: optax.GradientTransformation,
              loss: Callable[[jax.Array, Any], jax.Array]) -> Callable[
                  [Any, Any, Any], tuple[Any, Any, jax.Array]]:
  """``step(params, opt_state, batch) -> (params, opt_state, loss)``.

  Use :func:`apollo_lm.steps.make_layerwise_train_step`, which passes the
  project's one loss; this function owns the layer-by-layer schedule only.

  Args:
    config: the model config (its ``remat`` and ``scan_layers`` do not matter:
      blocks are always recomputed one at a time).
    tx: the optimizer; it must act leaf by leaf (see the module docstring).
      Wrap it in :func:`apollo_optax.quantized_weights` for quantized params.
    loss: ``loss(logits, batch)``, a scalar (``apollo_lm.steps.next_token_loss``).

  Returns:
    A pure function of ``params`` (plain dict, possibly with
    ``QuantizedArray`` kernels), ``opt_state`` (:class:`LayerwiseState`) and
    ``batch`` (an ``apollo_lm.steps.Batch`` of ``[B, T]`` arrays); jit it
    with ``donate_argnums=(0, 1)`` and :func:`compiler_options`.
  """
  abstract = nnx.eval_shape(lambda: model_lib.Llama(config, rngs=nnx.Rngs(0)))
  embed_def = nnx.graphdef(abstract.embed)
  block_def = nnx.graphdef(abstract.layers)
  tied = config.tie_embeddings
  head_loss = _head_loss(config, abstract, loss)
  tx = optax.with_extra_args_support(tx)

  def as_float(layer):
    return apollo_optax.dequantize_params(layer, config.param_dtype)

  # Per-layer windows and RoPE bases (Gemma 3), None for uniform stacks.
  spec = model_lib.layer_spec(config)

  def block(weights, x, mask, positions, layer_spec):
    return nnx.merge(block_def, weights)(x, positions=positions, mask=mask,
                                         spec=layer_spec)

  def update(grads, state, params, **extra):
    updates, state = tx.update(grads, state, params, **extra)
    return apollo_optax.apply_quantized_updates(params, updates), state

  def step(params, opt_state, batch):
    embed, layers, head = split_params(params)

    # 1. Forward, saving the input of every block.
    x0, embed_vjp = jax.vjp(
        lambda e: nnx.merge(embed_def, e["embed"])(batch.inputs), embed)

    # Packed rows (fine-tuning): the model's segment mask and positions.
    mask, positions = model_lib.packing_inputs(batch.segment_ids,
                                               batch.positions)
    layer_fn = lambda w, x, s: block(w, x, mask, positions, s)

    def forward(x, layer_and_spec):
      layer, layer_spec = layer_and_spec
      return layer_fn(as_float(layer), x, layer_spec), x

    x_last, saved = jax.lax.scan(forward, x0, (layers["layers"], spec))

    # 2. Head: loss, gradient, update.
    loss_value, head_grads, embed_head_grads, dx = _head_grads(
        head_loss, tied, head, embed, x_last, batch)
    head, head_state = update(head_grads, opt_state.head, head)

    # 3. Blocks, last to first: recompute, VJP, update layer l in place.
    stack, layers_state, dx = _backward_blocks(
        layer_fn, update, as_float, config.num_layers, layers["layers"],
        opt_state.layers, saved, dx, spec)

    # 4. Embedding.
    (embed_grads,) = embed_vjp(dx)
    if tied:
      embed_grads = jax.tree.map(jnp.add, embed_grads, embed_head_grads)
    embed, embed_state = update(embed_grads, opt_state.embed, embed)

    new_params = {**embed, "layers": stack, **head}
    return new_params, LayerwiseState(embed_state, layers_state,
                                      head_state), loss_value

  return step


def _head_loss(config: LlamaConfig, abstract: Any,
               loss: Callable[[jax.Array, Any], jax.Array]) -> Callable:
  """``head_loss(head, embed, x, batch)``: final norm, head (or the tied
  embedding) and ``loss`` on the last block's output ``x``."""
  embed_def = nnx.graphdef(abstract.embed)
  norm_def = nnx.graphdef(abstract.final_norm)
  head_def = None if config.tie_embeddings else nnx.graphdef(abstract.lm_head)

  def head_loss(head, embed, x, batch):
    norm = nnx.merge(norm_def, head["final_norm"])
    if config.tie_embeddings:
      embedding = nnx.merge(embed_def, embed["embed"]).embedding[...]
      logits = model_lib.tied_logits(norm(x), embedding, config.dtype)
    else:
      lm_head = nnx.merge(head_def, head["lm_head"])
      logits = lm_head(norm(x)).astype(jnp.float32)
    return loss(logits, batch)

  return head_loss


def _head_grads(head_loss: Callable, tied: bool, head: Any, embed: Any,
                x_last: jax.Array, batch: Any) -> tuple[Any, Any, Any, Any]:
  """(loss, head gradient, tied embedding's gradient or None, d loss / dx)."""
  if tied:
    loss_value, head_vjp = jax.vjp(
        lambda h, e, x: head_loss(h, e, x, batch), head, embed, x_last)
    head_grads, embed_head_grads, dx = head_vjp(jnp.ones_like(loss_value))
    return loss_value, head_grads, embed_head_grads, dx
  loss_value, head_vjp = jax.vjp(
      lambda h, x: head_loss(h, None, x, batch), head, x_last)
  head_grads, dx = head_vjp(jnp.ones_like(loss_value))
  return loss_value, head_grads, None, dx


def _backward_blocks(layer_fn: Callable, update: Callable, as_float: Callable,
                     num_layers: int, stack: Any, state_stack: Any,
                     saved: jax.Array, dx: jax.Array,
                     spec: Any = None) -> tuple[Any, Any, Any]:
  """Blocks from last to first: recompute, VJP, update layer ``l`` in place.

  ``layer_fn(weights, x, layer_spec)``; ``spec`` is the model's per-layer
  :class:`apollo_lm.model.LayerSpec` (row ``l`` goes to layer ``l``) or None.

  Returns the updated weight stack, optimizer-state stack and the gradient
  of the first block's input.
  """

  def backward(i, carry):
    stack, state_stack, dx = carry
    l = num_layers - 1 - i
    layer = {"layers": _tree_index(stack, l)}
    layer_spec = _tree_index(spec, l)
    _, block_vjp = jax.vjp(lambda w, x: layer_fn(w, x, layer_spec),
                           as_float(layer["layers"]), _tree_index(saved, l))
    grads, dx = block_vjp(dx)
    layer, layer_state = update(
        {"layers": grads}, _tree_index(state_stack, l), layer,
        matrix_index_offset=l)
    return (_tree_set(stack, layer["layers"], l),
            _tree_set(state_stack, layer_state, l), dx)

  return jax.lax.fori_loop(0, num_layers, backward, (stack, state_stack, dx))
