"""Tests for the data pipeline (apollo_lm.data, apollo_lm.tokenizer)."""

import argparse
import collections
import functools
import gzip
import hashlib
import json
import pathlib
import shlex
import shutil
import sysconfig
import textwrap
import time

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import tokenizers

from apollo_lm import data
from apollo_lm import tokenizer as tokenizer_lib

# Tests sharing the module-scoped corpus run on one xdist worker, so it is
# built once.
pytestmark = pytest.mark.xdist_group("apollo_lm_data")

SMALL_VOCAB = 512
STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])
# Real, UTF-8 stdlib modules of a few kB to a few tens of kB.
STDLIB_SAMPLE = (
    "abc.py", "bisect.py", "calendar.py", "cmd.py", "colorsys.py",
    "contextvars.py", "copy.py", "csv.py", "dataclasses.py", "fnmatch.py",
    "fractions.py", "functools.py", "getopt.py", "glob.py", "graphlib.py",
    "heapq.py", "keyword.py", "linecache.py", "numbers.py", "operator.py",
    "queue.py", "random.py", "sched.py", "secrets.py", "shlex.py",
    "statistics.py", "string.py", "textwrap.py", "json/decoder.py",
    "json/encoder.py", "json/__init__.py", "collections/abc.py",
)


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> pathlib.Path:
  """A directory with ~30 real stdlib files, in a nested layout."""
  root = tmp_path_factory.mktemp("stdlib_sample") / "lib"
  for name in STDLIB_SAMPLE:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(STDLIB / name, root / name)
  return root


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def corpus(sample_dir, cache_root) -> data.Corpus:
  return data.load_corpus([sample_dir], vocab_size=SMALL_VOCAB, cache_dir=cache_root)


# --- Files and split ---------------------------------------------------------


def test_held_out_rule_is_pinned():
  # The rule is part of the data's definition: these must never change.
  keys = [f"f{i}.py" for i in range(120)]
  assert [k for k in keys if data.is_held_out(k)] == [
      "f18.py", "f20.py", "f65.py", "f79.py", "f112.py", "f118.py"]
  digest = hashlib.sha256(b"f18.py").digest()
  assert int.from_bytes(digest[:8], "big") < 0.025 * 2**64


def test_stdlib_split_is_deterministic_and_disjoint():
  files = data.stdlib_files()
  assert files == data.stdlib_files()
  assert files == sorted(files) and len(files) > 500
  keys = [f.key for f in files]
  assert len(set(keys)) == len(keys)
  assert not any(
      {"site-packages", "dist-packages", "__pycache__"} & set(k.split("/")) for k in keys)
  assert all(k.endswith(".py") for k in keys)
  train, held_out = data.split_files(files)
  assert (train, held_out) == data.split_files(list(files))
  assert {f.key for f in train}.isdisjoint(f.key for f in held_out)
  assert sorted(train + held_out) == files
  assert 0.01 < len(held_out) / len(files) < 0.05
  assert all(data.is_held_out(f.key) for f in held_out)


@pytest.mark.parametrize("count", [2, 3, 10])
def test_split_always_holds_out_something(count):
  # f0..f9 are all train by the hash rule; the fallback must still hold one out.
  files = [data.SourceFile(f"f{i}.py", pathlib.Path(f"f{i}.py")) for i in range(count)]
  assert not any(data.is_held_out(f.key) for f in files)
  train, held_out = data.split_files(files)
  assert len(held_out) == 1 and len(train) == count - 1
  assert data.split_files(files[::-1])[1] == held_out


def test_split_needs_two_files():
  with pytest.raises(ValueError, match=r"expected at least 2 non-empty files.*eval_paths"):
    data.split_files([data.SourceFile("a.py", pathlib.Path("a.py"))])


def test_collect_files_walks_sorted_and_skips_hidden(tmp_path):
  for name in ["b/z.txt", "b/a.txt", "a.txt", ".hidden.txt", ".git/config", "b/.x/y.txt"]:
    (tmp_path / "d" / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "d" / name).write_text(name)
  (tmp_path / "d" / "empty.txt").touch()
  (tmp_path / "single.txt").write_text("single")
  files = data.collect_files([tmp_path / "single.txt", tmp_path / "d", tmp_path / "d" / "a.txt"])
  assert [f.key for f in files] == ["single.txt", "d/a.txt", "d/b/a.txt", "d/b/z.txt"]
  assert files[1].path == tmp_path / "d" / "a.txt"


def test_missing_path_raises(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError, match=r"nope: no such file or directory"):
    data.load_corpus([tmp_path, missing], cache_dir=tmp_path / "cache")


def test_no_files_raises(tmp_path):
  (tmp_path / "empty_dir" / ".hidden").mkdir(parents=True)
  (tmp_path / "empty_dir" / ".hidden" / "x.txt").write_text("x")
  with pytest.raises(ValueError, match=r"no files found in .*empty_dir"):
    data.load_corpus([tmp_path / "empty_dir"], cache_dir=tmp_path / "cache")


def test_all_empty_files_raise(tmp_path):
  for name in "abc":
    (tmp_path / name).touch()
  with pytest.raises(ValueError, match=r"all 3 files in .* are empty"):
    data.load_corpus([tmp_path], cache_dir=tmp_path / "cache")


def test_non_utf8_file_raises(tmp_path, sample_dir):
  shutil.copytree(sample_dir, tmp_path / "lib")
  (tmp_path / "lib" / "latin1.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
  with pytest.raises(ValueError, match=r"latin1\.txt: not valid UTF-8 .*0xe9 at offset 3"):
    data.load_corpus([tmp_path / "lib"], eval_paths=[tmp_path / "lib" / "latin1.txt"],
                     vocab_size=300, cache_dir=tmp_path / "cache")


def test_eval_paths_covering_everything_raise(tmp_path):
  (tmp_path / "a.txt").write_text("a")
  with pytest.raises(ValueError, match=r"no train files left"):
    data.load_corpus([tmp_path], eval_paths=[tmp_path / "a.txt"], cache_dir=tmp_path / "c")


# --- Tokenizer ---------------------------------------------------------------


TRICKY_TEXTS = [
    "",
    "def f(x):\n\treturn x  # tab, then spaces\r\n",
    "    \n\n        \t \u00a0\u2003",
    "emoji \U0001F600, CJK \u6f22\u5b57, combining e\u0301, RTL \u05e9\u05dc\u05d5\u05dd",
    f"literal {tokenizer_lib.EOS_TOKEN} stays text",
    "\x00\x01\x7f control bytes",
]


@pytest.mark.parametrize("vocab_size, bytes_per_token", [(300, 1.3), (SMALL_VOCAB, 2.0),
                                                        (4096, 3.0)])
def test_tokenizer_round_trips(vocab_size, bytes_per_token, sample_dir):
  paths = sorted(sample_dir.rglob("*.py"))
  texts = [p.read_text(encoding="utf-8") for p in paths]
  tok = tokenizer_lib.train_bpe_tokenizer(texts, vocab_size)
  assert tok.token_to_id(tokenizer_lib.EOS_TOKEN) == 0
  assert 257 < tok.get_vocab_size() <= vocab_size
  for text in texts + TRICKY_TEXTS:
    ids = tok.encode(text).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert 0 not in ids  # The EOS id never comes from text.
  # BPE compresses code well beyond one token per byte.
  total_ids = sum(len(e.ids) for e in tok.encode_batch(texts))
  assert sum(map(len, texts)) / total_ids > bytes_per_token


def test_tokenizer_rejects_tiny_vocab():
  with pytest.raises(ValueError, match=r"vocab_size=100 is too small"):
    tokenizer_lib.train_bpe_tokenizer(["abc"], 100)


@pytest.mark.parametrize("vocab_size, dtype", [(4096, np.uint16), (2**16, np.uint16),
                                               (2**16 + 1, np.uint32)])
def test_token_dtype(vocab_size, dtype):
  assert tokenizer_lib.token_dtype(vocab_size) == dtype


# --- Corpus and cache --------------------------------------------------------


def test_corpus_streams_match_files(corpus, sample_dir):
  assert corpus.train_tokens.dtype == np.uint16
  assert isinstance(corpus.train_tokens, np.memmap)
  train, held_out = data.split_files(data.collect_files([sample_dir]))
  assert corpus.files == data.CorpusFiles(tuple(f.path for f in train),
                                          tuple(f.path for f in held_out))
  assert set(corpus.files.train).isdisjoint(corpus.files.eval)
  assert len(corpus.files.train) + len(corpus.files.eval) == len(STDLIB_SAMPLE)
  for tokens, paths in [(corpus.train_tokens, corpus.files.train),
                        (corpus.eval_tokens, corpus.files.eval)]:
    expected = []
    for path in paths:
      expected += corpus.tokenizer.encode(path.read_text()).ids + [corpus.eos_id]
    np.testing.assert_array_equal(tokens, expected)
  assert corpus.vocab_size == corpus.tokenizer.get_vocab_size() <= SMALL_VOCAB
  assert int(np.max(corpus.train_tokens)) < corpus.vocab_size
  assert "lib" in corpus.description and f"{corpus.train_tokens.size:,}" in corpus.description


def test_second_load_hits_cache(sample_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("APOLLO_LM_CACHE", str(tmp_path / "env_cache"))
  start = time.perf_counter()
  first = data.load_corpus([sample_dir], vocab_size=SMALL_VOCAB)
  first_time = time.perf_counter() - start
  assert not first.cache_hit
  assert first.cache_dir.parent == tmp_path / "env_cache"
  assert sorted(p.name for p in first.cache_dir.iterdir()) == [
      "eval.npy", "meta.json", "tokenizer.json", "train.npy"]
  stamps = {p.name: p.stat().st_mtime_ns for p in first.cache_dir.iterdir()}

  start = time.perf_counter()
  second = data.load_corpus([sample_dir], vocab_size=SMALL_VOCAB)
  second_time = time.perf_counter() - start
  assert second.cache_hit and second.cache_dir == first.cache_dir
  assert {p.name: p.stat().st_mtime_ns for p in second.cache_dir.iterdir()} == stamps
  np.testing.assert_array_equal(second.train_tokens, first.train_tokens)
  np.testing.assert_array_equal(second.eval_tokens, first.eval_tokens)
  assert second.tokenizer.to_str() == first.tokenizer.to_str()
  assert (second.files, second.eos_id, second.description) == (
      first.files, first.eos_id, first.description)
  assert second_time < first_time
  print(f"first load {first_time:.2f}s, cached load {second_time:.3f}s")


def test_cache_key_follows_files_and_vocab(sample_dir, tmp_path):
  lib = tmp_path / "lib"
  shutil.copytree(sample_dir, lib)
  base = data.load_corpus([lib], vocab_size=300, cache_dir=tmp_path / "c")
  assert data.load_corpus([lib], vocab_size=300, cache_dir=tmp_path / "c").cache_hit
  other_vocab = data.load_corpus([lib], vocab_size=320, cache_dir=tmp_path / "c")
  assert not other_vocab.cache_hit and other_vocab.cache_dir != base.cache_dir
  with open(lib / "copy.py", "a") as f:
    f.write("\n# edited\n")
  edited = data.load_corpus([lib], vocab_size=300, cache_dir=tmp_path / "c")
  assert not edited.cache_hit and edited.cache_dir != base.cache_dir


def test_explicit_eval_paths_and_train_only_vocab(sample_dir, tmp_path):
  marker = "zqxjkvwp"
  (tmp_path / "held").mkdir()
  (tmp_path / "held" / "secret.txt").write_text(f"{marker} = 1\n" * 200)
  corpus = data.load_corpus([sample_dir, tmp_path / "held"],
                            eval_paths=[tmp_path / "held"], vocab_size=SMALL_VOCAB,
                            cache_dir=tmp_path / "c")
  assert corpus.files.eval == (tmp_path / "held" / "secret.txt",)
  assert len(corpus.files.train) == len(STDLIB_SAMPLE)
  # Trained on the train split only: the held-out word was never merged.
  assert not any("zqx" in token for token in corpus.tokenizer.get_vocab())
  assert corpus.eval_tokens[-1] == corpus.eos_id


def test_default_corpus_skips_non_utf8_stdlib_files(sample_dir, tmp_path, monkeypatch):
  # The stdlib itself is too big to train on here: stand in a sample of it,
  # plus a Latin-1 file like the stdlib's source-encoding test fixtures.
  latin1 = tmp_path / "encoded_modules" / "module_iso_8859_1.py"
  latin1.parent.mkdir()
  latin1.write_bytes("# -*- coding: iso-8859-1 -*-\nx = 'caf\u00e9'\n".encode("latin-1"))
  files = sorted(data.collect_files([sample_dir]) + [
      data.SourceFile("encoded_modules/module_iso_8859_1.py", latin1)])
  monkeypatch.setattr(data, "stdlib_files", lambda: files)
  corpus = data.load_corpus(vocab_size=300, cache_dir=tmp_path / "c")
  assert latin1 not in corpus.files.train + corpus.files.eval
  assert len(corpus.files.train) + len(corpus.files.eval) == len(STDLIB_SAMPLE)
  assert corpus.description.startswith("Python ")
  assert "standard library" in corpus.description


def test_stdlib_with_eval_paths_raises(tmp_path):
  with pytest.raises(ValueError, match=r"eval_paths needs paths"):
    data.load_corpus(eval_paths=[tmp_path])


# --- Training batches --------------------------------------------------------


def arange_tokens(num_windows: int, seq_len: int) -> np.ndarray:
  # Window i holds i * (seq_len + 1) ... : the first token identifies it.
  return np.arange(num_windows * (seq_len + 1) + seq_len, dtype=np.uint32)


@pytest.mark.parametrize("batch_size, seq_len", [(4, 8), (6, 1), (16, 33)])
def test_batches_shapes_and_shift(batch_size, seq_len):
  batches = data.TokenBatches(arange_tokens(50, seq_len), batch_size, seq_len, seed=3)
  assert batches.num_windows == 50 and batches.steps_per_epoch == 50 // batch_size
  for step in range(3):
    inputs, targets, *unset = batches.batch(step)
    assert unset == [None, None, None]  # no mask, segments or positions
    assert inputs.shape == targets.shape == (batch_size, seq_len)
    assert inputs.dtype == targets.dtype == np.int32
    np.testing.assert_array_equal(targets, inputs + 1)  # arange stream: shift by one
    assert np.all(inputs[:, 0] % (seq_len + 1) == 0)  # whole, aligned windows


def test_batches_cover_each_epoch_without_repeats():
  batches = data.TokenBatches(arange_tokens(40, 4), 8, 4, seed=0)
  for epoch in range(3):
    firsts = np.concatenate([
        batches.batch(epoch * 5 + i)[0][:, 0] for i in range(5)])
    assert sorted(firsts // 5) == list(range(40))
  assert not np.array_equal(batches.batch(0)[0], batches.batch(5)[0])


def test_batches_drop_epoch_remainder_and_differ_by_seed():
  tokens = arange_tokens(43, 4)
  a = data.TokenBatches(tokens, 8, 4, seed=0)
  assert a.steps_per_epoch == 5
  epoch0 = np.concatenate([a.batch(i)[0][:, 0] // 5 for i in range(5)])
  np.testing.assert_array_equal(epoch0, a.permutation(0)[:40])
  assert len(set(epoch0)) == 40
  b = data.TokenBatches(tokens, 8, 4, seed=1)
  assert not np.array_equal(a.batch(0)[0], b.batch(0)[0])


@pytest.mark.parametrize("step", [0, 1, 7, 123, 10_000])
def test_resume_gives_identical_batches(corpus, step):
  uninterrupted = corpus.batches(4, 16, seed=7)
  stream = uninterrupted.batches_from()
  for _ in range(min(step, 10)):
    next(stream)
  resumed = data.TokenBatches(corpus.train_tokens, 4, 16, seed=7).batches_from(step)
  for offset in range(3):
    expected = uninterrupted.batch(step + offset)
    got = next(resumed)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    if step < 10:
      np.testing.assert_array_equal(next(stream)[0], expected[0])
  inputs, targets = expected.inputs, expected.targets
  np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])


@pytest.mark.parametrize("process_count", [1, 2, 4, 8])
def test_process_slices_concatenate_to_global_batch(corpus, process_count):
  whole = corpus.batches(8, 16, seed=1)
  parts = [corpus.batches(8, 16, seed=1, process_index=i, process_count=process_count)
           for i in range(process_count)]
  for step in (0, 3, whole.steps_per_epoch + 1):
    slices = [p.batch(step) for p in parts]
    assert all(s[0].shape == (8 // process_count, 16) for s in slices)
    for k in range(2):
      np.testing.assert_array_equal(np.concatenate([s[k] for s in slices]),
                                    whole.batch(step)[k])


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=6, process_count=4), r"batch_size=6 must be divisible by process_count=4"),
    (dict(process_index=2, process_count=2), r"process_index=2 must be in \[0, process_count=2\)"),
    (dict(batch_size=11), r"make 10 windows .* fewer than batch_size=11"),
    (dict(seq_len=0), r"seq_len=0 must be >= 1"),
])
def test_batches_reject_bad_arguments(kwargs, match):
  args = dict(batch_size=4, seq_len=4, process_index=0, process_count=1) | kwargs
  with pytest.raises(ValueError, match=match):
    data.TokenBatches(arange_tokens(10, 4), **args)


def test_negative_step_raises():
  with pytest.raises(ValueError, match=r"step=-1 must be >= 0"):
    data.TokenBatches(arange_tokens(10, 4), 2, 4).batch(-1)


# --- Evaluation batches and baseline -----------------------------------------


def test_eval_batches_fixed_and_spread(corpus):
  batches = corpus.eval_batches(2, 4, 16)
  again = data.eval_batches(np.array(corpus.eval_tokens), 2, 4, 16)
  assert len(batches) == 2
  for (x, y, *_), (x2, y2, *_) in zip(batches, again):
    assert x.shape == y.shape == (4, 16) and x.dtype == np.int32
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
  firsts = data.eval_batches(arange_tokens(100, 4), 2, 4, 4)
  starts = np.concatenate([b.inputs[:, 0] // 5 for b in firsts])
  np.testing.assert_array_equal(starts, [0, 12, 25, 37, 50, 62, 75, 87])
  halves = [data.eval_batches(arange_tokens(100, 4), 2, 4, 4, process_index=i,
                              process_count=2) for i in range(2)]
  for b in range(2):
    np.testing.assert_array_equal(
        np.concatenate([halves[0][b][0], halves[1][b][0]]), firsts[b][0])


def test_eval_batches_too_many_raise():
  with pytest.raises(ValueError, match=r"asked for 3 batches of 4 windows of 5 tokens, but the held-out stream of 54 tokens has 10 windows"):
    data.eval_batches(arange_tokens(10, 4), 3, 4, 4)


def test_unigram_entropy():
  # Add-one smoothing: counts (3, 1, 1) -> probabilities (4, 2, 2) / 8.
  train = np.array([0, 0, 0, 1, 2])
  assert data.unigram_entropy(train, np.array([0, 1]), 3) == pytest.approx(
      -(np.log(0.5) + np.log(0.25)) / 2)
  uniform = np.arange(1000) % 10
  assert data.unigram_entropy(uniform, uniform, 10) == pytest.approx(np.log(10))


def test_unigram_entropy_on_corpus(corpus):
  entropy = data.unigram_entropy(corpus.train_tokens, corpus.eval_tokens, corpus.vocab_size)
  assert 3.0 < entropy < np.log(corpus.vocab_size)


# --- C4 ----------------------------------------------------------------------


@functools.cache
def docstring_paragraphs() -> tuple[str, ...]:
  """Real English text for fake C4 documents: stdlib docstring paragraphs."""
  paragraphs = []
  for module in (argparse, collections, functools, json, shlex, textwrap):
    for obj in [module, *vars(module).values()]:
      doc = getattr(obj, "__doc__", None)
      for p in doc.split("\n\n") if isinstance(doc, str) else ():
        if len(p.strip()) > 80 and p.strip() not in paragraphs:
          paragraphs.append(p.strip())
  return tuple(paragraphs[:40])


@pytest.fixture(scope="module")
def c4_file(tmp_path_factory) -> pathlib.Path:
  path = tmp_path_factory.mktemp("c4") / "c4-validation.00000-of-00008.json.gz"
  with gzip.open(path, "wt", encoding="utf-8") as f:
    for i, text in enumerate(docstring_paragraphs()):
      record = {"text": text, "timestamp": f"2019-04-{i % 28 + 1:02d}T12:00:00Z",
                "url": f"https://example.com/doc/{i}"}
      f.write(json.dumps(record) + "\n")
  return path


@pytest.fixture(scope="module")
def c4_tokenizer(corpus, tmp_path_factory) -> tokenizers.Tokenizer:
  # A local tokenizer.json, as one would pass instead of t5-base offline.
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  corpus.tokenizer.save(str(path))
  return tokenizer_lib.load_tokenizer(path)


def import_datasets():
  return pytest.importorskip(
      "datasets", reason="Hugging Face `datasets` is not installed: C4 loader untested")


def test_c4_token_stream_reads_local_files(c4_file, c4_tokenizer):
  import_datasets()
  texts = docstring_paragraphs()
  assert len(texts) == 40
  docs = list(data.c4_token_stream(c4_tokenizer, split="validation", data_files=str(c4_file)))
  assert len(docs) == len(texts)
  eos = c4_tokenizer.token_to_id(tokenizer_lib.EOS_TOKEN)
  for ids, text in zip(docs, texts):
    assert ids.dtype == np.int32 and ids[-1] == eos
    np.testing.assert_array_equal(ids[:-1], c4_tokenizer.encode(text).ids)


def packed_reference(tokenizer, seq_len) -> np.ndarray:
  eos = tokenizer.token_to_id(tokenizer_lib.EOS_TOKEN)
  stream = np.concatenate(
      [tokenizer.encode(t).ids + [eos] for t in docstring_paragraphs()])
  count = stream.size // (seq_len + 1)
  return stream[: count * (seq_len + 1)].reshape(count, seq_len + 1)


@pytest.mark.parametrize("start_step", [0, 1, 3])
@pytest.mark.parametrize("process_count", [1, 2])
def test_c4_batches_pack_resume_and_slice(c4_file, c4_tokenizer, start_step, process_count):
  import_datasets()
  windows = packed_reference(c4_tokenizer, 32)
  assert windows.shape[0] >= 40
  expected = windows[: windows.shape[0] // 8 * 8].reshape(-1, 8, 33)[start_step:]
  per_process = [
      list(data.c4_batches(c4_tokenizer, 8, 32, split="validation", data_files=[str(c4_file)],
                           start_step=start_step, process_index=i,
                           process_count=process_count))
      for i in range(process_count)]
  assert all(len(batches) == len(expected) for batches in per_process)
  for step, window in enumerate(expected):
    inputs = np.concatenate([batches[step][0] for batches in per_process])
    targets = np.concatenate([batches[step][1] for batches in per_process])
    assert inputs.dtype == np.int32
    np.testing.assert_array_equal(inputs, window[:, :-1])
    np.testing.assert_array_equal(targets, window[:, 1:])


class T5LikeEncoder:
  """An `encode(text) -> ids` tokenizer that ends every text with its EOS."""

  eos_token_id = 1

  def encode(self, text):
    return [2 + b for b in text.encode("utf-8")] + [self.eos_token_id]


def test_c4_with_plain_encoder_does_not_double_eos(c4_file):
  import_datasets()
  docs = list(data.c4_token_stream(T5LikeEncoder(), split="validation", data_files=str(c4_file)))
  for ids, text in zip(docs, docstring_paragraphs(), strict=True):
    np.testing.assert_array_equal(ids, T5LikeEncoder().encode(text))


def test_pack_windows_spans_documents_and_skips():
  docs = [np.arange(n, dtype=np.int32) + 100 * n for n in (3, 7, 1, 9, 4)]
  stream = np.concatenate(docs)
  windows = list(data.pack_windows(iter(docs), 4))
  np.testing.assert_array_equal(windows, stream[:20].reshape(4, 5))
  np.testing.assert_array_equal(list(data.pack_windows(iter(docs), 4, skip_windows=3)),
                                stream[15:20].reshape(1, 5))


@hypothesis.given(
    lengths=st.lists(st.integers(0, 12), max_size=12),
    seq_len=st.integers(1, 6),
    skip=st.integers(0, 4),
)
def test_pack_windows_matches_reference(lengths, seq_len, skip):
  docs = [np.full(n, i, np.int32) for i, n in enumerate(lengths)]
  stream = np.concatenate(docs) if docs else np.zeros(0, np.int32)
  count = stream.size // (seq_len + 1)
  reference = stream[: count * (seq_len + 1)].reshape(count, seq_len + 1)
  packed = list(data.pack_windows(iter(docs), seq_len, skip_windows=skip))
  assert len(packed) == max(count - skip, 0)
  for got, expected in zip(packed, reference[skip:]):
    np.testing.assert_array_equal(got, expected)


def test_find_eos_id():
  assert tokenizer_lib.find_eos_id(T5LikeEncoder()) == 1
  t5_style = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<pad>": 0, "</s>": 1, "a": 2}))
  assert tokenizer_lib.find_eos_id(t5_style) == 1
  with pytest.raises(ValueError, match=r"Tokenizer has no eos_token_id.*pass eos_id"):
    tokenizer_lib.find_eos_id(tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0})))


# --- A few files: split by documents -----------------------------------------


@pytest.mark.parametrize("max_bytes", [64, 300, 8192])
def test_documents_are_bounded_and_lose_no_text(max_bytes):
  text = (STDLIB / "json" / "decoder.py").read_text()
  docs = data.documents(text, max_bytes)
  assert all(len(d.encode()) <= max_bytes for d in docs)
  assert all(d.strip() for d in docs)
  # Only separators (blank lines, line breaks at cuts) are dropped.
  squash = lambda s: "".join(s.split())
  assert squash("".join(docs)) == squash(text)


def test_single_file_split_is_deterministic_disjoint_and_non_empty():
  text = (STDLIB / "json" / "decoder.py").read_text()
  train, held_out = data.split_documents([("decoder.py", text)],
                                         max_bytes=512)
  assert train and held_out
  assert set(train).isdisjoint(held_out)
  assert len(train) + len(held_out) == len(data.documents(text, 512))
  assert data.split_documents([("decoder.py", text)], max_bytes=512) == (
      train, held_out)
  # The rule: hash of "file#index"; about DOCUMENT_HELD_OUT_FRACTION.
  keys = [f"decoder.py#{i}" for i in range(len(train) + len(held_out))]
  expected = [k for k in keys if data.is_held_out(
      k, data.DOCUMENT_HELD_OUT_FRACTION)]
  assert len(held_out) == max(1, len(expected))


def test_too_little_text_to_split_raises():
  with pytest.raises(ValueError, match=r"too little text .*--eval-data"):
    data.split_documents([("a.txt", "one paragraph only")])


def test_one_big_file_loads_with_a_document_split(tmp_path):
  big = tmp_path / "one_big_file.txt"
  big.write_text("\n\n".join((STDLIB / name).read_text()
                             for name in STDLIB_SAMPLE[:6]))
  corpus = data.load_corpus([big], vocab_size=SMALL_VOCAB,
                            cache_dir=tmp_path / "cache")
  assert corpus.train_tokens.size > 0 and corpus.eval_tokens.size > 0
  assert "1 file(s) cut into documents" in corpus.description
  assert f"{corpus.eval_tokens.size:,} tokens" in corpus.description
  again = data.load_corpus([big], vocab_size=SMALL_VOCAB,
                           cache_dir=tmp_path / "cache")
  assert again.cache_hit
  np.testing.assert_array_equal(again.eval_tokens, corpus.eval_tokens)
