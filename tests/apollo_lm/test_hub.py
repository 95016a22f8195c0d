"""Tests of apollo_lm.hub: checkpoints by folder or Hub id, offline, from a
cache in the Hugging Face layout built here (nothing is downloaded)."""

import pathlib
import shutil

import jax
import numpy as np
import pytest

from apollo_lm import hf
from apollo_lm import hub
from apollo_lm import tokenizer as tokenizer_lib
from tests.apollo_lm.conftest import HF_FIXTURES
from tests.apollo_lm.conftest import write_hf_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def _cache_model(hf_home: pathlib.Path, repo_id: str, fixture: str,
                 commit: str = COMMIT, ref: str = "main") -> pathlib.Path:
  """A model in ``hf_home``'s hub cache as ``snapshot_download`` leaves it:
  files under ``blobs/``, ``snapshots/<commit>/`` symlinks, ``refs/<ref>``."""
  repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
  source = write_hf_checkpoint(hf_home.parent / f"src-{commit}", fixture)
  snapshot = repo / "snapshots" / commit
  snapshot.mkdir(parents=True)
  (repo / "blobs").mkdir(exist_ok=True)
  for i, file in enumerate(sorted(source.iterdir())):
    if file.suffix == ".npy":  # the fixture's reference logits: not a model file
      continue
    blob = repo / "blobs" / f"{commit[:8]}{i:032d}"
    shutil.copy(file, blob)
    (snapshot / file.name).symlink_to(pathlib.Path("..", "..", "blobs", blob.name))
  (repo / "refs").mkdir(exist_ok=True)
  (repo / "refs" / ref).write_text(commit)
  return snapshot


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
  home = tmp_path / "hf_home"
  monkeypatch.setenv("HF_HOME", str(home))
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.chdir(tmp_path)
  return home


def _params(model):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("name, expected", [
    ("Qwen/Qwen3-0.6B", True), ("org/name.v2_x", True), ("gpt2", False),
    ("./org/name", False), ("../org/name", False), ("/abs/path", False),
    ("org/name/sub", False), ("org/../name", False), ("org--x/name", False),
])
def test_is_repo_id(name, expected):
  assert hub.is_repo_id(name) is expected


@pytest.mark.parametrize("env, expected", [
    ({"HF_HOME": "/h"}, "/h/hub"),
    ({"HF_HOME": "/h", "HF_HUB_CACHE": "/c"}, "/c"),
    ({"XDG_CACHE_HOME": "/x"}, "/x/huggingface/hub"),
])
def test_hub_cache_dir_follows_the_environment(monkeypatch, env, expected):
  for name in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
               "XDG_CACHE_HOME"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert hub.hub_cache_dir() == pathlib.Path(expected)


def test_hub_id_loads_from_the_cache_offline(hf_home):
  """Weights, config, tokenizer and EOS ids of a cached id equal the folder's."""
  snapshot = _cache_model(hf_home, "tiny-org/tiny-qwen3", "qwen3")
  assert hub.resolve_checkpoint("tiny-org/tiny-qwen3") == snapshot
  model, config = hf.load_pretrained("tiny-org/tiny-qwen3")
  reference, ref_config = hf.load_pretrained(HF_FIXTURES / "qwen3")
  assert config == ref_config and config.name == "Qwen3ForCausalLM"
  jax.tree.map(np.testing.assert_array_equal, _params(model),
               _params(reference))
  tok = tokenizer_lib.load_checkpoint_tokenizer("tiny-org/tiny-qwen3")
  assert tok.encode("ab1") == [4, 5, 31] and tok.eos_id == 2
  assert hf.eos_token_ids("tiny-org/tiny-qwen3") == hf.eos_token_ids(
      HF_FIXTURES / "qwen3")


def test_revision_picks_its_snapshot(hf_home):
  main = _cache_model(hf_home, "org/tiny", "llama3")
  tagged = _cache_model(hf_home, "org/tiny", "qwen2", commit=OTHER_COMMIT,
                        ref="v1")
  assert hub.resolve_checkpoint("org/tiny") == main
  assert hub.resolve_checkpoint("org/tiny", revision="v1") == tagged
  assert hub.resolve_checkpoint("org/tiny", revision=OTHER_COMMIT) == tagged
  _, config = hf.load_pretrained("org/tiny", revision="v1")
  assert config.name == "Qwen2ForCausalLM"


def test_a_local_folder_wins_over_a_cached_id(hf_home):
  _cache_model(hf_home, "org/tiny", "llama3")
  write_hf_checkpoint(pathlib.Path("org") / "tiny", "mistral")  # cwd-relative
  assert hub.resolve_checkpoint("org/tiny") == pathlib.Path("org/tiny")
  _, config = hf.load_pretrained("org/tiny")
  assert config.name == "MistralForCausalLM"


@pytest.mark.parametrize("revision", [None, "v9"])
def test_uncached_id_offline_names_the_id_and_the_cache(hf_home, revision):
  _cache_model(hf_home, "org/tiny", "llama3")
  message = (f"org/missing: no such folder, and not in the Hugging Face cache"
             f"{'' if revision is None else ' at revision ' + repr(revision)}"
             f" (HF_HUB_OFFLINE is set); cache {hf_home / 'hub'}")
  with pytest.raises(FileNotFoundError) as e:
    hf.load_pretrained("org/missing", revision=revision)
  assert str(e.value) == message
  with pytest.raises(FileNotFoundError, match="org/missing: no such folder"):
    tokenizer_lib.load_checkpoint_tokenizer("org/missing")


@pytest.mark.parametrize("name, message", [
    ("nowhere", "nowhere: no such folder (and not a Hugging Face Hub id"),
    ("model.gguf", "model.gguf: a GGUF file (llama.cpp format)"),
    ("weights.bin", "weights.bin: a file; expected a Hugging Face model folder"),
])
def test_not_a_folder(hf_home, name, message):
  pathlib.Path("model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
  pathlib.Path("weights.bin").write_bytes(b"\x00" * 8)
  with pytest.raises(FileNotFoundError, match=message.replace("(", r"\(")
                     .replace(")", r"\)")):
    hub.resolve_checkpoint(name)


def test_gguf_message_says_how_to_convert():
  message = hub.gguf_message("/m/q4.gguf")
  assert "from_pretrained(folder, gguf_file='q4.gguf')" in message
  assert message.count("\n") == 0


def test_online_resolution_asks_snapshot_download_for_model_files(
    hf_home, monkeypatch):
  """Without HF_HUB_OFFLINE the id goes to snapshot_download (replaced here:
  no network) with the cache, the revision and only the model's files."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv("HF_HUB_OFFLINE")
  calls = []

  def fake(repo_id, **kwargs):
    calls.append((repo_id, kwargs))
    return str(hf_home / "somewhere")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
  assert hub.resolve_checkpoint("org/x", revision="dev") == hf_home / "somewhere"
  (repo_id, kwargs), = calls
  assert repo_id == "org/x" and kwargs["revision"] == "dev"
  assert kwargs["cache_dir"] == hf_home / "hub"
  assert kwargs["local_files_only"] is False
  patterns = kwargs["allow_patterns"]
  assert {"*.safetensors", "config.json", "tokenizer.json",
          "tokenizer_config.json", "generation_config.json",
          "chat_template.jinja"} <= set(patterns)
  assert not any(p.endswith((".bin", ".gguf", ".pt")) for p in patterns)


def test_finetune_checkpoint_is_a_cached_hub_id(hf_home):
  from apollo_lm import finetune  # pylint: disable=g-import-not-at-top
  snapshot = _cache_model(hf_home, "org/tiny", "llama3")
  tagged = _cache_model(hf_home, "org/tiny", "gemma3", commit=OTHER_COMMIT,
                        ref="v1")
  for revision, folder, arch in ((None, snapshot, "LlamaForCausalLM"),
                                 ("v1", tagged, "Gemma3ForCausalLM")):
    config = finetune.FinetuneConfig(checkpoint="org/tiny", revision=revision,
                                     data=("x.jsonl",), num_devices=1)
    assert finetune.checkpoint_dir(config) == folder
    assert finetune.checkpoint_config(config).name == arch
