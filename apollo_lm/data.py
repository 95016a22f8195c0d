"""Data pipeline for the LLaMA pre-training job and the benchmarks.

Two corpora feed the same kind of batches:

* ``load_corpus()``: a small, fully local corpus. By default the Python
  standard library's own source files, which every machine with this Python
  has, so the demo, tests and benchmarks need no download. Any text files or
  directories can be given instead. A byte-level BPE tokenizer
  (``apollo_lm.tokenizer``) is trained on the train split, both splits are
  tokenized once, and everything is cached on disk: later runs memory-map the
  ``.npy`` token arrays and start in seconds.
* ``c4_batches()``: the paper's corpus, C4 (``allenai/c4``, ``en``), streamed
  with Hugging Face ``datasets`` (an optional dependency) or read from local
  ``*.json.gz`` files in the same format, tokenized on the fly.

Batches (:class:`apollo_lm.batch.Batch`) hold ``inputs`` and ``targets``,
int32 arrays of shape ``(batch, seq_len)`` cut from windows of ``seq_len + 1`` consecutive tokens, ``targets`` being
``inputs`` shifted by one. For ``TokenBatches`` the batch at a step is a pure
function of ``(seed, step)``, so a checkpoint needs to store only the step to
resume exactly; with several processes (hosts) each one gets its own rows of
a global batch that does not depend on the number of processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import tokenizers

from apollo_lm import tokenizer as tokenizer_lib
from apollo_lm.batch import Batch

HELD_OUT_FRACTION = 0.025
"""Share of files held out for evaluation by the hash rule (``is_held_out``)."""

MIN_FILES_FOR_FILE_SPLIT = 20
"""Fewer files than this are split by documents (``split_documents``)."""

DOCUMENT_BYTES = 8192
"""Size bound of the documents a few files are cut into."""

DOCUMENT_HELD_OUT_FRACTION = 0.1
"""Share of documents held out when a few files are split by documents."""

_EXCLUDED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
# Bump when the cached files change meaning, to invalidate old caches.
_CACHE_FORMAT = 1

PathLike = str | os.PathLike[str]


class SourceFile(NamedTuple):
  """A corpus file: ``key`` decides its split, ``path`` is where it is read.

  ``key`` is the path relative to the directory it was found in (prefixed by
  that directory's name for user directories), so it is the same on every
  machine and the split does not depend on where the files live.
  """

  key: str
  path: pathlib.Path


class CorpusFiles(NamedTuple):
  """The files of each split, in stream order."""

  train: tuple[pathlib.Path, ...]
  eval: tuple[pathlib.Path, ...]


def is_held_out(key: str, fraction: float = HELD_OUT_FRACTION) -> bool:
  """Whether the file with this key belongs to the held-out split.

  The first 8 bytes of ``sha256(key)`` as an integer, compared with
  ``fraction`` of their range: stable across machines, Python versions and
  processes (unlike ``hash()``), and independent of which other files exist,
  so adding a file never moves another one between splits.
  """
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") < fraction * 2**64


def split_files(
    files: Sequence[SourceFile], fraction: float = HELD_OUT_FRACTION
) -> tuple[list[SourceFile], list[SourceFile]]:
  """Splits files into (train, held-out) by ``is_held_out``, keeping order.

  When the hash rule holds out nothing (likely for a handful of files), the
  file with the smallest hash is held out, so evaluation always has data.

  Raises:
    ValueError: with fewer than two files, which cannot make two splits.
  """
  if len(files) < 2:
    raise ValueError(
        f"cannot split {[str(f.path) for f in files]} into train and held-out"
        " files: expected at least 2 non-empty files, or pass eval_paths."
    )
  held_out = [f for f in files if is_held_out(f.key, fraction)]
  if not held_out:
    held_out = [min(files, key=lambda f: hashlib.sha256(f.key.encode()).digest())]
  if len(held_out) == len(files):
    held_out = held_out[:1]
  held_out_keys = {f.key for f in held_out}
  return [f for f in files if f.key not in held_out_keys], held_out


def documents(text: str, max_bytes: int = DOCUMENT_BYTES) -> list[str]:
  """Cuts ``text`` into documents of at most ``max_bytes`` UTF-8 bytes.

  Paragraphs (separated by blank lines) are packed greedily, in order, into
  documents up to the bound; a paragraph longer than the bound is cut at line
  ends (a single longer line at the bound). Joining the documents with
  ``"\n\n"`` gives back the paragraphs; no text is lost but the separators.
  """
  pieces: list[str] = []
  for paragraph in text.split("\n\n"):
    if len(paragraph.encode()) <= max_bytes:
      pieces.append(paragraph)
      continue
    line_chunk = ""
    for line in paragraph.split("\n"):
      while len(line.encode()) > max_bytes:
        head = line.encode()[:max_bytes].decode("utf-8", "ignore")
        if line_chunk:
          pieces.append(line_chunk)
          line_chunk = ""
        pieces.append(head)
        line = line[len(head):]
      candidate = f"{line_chunk}\n{line}" if line_chunk else line
      if line_chunk and len(candidate.encode()) > max_bytes:
        pieces.append(line_chunk)
        candidate = line
      line_chunk = candidate
    pieces.append(line_chunk)
  docs: list[str] = []
  for piece in pieces:
    if not piece.strip():
      continue
    joined = f"{docs[-1]}\n\n{piece}" if docs else piece
    if docs and len(joined.encode()) <= max_bytes:
      docs[-1] = joined
    else:
      docs.append(piece)
  return docs


def split_documents(
    texts: Sequence[tuple[str, str]],
    fraction: float = DOCUMENT_HELD_OUT_FRACTION,
    max_bytes: int = DOCUMENT_BYTES,
) -> tuple[list[str], list[str]]:
  """Splits a few files' texts into (train, held-out) documents.

  Each ``(key, text)`` is cut by :func:`documents`; document ``i`` of file
  ``key`` is held out when ``is_held_out(f"{key}#{i}", fraction)``, so the
  split is deterministic and the same on every machine. If that holds out
  nothing (or everything), the document with the smallest hash moves.

  Raises:
    ValueError: fewer than two documents in all, which cannot make two
      sides.
  """
  docs = [(f"{key}#{i}", doc) for key, text in texts
          for i, doc in enumerate(documents(text, max_bytes))]
  if len(docs) < 2:
    raise ValueError(
        f"{len(docs)} document(s) of at most {max_bytes} bytes: too little "
        "text to hold any out; add text, or pass separate held-out files "
        "(--eval-data).")
  held = [is_held_out(key, fraction) for key, _ in docs]
  if all(held) or not any(held):
    smallest = min(range(len(docs)),
                   key=lambda i: hashlib.sha256(docs[i][0].encode()).digest())
    held[smallest] = not held[smallest]
  return ([d for (_, d), h in zip(docs, held) if not h],
          [d for (_, d), h in zip(docs, held) if h])


def stdlib_files() -> list[SourceFile]:
  """The ``*.py`` files of this Python's standard library, sorted by key.

  Third-party packages (``site-packages``, ``dist-packages``) and bytecode
  caches are excluded, and so are empty files, which hold no text.
  """
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Pruned rather than filtered: site-packages can be far larger than the
    # standard library itself.
    dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_STDLIB_DIRS]
    for name in filenames:
      path = pathlib.Path(dirpath, name)
      if name.endswith(".py") and path.is_file() and path.stat().st_size:
        files.append(SourceFile(path.relative_to(root).as_posix(), path))
  return sorted(files)


def collect_files(paths: Iterable[PathLike]) -> list[SourceFile]:
  """The non-empty regular files named by ``paths``, in a reproducible order.

  A file is taken as given. A directory is walked recursively, hidden files
  and directories (name starting with ``.``) are skipped, and its files come
  sorted by relative path. Paths keep the order given; a file reached twice is
  taken once.

  Raises:
    FileNotFoundError: a path does not exist.
    ValueError: no files at all, or all of them empty.
  """
  paths = [pathlib.Path(p) for p in paths]
  found: list[SourceFile] = []
  for path in paths:
    if path.is_dir():
      below = []
      for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
          file = pathlib.Path(dirpath, name)
          if not name.startswith(".") and file.is_file():
            key = pathlib.PurePosixPath(
                path.resolve().name, file.relative_to(path).as_posix()
            )
            below.append(SourceFile(str(key), file))
      found.extend(sorted(below))
    elif path.is_file():
      found.append(SourceFile(path.name, path))
    else:
      raise FileNotFoundError(
          f"{path}: no such file or directory (expected a text file or a"
          " directory of text files)"
      )
  if not found:
    raise ValueError(
        f"no files found in {[str(p) for p in paths]}: expected at least one"
        " regular, non-hidden file"
    )
  seen = set()
  unique = []
  for file in found:
    resolved = file.path.resolve()
    if resolved not in seen:
      seen.add(resolved)
      unique.append(file)
  non_empty = [f for f in unique if f.path.stat().st_size]
  if not non_empty:
    raise ValueError(
        f"all {len(unique)} files in {[str(p) for p in paths]} are empty:"
        " expected some text"
    )
  return non_empty


def read_text(path: pathlib.Path) -> str:
  """Reads a file as strict UTF-8.

  Raises:
    ValueError: naming the file and the first invalid byte.
  """
  data = path.read_bytes()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(
        f"{path}: not valid UTF-8 (invalid byte {data[e.start]:#04x} at offset"
        f" {e.start}); expected UTF-8 encoded text"
    ) from None


def default_cache_root() -> pathlib.Path:
  """``$APOLLO_LM_CACHE`` if set, else ``~/.cache/apollo_lm``."""
  root = os.environ.get("APOLLO_LM_CACHE")
  return pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "apollo_lm"


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A tokenized corpus with its train and held-out token streams.

  Attributes:
    tokenizer: the byte-level BPE tokenizer trained on the train split.
    train_tokens: the train stream, read-only memory-mapped, every document
      followed by ``eos_id``.
    eval_tokens: the held-out stream, in the same format.
    vocab_size: the tokenizer's vocabulary size; all ids are below it. At most
      the requested size (smaller if the corpus is too small for more merges).
    eos_id: the end-of-document token id.
    files: the files of each split, in stream order.
    description: one line for logs and reports.
    cache_dir: the directory holding ``tokenizer.json`` and the ``.npy`` files.
    cache_hit: whether this load reused the cache instead of training and
      tokenizing.
  """

  tokenizer: tokenizers.Tokenizer
  train_tokens: np.ndarray
  eval_tokens: np.ndarray
  vocab_size: int
  eos_id: int
  files: CorpusFiles
  description: str
  cache_dir: pathlib.Path
  cache_hit: bool

  def batches(
      self,
      batch_size: int,
      seq_len: int,
      *,
      seed: int = 0,
      process_index: int = 0,
      process_count: int = 1,
  ) -> TokenBatches:
    """Training batches from ``train_tokens`` (see ``TokenBatches``)."""
    return TokenBatches(
        self.train_tokens,
        batch_size,
        seq_len,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )

  def eval_batches(
      self,
      num_batches: int,
      batch_size: int,
      seq_len: int,
      *,
      process_index: int = 0,
      process_count: int = 1,
  ) -> list[Batch]:
    """Fixed evaluation batches from ``eval_tokens`` (see ``eval_batches``)."""
    return eval_batches(
        self.eval_tokens,
        num_batches,
        batch_size,
        seq_len,
        process_index=process_index,
        process_count=process_count,
    )


def load_corpus(
    paths: Sequence[PathLike] | None = None,
    *,
    eval_paths: Sequence[PathLike] | None = None,
    vocab_size: int = 8192,
    cache_dir: PathLike | None = None,
) -> Corpus:
  """Loads a tokenized corpus, building and caching it on first use.

  Args:
    paths: text files and/or directories (see ``collect_files``). ``None``
      means the Python standard library's source (see ``stdlib_files``); its
      few files that are not UTF-8 (test fixtures for other source encodings)
      are left out, while in user files they are an error.
    eval_paths: the held-out files, given explicitly; they are removed from
      the train files if ``paths`` includes them too. ``None`` holds out files
      by the hash rule (``split_files``), or, with fewer than
      :data:`MIN_FILES_FOR_FILE_SPLIT` files, documents of them
      (``split_documents``).
    vocab_size: the tokenizer's largest vocabulary size.
    cache_dir: the cache root; defaults to ``default_cache_root()``. The
      corpus lives in a subdirectory named by a hash of the file list (paths,
      sizes and modification times), the split, ``vocab_size`` and the
      ``tokenizers`` version, so a changed file or setting builds anew.

  Returns:
    The corpus, with memory-mapped token arrays.

  Raises:
    FileNotFoundError: a path does not exist.
    ValueError: no files, only empty files, a file that is not UTF-8, or
      nothing left for one of the splits.
  """
  by_documents = False
  if paths is None:
    if eval_paths is not None:
      raise ValueError("eval_paths needs paths: the stdlib corpus has its own split")
    source = f"Python {sys.version.split()[0]} standard library"
    train, held_out = split_files(stdlib_files())
  else:
    source = f"text files from {[str(p) for p in paths]}"
    files = collect_files(paths)
    if eval_paths is None and len(files) < MIN_FILES_FOR_FILE_SPLIT:
      by_documents = True
      train, held_out = files, []
    elif eval_paths is None:
      train, held_out = split_files(files)
    else:
      held_out = collect_files(eval_paths)
      held_out_paths = {f.path.resolve() for f in held_out}
      train = [f for f in files if f.path.resolve() not in held_out_paths]
      if not train:
        raise ValueError(
            f"no train files left in {[str(p) for p in paths]}: all of them"
            " are in eval_paths"
        )

  root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_root()
  key = _cache_key(train, held_out, vocab_size, by_documents)
  corpus_dir = root / f"corpus-{key}"
  cache_hit = (corpus_dir / "meta.json").exists()
  if not cache_hit:
    _build(corpus_dir, train, held_out, vocab_size, source,
           skip_undecodable=paths is None, by_documents=by_documents)
  meta = json.loads((corpus_dir / "meta.json").read_text())
  tokenizer = tokenizer_lib.load_tokenizer(corpus_dir / "tokenizer.json")
  return Corpus(
      tokenizer=tokenizer,
      train_tokens=np.load(corpus_dir / "train.npy", mmap_mode="r"),
      eval_tokens=np.load(corpus_dir / "eval.npy", mmap_mode="r"),
      vocab_size=tokenizer.get_vocab_size(),
      eos_id=meta["eos_id"],
      files=CorpusFiles(
          tuple(map(pathlib.Path, meta["train_files"])),
          tuple(map(pathlib.Path, meta["eval_files"])),
      ),
      description=meta["description"],
      cache_dir=corpus_dir,
      cache_hit=cache_hit,
  )


def _cache_key(
    train: Sequence[SourceFile], held_out: Sequence[SourceFile], vocab_size: int,
    by_documents: bool = False,
) -> str:
  """A hash of everything the cached files depend on."""

  def fingerprint(files: Sequence[SourceFile]) -> list[Any]:
    stats = ((str(f.path.resolve()), f.path.stat()) for f in files)
    return [(path, st.st_size, st.st_mtime_ns) for path, st in stats]

  state = {
      "format": _CACHE_FORMAT,
      "train": fingerprint(train),
      "eval": fingerprint(held_out),
      "vocab_size": vocab_size,
      "tokenizers": tokenizers.__version__,
  }
  if by_documents:
    state["documents"] = [DOCUMENT_BYTES, DOCUMENT_HELD_OUT_FRACTION]
  return hashlib.sha256(json.dumps(state).encode()).hexdigest()[:20]


def _build(
    corpus_dir: pathlib.Path,
    train: Sequence[SourceFile],
    held_out: Sequence[SourceFile],
    vocab_size: int,
    source: str,
    *,
    skip_undecodable: bool,
    by_documents: bool = False,
) -> None:
  """Trains the tokenizer, tokenizes both splits and writes ``corpus_dir``.

  Everything is written to a temporary sibling directory renamed into place
  at the end, so concurrent builders (test workers, hosts sharing a disk)
  never see a partial cache: the first rename wins, the others are dropped.
  """
  train_paths, train_texts = _read_sources(train, skip_undecodable)
  eval_paths, eval_texts = _read_sources(held_out, skip_undecodable)
  if by_documents:
    train_texts, eval_texts = split_documents(
        [(f.key, t) for f, t in zip(train, train_texts)])
    eval_paths = train_paths
  tokenizer = tokenizer_lib.train_bpe_tokenizer(
      train_texts, vocab_size, length=len(train_texts)
  )
  eos_id = tokenizer.token_to_id(tokenizer_lib.EOS_TOKEN)
  train_tokens = tokenizer_lib.encode_documents(tokenizer, train_texts, eos_id)
  eval_tokens = tokenizer_lib.encode_documents(tokenizer, eval_texts, eos_id)
  if by_documents:
    split = (
        f"{len(train_paths)} file(s) cut into documents of <= {DOCUMENT_BYTES}"
        f" bytes at blank lines, {len(train_texts)} train / {len(eval_texts)}"
        f" held-out documents (hash of file#document,"
        f" {DOCUMENT_HELD_OUT_FRACTION:.0%})"
    )
  else:
    split = f"{len(train_paths)} train / {len(eval_paths)} held-out files"
  description = (
      f"{source}: {split}, {train_tokens.size:,} / {eval_tokens.size:,}"
      f" tokens, byte-level BPE vocab {tokenizer.get_vocab_size()}"
  )
  meta = {
      "eos_id": eos_id,
      "train_files": [str(p) for p in train_paths],
      "eval_files": [str(p) for p in eval_paths],
      "description": description,
  }
  _write_corpus(corpus_dir, tokenizer, train_tokens, eval_tokens, meta)


def _read_sources(files: Sequence[SourceFile], skip_undecodable: bool
                  ) -> tuple[list[pathlib.Path], list[str]]:
  """The paths and texts of ``files`` (undecodable ones skipped if asked)."""
  kept, texts = [], []
  for file in files:
    try:
      texts.append(read_text(file.path))
    except ValueError:
      if not skip_undecodable:
        raise
      continue
    kept.append(file.path)
  return kept, texts


def _write_corpus(corpus_dir: pathlib.Path, tokenizer: tokenizers.Tokenizer,
                  train_tokens: np.ndarray, eval_tokens: np.ndarray,
                  meta: dict[str, Any]) -> None:
  """Writes a temporary sibling of ``corpus_dir`` and renames it into place."""
  corpus_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=corpus_dir.name + ".", dir=corpus_dir.parent))
  try:
    tokenizer.save(str(tmp / "tokenizer.json"))
    np.save(tmp / "train.npy", train_tokens)
    np.save(tmp / "eval.npy", eval_tokens)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
      tmp.rename(corpus_dir)
    except OSError:
      if not (corpus_dir / "meta.json").exists():
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _check_batch_shape(batch_size: int, seq_len: int, process_count: int,
                       process_index: int) -> None:
  if batch_size < 1 or seq_len < 1:
    raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must be >= 1")
  if not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index={process_index} must be in [0, process_count={process_count})"
    )
  if batch_size % process_count:
    raise ValueError(
        f"batch_size={batch_size} must be divisible by process_count={process_count}"
    )


def process_rows(rows: Sequence[Any] | np.ndarray, process_index: int,
                 process_count: int) -> Any:
  """This process's consecutive share of a global batch's ``rows``.

  Process ``i`` of ``n`` gets rows ``i * B/n ... (i + 1) * B/n - 1``;
  concatenating the processes' shares in index order gives ``rows``, so the
  global batch does not depend on the number of processes. Every source
  (local corpus, evaluation batches, C4) slices with this one function.
  """
  local = len(rows) // process_count
  return rows[process_index * local:(process_index + 1) * local]


class TrainBatches(Protocol):
  """A resumable source of training batches (local corpus or C4).

  ``batches_from(step)`` yields this process's ``(inputs, targets)`` of global
  batches ``step, step + 1, ...``: the data position of a run is its step.
  """

  def batches_from(self, start_step: int) -> Iterator[Batch]:
    ...


def _windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
  """Views ``tokens`` as non-overlapping rows of ``seq_len + 1`` tokens."""
  count = tokens.shape[0] // (seq_len + 1)
  return tokens[: count * (seq_len + 1)].reshape(count, seq_len + 1)


def _to_batch(windows: np.ndarray) -> Batch:
  return Batch.from_tokens(np.asarray(windows, np.int32))


class TokenBatches:
  """Deterministic, resumable training batches from a token stream.

  The stream is cut into non-overlapping windows of ``seq_len + 1`` tokens
  (the tail shorter than one window is unused). Each epoch visits the windows
  in the order of a permutation drawn from ``Generator(PCG64([seed, epoch]))``;
  the ``num_windows % batch_size`` windows left over at the end of an epoch's
  permutation are skipped, so a batch never holds the same window twice.
  Global batch ``step`` is rows ``step * batch_size ...`` of that order, so it
  depends only on ``(seed, step)``: resuming from a checkpoint at step ``k``
  with ``batch(k)`` gives exactly what an uninterrupted run would have seen.

  With ``process_count > 1`` each process returns its ``batch_size //
  process_count`` consecutive rows of the same global batch; concatenating the
  processes' rows in ``process_index`` order gives the single-process batch.
  """

  def __init__(
      self,
      tokens: np.ndarray,
      batch_size: int,
      seq_len: int,
      *,
      seed: int = 0,
      process_index: int = 0,
      process_count: int = 1,
  ):
    """Initialises the batches.

    Args:
      tokens: a 1-D token stream, typically memory-mapped; read lazily.
      batch_size: the global batch size, over all processes.
      seq_len: the length of each input row.
      seed: selects the permutations of windows.
      process_index: this process's index, in ``[0, process_count)``.
      process_count: the number of processes sharing each global batch.

    Raises:
      ValueError: bad sizes, or fewer windows than one global batch.
    """
    _check_batch_shape(batch_size, seq_len, process_count, process_index)
    self._windows = _windows(tokens, seq_len)
    if self.num_windows < batch_size:
      raise ValueError(
          f"{tokens.shape[0]} tokens make {self.num_windows} windows of"
          f" seq_len + 1 = {seq_len + 1}, fewer than batch_size={batch_size}"
      )
    self.batch_size = batch_size
    self.seq_len = seq_len
    self.seed = seed
    self.local_batch_size = batch_size // process_count
    self._process = (process_index, process_count)

  @property
  def num_windows(self) -> int:
    """The number of windows of ``seq_len + 1`` tokens in the stream."""
    return self._windows.shape[0]

  @property
  def steps_per_epoch(self) -> int:
    """Global batches per pass over the windows."""
    return self.num_windows // self.batch_size

  def permutation(self, epoch: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the windows."""
    rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
    return rng.permutation(self.num_windows)

  def batch(self, step: int) -> Batch:
    """This process's ``(inputs, targets)`` of global batch ``step``.

    Both are int32 of shape ``(batch_size // process_count, seq_len)``, and
    ``targets[:, :-1] == inputs[:, 1:]``.
    """
    if step < 0:
      raise ValueError(f"step={step} must be >= 0")
    epoch, index = divmod(step, self.steps_per_epoch)
    order = self.permutation(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
    return _to_batch(self._windows[process_rows(order, *self._process)])

  def batches_from(self, start_step: int = 0) -> Iterator[Batch]:
    """Yields ``batch(start_step)``, ``batch(start_step + 1)``, ... forever."""
    step = start_step
    while True:
      yield self.batch(step)
      step += 1


def eval_batches(
    tokens: np.ndarray,
    num_batches: int,
    batch_size: int,
    seq_len: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> list[Batch]:
  """A fixed list of evaluation batches from a held-out token stream.

  ``num_batches * batch_size`` windows of ``seq_len + 1`` tokens, evenly
  spaced over the stream so they cover all held-out files rather than the
  first few, in stream order. No randomness: the same arguments give the same
  batches on every run and machine, so evaluation losses are comparable.
  Process slicing works as in ``TokenBatches``.

  Raises:
    ValueError: the stream has fewer windows than requested.
  """
  _check_batch_shape(batch_size, seq_len, process_count, process_index)
  windows = _windows(tokens, seq_len)
  wanted = num_batches * batch_size
  if not 0 < wanted <= windows.shape[0]:
    raise ValueError(
        f"asked for {num_batches} batches of {batch_size} windows of"
        f" {seq_len + 1} tokens, but the held-out stream of {tokens.shape[0]}"
        f" tokens has {windows.shape[0]} windows"
    )
  chosen = (np.arange(wanted) * windows.shape[0]) // wanted
  return [
      _to_batch(windows[process_rows(rows, process_index, process_count)])
      for rows in chosen.reshape(num_batches, batch_size)
  ]


def unigram_entropy(
    train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int
) -> float:
  """Cross-entropy of a unigram model, in nats per token: a loss baseline.

  The unigram distribution is the add-one-smoothed token frequency of
  ``train_tokens``; it is evaluated on ``eval_tokens``. A language model that
  uses any context must get a held-out loss clearly below this.
  """
  counts = np.bincount(np.asarray(train_tokens), minlength=vocab_size) + 1.0
  log_probs = np.log(counts) - np.log(counts.sum())
  return float(-log_probs[np.asarray(eval_tokens)].mean())


# ---------------------------------------------------------------------------
# C4, the paper's corpus.


class TextEncoder(Protocol):
  """Anything with ``encode(text) -> ids``, e.g. a ``transformers`` tokenizer."""

  def encode(self, text: str) -> Sequence[int]:
    ...


def c4_documents(
    split: str = "train",
    *,
    data_files: str | Sequence[str] | None = None,
) -> Iterator[str]:
  """Streams the ``text`` of C4 documents, in the dataset's order.

  Args:
    split: ``"train"`` or ``"validation"``.
    data_files: local files in C4's format (``*.json.gz``, one JSON object per
      line with ``text``, ``timestamp`` and ``url``), read as ``split``;
      ``None`` streams ``allenai/c4`` (``en``) from the Hugging Face Hub.
  """
  import datasets  # Optional dependency, only needed for C4.

  if data_files is None:
    dataset = datasets.load_dataset("allenai/c4", "en", split=split, streaming=True)
  else:
    dataset = datasets.load_dataset(
        "json", data_files={split: data_files}, split=split, streaming=True
    )
  for example in dataset:
    yield example["text"]


def tokenize_documents(
    documents: Iterable[str],
    tokenizer: tokenizers.Tokenizer | TextEncoder,
    eos_id: int,
    *,
    chunk_size: int = 256,
) -> Iterator[np.ndarray]:
  """Yields each document's int32 ids followed by one ``eos_id``.

  A ``tokenizers.Tokenizer`` encodes ``chunk_size`` documents per parallel
  batch call, without its post-processor's special tokens; another object's
  ``encode(text)`` is called per document, and if it already ends the ids
  with ``eos_id`` (as T5's does) no second one is appended.
  """
  if isinstance(tokenizer, tokenizers.Tokenizer):
    def encode(texts: list[str]) -> list[Sequence[int]]:
      encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
      return [e.ids for e in encodings]
  else:
    def encode(texts: list[str]) -> list[Sequence[int]]:
      return [tokenizer.encode(text) for text in texts]

  documents = iter(documents)
  while chunk := [text for _, text in zip(range(chunk_size), documents)]:
    for ids in encode(chunk):
      ids = np.asarray(ids, np.int32)
      if ids.size and ids[-1] == eos_id:
        yield ids
      else:
        yield np.append(ids, np.int32(eos_id))


def pack_windows(
    token_stream: Iterable[np.ndarray], seq_len: int, *, skip_windows: int = 0
) -> Iterator[np.ndarray]:
  """Packs consecutive token arrays into windows of ``seq_len + 1`` tokens.

  Windows span document boundaries (the EOS tokens separate documents); a
  final partial window is dropped. The first ``skip_windows`` windows are
  skipped without being built, which is how a run resumes.
  """
  width = seq_len + 1
  to_skip = skip_windows * width
  buffer = np.zeros((0,), np.int32)
  for ids in token_stream:
    if to_skip:
      dropped = min(to_skip, ids.shape[0])
      ids = ids[dropped:]
      to_skip -= dropped
    buffer = np.concatenate([buffer, ids])
    count = buffer.shape[0] // width
    yield from buffer[: count * width].reshape(count, width)
    buffer = buffer[count * width:]


def c4_token_stream(
    tokenizer: tokenizers.Tokenizer | TextEncoder,
    *,
    split: str = "train",
    data_files: str | Sequence[str] | None = None,
    eos_id: int | None = None,
) -> Iterator[np.ndarray]:
  """C4's documents as int32 token arrays, each ending with the EOS id.

  Args:
    tokenizer: a ``tokenizers.Tokenizer`` (e.g. from a local
      ``tokenizer.json``, or ``Tokenizer.from_pretrained("t5-base")`` as
      GaLore uses) or any object with ``encode(text) -> ids``.
    split: see ``c4_documents``.
    data_files: see ``c4_documents``.
    eos_id: the separator id; ``None`` finds it with ``apollo_lm.tokenizer.find_eos_id``.
  """
  if eos_id is None:
    eos_id = tokenizer_lib.find_eos_id(tokenizer)
  return tokenize_documents(
      c4_documents(split, data_files=data_files), tokenizer, eos_id
  )


def c4_batches(
    tokenizer: tokenizers.Tokenizer | TextEncoder,
    batch_size: int,
    seq_len: int,
    *,
    split: str = "train",
    data_files: str | Sequence[str] | None = None,
    eos_id: int | None = None,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
  """C4 training batches: documents packed into windows, in stream order.

  Global batch ``step`` is windows ``step * batch_size ...`` of the packed
  stream (``pack_windows`` over ``c4_token_stream``), so the position of a run
  is the number of steps taken (equivalently ``step * batch_size`` windows
  consumed). Resuming with ``start_step=k`` yields exactly the batches an
  uninterrupted run would from step ``k``; it re-reads and re-tokenizes the
  documents before that point, without building their windows, so resuming
  costs about as long as tokenizing ``k * batch_size * (seq_len + 1)`` tokens.
  Every process reads the whole stream and keeps its own rows, as in
  ``TokenBatches``, so the global batch does not depend on the process count.

  Args:
    tokenizer: see ``c4_token_stream``.
    batch_size: the global batch size, over all processes.
    seq_len: the length of each input row.
    split: see ``c4_documents``.
    data_files: see ``c4_documents``.
    eos_id: see ``c4_token_stream``.
    start_step: the first global step to yield.
    process_index: this process's index, in ``[0, process_count)``.
    process_count: the number of processes sharing each global batch.

  Yields:
    This process's int32 ``(inputs, targets)``, each of shape
    ``(batch_size // process_count, seq_len)``, until the stream runs out
    (a final partial batch is dropped).
  """
  _check_batch_shape(batch_size, seq_len, process_count, process_index)
  windows = pack_windows(
      c4_token_stream(tokenizer, split=split, data_files=data_files, eos_id=eos_id),
      seq_len,
      skip_windows=start_step * batch_size,
  )
  while len(rows := [w for _, w in zip(range(batch_size), windows)]) == batch_size:
    yield _to_batch(np.stack(process_rows(rows, process_index, process_count)))


@dataclasses.dataclass(frozen=True)
class C4Batches:
  """:func:`c4_batches` as a :class:`TrainBatches` (resumes by re-reading)."""

  tokenizer: Any
  batch_size: int
  seq_len: int
  data_files: Sequence[str] | None = None
  process_index: int = 0
  process_count: int = 1

  def batches_from(self, start_step: int) -> Iterator[Batch]:
    return c4_batches(
        self.tokenizer, self.batch_size, self.seq_len,
        data_files=self.data_files, start_step=start_step,
        process_index=self.process_index, process_count=self.process_count)
