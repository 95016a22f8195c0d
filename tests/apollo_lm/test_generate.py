"""Tests for KV-cache generation (`apollo_lm.generate`)."""

import json
import pathlib
import re
import shutil

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers

from apollo_lm import generate as gen
from apollo_lm import hf

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"

pytestmark = pytest.mark.xdist_group("apollo_lm_generate")


@pytest.fixture(scope="module")
def llama3():
  """Grouped-query, tied, llama3-RoPE fixture written by transformers."""
  return hf.load_pretrained(FIXTURES / "llama3")[0]


def _greedy_without_cache(model, prompt, n):
  """Full forward passes over a fixed-length buffer (one compilation): the
  model is causal, so the zeros after position t do not change its logits."""
  length = prompt.shape[1]
  tokens = np.zeros((prompt.shape[0], length + n), np.int32)
  tokens[:, :length] = prompt
  forward = nnx.jit(lambda m, t: m(t))
  for t in range(length, length + n):
    logits = np.asarray(forward(model, jnp.asarray(tokens)))
    tokens[:, t] = logits[:, t - 1].argmax(-1)
  return tokens[:, length:]


def test_greedy_matches_full_forward(llama3):
  prompt = np.load(FIXTURES / "tokens.npy")[:, :5].astype(np.int32)
  new = gen.generate(llama3, prompt, max_new_tokens=8)
  assert new.shape == (2, 8) and new.dtype == jnp.int32
  np.testing.assert_array_equal(new, _greedy_without_cache(llama3, prompt, 8))
  # A tiny nucleus keeps only the most likely token: greedy again.
  nucleus = gen.generate(llama3, prompt, max_new_tokens=8, temperature=1.0,
                         top_p=1e-6, key=jax.random.key(3))
  np.testing.assert_array_equal(nucleus, new)


@pytest.mark.parametrize("fixture,lengths", [
    ("llama3", (3, 7, 5)), ("llama3", (6, 6)),
    ("gemma3", (2, 7, 4))])  # Gemma 3: sliding window 4, own RoPE bases.
def test_batched_prompts_match_one_by_one(llama3, fixture, lengths):
  """Left-padded prompts of different lengths give every row the tokens it
  gets alone (padding masked, positions from each row's first token)."""
  model = llama3 if fixture == "llama3" else hf.load_pretrained(
      FIXTURES / fixture)[0]
  tokens = np.load(FIXTURES / "tokens.npy").astype(np.int32)
  prompts = [tokens[i % 2, :n].tolist() for i, n in enumerate(lengths)]
  batched = np.asarray(gen.generate(model, prompts, max_new_tokens=6))
  assert batched.shape == (len(lengths), 6)
  for row, prompt in zip(batched, prompts):
    alone = np.asarray(gen.generate(model, jnp.asarray([prompt]),
                                    max_new_tokens=6))[0]
    np.testing.assert_array_equal(row, alone)


def test_padded_prefill_logits_match_unpadded(llama3):
  """The logits of a left-padded row equal those of the row alone."""
  tokens = np.load(FIXTURES / "tokens.npy").astype(np.int32)
  short, long = tokens[0, :4].tolist(), tokens[1, :7].tolist()
  batch, pad = gen.left_pad([short, long])
  np.testing.assert_array_equal(pad, [3, 0])
  decode = nnx.jit(lambda m, t, c: m.decode(t, c)[0])
  padded = decode(llama3, jnp.asarray(batch),
                  llama3.init_cache(2, 8, jnp.float32, pad=pad))
  alone = decode(llama3, jnp.asarray([short]),
                 llama3.init_cache(1, 8, jnp.float32))
  assert np.isfinite(np.asarray(padded)).all()
  np.testing.assert_allclose(padded[0, 3:], alone[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(padded[1], llama3(jnp.asarray([long]))[0],
                             rtol=1e-5, atol=1e-5)


def test_left_pad_errors():
  with pytest.raises(ValueError, match="`prompts`"):
    gen.left_pad([[1, 2], []])
  with pytest.raises(ValueError, match="`prompts`"):
    gen.left_pad([])


def test_eos_stops_a_row(llama3):
  prompt = np.load(FIXTURES / "tokens.npy")[:, :5].astype(np.int32)
  greedy = np.asarray(gen.generate(llama3, prompt, max_new_tokens=8))
  eos = int(greedy[0, 2])
  stopped = np.asarray(gen.generate(llama3, prompt, max_new_tokens=8,
                                    eos_ids=(eos,), pad_id=-7))
  first = list(greedy[0]).index(eos)
  np.testing.assert_array_equal(stopped[0, :first + 1], greedy[0, :first + 1])
  np.testing.assert_array_equal(stopped[0, first + 1:], -7)


def test_sampling_frequencies_follow_the_distribution():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 4000)
  counts = np.bincount(jax.vmap(lambda k: gen.sample_token(
      logits, k, temperature=1.0)[0])(keys), minlength=4) / 4000
  np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)
  # top_p=0.7: the two most likely (0.8 >= 0.7), renormalised.
  counts = np.bincount(jax.vmap(lambda k: gen.sample_token(
      logits, k, temperature=1.0, top_p=0.7)[0])(keys), minlength=4) / 4000
  np.testing.assert_allclose(counts, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.03)
  # Low temperature sharpens towards the argmax.
  counts = np.bincount(jax.vmap(lambda k: gen.sample_token(
      logits, k, temperature=0.1)[0])(keys), minlength=4) / 4000
  assert counts[0] > 0.98


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "`max_new_tokens` must be a positive int"),
    (dict(max_new_tokens=60), "exceeds `max_seq_len`=64"),
    (dict(max_new_tokens=4, temperature=-1.0), "`temperature` must be >= 0"),
    (dict(max_new_tokens=4, temperature=1.0, top_p=0.0,
          key=jax.random.key(0)), "`top_p` must be in (0, 1]"),
    (dict(max_new_tokens=4, temperature=1.0), "needs a `key`"),
])
def test_generate_errors(llama3, kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    gen.generate(llama3, jnp.zeros((1, 5), jnp.int32), **kwargs)


def test_command_line(tmp_path, capsys, llama3):
  ckpt = tmp_path / "ckpt"
  shutil.copytree(FIXTURES / "llama3", ckpt)
  vocab = {f"w{i}": i for i in range(64)}
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, "w0"))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tokenizer.decoder = tokenizers.decoders.WordPiece()
  tokenizer.save(str(ckpt / "tokenizer.json"))
  (ckpt / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "w1", "eos_token": "w2"}))
  gen.main(["--checkpoint", str(ckpt), "--prompt", "w5 w9 w11",
            "--max-new-tokens", "6"])
  out = capsys.readouterr().out
  assert out.startswith("### prompt 1: w5 w9 w11\n")
  expected = np.asarray(gen.generate(
      llama3, jnp.array([[1, 5, 9, 11]]), max_new_tokens=6, eos_ids=(2, 3)))
  words = out.splitlines()[1].split()
  ids = [int(t) for t in expected[0]]
  cut = next((j for j, t in enumerate(ids) if t in (2, 3)), len(ids))
  assert words == [f"w{t}" for t in ids[:cut]]


def test_generate_on_a_mesh_matches_unsharded(llama3):
  from apollo_lm import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(1, 4, 2)
  sharded, _ = hf.load_pretrained(FIXTURES / "llama3", mesh=mesh)
  prompt = np.load(FIXTURES / "tokens.npy")[:, :5].astype(np.int32)
  with jax.set_mesh(mesh):
    new = gen.generate(sharded, prompt, max_new_tokens=6)
  np.testing.assert_array_equal(
      new, gen.generate(llama3, prompt, max_new_tokens=6))
