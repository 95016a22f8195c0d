"""Tests of ``apollo_lm.checkpoint.Checkpointer``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from apollo_lm import checkpoint as checkpoint_lib

pytestmark = pytest.mark.xdist_group("apollo_lm_checkpoint")


def _params():
  keys = jax.random.split(jax.random.key(0), 3)
  return {"embed": jax.random.normal(keys[0], (16, 8)),
          "layers": {"kernel": jax.random.normal(keys[1], (2, 8, 12))},
          "norm": jax.random.normal(keys[2], (8,))}


def _galore_state(params):
  # GaLore keeps zero-size projectors for the leaves it does not project,
  # which Orbax cannot save on its own, and nested optax state classes.
  tx = optax.contrib.galore(1e-2, rank=2)
  state = tx.init({"w": params["embed"], "b": params["norm"]})
  return jax.tree.map(lambda x: x + 1, state)


def test_round_trip_restores_every_leaf_and_the_metadata(tmp_path):
  params = _params()
  opt_state = _galore_state(params)
  assert any(leaf.size == 0 for leaf in jax.tree.leaves(opt_state))
  checkpointer = checkpoint_lib.Checkpointer(tmp_path)
  assert checkpointer.latest_step() is None
  assert checkpointer.save(7, params, opt_state, metadata={"note": "x"})
  checkpointer.close()

  reopened = checkpoint_lib.Checkpointer(tmp_path)
  assert reopened.latest_step() == 7
  assert reopened.metadata() == {"note": "x", "step": 7}
  template = (jax.tree.map(jnp.zeros_like, params),
              jax.tree.map(jnp.zeros_like, opt_state))
  restored_params, restored_state, meta = reopened.restore(None, *template)
  reopened.close()
  assert meta == {"note": "x", "step": 7}
  assert jax.tree.structure(restored_state) == jax.tree.structure(opt_state)
  for expected, actual in zip(jax.tree.leaves((params, opt_state)),
                              jax.tree.leaves((restored_params,
                                               restored_state))):
    assert expected.shape == actual.shape and expected.dtype == actual.dtype
    np.testing.assert_array_equal(actual, expected)


def test_save_interval_and_latest_step(tmp_path):
  params = _params()
  checkpointer = checkpoint_lib.Checkpointer(tmp_path, save_interval_steps=2,
                                             max_to_keep=None)
  written = [checkpointer.save(step, params, {}) for step in (1, 2, 3)]
  assert written == [False, True, False]
  assert checkpointer.save(3, params, {}, force=True)
  checkpointer.wait()
  assert checkpointer.latest_step() == 3
  checkpointer.close()


def test_restore_without_checkpoint_raises(tmp_path):
  checkpointer = checkpoint_lib.Checkpointer(tmp_path)
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    checkpointer.restore(None, _params(), {})
  checkpointer.close()
