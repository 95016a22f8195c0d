"""LowRankCoverageWarning and lowrank_summary (issue 13 §2)."""

import math
import warnings

import jax
import jax.numpy as jnp
import optax
import pytest

import apollo_optax

D = apollo_optax.ApolloDimensionNumbers
MAKERS = {
    "apollo": lambda **kw: apollo_optax.apollo(1e-2, rank=4, **kw),
    "apollo_mini": lambda **kw: apollo_optax.apollo_mini(1e-2, **kw),
}


def _coverage_warnings(fn):
  """The LowRankCoverageWarning messages emitted while running ``fn``."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fn()
  return [str(w.message) for w in caught
          if issubclass(w.category, apollo_optax.LowRankCoverageWarning)]


# (params, extra arguments, parts of the expected message)
POOR_COVERAGE = {
    "flattened": (
        {"w": jnp.zeros(1000), "b": jnp.zeros(10)}, {},
        ["0 of 1,010 parameters (0.0%) are low-rank", "1,010 fell back to AdamW",
         "1,010 in leaves with fewer than 2 axes", "2 leaves: 'b', 'w'"],
    ),
    "mask-matches-nothing": (
        {"attn": jnp.zeros((16, 8)), "mlp": jnp.zeros((8, 32))},
        {"lowrank_mask": lambda p: jax.tree.map(lambda _: False, p)},
        ["0 of 384 parameters", "384 excluded by `lowrank_mask`"],
    ),
    "no-dimension-numbers": (
        {"attn": jnp.zeros((16, 8)), "mlp": jnp.zeros((8, 32))},
        {"weight_dimension_numbers": {"attn": None, "mlp": None}},
        ["0 of 384 parameters", "384 selected by the mask but given no"
         " `weight_dimension_numbers`"],
    ),
    "small-fraction": (
        {"embed": jnp.zeros((951, 1)), "kernel": jnp.zeros((7, 7))}, {},
        ["49 of 1,000 parameters (4.9%) are low-rank (below MIN_LOWRANK_FRACTION = 5%)",
         "951 excluded by `lowrank_mask`", "1 leaf: 'embed'"],
    ),
}


@pytest.mark.parametrize("make", MAKERS.values(), ids=MAKERS.keys())
@pytest.mark.parametrize("case", POOR_COVERAGE, ids=str)
def test_poor_coverage_warns_once_at_init(case, make):
  params, kwargs, parts = POOR_COVERAGE[case]
  tx = make(**kwargs)
  messages = _coverage_warnings(lambda: tx.init(params))
  assert len(messages) == 1
  for part in parts:
    assert part in messages[0], (part, messages[0])
  assert "To fix:" in messages[0] and "lowrank_summary" in messages[0]
  # No warning at construction or update, only at init.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", apollo_optax.LowRankCoverageWarning)
    state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  assert _coverage_warnings(lambda: tx.update(grads, state, params)) == []


def test_mixed_reasons_are_all_listed():
  params = {"flat": jnp.zeros(5000), "embed": jnp.zeros((100, 10)),
            "odd": jnp.zeros((10, 10)), "kernel": jnp.zeros((4, 4))}
  tx = apollo_optax.apollo(1e-2, rank=2, weight_dimension_numbers={
      "flat": None, "embed": None, "odd": None, "kernel": D(0, 1)})
  message, = _coverage_warnings(lambda: tx.init(params))
  assert "16 of 6,116 parameters (0.3%)" in message
  assert "5,000 in leaves with fewer than 2 axes" in message
  assert "1,000 excluded by `lowrank_mask`" in message
  assert "100 selected by the mask but given no" in message


@pytest.mark.parametrize(
    "params",
    [
        # Mostly matrices (the usual case).
        {"embed": jnp.zeros((100, 8)), "kernel": jnp.zeros((8, 64)), "b": jnp.zeros(64)},
        # Exactly the threshold: 50 of 1,000 = 5%.
        {"embed": jnp.zeros((950, 1)), "kernel": jnp.zeros((5, 10))},
        # Few low-rank parameters, but no matrix left on AdamW: nothing to fix.
        {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(1000)},
        # Nothing to optimize.
        {},
    ],
    ids=["matrices", "at-threshold", "only-vectors-left", "empty"],
)
def test_good_coverage_does_not_warn(params):
  for make in MAKERS.values():
    assert _coverage_warnings(lambda: make().init(params)) == []


def test_the_warning_is_a_user_warning_that_can_be_an_error():
  assert issubclass(apollo_optax.LowRankCoverageWarning, UserWarning)
  tx = apollo_optax.apollo(1e-2)
  with warnings.catch_warnings():
    warnings.simplefilter("error", apollo_optax.LowRankCoverageWarning)
    with pytest.raises(apollo_optax.LowRankCoverageWarning):
      tx.init({"w": jnp.zeros(100)})


def test_warns_when_traced_and_through_wrappers():
  params = {"w": jnp.zeros(100)}
  for make in (
      lambda: apollo_optax.apollo(1e-2),
      lambda: optax.chain(optax.clip_by_global_norm(1.0), apollo_optax.apollo(1e-2)),
      lambda: optax.MultiSteps(apollo_optax.apollo(1e-2), 2),
      lambda: optax.inject_hyperparams(
          apollo_optax.apollo, static_args=("rank", "update_proj_gap"))(1e-2),
  ):
    # Warned while tracing (a cached trace does not warn again).
    assert len(_coverage_warnings(lambda: jax.eval_shape(make().init, params))) == 1
    assert len(_coverage_warnings(lambda: jax.jit(make().init)(params))) == 1


def _tree():
  return {
      "embed": jnp.zeros((300, 16)),
      "layers": {"kernel": jnp.zeros((3, 16, 40)), "norm": jnp.zeros((3, 16))},
      "flat": jnp.zeros(64),
      "proj": jnp.zeros((16, 24)),
  }


def test_lowrank_summary_counts_and_state_bytes():
  params = _tree()
  tx = apollo_optax.apollo(1e-2, rank=4, weight_dimension_numbers={
      "embed": None, "layers": D(1, 2), "flat": None, "proj": None})
  summary = apollo_optax.lowrank_summary(params, tx)
  assert summary.lowrank_leaves == ("layers/kernel",)
  assert summary.lowrank_params == 3 * 16 * 40
  assert summary.fallback_params == {
      "1-D": 64, "mask": 300 * 16 + 3 * 16, "no dimension numbers": 16 * 24}
  assert dict(summary.fallback_leaves) == {
      "embed": "mask", "layers/norm": "mask", "flat": "1-D",
      "proj": "no dimension numbers"}
  assert summary.total_params == sum(x.size for x in jax.tree.leaves(params))
  # Exact bytes, from the shapes: two (3, 4, 40) float32 moments, three
  # limiter norms and APOLLO's int32 step count; AdamW moments of every other
  # leaf; the rest are counts.
  assert summary.lowrank_state_bytes == 2 * 3 * 4 * 40 * 4 + 3 * 4 + 4
  assert summary.adam_state_bytes == 2 * 4 * sum(summary.fallback_params.values())
  state = tx.init(params)
  assert summary.state_bytes == apollo_optax.state_bytes(state)
  apollo_state = optax.tree.get(state, "ScaleByApolloState")
  limiter_state = optax.tree.get(state, "NormGrowthLimiterState")
  assert summary.lowrank_state_bytes == apollo_optax.state_bytes(
      (apollo_state, limiter_state))
  assert 0 < summary.other_state_bytes < 64
  assert summary.lowrank_fraction == pytest.approx(1920 / summary.total_params)
  text = str(summary)
  for part in ("low-rank (APOLLO)", "1,920", "AdamW: mask", "AdamW: 1-D",
               "AdamW: no dimension numbers", f"{summary.state_bytes:,}"):
    assert part in text, part


def test_lowrank_summary_through_wrappers_and_without_warning():
  params = {"w": jnp.zeros(100)}
  base = apollo_optax.lowrank_summary(params, apollo_optax.apollo_mini(1e-2))
  assert base.lowrank_params == 0 and base.fallback_params["1-D"] == 100
  for tx in (
      optax.chain(optax.clip_by_global_norm(1.0), apollo_optax.apollo_mini(1e-2)),
      optax.MultiSteps(apollo_optax.apollo_mini(1e-2), 2),
  ):
    assert _coverage_warnings(lambda: apollo_optax.lowrank_summary(params, tx)) == []
    summary = apollo_optax.lowrank_summary(params, tx)
    assert summary[:4] == base[:4]
    assert summary.adam_state_bytes == base.adam_state_bytes == 2 * 4 * 100


def test_lowrank_summary_of_an_optimizer_without_apollo_is_an_error():
  with pytest.raises(ValueError, match="contains no apollo_optax.apollo"):
    apollo_optax.lowrank_summary({"w": jnp.zeros((4, 4))}, optax.adamw(1e-3))


def test_lowrank_summary_on_abstract_params_allocates_nothing():
  params = {"w": jax.ShapeDtypeStruct((8192, 4096), jnp.bfloat16)}
  summary = apollo_optax.lowrank_summary(params, apollo_optax.apollo(1e-2, rank=256))
  assert summary.lowrank_params == math.prod((8192, 4096))
  assert summary.lowrank_state_bytes == 2 * 256 * 8192 * 4 + 4 + 4
