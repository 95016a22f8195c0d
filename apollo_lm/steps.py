"""The one loss and the training and evaluation steps of ``apollo_lm``.

Every entry point (``apollo_lm.train``, the demo, the benchmarks and the
tests) builds its steps here; no other module computes the loss or applies an
update. What this module owns:

* The steps read an :class:`apollo_lm.batch.Batch`: inputs, targets and
  the optional per-token loss mask, segment ids and positions (the last
  three are None for packed pre-training windows; fine-tuning sets the mask
  to train on answers only).
* :func:`next_token_loss`: the mean next-token cross-entropy in float32 over
  the counted tokens, and :func:`next_token_loss_sum` (sum and token count,
  for evaluations that weight batches by their token count).
* :func:`make_train_step`: the ordinary step (whole gradient, then
  ``tx.update``), with or without gradient accumulation over micro-batches.
* :func:`make_layerwise_train_step`: the layer-wise step of
  :mod:`apollo_lm.layerwise` (each layer updated during the backward pass).
* :func:`make_update_step`: ``tx.update`` + ``optax.apply_updates`` alone
  (for benchmarks that time or measure the optimizer on given gradients).
* :func:`make_eval_step`: loss sum and token count of a batch.

Steps are pure functions; jit them with ``donate_argnums=(0, 1)`` (the
parameters and the optimizer state are updated in place).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import optax

import apollo_optax
from apollo_lm import layerwise
from apollo_lm.batch import Batch
from apollo_lm.configs import LlamaConfig

Metrics = dict[str, jax.Array]
TrainStep = Callable[[Any, Any, "Batch"], tuple[Any, Any, Metrics]]


def _per_token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)


def next_token_loss(logits: jax.Array, batch: Batch) -> jax.Array:
  r"""Mean next-token cross-entropy in float32.

  .. math::
    \ell = \frac{\sum_{b,t} m_{bt}\,(-\log \mathrm{softmax}(z_{bt})_{y_{bt}})}
                {\max(\sum_{b,t} m_{bt},\ \epsilon)}

  with ``m`` the loss mask (all ones when ``batch.loss_mask`` is None),
  ``z`` the logits and ``y`` the targets.

  Example::

    >>> import jax.numpy as jnp
    >>> from apollo_lm import steps
    >>> batch = steps.Batch(jnp.zeros((1, 2), jnp.int32),
    ...                     jnp.array([[0, 1]]), loss_mask=jnp.array([[1, 0]]))
    >>> logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1]]]))
    >>> round(float(steps.next_token_loss(logits, batch)), 4)  # -log(0.5)
    0.6931

  Args:
    logits: ``[B, T, V]`` predictions for the token after each position.
    batch: the :class:`Batch` (its ``targets`` and ``loss_mask`` are read).

  Returns:
    The (masked) mean loss; 0 if the mask is all zero.
  """
  losses = _per_token_losses(logits, batch.targets)
  if batch.loss_mask is None:
    return jnp.mean(losses)
  mask = batch.loss_mask.astype(jnp.float32)
  # An all-zero mask gives 0 / tiny = 0 rather than NaN.
  return jnp.sum(losses * mask) / jnp.maximum(
      jnp.sum(mask), jnp.finfo(jnp.float32).tiny)


def next_token_loss_sum(logits: jax.Array,
                        batch: Batch) -> tuple[jax.Array, jax.Array]:
  """(summed loss, counted tokens) in float32; ``sum / count`` is the mean."""
  losses = _per_token_losses(logits, batch.targets)
  if batch.loss_mask is None:
    return jnp.sum(losses), jnp.asarray(losses.size, jnp.float32)
  mask = batch.loss_mask.astype(jnp.float32)
  return jnp.sum(losses * mask), jnp.sum(mask)


def _apply(graphdef: nnx.GraphDef, params: Any, batch: Batch) -> jax.Array:
  return nnx.merge(graphdef, params)(batch.inputs,
                                     segment_ids=batch.segment_ids,
                                     positions=batch.positions)


def loss_fn(graphdef: nnx.GraphDef) -> Callable[[Any, Batch], jax.Array]:
  """``loss(params, batch)``: the model's :func:`next_token_loss`."""

  def loss(params: Any, batch: Batch) -> jax.Array:
    return next_token_loss(_apply(graphdef, params, batch), batch)

  return loss


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    *, grad_accum: int | None = None,
                    with_grad_norm: bool = True,
                    trainable: Callable[[Any], Any] | None = None,
                    ) -> TrainStep:
  """``step(params, opt_state, batch) -> (params, opt_state, metrics)``.

  Args:
    graphdef: the model's graph definition (``nnx.split``); ``params`` is
      the matching plain dict of parameters.
    tx: the optimizer.
    grad_accum: None: ``batch`` fields are ``[B, T]`` and one gradient is
      taken. An int ``A``: ``batch`` fields are ``[A, B / A, T]``
      micro-batches whose gradients are averaged in a ``lax.scan`` (one
      optimizer update per step, unlike ``optax.MultiSteps``, so the schedule
      and APOLLO's projection gap count updates); the loss metric is the mean
      of the micro-batch losses.
    with_grad_norm: add ``grad_norm`` (global L2 norm of the averaged
      gradient) to the metrics. It is computed before ``tx.update`` and is a
      scalar, so it does not extend the gradients' lifetime; memory
      benchmarks still turn it off to compile exactly the update.
    trainable: None trains every leaf. A function ``params -> pytree of
      bools`` (e.g. :func:`apollo_lm.lora.adapter_mask`): only those leaves
      are differentiated, counted in ``grad_norm`` and updated; the others
      (which may be int8 ``QuantizedArray`` weights) pass through unchanged
      and their gradients are never computed. ``tx`` still gets the whole
      tree, with zero gradients for the frozen leaves, so freeze them in it
      (:func:`apollo_lm.optimizers.train_only`) to hold no state for them.

  Returns:
    The pure step; metrics are ``{"loss"}`` (+ ``"grad_norm"``).
  """
  loss = loss_fn(graphdef)
  # Differentiated with respect to the trainable leaves only.
  grad_fn = jax.value_and_grad(
      lambda train, frozen, batch: loss(_join(train, frozen), batch))

  def gradients(train: Any, frozen: Any,
                batch: Batch) -> tuple[jax.Array, Any]:
    if grad_accum is None:
      return grad_fn(train, frozen, batch)

    def micro_step(grads_sum, micro_batch):
      loss, grads = grad_fn(train, frozen, micro_batch)
      return jax.tree.map(jnp.add, grads_sum, grads), loss

    zeros = jax.tree.map(jnp.zeros_like, train)
    grads, losses = jax.lax.scan(micro_step, zeros, batch)
    grads = jax.tree.map(lambda g: g / grad_accum, grads)
    return jnp.mean(losses), grads

  def step(params: Any, opt_state: Any, batch: Batch):
    mask = None if trainable is None else trainable(params)
    train, frozen = _split(params, mask)
    loss, grads = gradients(train, frozen, batch)
    metrics = {"loss": loss}
    if with_grad_norm:
      metrics["grad_norm"] = optax.tree.norm(grads)
    # Zeros that `tx` does not read when it freezes those leaves, so XLA
    # never materialises them.
    grads = _join(grads, jax.tree.map(jnp.zeros_like, frozen))
    updates, opt_state = tx.update(grads, opt_state, params)
    train = optax.apply_updates(train, _split(updates, mask)[0])
    return _join(train, frozen), opt_state, metrics

  return step


def _split(tree: Any, mask: Any) -> tuple[Any, Any]:
  """(leaves where ``mask``, the others), None in the other's places; with
  ``mask`` None, ``(tree, None)``."""
  if mask is None:
    return tree, None
  return (jax.tree.map(lambda x, m: x if m else None, tree, mask),
          jax.tree.map(lambda x, m: None if m else x, tree, mask))


def _join(first: Any, second: Any) -> Any:
  """Inverse of :func:`_split`: ``first``'s leaves, ``second``'s for None."""
  if second is None:
    return first
  return jax.tree.map(lambda a, b: b if a is None else a, first, second,
                      is_leaf=lambda x: x is None)


def make_layerwise_train_step(config: LlamaConfig,
                              tx: optax.GradientTransformation) -> TrainStep:
  """The layer-wise step: ``step(params, opt_state, batch)``.

  :func:`apollo_lm.layerwise.make_step` with :func:`next_token_loss` as its
  head loss; ``opt_state`` is a :class:`apollo_lm.layerwise.LayerwiseState`,
  ``params`` may hold int8 ``QuantizedArray`` kernels (with ``tx`` wrapped in
  :func:`apollo_optax.quantized_weights`). ``batch`` fields are ``[B, T]``.
  Metrics: ``{"loss"}`` (no gradient norm: the whole gradient never exists).
  Jit it with ``donate_argnums=(0, 1)`` and
  ``compiler_options=layerwise.compiler_options()``.
  """
  step = layerwise.make_step(config, tx, next_token_loss)

  def train_step(params: Any, opt_state: Any, batch: Batch):
    params, opt_state, loss = step(params, opt_state, batch)
    return params, opt_state, {"loss": loss}

  return train_step


def make_update_step(tx: optax.GradientTransformation,
                     ) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
  """``update(params, opt_state, grads) -> (params, opt_state)``.

  The donated arguments come first: with the (not donated) gradients first,
  XLA:CPU inserted full-size copies into AdamW's update (4x its time on 60M).
  """

  def update_step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return update_step


def make_eval_step(graphdef: nnx.GraphDef, param_dtype: Any = jnp.float32,
                   *, dequantize: bool = True,
                   ) -> Callable[[Any, Batch], tuple[jax.Array, jax.Array]]:
  """``eval(params, batch) -> (loss sum, token count)``, float32 scalars.

  int8 ``QuantizedArray`` parameters (Q-APOLLO) are dequantized to
  ``param_dtype`` first, unless ``dequantize`` is False: for a model whose
  layers read them one layer at a time (:class:`apollo_lm.lora.LoRALinear`,
  QLoRA-like), which keeps the whole dequantized model out of memory.
  """

  def eval_step(params: Any, batch: Batch):
    if dequantize:
      params = apollo_optax.dequantize_params(params, param_dtype)
    return next_token_loss_sum(_apply(graphdef, params, batch), batch)

  return eval_step
