"""Tests of fine-tuning: freezing parts of the model, the finetune entry point."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import apollo_optax
from apollo_lm import optimizers


def _params():
  keys = jax.random.split(jax.random.key(0), 4)
  return {
      "embed": {"embedding": jax.random.normal(keys[0], (11, 8))},
      "layers": {"attn": {"q_proj": {"kernel": jax.random.normal(keys[1], (2, 8, 8))}},
                 "attn_norm": {"scale": jnp.ones((2, 8))}},
      "final_norm": {"scale": jnp.ones((8,))},
      "lm_head": {"kernel": jax.random.normal(keys[2], (8, 11))},
  }


def _drop(tree, parts):
  """``tree`` without the frozen parts (same paths for the other leaves)."""
  names = {"embedding": "embed", "head": "lm_head"}
  return {k: v for k, v in tree.items() if k not in {names[p] for p in parts}}


@pytest.mark.parametrize("parts", [["embedding"], ["head"], ["embedding", "head"]])
@pytest.mark.parametrize("name", ["adamw", "apollo_mini"])
def test_freeze_keeps_parts_and_runs_tx_on_the_rest(parts, name):
  params = _params()
  inner = (optax.adamw(1e-2, weight_decay=0.1) if name == "adamw"
           else apollo_optax.apollo_mini(1e-2))
  tx = optimizers.freeze(inner, parts)
  mask = optimizers.frozen_mask(params, parts)
  assert sum(jax.tree.leaves(mask)) == len(parts)
  state = tx.init(params)
  # The trainable leaves alone, through `inner`: the reference.
  ref_params = _drop(params, parts)
  ref_state = inner.init(ref_params)
  new = params
  for i in range(3):
    grads = jax.tree.map(lambda x: jnp.cos(x + i), new)
    updates, state = tx.update(grads, state, new)
    new = optax.apply_updates(new, updates)
    ref_grads = jax.tree.map(lambda x: jnp.cos(x + i), ref_params)
    ref_updates, ref_state = inner.update(ref_grads, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, ref_updates)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6),
               _drop(new, parts), ref_params)
  for p, x, f in zip(jax.tree.leaves(params), jax.tree.leaves(new), jax.tree.leaves(mask)):
    if f:
      np.testing.assert_array_equal(x, p)
  # No optimizer state for frozen leaves.
  assert apollo_optax.state_bytes(state) == apollo_optax.state_bytes(ref_state)


def test_freeze_nothing_is_tx():
  tx = optax.adamw(1e-3)
  assert optimizers.freeze(tx, []) is tx


def test_freeze_unknown_part():
  with pytest.raises(ValueError, match=r"freeze: unknown part\(s\) \['norms'\]; allowed: embedding, head"):
    optimizers.frozen_mask(_params(), ["norms"])
