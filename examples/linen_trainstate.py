"""APOLLO-Mini with a Flax Linen ``TrainState``: a small character model.

A multi-layer perceptron reads the previous ``CONTEXT`` characters of a text
(by default, this file) and predicts the next one. ``apollo_optax.apollo_mini``
is an ordinary ``optax.GradientTransformation``, so it drops into
``TrainState.create(tx=...)``; its default low-rank mask puts the ``Dense``
kernels on APOLLO-Mini (rank 1, one scaling factor per matrix) and leaves the
embedding (path ``Embed_0``) and the biases on AdamW.

  python examples/linen_trainstate.py --steps 300
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Sequence

from flax import linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

import apollo_optax

CONTEXT = 8


class CharMLP(nn.Module):
  """Embeds ``CONTEXT`` characters, concatenates them, two hidden layers."""

  vocab_size: int
  embed_dim: int = 32
  hidden: int = 256

  @nn.compact
  def __call__(self, context: jax.Array) -> jax.Array:
    x = nn.Embed(self.vocab_size, self.embed_dim)(context)
    x = x.reshape(x.shape[0], -1)
    x = nn.gelu(nn.Dense(self.hidden)(x))
    x = nn.gelu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.vocab_size)(x)


def make_windows(text: str) -> tuple[np.ndarray, np.ndarray, int]:
  """(contexts, next characters, vocabulary size) from ``text``."""
  chars = sorted(set(text))
  ids = np.array([chars.index(c) for c in text], np.int32)
  index = np.arange(len(ids) - CONTEXT)[:, None] + np.arange(CONTEXT)
  return ids[index], ids[CONTEXT:], len(chars)


@jax.jit
def train_step(state: train_state.TrainState, context: jax.Array,
               targets: jax.Array) -> tuple[train_state.TrainState, jax.Array]:
  def loss_fn(params):
    logits = state.apply_fn({"params": params}, context)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, targets).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss


def main(argv: Sequence[str] | None = None) -> list[float]:
  """Trains and returns the loss of every step."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--lr", type=float, default=1e-2)
  parser.add_argument("--text", default=__file__,
                      help="a UTF-8 text file to model")
  args = parser.parse_args(argv)

  contexts, targets, vocab_size = make_windows(
      pathlib.Path(args.text).read_text(encoding="utf-8"))
  model = CharMLP(vocab_size)
  params = model.init(jax.random.key(0), contexts[:1])["params"]
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, args.lr, warmup_steps=max(1, args.steps // 10),
      decay_steps=args.steps, end_value=0.1 * args.lr)
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=params,
      tx=apollo_optax.apollo_mini(schedule))

  rng = np.random.default_rng(0)
  losses = []
  for step in range(args.steps):
    rows = rng.integers(0, len(targets), args.batch_size)
    state, loss = train_step(state, contexts[rows], targets[rows])
    losses.append(float(loss))
    if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
      print(f"step {step:4d}  loss {loss:.3f}")
  print(f"optimizer state: {apollo_optax.state_bytes(state.opt_state):,} bytes"
        f" for {sum(p.size for p in jax.tree.leaves(params)):,} parameters")
  return losses


if __name__ == "__main__":
  main()
