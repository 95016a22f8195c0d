"""APOLLO in a framework-free training loop: a params pytree, jax.grad, optax.

The model is a dict of arrays and a pure function, the style of Equinox or
plain JAX without any module library: a two-hidden-layer MLP regressing a
fixed random "teacher" network. ``apollo_optax.apollo`` projects the two
weight matrices that have at least two axes (rank 16 here); the biases and the
1-wide output layer's bias stay on AdamW.

  python examples/equinox_style.py --steps 500
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

import apollo_optax

Params = dict[str, jax.Array]


def init_mlp(key: jax.Array, sizes: Sequence[int]) -> Params:
  """``w{i}``, ``b{i}`` for each layer, LeCun-normal weights, zero biases."""
  params = {}
  for i, (din, dout) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, sub = jax.random.split(key)
    params[f"w{i}"] = jax.random.normal(sub, (din, dout)) / jnp.sqrt(din)
    params[f"b{i}"] = jnp.zeros(dout)
  return params


def mlp(params: Params, x: jax.Array) -> jax.Array:
  layers = len(params) // 2
  for i in range(layers):
    x = x @ params[f"w{i}"] + params[f"b{i}"]
    if i < layers - 1:
      x = jax.nn.tanh(x)
  return x


def main(argv: Sequence[str] | None = None) -> list[float]:
  """Trains and returns the loss of every step."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=500)
  parser.add_argument("--lr", type=float, default=1e-2)
  parser.add_argument("--rank", type=int, default=16)
  args = parser.parse_args(argv)

  teacher_key, student_key, data_key = jax.random.split(jax.random.key(0), 3)
  sizes = (32, 128, 128, 1)
  teacher = init_mlp(teacher_key, sizes)
  params = init_mlp(student_key, sizes)
  inputs = jax.random.normal(data_key, (1024, sizes[0]))
  targets = mlp(teacher, inputs)

  optimizer = apollo_optax.apollo(
      optax.warmup_cosine_decay_schedule(
          0.0, args.lr, warmup_steps=max(1, args.steps // 10),
          decay_steps=args.steps, end_value=0.1 * args.lr),
      rank=args.rank)
  opt_state = optimizer.init(params)

  def loss_fn(params: Params) -> jax.Array:
    return jnp.mean((mlp(params, inputs) - targets) ** 2)

  @jax.jit
  def step(params: Params, opt_state: optax.OptState):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for i in range(args.steps):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
    if i % max(1, args.steps // 10) == 0 or i == args.steps - 1:
      print(f"step {i:4d}  mse {loss:.5f}")
  return losses


if __name__ == "__main__":
  main()
