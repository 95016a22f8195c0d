"""Tests of ``apollo_lm.optimizers``: names, defaults, schedule, GaLore layout."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import apollo_optax
from apollo_lm import configs
from apollo_lm import optimizers
from apollo_lm import steps as steps_lib
from tests.apollo_lm.conftest import init_params
from tests.apollo_lm.conftest import small_config

pytestmark = pytest.mark.xdist_group("apollo_lm_optimizers")

CONFIG = small_config(num_heads=2, max_seq_len=16)


@pytest.fixture(scope="module")
def model_and_batch():
  graphdef, params = init_params(CONFIG)
  tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, CONFIG.vocab_size)
  return graphdef, params, tokens


def _losses(name, model_and_batch, steps=8, **kwargs):
  graphdef, params, tokens = model_and_batch
  tx = optimizers.make_optimizer(name, total_steps=steps, warmup_steps=1,
                                 config=CONFIG, **kwargs)

  train_step = steps_lib.make_train_step(graphdef, tx, with_grad_norm=False)
  batch = steps_lib.Batch.from_tokens(tokens)

  @jax.jit
  def run(p):
    def step(carry, _):
      p, s, metrics = train_step(*carry, batch)
      return (p, s), metrics["loss"]
    _, losses = jax.lax.scan(step, (p, tx.init(p)), None, length=steps)
    return losses

  return np.asarray(run(params))


@pytest.mark.parametrize("name", optimizers.OPTIMIZER_NAMES)
def test_steps_decrease_the_loss(name, model_and_batch):
  # The first update has lr 0 (warm-up starts at 0), so losses[1] == start.
  losses = _losses(name, model_and_batch)
  assert np.isfinite(losses).all()
  assert losses[-1] < losses[0] - 0.1, losses


def test_unknown_name_lists_the_allowed_ones():
  with pytest.raises(ValueError, match=r"unknown optimizer 'lion'; allowed: "
                     r"adamw, apollo, apollo_mini, galore, adafactor"):
    optimizers.make_optimizer("lion", total_steps=10, warmup_steps=1,
                              config=CONFIG)


def test_paper_defaults():
  apollo = optimizers.resolve_hparams("apollo", CONFIG)
  assert (apollo["learning_rate"], apollo["rank"], apollo["scale"]) == (
      1e-2, CONFIG.hidden_size // 4, 1.0)
  assert (apollo["b1"], apollo["b2"], apollo["eps"]) == (0.9, 0.999, 1e-6)
  assert apollo["update_proj_gap"] == 200
  mini = optimizers.resolve_hparams("apollo_mini", CONFIG)
  assert (mini["learning_rate"], mini["rank"], mini["scale"]) == (1e-2, 1,
                                                                   128.0)
  assert optimizers.resolve_hparams("adamw", CONFIG)["learning_rate"] == 1e-3
  galore = optimizers.resolve_hparams("galore", CONFIG, rank=4)
  assert (galore["learning_rate"], galore["rank"]) == (1e-2, 4)
  with pytest.raises(ValueError, match="rank: 'apollo_mini' has no rank"):
    optimizers.resolve_hparams("apollo_mini", CONFIG, rank=2)


def test_schedule_warms_up_then_decays_to_a_tenth():
  schedule = optimizers.make_schedule(1e-2, total_steps=100, warmup_steps=10)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(5e-3)
  assert float(schedule(10)) == pytest.approx(1e-2)
  assert float(schedule(55)) == pytest.approx(0.55e-2, rel=1e-5)
  assert float(schedule(100)) == pytest.approx(1e-3)
  with pytest.raises(ValueError, match=r"warmup_steps: must be in \[0, total_steps=100\), got 100"):
    optimizers.make_schedule(1e-2, total_steps=100, warmup_steps=100)


def test_apollo_and_galore_project_the_same_leaves_per_layer(model_and_batch):
  _, params, _ = model_and_batch
  rank = CONFIG.hidden_size // 4
  layers = CONFIG.num_layers

  apollo_state = optimizers.make_optimizer(
      "apollo", total_steps=10, warmup_steps=1, config=CONFIG).init(params)
  moments = optax.tree.get(apollo_state, "ScaleByApolloState").mu
  lowrank = {jax.tree_util.keystr(path): leaf.shape for path, leaf in
             jax.tree_util.tree_leaves_with_path(moments)}
  assert lowrank["['layers']['mlp']['up_proj']['kernel']"] == (
      layers, rank, CONFIG.intermediate_size)
  assert not any("embed" in k or "lm_head" in k or "norm" in k
                 for k in lowrank)

  galore_state = optimizers.make_optimizer(
      "galore", total_steps=10, warmup_steps=1, config=CONFIG).init(params)
  projectors = galore_state[0].projector
  up = projectors["layers"]["mlp"]["up_proj"]["kernel"]
  assert isinstance(up, tuple) and len(up) == layers
  assert all(p.shape == (CONFIG.intermediate_size, rank) for p in up)
  projected = {jax.tree_util.keystr(path) for path, leaf in
               jax.tree_util.tree_leaves_with_path(projectors) if leaf.size}
  assert {k.rsplit("[", 1)[0] for k in projected} == set(lowrank)


def test_grad_clip_is_applied_first(model_and_batch):
  _, params, _ = model_and_batch
  grads = jax.tree.map(jnp.ones_like, params)
  max_update = {}
  for clip in (None, 1e-9):
    tx = optimizers.make_optimizer(
        "adamw", learning_rate=optax.constant_schedule(1.0), total_steps=10,
        warmup_steps=0, config=CONFIG, grad_clip=clip)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    max_update[clip] = max(float(jnp.abs(u).max())
                           for u in jax.tree.leaves(updates))
  # Unclipped, Adam's first step is lr * sign(g); clipped to a norm far below
  # eps = 1e-8 it is tiny.
  assert max_update[None] == pytest.approx(1.0, rel=1e-3)
  assert max_update[1e-9] < 0.1


@pytest.mark.parametrize("options", [
    dict(scale_type="tensor"),
    dict(projection="svd"),
    dict(limiter=False),
    dict(scale_type="tensor", projection="svd", limiter=False),
])
def test_ablation_options_reach_apollo(options, model_and_batch):
  """make_optimizer's ablation options build the matching apollo_optax.apollo."""
  _, params, _ = model_and_batch
  grads = jax.tree.map(
      lambda x: jax.random.normal(jax.random.key(x.size), x.shape), params)
  lr = optax.constant_schedule(1e-2)
  ours = optimizers.make_optimizer(
      "apollo", learning_rate=lr, total_steps=10, warmup_steps=0,
      config=CONFIG, **options)
  expected_tx = apollo_optax.apollo(
      lr, CONFIG.hidden_size // 4, b1=0.9, b2=0.999, eps=1e-6,
      weight_decay_mask=optimizers.decay_mask,
      scale_type=options.get("scale_type", "channel"),
      projection=options.get("projection", "gaussian"),
      norm_growth_limit=1.01 if options.get("limiter", True) else None)
  default_tx = optimizers.make_optimizer(
      "apollo", learning_rate=lr, total_steps=10, warmup_steps=0,
      config=CONFIG)

  def two_updates(tx):
    state = tx.init(params)
    for _ in range(2):
      updates, state = tx.update(grads, state, params)
    return updates

  got, want, default = (two_updates(t) for t in (ours, expected_tx,
                                                  default_tx))
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-9)
  # The option changes the matrix updates (the check above is not vacuous).
  up_proj = lambda t: t["layers"]["mlp"]["up_proj"]["kernel"]  # noqa: E731
  assert not np.allclose(up_proj(got), up_proj(default), rtol=1e-3)
  hp = optimizers.resolve_hparams("apollo", CONFIG, **options)
  assert hp["scale_type"] == options.get("scale_type", "channel")
  assert hp["projection"] == options.get("projection", "gaussian")
  assert hp["limiter"] is options.get("limiter", True)


@pytest.mark.parametrize("name, options, match", [
    ("adamw", dict(scale_type="tensor"),
     r"scale_type: 'adamw' has no scale_type \(only apollo and apollo_mini"),
    ("galore", dict(projection="svd"), r"projection: 'galore' has no"),
    ("adafactor", dict(limiter=False), r"limiter: 'adafactor' has no"),
    ("apollo", dict(scale_type="row"),
     r"scale_type: unknown value 'row'; allowed: channel, tensor"),
    ("apollo", dict(projection="qr"),
     r"projection: unknown value 'qr'; allowed: gaussian, rademacher, svd"),
    ("apollo_mini", dict(scale_type="channel"),
     r"scale_type: apollo_mini is tensor-wise"),
])
def test_ablation_options_errors_name_the_option(name, options, match):
  with pytest.raises(ValueError, match=match):
    optimizers.make_optimizer(name, total_steps=10, warmup_steps=1,
                              config=CONFIG, **options)


@pytest.mark.parametrize("name", ["adamw", "apollo", "apollo_mini"])
def test_non_lowrank_lr_scales_only_embedding_head_and_norms(
    name, model_and_batch):
  _, params, _ = model_and_batch
  grads = jax.tree.map(
      lambda x: jax.random.normal(jax.random.key(x.size), x.shape), params)
  peak = optimizers.resolve_hparams(name, CONFIG)["learning_rate"]

  def two_updates(**kwargs):
    tx = optimizers.make_optimizer(name, total_steps=10, warmup_steps=2,
                                   config=CONFIG, weight_decay=0.1, **kwargs)
    state = tx.init(params)
    for _ in range(3):
      updates, state = tx.update(grads, state, params)
    return updates

  base, split = two_updates(), two_updates(non_lowrank_lr=7 * peak)
  lowrank = apollo_optax.default_lowrank_mask(params)
  checked = 0
  for b, s, low in zip(jax.tree.leaves(base), jax.tree.leaves(split),
                       jax.tree.leaves(lowrank)):
    np.testing.assert_allclose(s, b if low else 7 * b, rtol=1e-6, atol=1e-12)
    checked += not low
  assert checked >= 3  # embedding, head, norms
  with pytest.raises(ValueError, match="non_lowrank_lr: needs a float"):
    optimizers.make_optimizer(name, learning_rate=optax.constant_schedule(1.),
                              total_steps=10, warmup_steps=1, config=CONFIG,
                              non_lowrank_lr=1e-2)


@pytest.mark.parametrize("name", ["apollo", "apollo_mini"])
def test_rademacher_projection_option(name):
  """--projection rademacher reaches apollo_optax: same state layout as the
  Gaussian, different projected moments."""
  config = configs.get_config("tiny", vocab_size=64)
  params = {"layers": {"mlp": {"kernel": jnp.ones((2, 16, 24))}}}
  grads = {"layers": {"mlp": {"kernel": jax.random.normal(
      jax.random.key(0), (2, 16, 24))}}}
  states = {}
  for projection in ("gaussian", "rademacher"):
    tx = optimizers.make_optimizer(name, total_steps=10, warmup_steps=1,
                                   config=config, projection=projection)
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    states[projection] = state
  chex.assert_trees_all_equal_shapes_and_dtypes(states["gaussian"],
                                                states["rademacher"])
  is_apollo = lambda x: isinstance(x, apollo_optax.ScaleByApolloState)
  mus = [[x for x in jax.tree.leaves(s, is_leaf=is_apollo) if is_apollo(x)][0].mu
         for s in states.values()]
  assert not np.allclose(np.asarray(jax.tree.leaves(mus[0])[0]),
                         np.asarray(jax.tree.leaves(mus[1])[0]))


def test_projection_dtype_option(model_and_batch):
  """--projection-dtype bfloat16 reaches apollo_optax (the product runs in
  bf16, so the update moves, within bf16 rounding); others refuse it."""
  _, params, _ = model_and_batch
  grads = jax.tree.map(
      lambda x: jax.random.normal(jax.random.key(x.size), x.shape), params)

  def update(**kwargs):
    tx = optimizers.make_optimizer("apollo", total_steps=10, warmup_steps=1,
                                   config=CONFIG, **kwargs)
    state = tx.init(params)
    updates, _ = tx.update(grads, tx.update(grads, state, params)[1], params)
    return updates

  base, fast = update(), update(projection_dtype=jnp.bfloat16)
  lowrank = apollo_optax.default_lowrank_mask(params)
  moved = 0
  for b, f, low in zip(jax.tree.leaves(base), jax.tree.leaves(fast),
                       jax.tree.leaves(lowrank)):
    if low:
      np.testing.assert_allclose(f, b, rtol=5e-2, atol=1e-7)
      moved += not np.array_equal(f, b)
    else:
      np.testing.assert_array_equal(f, b)
  assert moved >= 1
  with pytest.raises(ValueError, match="projection_dtype: 'adamw' has no"):
    optimizers.make_optimizer("adamw", total_steps=10, warmup_steps=1,
                              config=CONFIG, projection_dtype=jnp.bfloat16)
