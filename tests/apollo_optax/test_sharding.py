"""The optimizer state follows the parameters' sharding (8 CPU devices).

Layouts of a small LLaMA-block-shaped tree (scanned (L, m, n) kernels, norm
scales and an embedding on Adam): FSDP along rows, FSDP along columns, and
the model's (fsdp x tensor) annotations; see benchmarks/sharding_report.py.
"""

import functools
import json
import os
import socket
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import apollo_optax
from apollo_lm import configs
from apollo_lm import model as model_lib
from apollo_lm import sharding as lm_sharding
from benchmarks import sharding_report as report

pytestmark = pytest.mark.xdist_group("apollo_optax_sharding")

L, D, F, V, RANK, STEPS = 2, 32, 64, 64, 8, 10
SHAPES = {
    "attn/q_proj/kernel": (L, D, D),
    "attn/o_proj/kernel": (L, D, D),
    "mlp/gate_proj/kernel": (L, D, F),
    "mlp/down_proj/kernel": (L, F, D),
    "attn_norm/scale": (L, D),
    "embed/embedding": (V, D),
}
LOWRANK = [k for k, s in SHAPES.items() if "kernel" in k]
OPTIMIZERS = {
    "apollo": lambda: apollo_optax.apollo(1e-2, rank=RANK, weight_decay=0.1),
    "apollo_mini": lambda: apollo_optax.apollo_mini(1e-2),
    # Issue 12's fast path: Rademacher signs, bfloat16 product inputs.
    "apollo_fast": lambda: apollo_optax.apollo(
        1e-2, rank=RANK, weight_decay=0.1, projection="rademacher",
        projection_dtype=jnp.bfloat16),
    "apollo_mini_fast": lambda: apollo_optax.apollo_mini(
        1e-2, projection="rademacher", projection_dtype=jnp.bfloat16),
}


def _params(mesh=None, layout=None):
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32)
            for k, s in SHAPES.items()}
  if mesh is None:
    return params
  return {k: jax.device_put(p, _sharding(mesh, layout, k)) for k, p in params.items()}


def _sharding(mesh, layout, key):
  return NamedSharding(mesh, report.layout_spec(layout, key, len(SHAPES[key])))


def _names(entry):
  return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


def _expected_lowrank_spec(spec, shape):
  """Kept axis: its own mesh axes, then those of the projected axis."""
  s = tuple(spec) + (None,) * (3 - len(spec))
  tall = shape[1] >= shape[2]
  kept, projected = (s[1], s[2]) if tall else (s[2], s[1])
  names = _names(kept) + _names(projected)
  merged = None if not names else names[0] if len(names) == 1 else names
  return P(s[0], merged, None) if tall else P(s[0], None, merged)


def _spec_of(x):
  """The spec of an array, or of a NamedSharding (from state_shardings)."""
  return x.spec if isinstance(x, NamedSharding) else x.sharding.spec


def _normalized(spec, ndim):
  spec = tuple(spec)
  return P(*(spec + (None,) * (ndim - len(spec))))


def _check_state_specs(state, param_specs):
  """Low-rank moments, limiter norms and Adam moments have the right specs."""
  apollo_state = optax.tree.get(state, "ScaleByApolloState")
  limiter_state = optax.tree.get(state, "NormGrowthLimiterState")
  adam_state = optax.tree.get(state, "ScaleByAdamMomentsState")
  for key in LOWRANK:
    expected = _expected_lowrank_spec(param_specs[key], SHAPES[key])
    for moment in (apollo_state.mu[key], apollo_state.nu[key]):
      assert _normalized(_spec_of(moment), 3) == expected, key
    norm = limiter_state.previous_norm[key]
    assert _normalized(_spec_of(norm), 1) == _normalized(param_specs[key][:1], 1)
  for key in SHAPES:
    if key not in LOWRANK:
      for moment in (adam_state.mu[key], adam_state.nu[key]):
        assert _normalized(_spec_of(moment), 2) == _normalized(param_specs[key], 2)


def _loss(params):
  return sum(jnp.sum(0.5 * p**2 + jnp.cos(3.0 * p)) for p in jax.tree.leaves(params))


def _train(tx, params, steps=STEPS):
  """(losses, parameter change) after ``steps`` steps; jitted step."""

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(_loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  start = params
  state = jax.jit(tx.init)(params)
  types = jax.tree.map(jax.typeof, state)
  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    assert jax.tree.map(jax.typeof, state) == types
    losses.append(float(loss))
  delta = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, start)
  return np.array(losses), delta, state


@functools.cache
def _single_device(name):
  losses, delta, _ = _train(OPTIMIZERS[name](), _params())
  return losses, delta


def _assert_same_training(actual, expected):
  np.testing.assert_allclose(actual[0], expected[0], rtol=1e-5)
  for key in SHAPES:
    scale = np.max(np.abs(expected[1][key]))
    np.testing.assert_allclose(actual[1][key] / scale, expected[1][key] / scale,
                               rtol=0, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("layout", report.LAYOUTS)
def test_explicit_mesh_state_types_and_training(layout, name):
  """jit(init) under Explicit axes: sharded state, stable types, same numbers."""
  mesh = report.make_mesh(layout, AxisType.Explicit)
  with jax.set_mesh(mesh):
    params = _params(mesh, layout)
    losses, delta, state = _train(OPTIMIZERS[name](), params)
  _check_state_specs(state, {k: p.sharding.spec for k, p in params.items()})
  _assert_same_training((losses, delta), _single_device(name))


@pytest.mark.parametrize("layout", report.LAYOUTS)
def test_eager_init_and_state_shardings(layout):
  """Eager init on sharded arrays = state_shardings (+ chained optax)."""
  mesh = report.make_mesh(layout, AxisType.Auto)
  params = _params(mesh, layout)
  specs = {k: p.sharding.spec for k, p in params.items()}
  for name, make in OPTIMIZERS.items():
    tx = make()
    state = tx.init(params)
    _check_state_specs(state, specs)
    shardings = apollo_optax.state_shardings(tx, params)
    for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
      if leaf.ndim:
        assert sharding.is_equivalent_to(leaf.sharding, leaf.ndim), name
    jitted = jax.jit(tx.init, out_shardings=shardings)(params)
    _check_state_specs(jitted, specs)
  # Ordinary optax transformations chained around APOLLO, and plain AdamW.
  chained = optax.chain(optax.clip_by_global_norm(1.0), OPTIMIZERS["apollo"]())
  shardings = apollo_optax.state_shardings(chained, params)
  _check_state_specs(shardings[1], {k: s for k, s in specs.items()})
  adamw = apollo_optax.state_shardings(optax.adamw(1e-3), params)
  for key in SHAPES:
    assert adamw[0].mu[key] == params[key].sharding
  # Only shapes and shardings are needed.
  abstract = jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding), params)
  assert apollo_optax.state_shardings(chained, abstract) == shardings


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("mode", ["auto", "explicit"])
@pytest.mark.parametrize("layout", report.LAYOUTS)
def test_update_moves_only_lowrank_tensors(layout, mode, name):
  """Compiled update: reductions of R only; per-device state = total/8."""
  abstract = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in SHAPES.items()}
  result = report.measure(OPTIMIZERS[name](), layout, mode, abstract)
  by_op = result["collective_bytes_by_op"]
  # No gradient, parameter or update moves; only per-channel factors do.
  assert by_op["all-to-all"] == by_op["collective-permute"] == 0
  vectors = report.channel_bound(abstract)
  assert by_op["all-gather"] <= vectors
  bound = report.lowrank_bound(
      abstract, 1 if name.startswith("apollo_mini") else RANK)
  assert 0 < result["reduction_bytes"] <= bound + 2 * vectors
  replicated = 4 * (2 + L * len(LOWRANK))  # counts and limiter norms
  total, devices = result["state_bytes_total"], result["devices"]
  assert total / devices <= result["state_bytes_per_device"] <= total / devices + replicated


NNX_CONFIG = configs.LlamaConfig(
    name="test", hidden_size=32, intermediate_size=64, num_heads=4,
    num_layers=2, vocab_size=64, max_seq_len=16, dtype=jnp.float32)


def _check_nnx_optimizer(optimizer, mesh):
  """Each state array is sharded as its annotation says, and sensibly."""
  state = nnx.state(optimizer, nnx.OptState)
  is_spec = lambda x: isinstance(x, P)
  specs = dict(
      (jax.tree_util.keystr(path), spec) for path, spec in
      jax.tree_util.tree_leaves_with_path(nnx.get_partition_spec(state), is_leaf=is_spec))
  checked = 0
  for path, value in jax.tree_util.tree_leaves_with_path(state):
    name, spec = jax.tree_util.keystr(path), specs[jax.tree_util.keystr(path)]
    assert value.sharding.is_equivalent_to(NamedSharding(mesh, spec), value.ndim), name
    if "'apollo'" in name and "['mu']" in name and "gate_proj" in name:
      # (L, rank, f): the rank axis unsharded, f over tensor then fsdp.
      assert value.shape == (2, RANK, 64), name
      assert _normalized(spec, 3) == P(None, None, ("tensor", "fsdp")), name
      checked += 1
  assert checked == 1


def test_nnx_optimizer_state_sharding():
  """nnx.Optimizer, eagerly and inside nnx.jit, on an annotated Llama."""
  mesh = lm_sharding.make_mesh(1, 4, 2)
  tx = OPTIMIZERS["apollo"]()
  make = lambda: model_lib.Llama(NNX_CONFIG, rngs=nnx.Rngs(0))
  model = lm_sharding.create_sharded(make, mesh)
  with jax.set_mesh(mesh):
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  _check_nnx_optimizer(optimizer, mesh)

  @nnx.jit
  def create():
    model = make()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    state = nnx.state(optimizer)
    nnx.update(optimizer, jax.lax.with_sharding_constraint(
        state, nnx.get_partition_spec(state)))
    return model, optimizer

  with jax.set_mesh(mesh):
    _, jitted = create()
  _check_nnx_optimizer(jitted, mesh)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process():
  """2 processes x 4 CPU devices give the losses of 1 process x 8 devices."""
  worker = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
  root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = root

  def launch(num_processes, process_id, port):
    return subprocess.Popen(
        [sys.executable, worker, "--coordinator", f"localhost:{port}",
         "--num-processes", str(num_processes), "--process-id", str(process_id)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

  port = _free_port()
  procs = [launch(2, i, port) for i in range(2)] + [launch(1, 0, _free_port())]
  outputs = []
  for proc in procs:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    outputs.append(json.loads(out.strip().splitlines()[-1]))
  two_a, two_b, one = outputs
  assert two_a["devices"] == two_b["devices"] == one["devices"] == 8
  assert two_a["local_devices"] == 4 and one["local_devices"] == 8
  np.testing.assert_allclose(two_a["losses"], one["losses"], rtol=1e-5)
  np.testing.assert_allclose(two_b["losses"], one["losses"], rtol=1e-5)
  assert one["losses"][-1] < one["losses"][0]
