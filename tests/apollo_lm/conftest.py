"""Fixtures of the ``apollo_lm`` tests: a small model, a small corpus, runs.

The model is :func:`small_config` (two layers of width 32, compiled in about
a second), its parameters come from :func:`init_params` (one jitted init).
The corpus is the standard library's ``email`` package copied into a
temporary directory (about 240k tokens at a 320-token vocabulary, built in
about a second); runs use the ``tiny`` config shrunk to the same width.
Test modules import the helpers: ``from tests.apollo_lm.conftest import
small_config, init_params``.
"""

import functools
import json
import pathlib
import shutil
import sysconfig
from collections.abc import Callable
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from apollo_lm import configs
from apollo_lm import data as data_lib
from apollo_lm import model as model_lib

_SMALL = dict(name="test", hidden_size=32, intermediate_size=64, num_heads=4,
              num_layers=2, vocab_size=64, max_seq_len=32, dtype=jnp.float32)


def small_config(**changes: Any) -> configs.LlamaConfig:
  """The small test model with ``changes`` (LlamaConfig fields).

  Built anew (not ``dataclasses.replace``), so derived fields such as
  ``num_kv_heads`` and ``head_dim`` follow a changed ``num_heads``.
  """
  return configs.LlamaConfig(**{**_SMALL, **changes})


SMALL_CONFIG = small_config()
"""The small test model; every dimension divides the fsdp=4 / tensor=2 mesh."""


def init_params(config: configs.LlamaConfig, seed: int = 0
                ) -> tuple[nnx.GraphDef, Any]:
  """(graphdef, plain-dict params) of a Llama, initialised in one jit."""
  abstract = nnx.eval_shape(lambda: model_lib.Llama(config, rngs=nnx.Rngs(0)))

  @jax.jit
  def init():
    model = model_lib.Llama(config, rngs=nnx.Rngs(seed))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))

  return nnx.graphdef(abstract), init()


SMALL_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
               "num_layers": 2}
VOCAB_SIZE = 320

HF_FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"
"""The tiny Hugging Face checkpoints made by transformers (make hf-fixtures)."""

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 +=?:.,#\n"


def char_tokenizer() -> tokenizers.Tokenizer:
  """One token per character of :data:`CHARS` (ids 4...), fitting the
  64-token vocabulary of the fixtures; ``<s>`` 1, ``</s>`` 2, ``<|eot|>`` 3."""
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|eot|>": 3}
  vocab.update({c: i + 4 for i, c in enumerate(CHARS)})
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"),
                                           "isolated")
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens(["<s>", "</s>", "<|eot|>"])
  return tok


def write_hf_checkpoint(folder: pathlib.Path, fixture: str = "llama3",
                        **tokenizer_config: Any) -> pathlib.Path:
  """``folder``: the fixture's weights and config plus :func:`char_tokenizer`
  (``tokenizer.json``, ``tokenizer_config.json`` with ``tokenizer_config``)."""
  shutil.copytree(HF_FIXTURES / fixture, folder)
  char_tokenizer().save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", **tokenizer_config}))
  return folder


def _small_run(corpus_dir: pathlib.Path, **flags: Any) -> dict[str, Any]:
  """``train()`` options for a 3-step run of the small model on one device.

  Runs share a persistent compilation cache next to the corpus, so runs that
  differ only in checkpointing or data position compile once.
  """
  options = dict(
      compilation_cache=str(corpus_dir.parent / "jax_cache"),
      config="tiny", config_overrides=dict(SMALL_MODEL),
      data=[str(corpus_dir)], vocab_size=VOCAB_SIZE, steps=3, batch_size=8,
      seq_len=32, eval_every=0, eval_batches=0, no_progress=True,
      num_devices=1)
  options.update(flags)
  return options


def _small_cli(corpus_dir: pathlib.Path) -> list[str]:
  """The flags of :func:`_small_run` for ``python -m apollo_lm.train``."""
  overrides = [f"--model-override={k}={v}" for k, v in SMALL_MODEL.items()]
  return ["--config", "tiny", *overrides, "--data", str(corpus_dir),
          "--vocab-size", str(VOCAB_SIZE), "--batch-size", "8", "--seq-len",
          "32", "--eval-batches", "0", "--no-progress", "--num-devices", "1",
          "--compilation-cache", str(corpus_dir.parent / "jax_cache")]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> pathlib.Path:
  """A directory of stdlib sources whose corpus is already cached."""
  root = tmp_path_factory.mktemp("corpus")
  source = pathlib.Path(sysconfig.get_paths()["stdlib"]) / "email"
  shutil.copytree(source, root / "email",
                  ignore=shutil.ignore_patterns("__pycache__"))
  data_lib.load_corpus([root / "email"], vocab_size=VOCAB_SIZE,
                       cache_dir=root / "cache")
  return root / "email"


@pytest.fixture
def cache_env(corpus_dir, monkeypatch) -> pathlib.Path:
  """Points ``APOLLO_LM_CACHE`` at the session corpus cache."""
  cache = corpus_dir.parent / "cache"
  monkeypatch.setenv("APOLLO_LM_CACHE", str(cache))
  return cache


@pytest.fixture
def small_run(corpus_dir) -> Callable[..., dict[str, Any]]:
  """``small_run(**flags)``: options of a 3-step run on the session corpus."""
  return functools.partial(_small_run, corpus_dir)


@pytest.fixture
def small_cli(corpus_dir) -> list[str]:
  """The command-line flags of ``small_run()``."""
  return _small_cli(corpus_dir)
