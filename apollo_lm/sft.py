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

Sources (``--data``, each one of):

* a JSON file: ``*.jsonl`` / ``*.json``, one JSON object per line, or a
  ``*.json`` holding one JSON array of objects (LLaMA-Factory's
  ``alpaca_data.json``); bad records are reported with their line;
* a table file, ``*.csv`` or ``*.parquet``, read with ``datasets``;
* a folder written by ``datasets``' ``save_to_disk`` (``load_from_disk``; a
  ``DatasetDict`` gives its ``split``);
* a Hugging Face Hub dataset id ``org/name`` that is not a local path
  (``datasets.load_dataset(id, split=split)``; the Hugging Face cache,
  ``HF_HUB_OFFLINE`` as ``datasets`` reads it);
* anything else: plain text for continued pre-training, tokenized with the
  checkpoint's tokenizer, each file followed by EOS, cut into windows of
  ``seq_len + 1`` tokens as pre-training does; every token counts.

Records of a ``datasets`` source are numbered by row (``path[row N]``).
``columns`` (``--data-columns instruction=question,output=answer``) renames a
source's columns to the names below before anything else.

Record layouts (``data_format``; ``"auto"`` detects it per source from the
first record that names one; a forced layout that the first record does not
have is an error):

* ``prompt_completion``: ``{"prompt": str, "completion": str}``, tokenized as
  ``[bos] + prompt + completion + [eos]`` (``bos`` only if the checkpoint's
  ``tokenizer_config.json`` names a ``bos_token``). The two strings are
  concatenated as given, as TRL does for "standard" prompt-completion data:
  put the separator (a space or newline) at the end of the prompt. The loss
  counts the completion tokens and the EOS. TRL's conversational
  prompt-completion (``prompt`` and ``completion`` both lists of messages) is
  rendered as ``messages``, counting only the assistant turns of
  ``completion``.
* ``messages`` (OpenAI / TRL conversational):
  ``{"messages": [{"role": ..., "content": ...}, ...]}``, rendered with the
  checkpoint's chat template (``chat_template`` in ``tokenizer_config.json``,
  or a ``chat_template.jinja`` file) through ``jinja2``, as
  ``transformers``' ``apply_chat_template`` does. The loss counts every
  assistant turn: the text the template adds between the generation prompt
  and the end of that turn (for Llama 3 the content and ``<|eot_id|>``), as
  TRL's ``assistant_only_loss``. Without a template, the documented plain
  format ``apollo_lm.chat_template.PLAIN_CHAT_FORMAT`` is used. With
  ``"auto"`` a file may mix ``messages`` and ``prompt``/``completion``
  records (TRL's standard layouts).
* ``alpaca``: ``{"instruction", "input", "output"}`` and optional
  ``"system"`` and ``"history"`` (``[[query, response], ...]``), as
  LLaMA-Factory reads it: the user turn is ``instruction + "\n" + input``
  (just ``instruction`` when ``input`` is empty or missing), the assistant
  turn is ``output``, ``system`` a system message, ``history`` earlier
  user/assistant turns; then rendered as ``messages``.
* ``sharegpt``: ``{"conversations": [{"from": ..., "value": ...}, ...]}``
  with optional ``"system"``; ``from`` ``human`` -> ``user``, ``gpt`` ->
  ``assistant``, ``system`` -> ``system`` (``user`` / ``assistant`` are
  accepted as themselves); then rendered as ``messages``.

Where we differ from LLaMA-Factory: it renders with its own named templates
(``--template llama3``), we with the checkpoint's own chat template (as TRL
and ``transformers`` do), so the text is the model's native format; every
assistant turn of a conversation is trained (its default,
``mask_history=False``); its ``function_call``/``observation`` roles and
``tools`` are not supported (an unknown role is a bad record). From TRL:
conversations are not truncated but an over-long example is a bad record.

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
import os
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from apollo_lm import chat_template
from apollo_lm import data as data_lib
from apollo_lm import hub
from apollo_lm.tokenizer import CheckpointTokenizer

PathLike = str | pathlib.Path

JSONL_SUFFIXES = (".jsonl", ".json")
"""File suffixes read as JSON records (lines, or one array)."""

TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet"}
"""File suffixes read with ``datasets.load_dataset`` (suffix -> builder)."""

DATA_FORMATS = ("auto", "prompt_completion", "messages", "alpaca", "sharegpt")
"""Record layouts of the module docstring; ``auto`` detects one per source."""

COLUMNS = ("prompt", "completion", "messages", "instruction", "input",
           "output", "system", "history", "conversations")
"""The record keys a source's columns can be mapped to (``columns``)."""

# The keys that make a layout, in detection order.
_LAYOUT_KEYS = {"messages": ("messages",), "sharegpt": ("conversations",),
                "alpaca": ("instruction", "output"),
                "prompt_completion": ("prompt", "completion")}
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system",
                   "user": "user", "assistant": "assistant"}

_MAX_LISTED = 20  # bad records listed in a summary or an error


# ---------------------------------------------------------------------------
# Records -> tokenized examples.


class Example(NamedTuple):
  """A tokenized example: ``tokens`` and which of them the loss counts."""

  tokens: np.ndarray  # int32[n]
  target: np.ndarray  # bool[n]: token i is predicted with loss
  line: int


class BadRecord(NamedTuple):
  """A record that was skipped (or, strictly, rejected), and why.

  ``line`` is the line in a JSON file, or the 1-based row of a ``datasets``
  source (``by_row``).
  """

  path: str
  line: int
  reason: str
  by_row: bool = False

  def __str__(self) -> str:
    where = f"[row {self.line}]" if self.by_row else f":{self.line}"
    return f"{self.path}{where}: {self.reason}"


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


def detect_layout(record: Any) -> str | None:
  """The layout (a :data:`DATA_FORMATS` name) whose keys ``record`` has."""
  if not isinstance(record, dict):
    return None
  return next((layout for layout, keys in _LAYOUT_KEYS.items()
               if all(k in record for k in keys)), None)


def _text(record: dict[str, Any], key: str, *, required: bool) -> str:
  if required and key not in record:
    raise RecordError(f"missing key: {key!r}")
  value = record.get(key)
  if value is None:  # An empty cell of a table.
    return ""
  if not isinstance(value, str):
    raise RecordError(f"bad {key}: expected a string, got {type(value).__name__}")
  return value


def _alpaca_messages(record: dict[str, Any]) -> list[dict[str, str]]:
  instruction = _text(record, "instruction", required=True)
  query = _text(record, "input", required=False)
  output = _text(record, "output", required=True)
  system = _text(record, "system", required=False)
  messages = [{"role": "system", "content": system}] if system else []
  history = record.get("history") or []
  if not isinstance(history, list) or not all(
      isinstance(t, (list, tuple)) and len(t) == 2
      and all(isinstance(x, str) for x in t) for t in history):
    raise RecordError("bad history: expected a list of [query, response]"
                      " string pairs")
  for user, assistant in history:
    messages += [{"role": "user", "content": user},
                 {"role": "assistant", "content": assistant}]
  user = "\n".join([instruction, query]) if query else instruction
  return messages + [{"role": "user", "content": user},
                     {"role": "assistant", "content": output}]


def _sharegpt_messages(record: dict[str, Any]) -> list[dict[str, str]]:
  turns = record.get("conversations")
  if not isinstance(turns, list) or not turns:
    raise RecordError("bad conversations: expected a non-empty list of"
                      " {\"from\", \"value\"} objects")
  system = _text(record, "system", required=False)
  messages = [{"role": "system", "content": system}] if system else []
  for i, turn in enumerate(turns):
    if not isinstance(turn, dict) or not {"from", "value"} <= turn.keys():
      raise RecordError(f"bad conversations: turn {i} is not an object with"
                        " keys 'from' and 'value'")
    if turn["from"] not in _SHAREGPT_ROLES:
      raise RecordError(
          f"unknown role: turn {i} is from {turn['from']!r}; expected one of"
          f" {tuple(_SHAREGPT_ROLES)}")
    messages.append({"role": _SHAREGPT_ROLES[turn["from"]],
                     "content": turn["value"]})
  return messages


def standard_record(record: Any, layout: str) -> dict[str, Any]:
  """``record`` of ``layout`` as a ``prompt``/``completion`` or ``messages``
  record, the input of :func:`tokenize_record` (see the module docstring).

  Raises:
    RecordError: ``record`` does not have ``layout``'s keys and types.
  """
  if not isinstance(record, dict):
    raise RecordError(f"not an object: got {type(record).__name__}")
  if layout == "alpaca":
    return {"messages": _alpaca_messages(record)}
  if layout == "sharegpt":
    return {"messages": _sharegpt_messages(record)}
  if layout in ("messages", "prompt_completion"):
    missing = [k for k in _LAYOUT_KEYS[layout] if k not in record]
    if missing:
      raise RecordError(f"missing key: {missing[0]!r} (data format {layout})")
    return {k: record[k] for k in _LAYOUT_KEYS[layout]}
  return record  # auto with a standard record: messages or prompt/completion.


def parse_columns(spec: str | Sequence[str] | None) -> dict[str, str]:
  """``"instruction=question,output=answer"`` -> ``{"question":
  "instruction", "answer": "output"}`` (source column -> record key).

  Raises:
    ValueError: an item is not ``key=column`` or ``key`` not in
      :data:`COLUMNS`.
  """
  if not spec:
    return {}
  items = spec.split(",") if isinstance(spec, str) else [
      i for part in spec for i in part.split(",")]
  mapping = {}
  for item in items:
    key, sep, column = item.strip().partition("=")
    if not sep or not key or not column:
      raise ValueError(f"{item!r} is not key=column (e.g. "
                       "instruction=question,output=answer)")
    if key not in COLUMNS:
      raise ValueError(f"unknown key {key!r} in {item!r}; allowed: "
                       f"{', '.join(COLUMNS)}")
    mapping[column] = key
  return mapping


def _renamed(record: Any, columns: dict[str, str]) -> Any:
  if not columns or not isinstance(record, dict):
    return record
  return {columns.get(k, k): v for k, v in record.items()
          if k in columns or k not in columns.values()}


# ---------------------------------------------------------------------------
# Sources -> numbered records.


def source_kind(source: PathLike) -> str:
  """How ``source`` is read: ``"json"``, ``"table"``, ``"saved"``
  (``save_to_disk`` folder), ``"hub"`` (dataset id) or ``"text"``."""
  path = pathlib.Path(source)
  if path.is_file():
    suffix = path.suffix.lower()
    return ("json" if suffix in JSONL_SUFFIXES else
            "table" if suffix in TABLE_SUFFIXES else "text")
  if path.is_dir():
    saved = ((path / "state.json").is_file()
             or (path / "dataset_dict.json").is_file())
    return "saved" if saved else "text"
  suffix = path.suffix.lower()
  if suffix in JSONL_SUFFIXES:
    return "json"  # Missing: an error when it is read.
  if suffix not in TABLE_SUFFIXES and hub.is_repo_id(os.fspath(source)):
    return "hub"
  return "table" if suffix in TABLE_SUFFIXES else "text"


def _json_records(path: pathlib.Path) -> Iterator[tuple[int, Any]]:
  """(line, record) of a JSON-lines file or of a JSON array; a record that
  is not JSON is a :class:`RecordError` in place of the record."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if text.lstrip().startswith("["):
    decoder = json.JSONDecoder()
    try:
      whole = decoder.decode(text)
    except json.JSONDecodeError as e:
      yield e.lineno, RecordError(f"not valid JSON: {e.msg} (column {e.colno})")
      return
    if not isinstance(whole, list):
      yield 1, RecordError("not valid JSON lines or a JSON array")
      return
    # Each element again, for its line.
    pos = text.index("[") + 1
    for _ in whole:
      while text[pos] in " \t\r\n,":
        pos += 1
      record, end = decoder.raw_decode(text, pos)
      yield text.count("\n", 0, pos) + 1, record
      pos = end
    return
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      yield number, json.loads(line)
    except json.JSONDecodeError as e:
      yield number, RecordError(f"not valid JSON: {e.msg} (column {e.colno})")


def load_dataset_source(source: PathLike, *, split: str = "train") -> Any:
  """A ``datasets.Dataset`` of a table file, saved folder or Hub id.

  Raises:
    ValueError: ``datasets`` is missing, or the source cannot be loaded
      (named, with the reason).
  """
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(f"{source}: reading it needs `datasets`: pip install "
                     '"apollo-optax[lm]"') from None
  kind = source_kind(source)
  try:
    if kind == "table":
      builder = TABLE_SUFFIXES[pathlib.Path(source).suffix.lower()]
      return datasets.load_dataset(builder, data_files=[str(source)],
                                   split="train")
    if kind == "saved":
      loaded = datasets.load_from_disk(str(source))
    else:
      loaded = datasets.load_dataset(os.fspath(source), split=split)
  except Exception as e:  # datasets' errors: missing file, split, network
    reason = (str(e).strip().splitlines() or [""])[0]
    what = ("no such file or folder, and not a loadable Hugging Face Hub"
            " dataset" if kind == "hub" else "cannot load it with `datasets`")
    raise ValueError(f"{source}: {what} ({type(e).__name__}: {reason})"
                     ) from None
  if isinstance(loaded, datasets.DatasetDict):
    if split not in loaded:
      raise ValueError(f"{source}: no split {split!r} (--data-split); splits:"
                       f" {', '.join(loaded)}")
    loaded = loaded[split]
  return loaded


def read_records(source: PathLike, tok: CheckpointTokenizer, *,
                 data_format: str = "auto", columns: dict[str, str] | None = None,
                 split: str = "train", max_tokens: int | None = None,
                 strict: bool = False) -> tuple[list[Example], DataReport]:
  """Tokenizes every record of a JSON file or ``datasets`` source.

  Blank lines are not records. A record is bad if it is not valid JSON, not
  of the source's layout, has an empty completion or no assistant turn, or
  has more than ``max_tokens`` tokens.

  Args:
    source: a JSON(-lines) file, table file, saved dataset folder or Hub
      dataset id (see the module docstring).
    tok: the checkpoint's tokenizer.
    data_format: one of :data:`DATA_FORMATS`.
    columns: source column -> record key (:func:`parse_columns`).
    split: the split of a Hub dataset or saved ``DatasetDict``.
    max_tokens: longest allowed example (a window holds ``seq_len + 1``).
    strict: raise on the first bad records instead of skipping them.

  Returns:
    The examples of the good records, in source order, and the report.

  Raises:
    ValueError: an unknown ``data_format``; a forced ``data_format`` that
      the first record does not have; with ``strict``, listing the bad
      records with line numbers; or when no record at all is usable.
  """
  if data_format not in DATA_FORMATS:
    raise ValueError(f"data format {data_format!r}; allowed: "
                     f"{', '.join(DATA_FORMATS)}")
  columns = columns or {}
  kind = source_kind(source)
  by_row = kind != "json"
  if by_row:
    records = enumerate(load_dataset_source(source, split=split), 1)
  else:
    records = _json_records(pathlib.Path(source))
  report = DataReport(str(source))
  examples = []
  layout = None if data_format == "auto" else data_format
  checked = False
  for number, record in records:
    report.records += 1
    try:
      if isinstance(record, RecordError):
        raise record
      record = _renamed(record, columns)
      found = detect_layout(record)
      if not checked and found is not None:
        # The first record that names a layout fixes (or checks) the source's.
        checked = True
        if layout is None:
          layout = found
        elif found != layout and not set(_LAYOUT_KEYS[layout]) <= set(record):
          raise ValueError(
              f"{source}{f'[row {number}]' if by_row else f':{number}'}: the"
              f" records are {found} ({'/'.join(_LAYOUT_KEYS[found])}), not"
              f" data format {layout} ({'/'.join(_LAYOUT_KEYS[layout])});"
              f" allowed: {', '.join(DATA_FORMATS)}")
      if layout is None:
        # No layout yet: the one the record has some keys of names what is
        # missing; TRL's standard layouts otherwise.
        partial = next((name for name, keys in _LAYOUT_KEYS.items()
                        if isinstance(record, dict)
                        and any(k in record for k in keys)), "auto")
        standard = standard_record(record, partial)
      elif data_format == "auto" and layout in ("messages",
                                                   "prompt_completion"):
        standard = standard_record(record, "auto")  # Both may mix.
      else:
        standard = standard_record(record, layout)
      ids, flags = tokenize_record(standard, tok)
      if max_tokens is not None and len(ids) > max_tokens:
        raise RecordError(
            f"over-long: {len(ids)} tokens, a window holds {max_tokens}"
            " (seq_len + 1)")
    except RecordError as e:
      report.bad.append(BadRecord(str(source), number, str(e), by_row))
      continue
    examples.append(Example(np.asarray(ids, np.int32),
                            np.asarray(flags, bool), number))
  if strict and report.bad:
    raise ValueError("bad records (strict data):\n" + report.summary())
  if not examples:
    raise ValueError(f"no usable record in {source}:\n" + report.summary())
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
    reports: one :class:`DataReport` per source of records read.
    description: one line for logs.
  """

  train: Rows
  eval: Rows
  reports: tuple[DataReport, ...]
  description: str


def _load_one(paths: Sequence[PathLike], tok: CheckpointTokenizer, seq_len: int,
              strict: bool, **read: Any,
              ) -> tuple[list[Example] | Rows, list[DataReport]]:
  is_text = {source_kind(p) == "text" for p in paths}
  if len(is_text) > 1:
    raise ValueError(f"data {[str(p) for p in paths]} mixes records (JSON,"
                     " csv/parquet, datasets) and plain text files")
  if is_text == {True}:
    return text_rows(paths, tok, seq_len), []
  examples, reports = [], []
  for path in paths:
    found, report = read_records(path, tok, max_tokens=seq_len + 1,
                                 strict=strict, **read)
    examples += found
    reports.append(report)
  return examples, reports


def load_sft_data(data: PathLike | Sequence[PathLike], tok: CheckpointTokenizer,
                  seq_len: int, *, eval_data: PathLike | Sequence[PathLike] | None = None,
                  eval_fraction: float = 0.05, strict: bool = False,
                  seed: int = 0, data_format: str = "auto",
                  columns: dict[str, str] | None = None,
                  split: str = "train") -> SFTData:
  """Reads, tokenizes, splits and packs fine-tuning data.

  Args:
    data: source(s) of records (JSON, csv/parquet, saved datasets, Hub
      dataset ids), or plain text file(s)/directories (see the module
      docstring).
    tok: the checkpoint's tokenizer.
    seq_len: positions per packed row.
    eval_data: held-out file(s) of the same kind; None holds out
      ``eval_fraction`` of ``data`` (records by a hash of their tokens; plain
      text: the last windows of the stream).
    eval_fraction: share held out when ``eval_data`` is None.
    strict: bad records are an error instead of being skipped and reported.
    seed: the packing order.
    data_format: the records' layout, one of :data:`DATA_FORMATS`.
    columns: source column -> record key (:func:`parse_columns`).
    split: the split of a Hub dataset or saved ``DatasetDict``.

  Raises:
    ValueError: bad arguments, no usable record, or (``strict``) any bad
      record; the message names the file and line numbers.
  """
  if seq_len < 2:
    raise ValueError(f"seq_len={seq_len} must be >= 2")
  as_list = lambda p: [p] if isinstance(p, (str, pathlib.Path)) else list(p)
  train_paths = as_list(data)
  read = dict(data_format=data_format, columns=columns, split=split)
  train, reports = _load_one(train_paths, tok, seq_len, strict, **read)
  if eval_data is not None:
    held, more = _load_one(as_list(eval_data), tok, seq_len, strict, **read)
    if isinstance(held, Rows) != isinstance(train, Rows):
      raise ValueError("eval data must be of the same kind (records or"
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
