"""Tests of the demo's memory columns (``apollo_lm.demo.state_memory``)."""

import jax
import jax.numpy as jnp
from flax import nnx
import pytest

import apollo_optax
from apollo_lm import configs
from apollo_lm import demo
from apollo_lm import model as model_lib

CONFIG = configs.get_config("tiny", vocab_size=512, max_seq_len=64)


@pytest.fixture(scope="module")
def memory():
  return {name: demo.state_memory(name, CONFIG)
          for name in ("adamw", "apollo", "apollo_mini")}


def _lowrank_sizes(config):
  params = nnx.to_pure_dict(model_lib.abstract_state(config))
  mask = apollo_optax.default_lowrank_mask(params)
  return [p.shape for p, low in zip(jax.tree.leaves(params),
                                    jax.tree.leaves(mask)) if low]


def test_lowrank_leaves_alone(memory):
  shapes = _lowrank_sizes(CONFIG)
  numbers = sum(int(jnp.prod(jnp.array(s))) for s in shapes)
  # AdamW: two float32 moments per low-rank number, plus step counters.
  assert 8 * numbers <= memory["adamw"]["lowrank_state_bytes"] <= 8 * numbers + 64
  # APOLLO rank r: two float32 moments of r x max(m, n) per (L, m, n) stack.
  rank = CONFIG.hidden_size // 4
  apollo = sum(s[0] * 2 * rank * max(s[1:]) * 4 for s in shapes)
  assert apollo <= memory["apollo"]["lowrank_state_bytes"] <= apollo + 4096
  mini = sum(s[0] * 2 * max(s[1:]) * 4 for s in shapes)
  assert mini <= memory["apollo_mini"]["lowrank_state_bytes"] <= mini + 4096


def test_state_at_7b_shapes(memory):
  params = model_lib.count_params("7b")
  assert 8 * params <= memory["adamw"]["state_bytes_7b"] <= 8 * params + 64
  assert (memory["apollo_mini"]["state_bytes_7b"]
          < memory["apollo"]["state_bytes_7b"]
          < memory["adamw"]["state_bytes_7b"] / 5)
