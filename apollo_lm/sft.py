# Copyright 2025 The apollo_optax Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Supervised fine-tuning data: records in, packed next-token rows out.

Data formats (chosen by the file name):

* ``*.jsonl`` / ``*.json`` (one JSON object per line), either

  - ``{"prompt": str, "completion": str}``: tokenized as
    ``[bos] + prompt + completion + [eos]`` (``bos`` only if the checkpoint's
    ``tokenizer_config.json`` names a ``bos_token``). The two strings are
    concatenated as given, as TRL does for "standard" prompt-completion data:
    put the separator (a space or newline) at the end of the prompt. The loss
    counts the completion tokens and the EOS.
  - ``{"messages": [{"role": ..., "content": ...}, ...]}`` (chat), rendered
    with the checkpoint's chat template (``chat_template`` in
    ``tokenizer_config.json``, or a ``chat_template.jinja`` file) through
    ``jinja2``, as ``transformers``' ``apply_chat_template`` does. The loss
    counts every assistant turn: the text the template adds between the
    generation prompt and the end of that turn (for Llama 3 the content and
    ``<|eot_id|>``). Without a template, the documented plain format
    ``apollo_lm.chat_template.PLAIN_CHAT_FORMAT`` is used. TRL's
    conversational prompt-completion
    (``prompt`` and ``completion`` both lists of messages) is rendered the
    same way, counting only the assistant turns of ``completion``.

* any other file: plain text for continued pre-training, tokenized with the
  checkpoint's tokenizer, each file followed by EOS, cut into windows of
  ``seq_len + 1`` tokens as pre-training does; every token counts.

Bad records (not JSON, missing or mistyped keys, empty completions, unknown
roles, examples longer than a window) are never dropped silently: they are
counted in a :class:`DataReport` with their file and line number, and with
``strict=True`` they are an error.

Packing: examples are placed into fixed windows of ``seq_len`` positions
(first fit, in a seeded order). Each row carries ``segment_ids`` (1, 2, ... per
example, 0 for padding) and ``positions`` restarting at 0 for every example,
so a model that reads them attends only within an example and rotates each
example as if it started the sequence. A packed example of ``n`` tokens
contributes ``n - 1`` positions (inputs ``t[:-1]``, targets ``t[1:]``), so no
target ever crosses an example boundary. Padding positions have mask 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from apollo_lm import chat_template
from apollo_lm import data as data_lib
from apollo_lm.tokenizer import CheckpointTokenizer

PathLike = str | pathlib.Path

JSONL_SUFFIXES = (".jsonl", ".json")
"""File suffixes read as JSON-lines records; any other file is plain text."""

_MAX_LISTED = 20  # bad records listed in a summary or an error


# ---------------------------------------------------------------------------
# Records -> tokenized examples.


class Example(NamedTuple):
  """A tokenized example: ``tokens`` and which of them the loss counts."""

  tokens: np.ndarray  # int32[n]
  target: np.ndarray  # bool[n]: token i is predicted with loss
  line: int


class BadRecord(NamedTuple):
  """A record that was skipped (or, strictly, rejected), and why."""

  path: str
  line: int
  reason: str

  def __str__(self) -> str:
    return f"{self.path}:{self.line}: {self.reason}"


class RecordError(ValueError):
  """A record that cannot be turned into a training example."""


@dataclasses.dataclass
class DataReport:
  """What a data file held: records read, and the bad ones with line numbers."""

  path: str
  records: int = 0
  bad: list[BadRecord] = dataclasses.field(default_factory=list)

  @property
  def used(self) -> int:
    return self.records - len(self.bad)

  def counts(self) -> dict[str, int]:
    """Bad records per kind of problem (the reason up to its first colon)."""
    counts: dict[str, int] = {}
    for record in self.bad:
      kind = record.reason.split(":")[0]
      counts[kind] = counts.get(kind, 0) + 1
    return counts

  def summary(self) -> str:
    """One paragraph: counts, then the first bad records with their lines."""
    if not self.bad:
      return f"{self.path}: {self.records} records, all used"
    lines = [f"{self.path}: {self.records} records, {len(self.bad)} skipped ("
             + ", ".join(f"{k}: {v}" for k, v in self.counts().items()) + ")"]
    lines += [f"  {record}" for record in self.bad[:_MAX_LISTED]]
    if len(self.bad) > _MAX_LISTED:
      lines.append(f"  ... and {len(self.bad) - _MAX_LISTED} more")
    return "\n".join(lines)


def _check_messages(value: Any, key: str) -> list[dict[str, str]]:
  if not isinstance(value, list) or not value:
    raise RecordError(f"bad {key}: expected a non-empty list of"
                      " {\"role\", \"content\"} objects")
  for i, message in enumerate(value):
    if not isinstance(message, dict) or not {"role", "content"} <= message.keys():
      raise RecordError(f"bad {key}: message {i} is not an object with keys"
                        " 'role' and 'content'")
    if message["role"] not in chat_template.CHAT_ROLES:
      raise RecordError(f"unknown role: message {i} has role"
                        f" {message['role']!r}; expected one of {chat_template.CHAT_ROLES}")
    if not isinstance(message["content"], str):
      raise RecordError(f"bad {key}: message {i} content is not a string")
  return value


def _tokenize_chat(messages: list[dict[str, str]], tok: CheckpointTokenizer,
                   first_trained: int) -> tuple[list[int], list[bool]]:
  """Tokens and loss flags of a conversation; assistant turns from
  ``first_trained`` on are counted."""
  trained = [i for i, m in enumerate(messages)
             if m["role"] == "assistant" and i >= first_trained]
  if not trained:
    raise RecordError("no assistant message: nothing to train on")
  for i in trained:
    if not messages[i]["content"].strip():
      raise RecordError(f"empty completion: assistant message {i} is empty")
  if tok.chat_template is None:
    ids, flags = tok.bos_ids(), [False] * len(tok.bos_ids())
    for i, message in enumerate(messages):
      more, more_flags = tok.plain_message_ids(message)
      ids += more
      flags += [f and i in trained for f in more_flags]
    return ids, flags
  # Incremental rendering: the generation prompt before each trained turn and
  # the conversation up to its end must extend what was rendered before.
  pieces: list[tuple[str, bool]] = []
  done = ""
  try:
    for i in trained:
      prefix = tok.render_chat(messages[:i], add_generation_prompt=True)
      upto = tok.render_chat(messages[:i + 1])
      if not (prefix.startswith(done) and upto.startswith(prefix)):
        raise RecordError(
            "chat template: it does not render the conversation"
            " incrementally (a turn changes the text before it), so the"
            " assistant tokens cannot be located")
      pieces += [(prefix[len(done):], False), (upto[len(prefix):], True)]
      done = upto
    full = tok.render_chat(messages)
  except RecordError:
    raise
  except Exception as e:  # jinja2 errors, raise_exception() in templates
    raise RecordError(f"chat template: {type(e).__name__}: {e}") from None
  if not full.startswith(done):
    raise RecordError("chat template: the rendered conversation does not"
                      " extend its rendered prefix")
  pieces.append((full[len(done):], False))
  ids: list[int] = []
  flags: list[bool] = []
  for text, flag in pieces:
    piece = tok.encode(text) if text else []
    ids += piece
    flags += [flag] * len(piece)
  return ids, flags


def tokenize_record(record: Any, tok: CheckpointTokenizer) -> tuple[list[int], list[bool]]:
  """Token ids of one parsed record and, per token, whether the loss counts it.

  Raises:
    RecordError: the record is not one of the formats of the module
      docstring, or has nothing to train on.
  """
  if not isinstance(record, dict):
    raise RecordError(f"not an object: got {type(record).__name__}")
  if "messages" in record:
    return _tokenize_chat(_check_messages(record["messages"], "messages"), tok, 0)
  missing = [k for k in ("prompt", "completion") if k not in record]
  if missing:
    raise RecordError(
        f"missing key: {missing[0]!r} (a record needs 'prompt' and"
        " 'completion', or 'messages')")
  prompt, completion = record["prompt"], record["completion"]
  if isinstance(prompt, list) and isinstance(completion, list):
    prompt = _check_messages(prompt, "prompt")
    completion = _check_messages(completion, "completion")
    return _tokenize_chat(prompt + completion, tok, len(prompt))
  for key, value in (("prompt", prompt), ("completion", completion)):
    if not isinstance(value, str):
      raise RecordError(f"bad {key}: expected a string (or both prompt and"
                        f" completion lists of messages), got {type(value).__name__}")
  if not completion.strip():
    raise RecordError("empty completion: nothing to train on")
  head = tok.bos_ids() + tok.encode(prompt)
  body = tok.encode(completion) + [tok.eos_id]
  return head + body, [False] * len(head) + [True] * len(body)


def read_jsonl(path: PathLike, tok: CheckpointTokenizer, *,
               max_tokens: int | None = None, strict: bool = False,
               ) -> tuple[list[Example], DataReport]:
  """Tokenizes every record of a JSON-lines file.

  Blank lines are not records. A record is bad if it is not valid JSON, not
  one of the formats, has an empty completion or no assistant turn, or has
  more than ``max_tokens`` tokens.

  Args:
    path: the file.
    tok: the checkpoint's tokenizer.
    max_tokens: longest allowed example (a window holds ``seq_len + 1``).
    strict: raise on the first bad records instead of skipping them.

  Returns:
    The examples of the good records, in file order, and the report.

  Raises:
    ValueError: with ``strict``, listing the bad records with line numbers;
      or when no record at all is usable.
  """
  path = pathlib.Path(path)
  report = DataReport(str(path))
  examples = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      report.records += 1
      try:
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise RecordError(f"not valid JSON: {e.msg} (column {e.colno})") from None
        ids, flags = tokenize_record(record, tok)
        if max_tokens is not None and len(ids) > max_tokens:
          raise RecordError(
              f"over-long: {len(ids)} tokens, a window holds {max_tokens}"
              " (seq_len + 1)")
      except RecordError as e:
        report.bad.append(BadRecord(str(path), number, str(e)))
        continue
      examples.append(Example(np.asarray(ids, np.int32),
                              np.asarray(flags, bool), number))
  if strict and report.bad:
    raise ValueError("bad records (strict data):\n" + report.summary())
  if not examples:
    raise ValueError(f"no usable record in {path}:\n" + report.summary())
  return examples, report


def split_examples(examples: Sequence[Example], fraction: float,
                   key: Callable[[Example], bytes] | None = None,
                   ) -> tuple[list[Example], list[Example]]:
  """Splits examples into (train, held-out) by a hash of their tokens.

  An example is held out when the first 8 bytes of ``sha256`` of its tokens
  fall below ``fraction`` of their range (``data.is_held_out``): stable,
  independent of the other examples, and duplicates land on the same side.
  At least one example is held out and at least one kept.

  Raises:
    ValueError: ``fraction`` not in (0, 1), or fewer than 2 examples.
  """
  if not 0 < fraction < 1:
    raise ValueError(f"eval_fraction={fraction} must be in (0, 1) (or pass"
                     " eval data)")
  if len(examples) < 2:
    raise ValueError(f"{len(examples)} example(s) cannot be split into train"
                     " and held-out: pass eval data or more records")
  key = key or (lambda e: e.tokens.tobytes())
  held = [data_lib.is_held_out(key(e).hex(), fraction) for e in examples]
  if not any(held):
    held[min(range(len(examples)), key=lambda i: key(examples[i]))] = True
  if all(held):
    held[0] = False
  return ([e for e, h in zip(examples, held) if not h],
          [e for e, h in zip(examples, held) if h])


# ---------------------------------------------------------------------------
# Packing.


class Rows(NamedTuple):
  """Packed rows, fields in the order of ``apollo_lm.steps.Batch``.

  All fields are ``[N, seq_len]``: ``inputs``/``targets`` int32,
  ``loss_mask`` float32 (1 = counted), ``segment_ids`` int32 (1, 2, ... per
  example in a row, 0 = padding), ``positions`` int32 (restarting at 0 per
  example).
  """

  inputs: np.ndarray
  targets: np.ndarray
  loss_mask: np.ndarray
  segment_ids: np.ndarray
  positions: np.ndarray

  def take(self, index: Any) -> Rows:
    """The rows at ``index`` (an int array or slice)."""
    return Rows(*(field[index] for field in self))

  @property
  def num_rows(self) -> int:
    return self.inputs.shape[0]

  @property
  def num_target_tokens(self) -> int:
    return int(self.loss_mask.sum())


def pack_examples(examples: Sequence[Example], seq_len: int, *,
                  seed: int | None = 0) -> Rows:
  """Packs examples into rows of ``seq_len`` positions (first fit).

  The examples are visited in a seeded order (``seed=None`` keeps theirs);
  each goes into the first row with room for its ``n - 1`` positions.

  Raises:
    ValueError: an example longer than ``seq_len + 1`` tokens, or none.
  """
  if not examples:
    raise ValueError("no examples to pack")
  order = np.arange(len(examples))
  if seed is not None:
    order = np.random.Generator(np.random.PCG64([seed, 2**31])).permutation(order)
  placed: list[list[int]] = []
  free_arr = np.zeros((0,), np.int64)
  for i in order:
    need = examples[i].tokens.shape[0] - 1
    if need > seq_len:
      raise ValueError(f"example from line {examples[i].line} has"
                       f" {need + 1} tokens, more than seq_len + 1 = {seq_len + 1}")
    fits = np.flatnonzero(free_arr >= need)
    if fits.size:
      row = int(fits[0])
    else:
      row = len(placed)
      placed.append([])
      free_arr = np.append(free_arr, seq_len)
    placed[row].append(int(i))
    free_arr[row] -= need
  n = len(placed)
  rows = Rows(np.zeros((n, seq_len), np.int32), np.zeros((n, seq_len), np.int32),
              np.zeros((n, seq_len), np.float32), np.zeros((n, seq_len), np.int32),
              np.zeros((n, seq_len), np.int32))
  for r, members in enumerate(placed):
    start = 0
    for segment, i in enumerate(members, 1):
      tokens, target = examples[i].tokens, examples[i].target
      end = start + tokens.shape[0] - 1
      rows.inputs[r, start:end] = tokens[:-1]
      rows.targets[r, start:end] = tokens[1:]
      rows.loss_mask[r, start:end] = target[1:]
      rows.segment_ids[r, start:end] = segment
      rows.positions[r, start:end] = np.arange(end - start)
      start = end
  return rows


def text_rows(paths: Sequence[PathLike], tok: CheckpointTokenizer,
              seq_len: int) -> Rows:
  """Plain text files as pre-training windows of ``seq_len + 1`` tokens.

  Each file is tokenized with the checkpoint's tokenizer and followed by EOS;
  the stream is cut into windows spanning file boundaries
  (``data.pack_windows``); every position counts, one segment per row.

  Raises:
    ValueError: not even one window.
  """
  files = data_lib.collect_files(paths)
  texts = (data_lib.read_text(f.path) for f in files)
  windows = list(data_lib.pack_windows(
      data_lib.tokenize_documents(texts, tok.tokenizer, tok.eos_id), seq_len))
  if not windows:
    raise ValueError(f"{[str(p) for p in paths]}: fewer than seq_len + 1 ="
                     f" {seq_len + 1} tokens, not one window")
  w = np.stack(windows).astype(np.int32)
  n = w.shape[0]
  return Rows(w[:, :-1], w[:, 1:], np.ones((n, seq_len), np.float32),
              np.ones((n, seq_len), np.int32),
              np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy())


# ---------------------------------------------------------------------------
# Data sets and batches.


class RowBatches:
  """Deterministic, resumable batches of packed rows.

  As ``data.TokenBatches``: each epoch visits the rows in the order of a
  permutation drawn from ``Generator(PCG64([seed, epoch]))``, leftover rows at
  an epoch's end are skipped, and ``batch(step)`` depends only on
  ``(seed, step)``; with several processes each takes its consecutive rows.
  """

  def __init__(self, rows: Rows, batch_size: int, *, seed: int = 0,
               process_index: int = 0, process_count: int = 1):
    data_lib._check_batch_shape(batch_size, rows.inputs.shape[1],
                                process_count, process_index)
    if rows.num_rows < batch_size:
      raise ValueError(f"the training data packs into {rows.num_rows} rows,"
                       f" fewer than batch_size={batch_size}")
    self.rows = rows
    self.batch_size = batch_size
    self.seed = seed
    local = batch_size // process_count
    self._local = slice(process_index * local, (process_index + 1) * local)

  @property
  def steps_per_epoch(self) -> int:
    return self.rows.num_rows // self.batch_size

  def batch(self, step: int) -> Rows:
    """This process's rows of global batch ``step``."""
    if step < 0:
      raise ValueError(f"step={step} must be >= 0")
    epoch, index = divmod(step, self.steps_per_epoch)
    order = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(
        self.rows.num_rows)
    chosen = order[index * self.batch_size:(index + 1) * self.batch_size]
    return self.rows.take(chosen[self._local])

  def batches_from(self, start_step: int = 0) -> Iterator[Rows]:
    """Yields ``batch(start_step)``, ``batch(start_step + 1)``, ... forever
    (the ``data.TrainBatches`` protocol of the training loop)."""
    step = start_step
    while True:
      yield self.batch(step)
      step += 1

  iterate = batches_from


def eval_row_batches(rows: Rows, batch_size: int, *, process_index: int = 0,
                     process_count: int = 1) -> list[Rows]:
  """All held-out rows in batches of ``batch_size``, in order.

  The last batch is filled with all-padding rows (mask 0), which count
  nothing; weight batches by their counted tokens (``loss_mask`` sums).
  """
  data_lib._check_batch_shape(batch_size, rows.inputs.shape[1], process_count,
                              process_index)
  n = math.ceil(rows.num_rows / batch_size) * batch_size
  pad = n - rows.num_rows
  if pad:
    rows = Rows(*(np.concatenate([f, np.zeros((pad,) + f.shape[1:], f.dtype)])
                  for f in rows))
  local = batch_size // process_count
  return [rows.take(slice(b + process_index * local, b + (process_index + 1) * local))
          for b in range(0, n, batch_size)]


@dataclasses.dataclass(frozen=True)
class SFTData:
  """Packed train and held-out rows, and what was read.

  Attributes:
    train: training rows.
    eval: held-out rows.
    reports: one :class:`DataReport` per JSON-lines file read.
    description: one line for logs.
  """

  train: Rows
  eval: Rows
  reports: tuple[DataReport, ...]
  description: str


def _is_jsonl(path: PathLike) -> bool:
  return pathlib.Path(path).suffix.lower() in JSONL_SUFFIXES


def _load_one(paths: Sequence[PathLike], tok: CheckpointTokenizer, seq_len: int,
              strict: bool) -> tuple[list[Example] | Rows, list[DataReport]]:
  kinds = {_is_jsonl(p) for p in paths}
  if len(kinds) > 1:
    raise ValueError(f"data {[str(p) for p in paths]} mixes JSON-lines"
                     f" ({'/'.join(JSONL_SUFFIXES)}) and plain text files")
  if kinds == {False}:
    return text_rows(paths, tok, seq_len), []
  examples, reports = [], []
  for path in paths:
    found, report = read_jsonl(path, tok, max_tokens=seq_len + 1, strict=strict)
    examples += found
    reports.append(report)
  return examples, reports


def load_sft_data(data: PathLike | Sequence[PathLike], tok: CheckpointTokenizer,
                  seq_len: int, *, eval_data: PathLike | Sequence[PathLike] | None = None,
                  eval_fraction: float = 0.05, strict: bool = False,
                  seed: int = 0) -> SFTData:
  """Reads, tokenizes, splits and packs fine-tuning data.

  Args:
    data: JSON-lines file(s) of records, or plain text file(s)/directories
      (see the module docstring).
    tok: the checkpoint's tokenizer.
    seq_len: positions per packed row.
    eval_data: held-out file(s) of the same kind; None holds out
      ``eval_fraction`` of ``data`` (records by a hash of their tokens; plain
      text: the last windows of the stream).
    eval_fraction: share held out when ``eval_data`` is None.
    strict: bad records are an error instead of being skipped and reported.
    seed: the packing order.

  Raises:
    ValueError: bad arguments, no usable record, or (``strict``) any bad
      record; the message names the file and line numbers.
  """
  if seq_len < 2:
    raise ValueError(f"seq_len={seq_len} must be >= 2")
  as_list = lambda p: [p] if isinstance(p, (str, pathlib.Path)) else list(p)
  train_paths = as_list(data)
  train, reports = _load_one(train_paths, tok, seq_len, strict)
  if eval_data is not None:
    held, more = _load_one(as_list(eval_data), tok, seq_len, strict)
    if isinstance(held, Rows) != isinstance(train, Rows):
      raise ValueError("eval data must be of the same kind (JSON-lines or"
                       " plain text) as the training data")
    reports += more
  elif isinstance(train, Rows):
    if not 0 < eval_fraction < 1:
      raise ValueError(f"eval_fraction={eval_fraction} must be in (0, 1)"
                       " (or pass eval data)")
    if train.num_rows < 2:
      raise ValueError("the text makes 1 window: too little to hold any out;"
                       " pass eval data")
    n_eval = min(max(1, round(eval_fraction * train.num_rows)), train.num_rows - 1)
    held = train.take(slice(train.num_rows - n_eval, None))
    train = train.take(slice(0, train.num_rows - n_eval))
  else:
    train, held = split_examples(train, eval_fraction)
  if not isinstance(train, Rows):
    n_train, n_eval = len(train), len(held)
    train = pack_examples(train, seq_len, seed=seed)
    held = pack_examples(held, seq_len, seed=None)
    kind = f"{n_train} train / {n_eval} held-out examples"
  else:
    kind = "plain text (continued pre-training)"
  description = (
      f"{', '.join(map(str, train_paths))}: {kind}, {train.num_rows} train rows"
      f" ({train.num_target_tokens} counted tokens), {held.num_rows} held-out rows"
      f" ({held.num_target_tokens} counted tokens) of {seq_len} positions")
  return SFTData(train, held, tuple(reports), description)
