"""state_bytes, and the exact state size of APOLLO on LLaMA-7B shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import apollo_optax

# LLaMA-7B (hidden 4096, intermediate 11008, 32 layers, vocab 32000) with
# stacked layers, as the scanned model stores them.
L, D, F, V = 32, 4096, 11008, 32000


def _llama_7b(dtype=jnp.float32):
  s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
  return {
      "embed": {"embedding": s(V, D)},
      "layers": {
          "attn": {k: {"kernel": s(L, D, D)} for k in ("q_proj", "k_proj", "v_proj", "o_proj")},
          "mlp": {
              "gate_proj": {"kernel": s(L, D, F)},
              "up_proj": {"kernel": s(L, D, F)},
              "down_proj": {"kernel": s(L, F, D)},
          },
          "attn_norm": {"scale": s(L, D)},
          "mlp_norm": {"scale": s(L, D)},
      },
      "final_norm": {"scale": s(D)},
      "lm_head": {"kernel": s(D, V)},
  }


def _expected_numbers(rank):
  lowrank = L * (4 * rank * D + 3 * rank * F)  # 2 * rank * max(m, n), halved
  adam = V * D * 2 + 2 * L * D + D
  return 2 * lowrank + 2 * adam


@pytest.mark.parametrize("make,rank", [
    (lambda: apollo_optax.apollo(1e-2, rank=256), 256),
    (lambda: apollo_optax.apollo_mini(1e-2), 1),
])
def test_llama_7b_state_is_two_rank_max_per_matrix(make, rank):
  state = jax.eval_shape(make().init, _llama_7b())
  total = apollo_optax.state_bytes(state)
  expected = 4 * _expected_numbers(rank)
  # O(1) scalars: three counts and one limiter norm per matrix.
  scalars = total - expected
  assert 0 <= scalars <= 4 * (3 + 7 * L)
  adamw = apollo_optax.state_bytes(jax.eval_shape(optax.adamw(1e-3).init, _llama_7b()))
  assert total < 0.25 * adamw


def test_mu_dtype_halves_the_state():
  f32 = jax.eval_shape(apollo_optax.apollo(1e-2, rank=256).init, _llama_7b())
  bf16 = jax.eval_shape(
      apollo_optax.apollo(1e-2, rank=256, mu_dtype=jnp.bfloat16).init, _llama_7b()
  )
  moments = lambda s: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(s) if x.ndim >= 2)
  assert moments(bf16) * 2 == moments(f32)


def test_state_bytes_counts_every_array_leaf():
  tree = {
      "a": jnp.zeros((3, 5), jnp.float32),
      "b": [jnp.zeros(7, jnp.bfloat16), jax.ShapeDtypeStruct((2, 2), jnp.int8)],
      "c": None,
      "d": 3.0,
      "k": jax.random.key(0),
  }
  key_bytes = jax.random.key_data(tree["k"]).nbytes
  assert apollo_optax.state_bytes(tree) == 60 + 14 + 4 + key_bytes
  assert apollo_optax.state_bytes({}) == 0
