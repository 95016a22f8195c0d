"""Tests for Hugging Face checkpoints in and out (`apollo_lm.hf`).

The fixtures in tests/fixtures/hf were written by `transformers` itself
(`make hf-fixtures`, tests/fixtures/hf/make_fixtures.py), with its logits on
fixed tokens; roundtrip.json records that `transformers` loads our saved
folders with the same weights and logits.
"""

import dataclasses
import json
import pathlib
import re
import shutil

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from apollo_lm import configs
from apollo_lm import hf
from apollo_lm import sharding

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"
NAMES = ("llama2", "llama3", "qwen2", "mistral", "mistral_sliding", "qwen3",
         "gemma3")
TOKENS = np.load(FIXTURES / "tokens.npy").astype(np.int32)

pytestmark = pytest.mark.xdist_group("apollo_lm_hf")


def _params(model) -> dict[str, np.ndarray]:
  return {"/".join(map(str, p)): np.asarray(v[...]) for p, v
          in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _hf_config(name: str) -> dict:
  return json.loads((FIXTURES / name / "config.json").read_text())


def _copy(name: str, tmp_path: pathlib.Path) -> pathlib.Path:
  dst = tmp_path / name
  shutil.copytree(FIXTURES / name, dst)
  return dst


def _legacy_spelling(hf_config: dict) -> dict:
  """transformers >= 5 `rope_parameters` -> the 4.x top-level spelling."""
  out = dict(hf_config)
  rope = dict(out.pop("rope_parameters"))
  if "full_attention" in rope:  # per layer type (Gemma 3)
    out["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    rope = dict(rope["full_attention"])
  out["rope_theta"] = rope.pop("rope_theta")
  out["rope_scaling"] = None if rope.get("rope_type") == "default" else rope
  return out


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
  model, config = hf.load_pretrained(FIXTURES / name)
  assert config.param_dtype == jnp.float32 and config.dtype == jnp.float32
  expected = np.load(FIXTURES / name / "logits.npy")
  logits = np.asarray(model(jnp.asarray(TOKENS)))
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
  # The logits are far from trivial (so the check above can fail).
  assert np.abs(expected).max() > 1.0


@pytest.mark.parametrize("name, features", [
    ("llama2", dict(num_kv_heads=4, head_dim=8, tie_embeddings=False,
                    qkv_bias=False, rope_scaling=None)),
    ("llama3", dict(num_kv_heads=2, head_dim=16, tie_embeddings=True,
                    qkv_bias=False, rope_theta=500000.0,
                    rope_scaling=configs.RopeScaling(8.0, 1.0, 4.0, 16))),
    ("qwen2", dict(num_kv_heads=1, tie_embeddings=True, qkv_bias=True,
                   rope_theta=1e6)),
    ("mistral", dict(num_kv_heads=2, tie_embeddings=False, norm_eps=1e-5)),
    ("mistral_sliding", dict(sliding_window=4, layer_types=None)),
    ("qwen3", dict(num_kv_heads=2, head_dim=16, qk_norm=True, qkv_bias=False,
                   tie_embeddings=False, sliding_window=None,
                   layer_types=None, norm_plus_one=False)),
    ("gemma3", dict(
        num_layers=3, num_kv_heads=1, head_dim=16, qk_norm=True,
        norm_plus_one=True, post_norms=True, scale_embeddings=True,
        hidden_act="gelu_pytorch_tanh", query_pre_attn_scalar=24.0,
        tie_embeddings=True, sliding_window=4, rope_theta=1e6,
        rope_local_theta=1e4,
        rope_scaling=configs.RopeScaling(2.0, rope_type="linear"),
        layer_types=("sliding_attention", "full_attention",
                     "sliding_attention"))),
])
def test_config_from_hf_both_spellings(name, features):
  new = hf.config_from_hf(_hf_config(name))
  legacy = hf.config_from_hf(_legacy_spelling(_hf_config(name)))
  assert new == legacy
  for field, value in features.items():
    assert getattr(new, field) == value, field
  assert new.name == _hf_config(name)["architectures"][0]
  # config_to_hf writes what config_from_hf reads back.
  assert hf.config_from_hf(hf.config_to_hf(new)) == new


@pytest.mark.parametrize("name, dtype", [
    *((name, jnp.float32) for name in NAMES), ("llama3", jnp.bfloat16),
    ("gemma3", jnp.bfloat16)])
def test_load_save_load_is_exact(name, dtype, tmp_path):
  model, config = hf.load_pretrained(FIXTURES / name, dtype=dtype)
  files = hf.save_pretrained(model, config, tmp_path / "out")
  assert files == ["model.safetensors"]
  again, config_again = hf.load_pretrained(tmp_path / "out", dtype=dtype)
  assert config_again == config
  before, after = _params(model), _params(again)
  assert before.keys() == after.keys()
  for key in before:
    assert before[key].dtype == jnp.dtype(dtype), key
    np.testing.assert_array_equal(after[key], before[key], err_msg=key)
  # The same tensors as the original file, bit for bit (float32 only).
  if dtype == jnp.float32:
    ours = load_file(tmp_path / "out" / "model.safetensors")
    original = {}
    for file in (FIXTURES / name).glob("*.safetensors"):
      original.update(load_file(file))
    assert ours.keys() == original.keys()
    for key in ours:
      np.testing.assert_array_equal(ours[key], original[key], err_msg=key)


def test_save_sharded_with_index(tmp_path):
  model, config = hf.load_pretrained(FIXTURES / "llama2")
  files = hf.save_pretrained(model, config, tmp_path, max_shard_size=30_000)
  assert len(files) > 2
  assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
  index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
  assert sorted(set(index["weight_map"].values())) == files
  assert index["metadata"]["total_size"] == 4 * sum(
      v.size for v in _params(model).values())
  for file in files:
    size = sum(t.nbytes for t in load_file(tmp_path / file).values())
    # A shard is only over the limit when one tensor alone is.
    assert size <= 30_000 or len(load_file(tmp_path / file)) == 1
  again, _ = hf.load_pretrained(tmp_path)
  for key, value in _params(model).items():
    np.testing.assert_array_equal(_params(again)[key], value, err_msg=key)


def test_tied_checkpoint_with_lm_head_weight(tmp_path):
  path = _copy("qwen2", tmp_path)
  tensors = load_file(path / "model.safetensors")
  assert "lm_head.weight" not in tensors
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
  save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
  model, config = hf.load_pretrained(path)
  assert config.tie_embeddings and "lm_head/kernel" not in _params(model)
  np.testing.assert_allclose(
      model(jnp.asarray(TOKENS)), np.load(path / "logits.npy"), atol=1e-4)


def test_sharded_load_onto_mesh():
  assert jax.device_count() == 8
  mesh = sharding.make_mesh(1, 4, 2)
  model, _ = hf.load_pretrained(FIXTURES / "llama3", mesh=mesh)
  expected = sharding.param_shardings(model, mesh)
  flat = {"/".join(map(str, p)): s.get_value()
          for p, s in nnx.to_flat_state(expected)}
  sharded_leaves = 0
  for path, value in _params_raw(model).items():
    assert isinstance(value.sharding, NamedSharding)
    assert value.sharding.is_equivalent_to(flat[path], value.ndim), path
    sharded_leaves += len(value.sharding.device_set) == 8 and (
        value.addressable_shards[0].data.size < value.size)
  assert sharded_leaves >= 5
  with jax.set_mesh(mesh):
    logits = nnx.jit(lambda m, t: m(t))(model, jnp.asarray(TOKENS))
  np.testing.assert_allclose(logits, np.load(FIXTURES / "llama3" /
                                             "logits.npy"), atol=1e-4)


def _params_raw(model) -> dict[str, jax.Array]:
  return {"/".join(map(str, p)): v[...] for p, v
          in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("change, message", [
    (dict(architectures=["GPT2LMHeadModel"]),
     "unsupported architecture ['GPT2LMHeadModel']; supported architectures: "
     "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"),
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)),
     "unsupported RoPE scaling type 'yarn'; supported RoPE types: default, "
     "llama3"),
    (dict(hidden_act="gelu"), "unsupported `hidden_act` 'gelu'; supported: "
     "silu"),
    (dict(attention_bias=True), "`attention_bias`=true is not supported for "
     "LlamaForCausalLM"),
    (dict(mlp_bias=True), "`mlp_bias`=true is not supported"),
    (dict(layer_types=["sliding_attention", "full_attention"]),
     "unsupported `layer_types` ['full_attention', 'sliding_attention'] for "
     "LlamaForCausalLM"),
])
def test_unsupported_llama_config_features(change, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    hf.config_from_hf({**_hf_config("llama3"), **change})


@pytest.mark.parametrize("name, change, message", [
    ("qwen3", dict(attention_bias=True), "`attention_bias`=true is not "
     "supported for Qwen3ForCausalLM"),
    ("gemma3", dict(final_logit_softcapping=30.0),
     "`final_logit_softcapping`=30.0 is not supported; supported: null"),
    ("gemma3", dict(attn_logit_softcapping=50.0),
     "`attn_logit_softcapping`=50.0 is not supported"),
    ("gemma3", dict(use_bidirectional_attention=True),
     "`use_bidirectional_attention`=true is not supported"),
    ("gemma3", dict(rope_parameters=dict(
        full_attention=dict(rope_type="default", rope_theta=1e6),
        sliding_attention=dict(rope_type="linear", factor=2.0,
                               rope_theta=1e4))),
     "unsupported RoPE scaling type 'linear' of the sliding_attention layers"),
    ("gemma3", dict(hidden_activation="relu"),
     "unsupported `hidden_act` 'relu'"),
])
def test_unsupported_qwen3_gemma3_features(name, change, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    hf.config_from_hf({**_hf_config(name), **change})


def test_sliding_windows_follow_transformers():
  mistral = _hf_config("mistral_sliding")
  assert hf.config_from_hf(mistral).windowed
  # A window at least max_seq_len long binds nowhere (compiles as full).
  assert not hf.config_from_hf(mistral, max_seq_len=4).windowed
  # Qwen2/3 ignore the window unless use_sliding_window is set, then slide
  # from layer max_window_layers on (when config.json lists no layer_types).
  for name in ("qwen2", "qwen3"):
    qwen = {**_hf_config(name), "sliding_window": 4}
    del qwen["layer_types"]
    assert hf.config_from_hf(qwen).sliding_window is None
    config = hf.config_from_hf(
        {**qwen, "use_sliding_window": True, "max_window_layers": 1})
    assert config.layer_types == ("full_attention", "sliding_attention")
    assert config.windowed and hf.config_from_hf(
        hf.config_to_hf(config)) == config
  # Gemma 3 without layer_types: every sliding_window_pattern-th is global.
  gemma = {**_hf_config("gemma3"), "sliding_window_pattern": 3}
  del gemma["layer_types"]
  assert hf.config_from_hf(gemma).layer_types == (
      "sliding_attention", "sliding_attention", "full_attention")


@pytest.mark.parametrize("name, change", [
    ("mistral_sliding", dict(sliding_window=64)),
    ("gemma3", dict(sliding_window=64)),
    ("gemma3", dict(rope_local_theta=1e6)),
    ("gemma3", dict(query_pre_attn_scalar=16.0)),
])
def test_windows_and_local_rope_are_needed_to_match(name, change):
  """Without the fixture's window, local RoPE base or attention scale, logits
  move by far more than the 1e-4 they match transformers' to."""
  model, _ = hf.load_pretrained(FIXTURES / name, **change)
  logits = np.asarray(model(jnp.asarray(TOKENS)))
  assert np.abs(logits - np.load(FIXTURES / name / "logits.npy")).max() > 1e-2


@pytest.mark.parametrize("name", ["mistral_sliding", "gemma3"])
def test_decode_matches_forward_on_fixtures(name):
  """KV-cache decoding (prefill 5, then one token at a time, past the
  window of 4) gives the full forward's logits, i.e. transformers'."""
  model, _ = hf.load_pretrained(FIXTURES / name)
  tokens = jnp.asarray(TOKENS)
  decode = nnx.jit(lambda model, tokens, cache: model.decode(tokens, cache))
  cache = model.init_cache(2, 16)
  logits, cache = decode(model, tokens[:, :5], cache)
  steps = [logits]
  for t in range(5, tokens.shape[1]):
    logits, cache = decode(model, tokens[:, t:t + 1], cache)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1),
                             np.load(FIXTURES / name / "logits.npy"),
                             atol=1e-4, rtol=0)


def test_missing_unexpected_and_misshaped_tensors(tmp_path):
  path = _copy("mistral", tmp_path)
  tensors = load_file(path / "model.safetensors")

  def write(t):
    save_file(t, path / "model.safetensors", metadata={"format": "pt"})

  write({k: v for k, v in tensors.items()
         if k != "model.layers.1.mlp.up_proj.weight"})
  with pytest.raises(ValueError, match=r"missing tensor "
                     r"'model.layers.1.mlp.up_proj.weight'"):
    hf.load_pretrained(path)
  write({**tensors, "model.layers.0.self_attn.q_norm.weight":
         np.ones(8, np.float32)})
  with pytest.raises(ValueError, match=r"unexpected tensors "
                     r"\['model.layers.0.self_attn.q_norm.weight'\]"):
    hf.load_pretrained(path)
  write({**tensors, "model.norm.weight": np.ones(16, np.float32)})
  with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \[16\],"
                     r" the config implies \[32\]"):
    hf.load_pretrained(path)
  (path / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="neither model.safetensors nor "
                     "model.safetensors.index.json"):
    hf.load_pretrained(path)
  with pytest.raises(FileNotFoundError, match="nowhere: no such folder"):
    hf.load_pretrained(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="empty: no config.json"):
    hf.load_pretrained(tmp_path / "empty")


@pytest.mark.parametrize("name, file, keep", [
    ("mistral", "model.safetensors", 0.5),  # tensor data cut short
    ("mistral", "model.safetensors", 6e-5),  # inside the 8-byte header size
    ("llama2", "model-00002-of-00004.safetensors", 0.9),  # one shard
])
def test_truncated_safetensors_names_the_file(tmp_path, name, file, keep):
  path = _copy(name, tmp_path)
  data = (path / file).read_bytes()
  (path / file).write_bytes(data[:int(len(data) * keep)])
  with pytest.raises(ValueError, match=re.escape(
      f"{path / file}: not a readable safetensors file")):
    hf.load_pretrained(path)


def test_config_to_hf_architecture_errors():
  config = hf.config_from_hf(_hf_config("llama2"))
  assert hf.config_to_hf(config, "MistralForCausalLM")["model_type"] == (
      "mistral")
  with pytest.raises(ValueError, match="unsupported `architecture` 'Foo'"):
    hf.config_to_hf(config, "Foo")
  with pytest.raises(ValueError, match="Qwen2ForCausalLM cannot express "
                     "qkv_bias=False; supported as LlamaForCausalLM, "
                     "MistralForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM"):
    hf.config_to_hf(config, "Qwen2ForCausalLM")
  with pytest.raises(ValueError, match="Gemma3ForCausalLM cannot express "
                     "qk_norm=False"):
    hf.config_to_hf(config, "Gemma3ForCausalLM")
  gemma = hf.config_from_hf(_hf_config("gemma3"))
  with pytest.raises(ValueError, match="Qwen3ForCausalLM cannot express "
                     "norm_plus_one=True"):
    hf.config_to_hf(gemma, "Qwen3ForCausalLM")
  # A config without a checkpoint name gets the architecture of its features.
  for name in ("llama2", "qwen2", "qwen3", "gemma3"):
    unnamed = dataclasses.replace(hf.config_from_hf(_hf_config(name)),
                                  name="mine")
    assert hf.config_to_hf(unnamed)["architectures"] == (
        _hf_config(name)["architectures"])


def test_eos_token_ids(tmp_path):
  assert hf.eos_token_ids(FIXTURES / "llama3") == (2, 3)
  assert hf.eos_token_ids(FIXTURES / "llama2") == (2,)
  assert hf.eos_token_ids(tmp_path) == ()


def test_roundtrip_record_of_transformers():
  record = json.loads((FIXTURES / "roundtrip.json").read_text())
  assert set(record["fixtures"]) == set(NAMES)
  for result in record["fixtures"].values():
    assert result["weights_identical"]
    assert result["max_abs_logits_diff"] <= 1e-5


def test_fixtures_are_small():
  total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
  assert total < 1_000_000, total


def test_load_streams_one_stacked_leaf_at_a_time(monkeypatch):
  """Every leaf goes to its devices before the next leaf's tensors are read,
  so host memory holds one (stacked) leaf, not the model."""
  events = []
  get, put = hf._Reader.get, hf.jax.device_put  # pylint: disable=protected-access

  def spy_get(self, name):
    events.append(("read", name))
    return get(self, name)

  def spy_put(value, *args, **kwargs):
    events.append(("put", value.shape))
    return put(value, *args, **kwargs)

  monkeypatch.setattr(hf._Reader, "get", spy_get)  # pylint: disable=protected-access
  monkeypatch.setattr(hf.jax, "device_put", spy_put)
  model, config = hf.load_pretrained(FIXTURES / "llama2")
  monkeypatch.undo()
  params = _params(model)
  puts = [i for i, e in enumerate(events) if e[0] == "put"]
  assert len(puts) == len(params)
  start = 0
  for stop in puts:
    reads = [name for kind, name in events[start:stop]]
    # Only one leaf's tensors between two placements: one global tensor, or
    # the same tensor of each of the L layers.
    kinds = {name.split(".", 3)[-1] if name.startswith("model.layers.")
             else name for name in reads}
    assert len(kinds) == 1, reads
    assert len(reads) in (1, config.num_layers), reads
    start = stop + 1


# The published config.json files (fields config_from_hf reads; values as on
# huggingface.co/<id>/blob/main/config.json).
_QWEN3 = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3",
    attention_bias=False, head_dim=128, hidden_act="silu",
    initializer_range=0.02, max_position_embeddings=40960,
    num_key_value_heads=8, rms_norm_eps=1e-06, rope_scaling=None,
    rope_theta=1000000, sliding_window=None, use_sliding_window=False,
    vocab_size=151936)
_HUB_CONFIGS = {
    "qwen3-0.6b": dict(  # Qwen/Qwen3-0.6B
        _QWEN3, hidden_size=1024, intermediate_size=3072,
        num_attention_heads=16, num_hidden_layers=28, max_window_layers=28,
        tie_word_embeddings=True),
    "qwen3-8b": dict(  # Qwen/Qwen3-8B
        _QWEN3, hidden_size=4096, intermediate_size=12288,
        num_attention_heads=32, num_hidden_layers=36, max_window_layers=36,
        tie_word_embeddings=False),
    "gemma-3-1b": dict(  # google/gemma-3-1b-it
        architectures=["Gemma3ForCausalLM"], model_type="gemma3_text",
        attention_bias=False, attn_logit_softcapping=None,
        final_logit_softcapping=None, head_dim=256,
        hidden_activation="gelu_pytorch_tanh", hidden_size=1152,
        initializer_range=0.02, intermediate_size=6912,
        max_position_embeddings=32768, num_attention_heads=4,
        num_hidden_layers=26, num_key_value_heads=1,
        query_pre_attn_scalar=256, rms_norm_eps=1e-06,
        rope_local_base_freq=10000, rope_scaling=None, rope_theta=1000000,
        sliding_window=512, sliding_window_pattern=6, vocab_size=262144),
}


@pytest.mark.parametrize("name", sorted(_HUB_CONFIGS))
def test_published_configs_are_their_config_json(name):
  """apollo_lm.configs' published shapes = config_from_hf of the Hub files."""
  ours = configs.get_config(name)
  loaded = hf.config_from_hf(_HUB_CONFIGS[name], dtype=ours.dtype)
  assert dataclasses.replace(loaded, name=name) == ours
  assert hf.config_from_hf(hf.config_to_hf(loaded), dtype=ours.dtype) == loaded
