"""Tests for the LLaMA model, its configurations and its sharding."""

import dataclasses
import re

import chex
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np
import optax
import pytest

from apollo_lm import configs
from apollo_lm import model as model_lib
from apollo_lm import sharding
from apollo_lm import steps
from tests.apollo_lm.conftest import small_config

# Small enough to compile in about a second; every dimension is divisible by
# the fsdp=4 / tensor=2 mesh used below.
SMALL = small_config(dtype=jnp.bfloat16)

# The gradient tests compute in float32: on CPU, XLA compiles a bfloat16
# backward pass about three times more slowly. The forward tests use bfloat16.
SMALL_F32 = dataclasses.replace(SMALL, dtype=jnp.float32)

# One xdist worker runs the whole file, so compiled functions are reused.
pytestmark = pytest.mark.xdist_group("apollo_lm_model")


def _tokens(batch: int, seq_len: int, seed: int = 0) -> jax.Array:
  return jax.random.randint(
      jax.random.key(seed), (batch, seq_len), 0, SMALL.vocab_size, jnp.int32)


@pytest.fixture(scope="module")
def small_model() -> model_lib.Llama:
  return model_lib.Llama(SMALL, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def small_f32_model() -> model_lib.Llama:
  return model_lib.Llama(SMALL_F32, rngs=nnx.Rngs(0))


@nnx.jit
def _forward(model: model_lib.Llama, tokens: jax.Array) -> jax.Array:
  return model(tokens)


def _flat_params(model: nnx.Module) -> dict[str, nnx.Variable]:
  return {"/".join(map(str, path)): var for path, var
          in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _expected_params(config: configs.LlamaConfig) -> dict[str, tuple]:
  """The parameter contract: path -> (shape, sharding annotation)."""
  d, f, v, n = (config.hidden_size, config.intermediate_size,
                config.vocab_size, config.num_layers)
  col, row = (None, "fsdp", "tensor"), (None, "tensor", "fsdp")
  return {
      "embed/embedding": ((v, d), ("tensor", "fsdp")),
      "layers/attn/q_proj/kernel": ((n, d, d), col),
      "layers/attn/k_proj/kernel": ((n, d, d), col),
      "layers/attn/v_proj/kernel": ((n, d, d), col),
      "layers/attn/o_proj/kernel": ((n, d, d), row),
      "layers/mlp/gate_proj/kernel": ((n, d, f), col),
      "layers/mlp/up_proj/kernel": ((n, d, f), col),
      "layers/mlp/down_proj/kernel": ((n, f, d), row),
      "layers/attn_norm/scale": ((n, d), (None, None)),
      "layers/mlp_norm/scale": ((n, d), (None, None)),
      "final_norm/scale": ((d,), (None,)),
      "lm_head/kernel": ((d, v), ("fsdp", "tensor")),
  }


def _closed_form_count(config: configs.LlamaConfig) -> int:
  d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  return 2 * v * d + config.num_layers * (4 * d * d + 3 * d * f + 2 * d) + d


# ----------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, shape", [
    # Values of configs/llama_*.json in zhuhanqing/APOLLO and GaLore.
    ("9m", (128, 352, 4, 4)),
    ("60m", (512, 1376, 8, 8)),
    ("130m", (768, 2048, 12, 12)),
    ("350m", (1024, 2736, 16, 24)),
    ("1b", (2048, 5461, 32, 24)),
    ("7b", (4096, 11008, 32, 32)),
    ("13b", (5120, 13824, 40, 40)),
])
def test_get_config_shapes(name, shape):
  config = configs.get_config(name)
  assert (config.hidden_size, config.intermediate_size, config.num_heads,
          config.num_layers) == shape
  assert config.name == name
  assert config.vocab_size == 32000
  assert config.dtype == jnp.bfloat16 and config.param_dtype == jnp.float32


@pytest.mark.parametrize("name", configs.CONFIG_NAMES)
def test_every_registered_config_is_valid(name):
  config = configs.get_config(name, vocab_size=50257, remat=True)
  assert config.vocab_size == 50257 and config.remat
  assert config.head_dim * config.num_heads == config.hidden_size


def test_get_config_unknown_name_lists_allowed_names():
  with pytest.raises(ValueError, match="`name` '70b'") as err:
    configs.get_config("70b")
  for name in configs.CONFIG_NAMES:
    assert repr(name)[1:-1] in str(err.value)


def test_get_config_unknown_override():
  with pytest.raises(TypeError, match="hidden"):
    configs.get_config("60m", hidden=3)


@pytest.mark.parametrize("overrides, message", [
    (dict(num_heads=7), "divisible by `num_heads`=7"),
    (dict(hidden_size=24, num_heads=8), "must be even"),
    (dict(vocab_size=0), "`vocab_size` must be a positive int"),
    (dict(num_layers=2.0), "`num_layers` must be a positive int"),
    (dict(norm_eps=0.0), "`norm_eps` must be > 0"),
    (dict(dtype=jnp.int32), "`dtype` must be a floating dtype"),
])
def test_invalid_config_raises(overrides, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    configs.get_config("tiny", **overrides)


def test_config_is_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    SMALL.hidden_size = 64  # pytype: disable=not-writable


# ----------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------


def test_param_tree_matches_contract(small_model):
  params = _flat_params(small_model)
  expected = _expected_params(SMALL)
  assert set(params) == set(expected)
  for path, (shape, annotation) in expected.items():
    assert params[path].shape == shape, path
    assert params[path].get_metadata()["out_sharding"] == annotation, path
    assert params[path].dtype == jnp.float32, path
  # Everything in the state is a parameter (no stray buffers or biases).
  assert len(jax.tree.leaves(nnx.state(small_model))) == len(expected)


def test_init_statistics(small_model):
  params = _flat_params(small_model)
  for path, var in params.items():
    value = np.asarray(var[...])
    if path.endswith("scale"):
      np.testing.assert_array_equal(value, 1.0)
    else:
      np.testing.assert_allclose(value.std(), SMALL.init_std, rtol=0.15)
      np.testing.assert_allclose(value.mean(), 0.0, atol=0.005)
  # Layers are initialised independently, not copies of one another.
  q = np.asarray(params["layers/attn/q_proj/kernel"][...])
  assert not np.allclose(q[0], q[1])


@pytest.mark.parametrize("name", ["60m", "7b"])
def test_count_params_matches_closed_form(name):
  # Measured (vocab 32000): 60m -> 58_073_600 ("60M" in the paper),
  # 7b -> 6_738_415_616 ("7B"), 1b -> 1_339_082_752, 13b -> 13_015_864_320.
  config = configs.get_config(name)
  assert model_lib.count_params(name) == _closed_form_count(config)
  assert model_lib.count_params(config) == _closed_form_count(config)


def test_count_params_known_values():
  assert model_lib.count_params("60m") == 58_073_600
  assert model_lib.count_params("7b") == 6_738_415_616
  assert model_lib.count_params(
      configs.get_config("7b", vocab_size=100)) == 6_477_090_816


def test_abstract_state_13b_is_abstract():
  state = model_lib.abstract_state("13b")
  leaves = jax.tree.leaves(state)
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
  assert all(leaf.dtype == jnp.float32 for leaf in leaves)
  assert state["layers"]["mlp"]["down_proj"]["kernel"].shape == (
      40, 13824, 5120)
  specs = nnx.get_partition_spec(state)
  assert specs["lm_head"]["kernel"].get_value() == PartitionSpec(
      "fsdp", "tensor")


# ----------------------------------------------------------------------------
# Forward pass
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("batch, seq_len", [(1, 1), (3, 7), (2, 32)])
def test_logits_shape_and_dtype(small_model, batch, seq_len):
  logits = _forward(small_model, _tokens(batch, seq_len))
  chex.assert_shape(logits, (batch, seq_len, SMALL.vocab_size))
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)


def test_rejects_bad_tokens(small_model):
  with pytest.raises(ValueError, match="exceeds `max_seq_len`=32"):
    small_model(_tokens(1, 33))
  with pytest.raises(ValueError, match="integer array"):
    small_model(jnp.zeros((2, 4), jnp.float32))


@pytest.mark.parametrize("position", [1, 9, 31])
def test_causal_masking_is_exact(small_model, position):
  tokens = _tokens(2, 32)
  changed = tokens.at[:, position:].set(
      (tokens[:, position:] + 1) % SMALL.vocab_size)
  before, after = _forward(small_model, tokens), _forward(small_model, changed)
  np.testing.assert_array_equal(before[:, :position], after[:, :position])
  # The changed positions do see the change, so the check above can fail.
  assert not np.allclose(before[:, position:], after[:, position:])


def _dot_input_dtypes(jaxpr) -> set[jnp.dtype]:
  """Dtypes of every dot_general operand, including nested jaxprs."""
  dtypes = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      dtypes.update(var.aval.dtype for var in eqn.invars)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          dtypes |= _dot_input_dtypes(sub)
  return dtypes


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_params_float32_compute_in_config_dtype(dtype):
  config = dataclasses.replace(SMALL, dtype=dtype)
  model = model_lib.Llama(config, rngs=nnx.Rngs(0))
  assert {v.dtype for v in _flat_params(model).values()} == {
      jnp.dtype(jnp.float32)}
  graphdef, state = nnx.split(model)
  closed = jax.make_jaxpr(
      lambda state, tokens: nnx.merge(graphdef, state)(tokens))(
          state, _tokens(2, 8))
  assert _dot_input_dtypes(closed.jaxpr) == {jnp.dtype(dtype)}
  assert closed.out_avals[0].dtype == jnp.float32


@nnx.jit
def _loss_and_grads(model: model_lib.Llama, tokens: jax.Array):
  """Next-token loss and its gradient; shared so that it compiles once."""
  def loss_fn(model):
    batch = steps.Batch.from_tokens(tokens)
    return steps.next_token_loss(model(batch.inputs), batch)
  return nnx.value_and_grad(loss_fn)(model)


@pytest.mark.parametrize("remat, scan_layers", [(True, True), (False, False)])
def test_remat_and_unrolled_layers_match_reference(small_f32_model, remat,
                                                   scan_layers):
  reference = small_f32_model
  config = dataclasses.replace(SMALL_F32, remat=remat, scan_layers=scan_layers)
  other = model_lib.Llama(config, rngs=nnx.Rngs(1))
  nnx.update(other, nnx.state(reference))
  tokens = _tokens(2, 16)
  ref_logits, logits = _forward(reference, tokens), _forward(other, tokens)
  if scan_layers:
    # Rematerialisation recomputes the very same forward computation.
    np.testing.assert_array_equal(logits, ref_logits)
  else:
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
  if remat:
    (ref_loss, ref_grads), (loss, grads) = (
        _loss_and_grads(reference, tokens), _loss_and_grads(other, tokens))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-7, rtol=1e-5)


def test_rotary_embedding_is_relative():
  """RoPE keeps norms and makes q.k depend only on the position offset."""
  key_q, key_k = jax.random.split(jax.random.key(0))
  q = jnp.broadcast_to(jax.random.normal(key_q, (8,)), (1, 6, 1, 8))
  k = jnp.broadcast_to(jax.random.normal(key_k, (8,)), (1, 6, 1, 8))
  q_rot = model_lib.rotary_embedding(q, 10000.0)[0, :, 0]
  k_rot = model_lib.rotary_embedding(k, 10000.0)[0, :, 0]
  np.testing.assert_allclose(jnp.linalg.norm(q_rot, axis=-1),
                             jnp.linalg.norm(q[0, :, 0], axis=-1), rtol=1e-5)
  scores = q_rot @ k_rot.T
  for offset in range(-2, 3):
    diagonal = np.diagonal(scores, offset)
    np.testing.assert_allclose(diagonal, diagonal[0], rtol=1e-4, atol=1e-5)
  # Position 0 is not rotated at all.
  np.testing.assert_allclose(q_rot[0], q[0, 0, 0], rtol=1e-6)


# ----------------------------------------------------------------------------
# Loss and training
# ----------------------------------------------------------------------------


def test_adamw_steps_reduce_loss():
  model = model_lib.Llama(SMALL_F32, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)
  tokens = _tokens(2, 16, seed=1)
  update = nnx.jit(lambda optimizer, model, grads: optimizer.update(
      model, grads))
  losses = []
  for _ in range(10):
    loss, grads = _loss_and_grads(model, tokens)
    update(optimizer, model, grads)
    losses.append(float(loss))
  # Random init predicts about uniformly: loss ~ log(V).
  np.testing.assert_allclose(losses[0], np.log(SMALL.vocab_size), rtol=0.05)
  assert losses[-1] < losses[0] - 0.5, losses


# ----------------------------------------------------------------------------
# Sharding
# ----------------------------------------------------------------------------


def test_make_mesh_validates_device_count():
  assert jax.device_count() == 8, "tests/conftest.py sets 8 CPU devices"
  mesh = sharding.make_mesh(2, 2, 2)
  assert mesh.axis_names == sharding.MESH_AXES
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match=r"data \* fsdp \* tensor = 1 \* 4 \* 1"
                     r" must equal the number of devices, 8"):
    sharding.make_mesh(1, 4, 1)
  with pytest.raises(ValueError, match="number of devices, 2"):
    sharding.make_mesh(1, 1, 1, devices=jax.devices()[:2])


@pytest.mark.parametrize("data, fsdp, tensor, how", [
    (1, 4, 2, "create_sharded"), (2, 2, 2, "shard_model")])
def test_sharded_model_follows_annotations(small_model, data, fsdp, tensor,
                                           how):
  mesh = sharding.make_mesh(data, fsdp, tensor)
  if how == "create_sharded":
    sharded = sharding.create_sharded(
        lambda: model_lib.Llama(SMALL, rngs=nnx.Rngs(0)), mesh)
  else:
    sharded = sharding.shard_model(
        model_lib.Llama(SMALL, rngs=nnx.Rngs(0)), mesh)

  params = _flat_params(sharded)
  for path, (shape, annotation) in _expected_params(SMALL).items():
    value = params[path][...]
    expected = NamedSharding(mesh, PartitionSpec(*annotation))
    assert value.sharding.is_equivalent_to(expected, len(shape)), (
        path, value.sharding)
    # A weight split over k devices stores 1/k of it on each.
    num_shards = np.prod([mesh.shape[a] for a in annotation if a])
    assert value.addressable_shards[0].data.size == value.size // num_shards
  chex.assert_trees_all_close(nnx.state(sharded), nnx.state(small_model),
                              atol=1e-7)
  # Same pytree (incl. variable metadata) as the abstract state that memory
  # planning derives shardings from.
  assert jax.tree.structure(nnx.state(sharded)) == jax.tree.structure(
      model_lib.abstract_state(SMALL))

  tokens = _tokens(8, 16)
  with jax.set_mesh(mesh):
    logits = _forward(sharded, tokens)
  np.testing.assert_allclose(
      logits, _forward(small_model, tokens), atol=3e-2)


# ----------------------------------------------------------------------------
# Checkpoint-family features: GQA/MQA, head_dim, tied embeddings, llama3 RoPE,
# q/k/v biases, packed segments, KV-cache decoding
# ----------------------------------------------------------------------------

_LLAMA3_SCALING = configs.RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=16)

# Small variants, float32 compute, each checked against a float64 NumPy
# transcription of the formulas.
VARIANTS = {
    "mha": SMALL_F32,
    "gqa_tied_llama3": dataclasses.replace(
        SMALL_F32, num_kv_heads=2, tie_embeddings=True,
        rope_scaling=_LLAMA3_SCALING, rope_theta=500000.0, norm_eps=1e-5),
    "mqa_bias_head_dim": dataclasses.replace(
        SMALL_F32, num_kv_heads=1, head_dim=12, qkv_bias=True),
    # Qwen3: q/k norms, explicit head_dim, no biases.
    "qwen3_qk_norm": dataclasses.replace(
        SMALL_F32, num_kv_heads=2, head_dim=12, qk_norm=True, rope_theta=1e6),
    # Gemma 3: everything, with windows (5) shorter than the tests' sequences
    # and sliding / global layers with their own RoPE.
    "gemma3": dataclasses.replace(
        SMALL_F32, num_layers=3, num_kv_heads=1, head_dim=16, qk_norm=True,
        hidden_act="gelu_pytorch_tanh", norm_plus_one=True, post_norms=True,
        scale_embeddings=True, query_pre_attn_scalar=24.0, tie_embeddings=True,
        sliding_window=5, rope_theta=1e6, rope_local_theta=1e4,
        rope_scaling=configs.RopeScaling(2.0, rope_type="linear"),
        layer_types=("sliding_attention", "full_attention",
                     "sliding_attention")),
}


def _np_rope_frequencies(head_dim, theta, scaling):
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64)
                             / head_dim)
  if scaling is None:
    return inv_freq
  if scaling.rope_type == "linear":
    return inv_freq / scaling.factor
  context = scaling.original_max_position_embeddings
  out = []
  for f in inv_freq:
    wavelength = 2 * np.pi / f
    if wavelength < context / scaling.high_freq_factor:
      out.append(f)
    elif wavelength > context / scaling.low_freq_factor:
      out.append(f / scaling.factor)
    else:
      s = (context / wavelength - scaling.low_freq_factor) / (
          scaling.high_freq_factor - scaling.low_freq_factor)
      out.append((1 - s) * f / scaling.factor + s * f)
  return np.array(out)


def _np_forward(params, config, tokens, segment_ids=None):
  """Float64 NumPy LLaMA: per-head loops, explicit GQA head sharing.

  Also the Qwen3 / Gemma 3 features: q/k norms, (1 + w) norms, post-norms,
  GeGLU, scaled embeddings, query_pre_attn_scalar, and per layer (by
  ``layer_types``, else all when ``sliding_window``) windows and local RoPE.
  """
  p = {k: np.asarray(v[...], np.float64) for k, v in params.items()}
  batch, seq_len = tokens.shape
  heads, kv_heads, hd = config.num_heads, config.num_kv_heads, config.head_dim
  if segment_ids is None:
    segment_ids = np.zeros_like(tokens)
    positions = np.broadcast_to(np.arange(seq_len), tokens.shape)
  else:
    positions = np.zeros_like(tokens)
    for b in range(batch):
      for t in range(1, seq_len):
        same = segment_ids[b, t] == segment_ids[b, t - 1]
        positions[b, t] = positions[b, t - 1] + 1 if same else 0
  global_freq = _np_rope_frequencies(hd, config.rope_theta,
                                     config.rope_scaling)

  def rope(x, inv_freq):
    angles = positions[..., None] * inv_freq            # [B, T, D/2]
    cos, sin = np.cos(angles)[:, :, None], np.sin(angles)[:, :, None]
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

  def norm(x, scale):
    if config.norm_plus_one:
      scale = 1 + scale
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + config.norm_eps) * (
        scale)

  def act(x):
    if config.hidden_act == "gelu_pytorch_tanh":
      return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    return x / (1 + np.exp(-x))

  x = p["embed/embedding"][tokens]
  if config.scale_embeddings:
    x = x * np.sqrt(config.hidden_size)
  causal = (np.tril(np.ones((seq_len, seq_len), bool))[None]
            & (segment_ids[:, :, None] == segment_ids[:, None, :]))
  distance = np.arange(seq_len)[:, None] - np.arange(seq_len)[None, :]
  layer_types = config.layer_types or (
      ("sliding_attention" if config.sliding_window else "full_attention",)
      * config.num_layers)
  scale = (config.query_pre_attn_scalar or hd) ** -0.5
  for i in range(config.num_layers):
    layer = lambda name: p[f"layers/{name}"][i]
    sliding = layer_types[i] == "sliding_attention"
    allowed = causal & (distance < config.sliding_window) if sliding else causal
    inv_freq = (_np_rope_frequencies(hd, config.rope_local_theta, None)
                if sliding and config.rope_local_theta else global_freq)
    h = norm(x, layer("attn_norm/scale"))
    proj = {}
    for name, num in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
      y = h @ layer(f"attn/{name}_proj/kernel")
      if config.qkv_bias:
        y = y + layer(f"attn/{name}_proj/bias")
      proj[name] = y.reshape(batch, seq_len, num, hd)
      if config.qk_norm and name != "v":
        proj[name] = norm(proj[name], layer(f"attn/{name}_norm/scale"))
    q, k, v = rope(proj["q"], inv_freq), rope(proj["k"], inv_freq), proj["v"]
    out = np.zeros((batch, seq_len, heads, hd))
    for head in range(heads):
      kv = head // (heads // kv_heads)  # query head -> its key/value head
      scores = np.einsum("btd,bsd->bts", q[:, :, head], k[:, :, kv]) * scale
      scores = np.where(allowed, scores, -np.inf)
      weights = np.exp(scores - scores.max(-1, keepdims=True))
      weights /= weights.sum(-1, keepdims=True)
      out[:, :, head] = np.einsum("bts,bsd->btd", weights, v[:, :, kv])
    attn = out.reshape(batch, seq_len, -1) @ layer("attn/o_proj/kernel")
    if config.post_norms:
      attn = norm(attn, layer("post_attn_norm/scale"))
    x = x + attn
    h = norm(x, layer("mlp_norm/scale"))
    mlp = (act(h @ layer("mlp/gate_proj/kernel"))
           * (h @ layer("mlp/up_proj/kernel"))) @ layer("mlp/down_proj/kernel")
    if config.post_norms:
      mlp = norm(mlp, layer("post_mlp_norm/scale"))
    x = x + mlp
  x = norm(x, p["final_norm/scale"])
  head = (p["embed/embedding"].T if config.tie_embeddings
          else p["lm_head/kernel"])
  return x @ head


def _randomized(config, seed=0):
  """A model whose every parameter (norms, biases too) is random."""
  model = model_lib.Llama(config, rngs=nnx.Rngs(seed))
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  leaves = [leaf + 0.1 * jax.random.normal(key, leaf.shape, leaf.dtype)
            for leaf, key in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_float64_reference(variant):
  config = VARIANTS[variant]
  model = _randomized(config)
  tokens = np.asarray(_tokens(2, 24, seed=3))
  expected = _np_forward(_flat_params(model), config, tokens)
  np.testing.assert_allclose(_forward(model, jnp.asarray(tokens)), expected,
                             atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_param_tree(variant):
  config = VARIANTS[variant]
  params = _flat_params(model_lib.Llama(config, rngs=nnx.Rngs(0)))
  d, hd, n = config.hidden_size, config.head_dim, config.num_layers
  dq, dkv = config.num_heads * hd, config.num_kv_heads * hd
  assert params["layers/attn/q_proj/kernel"].shape == (n, d, dq)
  assert params["layers/attn/k_proj/kernel"].shape == (n, d, dkv)
  assert params["layers/attn/v_proj/kernel"].shape == (n, d, dkv)
  assert params["layers/attn/o_proj/kernel"].shape == (n, dq, d)
  assert ("lm_head/kernel" in params) == (not config.tie_embeddings)
  for name in ("q", "k", "v"):
    key = f"layers/attn/{name}_proj/bias"
    assert (key in params) == config.qkv_bias
    if config.qkv_bias:
      assert params[key].get_metadata()["out_sharding"] == (None, "tensor")
      np.testing.assert_array_equal(params[key][...], 0.0)
  for name in ("q", "k"):
    key = f"layers/attn/{name}_norm/scale"
    assert (key in params) == config.qk_norm
    if config.qk_norm:
      assert params[key].shape == (n, hd)
  for name in ("post_attn_norm", "post_mlp_norm"):
    assert (f"layers/{name}/scale" in params) == config.post_norms
  # Gemma's (1 + w) norms store w = 0 at init, the others scale 1.
  np.testing.assert_array_equal(params["final_norm/scale"][...],
                                0.0 if config.norm_plus_one else 1.0)
  embeddings = config.vocab_size * d * (1 if config.tie_embeddings else 2)
  per_layer = (2 * d * dq + 2 * d * dkv + 3 * d * config.intermediate_size
               + 2 * d + config.qkv_bias * (dq + 2 * dkv)
               + config.qk_norm * 2 * hd + config.post_norms * 2 * d)
  expected = embeddings + n * per_layer + d
  assert model_lib.count_params(config) == expected


@pytest.mark.parametrize("name, kwargs, published", [
    # Published sizes of the checkpoints' config.json shapes (model cards):
    # Llama-3.2-1B, Llama-3.1-8B, Qwen2.5-0.5B.
    ("llama-3.2-1b", dict(
        hidden_size=2048, intermediate_size=8192, num_heads=32, num_layers=16,
        vocab_size=128256, num_kv_heads=8, head_dim=64, tie_embeddings=True),
     1_235_814_400),
    ("llama-3.1-8b", dict(
        hidden_size=4096, intermediate_size=14336, num_heads=32,
        num_layers=32, vocab_size=128256, num_kv_heads=8),
     8_030_261_248),
    ("qwen2.5-0.5b", dict(
        hidden_size=896, intermediate_size=4864, num_heads=14, num_layers=24,
        vocab_size=151936, num_kv_heads=2, tie_embeddings=True,
        qkv_bias=True),
     494_032_768),
])
def test_count_params_published_checkpoints(name, kwargs, published):
  assert model_lib.count_params(
      configs.LlamaConfig(name=name, **kwargs)) == published


def _non_embedding(config: configs.LlamaConfig) -> int:
  """Parameters outside the input embedding and the output head."""
  head = 0 if config.tie_embeddings else config.vocab_size * config.hidden_size
  return (model_lib.count_params(config) - head
          - config.vocab_size * config.hidden_size)


@pytest.mark.parametrize("name, total, non_embedding, digits", [
    # Model cards on the Hub, "Number of Parameters" / "(Non-Embedding)":
    # huggingface.co/Qwen/Qwen3-0.6B: 0.6B / 0.44B.
    ("qwen3-0.6b", 0.6e9, 0.44e9, (1, 2)),
    # huggingface.co/Qwen/Qwen3-8B: 8.2B / 6.95B.
    ("qwen3-8b", 8.2e9, 6.95e9, (1, 2)),
    # Gemma 3 technical report (arXiv:2503.19786), Table 1, 1B: 302M
    # embedding + 698M non-embedding parameters (the model card: "1B").
    ("gemma-3-1b", 1.0e9, 698e6, (1, -6)),
])
def test_count_params_published_qwen3_gemma3(name, total, non_embedding,
                                             digits):
  config = configs.get_config(name)
  # Tied embeddings count once (count_params sums the model's leaves).
  count = model_lib.count_params(config)
  assert round(count / 1e9, digits[0]) == round(total / 1e9, digits[0]), count
  if digits[1] > 0:
    assert round(_non_embedding(config) / 1e9, digits[1]) == round(
        non_embedding / 1e9, digits[1]), _non_embedding(config)
  else:
    assert round(_non_embedding(config), digits[1]) == non_embedding
  assert config.name == name and config.qk_norm


def test_published_gemma3_layer_pattern():
  config = configs.get_config("gemma-3-1b")
  # Every 6th layer is global (sliding_window_pattern 6): 5, 11, 17, 23.
  assert [i for i, t in enumerate(config.layer_types)
          if t == "full_attention"] == [5, 11, 17, 23]
  spec = model_lib.layer_spec(config)
  assert spec.window.shape == (26,) and int(spec.window[0]) == 512
  assert spec.inv_freq.shape == (26, 128)


def test_rope_frequencies_llama3_match_reference():
  # The published Llama-3.1 rule and values, head_dim 128.
  scaling = configs.RopeScaling(8.0, 1.0, 4.0, 8192)
  actual = model_lib.rope_frequencies(128, 500000.0, scaling)
  expected = _np_rope_frequencies(128, 500000.0, scaling)
  np.testing.assert_allclose(actual, expected, rtol=2e-6)
  plain = _np_rope_frequencies(128, 500000.0, None)
  # High frequencies are kept, low ones divided by the factor, and the band
  # in between is changed too (so all three branches are exercised).
  assert np.array_equal(expected[:10], plain[:10])
  np.testing.assert_allclose(expected[-10:], plain[-10:] / 8.0)
  band = (expected != plain) & ~np.isclose(expected, plain / 8.0)
  assert band.sum() > 0


def test_segment_ids_mask_and_restart_positions():
  model = _randomized(VARIANTS["gqa_tied_llama3"])
  tokens = _tokens(2, 12, seed=4)
  segment_ids = jnp.array([[1] * 5 + [2] * 4 + [3] * 3,
                           [7] * 12])
  packed = model(tokens, segment_ids=segment_ids)
  # Every example on its own gives the same logits as packed.
  for row, spans in ((0, [(0, 5), (5, 9), (9, 12)]), (1, [(0, 12)])):
    for start, stop in spans:
      alone = model(tokens[row:row + 1, start:stop])
      np.testing.assert_allclose(packed[row, start:stop], alone[0],
                                 atol=2e-5)
  expected = _np_forward(_flat_params(model), VARIANTS["gqa_tied_llama3"],
                         np.asarray(tokens), np.asarray(segment_ids))
  np.testing.assert_allclose(packed, expected, atol=2e-4, rtol=1e-4)
  # Without segment ids the later examples see the earlier ones.
  assert not np.allclose(model(tokens)[0, 5:], packed[0, 5:], atol=1e-3)
  np.testing.assert_array_equal(
      model_lib.segment_positions(segment_ids)[0],
      [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2])


def test_explicit_positions_shift_equivariance():
  """RoPE is relative: shifting every position changes no logit."""
  model = _randomized(VARIANTS["mha"])
  tokens = _tokens(1, 10, seed=5)
  positions = jnp.arange(10)[None] + 37
  np.testing.assert_allclose(model(tokens, positions=positions),
                             model(tokens), atol=2e-5)
  with pytest.raises(ValueError, match="`positions` must have the shape"):
    model(tokens, positions=positions[:, :5])


# Gemma 3's windows and per-layer RoPE in decoding: test_hf's
# test_decode_matches_forward_on_fixtures, against transformers' logits.
@pytest.mark.parametrize("variant", sorted(set(VARIANTS) - {"gemma3"}))
def test_decode_with_kv_cache_matches_forward(variant):
  model = _randomized(VARIANTS[variant])
  tokens = _tokens(2, 14, seed=6)
  full = _forward(model, tokens)
  decode = nnx.jit(lambda model, tokens, cache: model.decode(tokens, cache))
  cache = model.init_cache(2, 16, jnp.float32)
  logits, cache = decode(model, tokens[:, :9], cache)
  steps = [logits]
  for t in range(9, 14):
    logits, cache = decode(model, tokens[:, t:t + 1], cache)
    steps.append(logits)
  assert int(cache.length) == 14
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=2e-5)
  with pytest.raises(ValueError, match="`max_len` must be in 1..max_seq_len"):
    model.init_cache(1, SMALL.max_seq_len + 1)


@pytest.mark.parametrize("overrides, message", [
    (dict(num_heads=4, num_kv_heads=3), "divisible by `num_kv_heads`=3"),
    (dict(head_dim=7), "`head_dim` = 7 must be even"),
    (dict(num_kv_heads=0), "`num_kv_heads` must be None or a positive int"),
    (dict(rope_scaling={"rope_type": "llama3"}), "must be None or a RopeScaling"),
    (dict(layer_types=("full_attention",) * 3),
     "`layer_types` must be None or `num_layers`=4 entries"),
    (dict(layer_types=("global",) * 4), "`layer_types` must be None"),
    (dict(layer_types=("sliding_attention",) * 4),
     "has sliding_attention layers but `sliding_window` is None"),
    (dict(hidden_act="gelu"), "unsupported `hidden_act` 'gelu'; supported: "
     "silu, gelu_pytorch_tanh"),
    (dict(query_pre_attn_scalar=0.0),
     "`query_pre_attn_scalar` must be None or > 0"),
    (dict(rope_local_theta=-1.0), "`rope_local_theta` must be None or > 0"),
])
def test_invalid_feature_config_raises(overrides, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    configs.get_config("tiny", **overrides)


def test_rope_scaling_type_must_be_supported():
  with pytest.raises(ValueError, match="unsupported `rope_type` 'yarn'.*llama3"):
    configs.RopeScaling(4.0, 1.0, 4.0, 8192, rope_type="yarn")
  # linear needs only the factor; llama3 needs all its fields.
  assert configs.RopeScaling(8.0, rope_type="linear").factor == 8.0
  with pytest.raises(ValueError, match="`factor` must be > 0 for rope_type "
                     "'linear', got 0.0"):
    configs.RopeScaling(0.0, rope_type="linear")
  with pytest.raises(ValueError, match="`low_freq_factor` must be > 0 for "
                     "rope_type 'llama3', got None"):
    configs.RopeScaling(8.0)


def test_rope_frequencies_linear_divides_by_factor():
  scaling = configs.RopeScaling(8.0, rope_type="linear")
  np.testing.assert_allclose(
      model_lib.rope_frequencies(64, 1e6, scaling),
      _np_rope_frequencies(64, 1e6, None) / 8.0, rtol=1e-6)


def test_layer_spec_scans_per_layer_windows_and_rope():
  config = VARIANTS["gemma3"]
  spec = model_lib.layer_spec(config)
  np.testing.assert_array_equal(spec.window, [5, config.max_seq_len, 5])
  local = _np_rope_frequencies(16, 1e4, None)
  full = _np_rope_frequencies(16, 1e6, None) / 2.0
  np.testing.assert_allclose(spec.inv_freq, np.stack([local, full, local]),
                             rtol=1e-6)
  # Uniform configs have none: they compile as before.
  for name in ("mha", "qwen3_qk_norm"):
    assert model_lib.layer_spec(VARIANTS[name]) is None
  # Mistral: every layer slides; a window at least max_seq_len long binds
  # nowhere.
  np.testing.assert_array_equal(model_lib.layer_spec(dataclasses.replace(
      SMALL_F32, sliding_window=6)).window, [6, 6])
  assert model_lib.layer_spec(dataclasses.replace(
      SMALL_F32, sliding_window=SMALL.max_seq_len)) is None


def test_block_without_its_layer_spec_is_an_error():
  model = model_lib.Llama(VARIANTS["gemma3"], rngs=nnx.Rngs(0))
  block = nnx.merge(*nnx.split(model.layers))  # the stacked block
  x = jnp.zeros((1, 4, SMALL.hidden_size))
  with pytest.raises(ValueError, match="per-layer sliding windows or RoPE "
                     "bases; pass `spec`"):
    block(x)


def test_head_dim_and_kv_heads_default_to_multi_head():
  config = configs.get_config("60m")
  assert (config.num_kv_heads, config.head_dim) == (8, 64)
  assert config == configs.get_config("60m", num_kv_heads=8, head_dim=64)
  # A window at least the sequence long changes nothing and is accepted.
  assert configs.get_config("tiny", sliding_window=256).sliding_window == 256


@pytest.mark.parametrize("variant", ["qwen3_qk_norm", "gemma3"])
def test_default_lowrank_mask_of_qwen3_and_gemma3(variant):
  """q/k norm scales (L, head_dim) and the post-norms are 2-D but not
  matrices: AdamW, not APOLLO; the projections stay low-rank."""
  import apollo_optax  # pylint: disable=g-import-not-at-top
  params = nnx.to_pure_dict(nnx.state(model_lib.Llama(
      VARIANTS[variant], rngs=nnx.Rngs(0)), nnx.Param))
  mask = {"/".join(k.key for k in path): value for path, value in
          jax.tree_util.tree_leaves_with_path(
              apollo_optax.default_lowrank_mask(params))}
  lowrank = {key for key, value in mask.items() if value}
  assert lowrank == {f"layers/attn/{n}_proj/kernel" for n in "qkvo"} | {
      f"layers/mlp/{n}_proj/kernel" for n in ("gate", "up", "down")}
  assert params["layers"]["attn"]["q_norm"]["scale"].ndim == 2
  assert not mask["layers/attn/q_norm/scale"]
  assert not mask["layers/attn/k_norm/scale"]


def test_default_lowrank_mask_keeps_biases_on_adam():
  import apollo_optax  # pylint: disable=g-import-not-at-top
  params = nnx.to_pure_dict(nnx.state(model_lib.Llama(
      VARIANTS["mqa_bias_head_dim"], rngs=nnx.Rngs(0)), nnx.Param))
  mask = {"/".join(k.key for k in path): value for path, value in
          jax.tree_util.tree_leaves_with_path(
              apollo_optax.default_lowrank_mask(params))}
  assert mask["layers/attn/q_proj/kernel"] and mask["layers/mlp/up_proj/kernel"]
  assert not any(mask[f"layers/attn/{n}_proj/bias"] for n in "qkv")
