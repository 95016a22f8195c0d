"""Byte-level BPE tokenizer for the language-model corpora.

Why BPE rather than raw bytes: a transformer sees a fixed number of positions
per example, and its cost grows with that number. BPE merges frequent byte
sequences into single tokens, so the same context window covers several times
more text (about 3-4 bytes per token on Python source) for the same model and
the same compute. Source code is particularly compressible this way: it repeats
identifiers (``self``, ``return``, ``import``), keywords and long runs of
indentation whitespace, which BPE turns into one token each.

Why byte-level: the pre-tokenizer maps every byte to one of 256 printable
symbols before merging, and the 256 symbols are all in the vocabulary from the
start. Every UTF-8 string therefore encodes without an unknown token and
decodes back to exactly the same string, whatever script, emoji or unusual
whitespace it contains, which matters for code whose exact bytes are the
thing being modelled.

The end-of-document token is a special token the model sees between files; it
is only ever inserted by the pipeline, never produced from the text itself
(``encode_special_tokens`` is on, so a literal ``<|endoftext|>`` inside a file
is encoded as ordinary text).

This module is also the one place that loads tokenizers: :func:`load_tokenizer`
(a ``tokenizer.json`` file or folder, or a Hugging Face Hub name) and
:func:`load_checkpoint_tokenizer` (the tokenizer of a Hugging Face checkpoint,
folder or Hub id, with its special tokens and chat template).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from apollo_lm import chat_template
from apollo_lm import hub

EOS_TOKEN = "<|endoftext|>"
"""The end-of-document token; it gets id 0 in tokenizers trained here."""


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 8192, *, length: int | None = None
) -> tokenizers.Tokenizer:
  """Trains a byte-level BPE tokenizer on ``texts``.

  Args:
    texts: the training documents (the train split only, so held-out text
      does not leak into the vocabulary).
    vocab_size: the largest vocabulary size, special token and the 256 byte
      symbols included. Training stops earlier when no pair occurs twice, so
      the result may be smaller on a tiny corpus.
    length: the number of documents, if known (only used for progress).

  Returns:
    A tokenizer with ``EOS_TOKEN`` as id 0 and ``encode_special_tokens`` on.
  """
  if vocab_size < 257 + 1:
    raise ValueError(
        f"vocab_size={vocab_size} is too small: byte-level BPE needs the 256"
        " byte symbols plus the end-of-document token, and at least one merge."
    )
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      min_frequency=2,
      special_tokens=[EOS_TOKEN],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
  tokenizer.encode_special_tokens = True
  return tokenizer


def load_tokenizer(source: str | os.PathLike[str], *,
                   encode_special_tokens: bool = True) -> tokenizers.Tokenizer:
  """Loads a tokenizer from a ``tokenizer.json``, a folder, or the Hub.

  Args:
    source: a ``tokenizer.json`` file (``Tokenizer.save``), a folder holding
      one, or a Hugging Face Hub name (``"t5-base"``).
    encode_special_tokens: encode a special token's text inside a document as
      ordinary text (True: tokenizers trained here, where only the pipeline
      inserts the EOS id; it is not part of the saved file). False keeps the
      ``tokenizers`` default, as checkpoints' chat markup needs.

  Raises:
    ValueError: ``source`` is neither a file, a folder with a
      ``tokenizer.json``, nor a loadable Hub tokenizer; or the file is not a
      readable ``tokenizer.json``.
  """
  path = pathlib.Path(source)
  if path.is_dir():
    path = path / "tokenizer.json"
  if path.is_file():
    try:
      tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # The Rust parser's errors.
      raise ValueError(f"{path}: not a readable tokenizer.json ({e}).") from None
  else:
    try:
      tokenizer = tokenizers.Tokenizer.from_pretrained(str(source))
    except Exception as e:  # Any hub/network failure.
      raise ValueError(
          f"source: {str(source)!r} is neither a tokenizer.json file (or a "
          f"folder with one) nor a loadable Hugging Face Hub tokenizer "
          f"({e}).") from e
  if encode_special_tokens:
    tokenizer.encode_special_tokens = True
  return tokenizer


def find_eos_id(tokenizer: Any) -> int:
  """The end-of-document id: ``eos_token_id``, or ``</s>`` / ``<|endoftext|>``.

  Args:
    tokenizer: a ``tokenizers.Tokenizer``, or an object with an
      ``eos_token_id`` (``apollo_lm.data.TextEncoder``).

  Raises:
    ValueError: the tokenizer has none of them.
  """
  eos_id = getattr(tokenizer, "eos_token_id", None)
  if eos_id is None and isinstance(tokenizer, tokenizers.Tokenizer):
    for token in ("</s>", EOS_TOKEN):
      eos_id = tokenizer.token_to_id(token)
      if eos_id is not None:
        break
  if eos_id is None:
    raise ValueError(
        f"tokenizer: {type(tokenizer).__name__} has no eos_token_id, '</s>'"
        f" or '{EOS_TOKEN}' token: pass eos_id"
    )
  return eos_id


def token_dtype(vocab_size: int) -> np.dtype:
  """The smallest unsigned dtype holding ids below ``vocab_size``."""
  return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def encode_documents(
    tokenizer: tokenizers.Tokenizer,
    texts: Sequence[str],
    eos_id: int,
    *,
    chunk_size: int = 64,
) -> np.ndarray:
  """Encodes documents into one stream, each followed by ``eos_id``.

  Uses the tokenizer's parallel batch encoding, ``chunk_size`` documents at a
  time to bound the memory held by intermediate encodings.

  Args:
    tokenizer: the tokenizer.
    texts: the documents, in stream order.
    eos_id: appended after every document.
    chunk_size: documents per ``encode_batch_fast`` call.

  Returns:
    A 1-D array of dtype ``token_dtype(tokenizer.get_vocab_size())``.
  """
  dtype = token_dtype(tokenizer.get_vocab_size())
  pieces = []
  eos = np.array([eos_id], dtype)
  for start in range(0, len(texts), chunk_size):
    chunk = list(texts[start:start + chunk_size])
    for encoding in tokenizer.encode_batch_fast(chunk, add_special_tokens=False):
      pieces.append(np.asarray(encoding.ids, dtype))
      pieces.append(eos)
  if not pieces:
    return np.zeros((0,), dtype)
  return np.concatenate(pieces)


# ---------------------------------------------------------------------------
# A Hugging Face checkpoint's tokenizer.


@dataclasses.dataclass(frozen=True)
class CheckpointTokenizer:
  """A checkpoint's ``tokenizer.json`` with its special tokens and template.

  Attributes:
    tokenizer: the ``tokenizers.Tokenizer`` (special tokens such as
      ``<|eot_id|>`` in text are parsed as special tokens, as in
      ``transformers``).
    eos_id: the end-of-sequence id (``eos_token`` of
      ``tokenizer_config.json``, else ``eos_token_id`` of
      ``generation_config.json`` / ``config.json``).
    bos_token: the beginning-of-sequence token text, or None (Qwen2 has none).
    eos_token: the end-of-sequence token text.
    chat_template: the Jinja chat template, or None.
  """

  tokenizer: tokenizers.Tokenizer
  eos_id: int
  bos_token: str | None = None
  eos_token: str | None = None
  chat_template: str | None = None

  @property
  def bos_id(self) -> int | None:
    """The id of ``bos_token``, or None."""
    if self.bos_token is None:
      return None
    return self.tokenizer.token_to_id(self.bos_token)

  @property
  def vocab_size(self) -> int:
    """The number of ids, added tokens included."""
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Ids of ``text``, without the post-processor's special tokens."""
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    """The text of ``ids``."""
    return self.tokenizer.decode(
        [int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def render_chat(self, messages: Sequence[dict[str, Any]], *,
                  add_generation_prompt: bool = False) -> str:
    """The checkpoint's chat template applied to ``messages`` (needs jinja2).

    Raises:
      ValueError: the checkpoint has no chat template.
    """
    if self.chat_template is None:
      raise ValueError("this checkpoint has no chat template (tokenizer_config"
                       ".json has no chat_template); use apollo_lm.chat_template.PLAIN_CHAT_FORMAT")
    return chat_template.render(
        self.chat_template, messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=self.bos_token or "", eos_token=self.eos_token or "")

  def chat_prompt_ids(self, messages: Sequence[dict[str, Any]]) -> list[int]:
    """Token ids of a conversation ending in the assistant's generation prompt.

    With a chat template, ``render_chat(..., add_generation_prompt=True)``;
    without, ``chat_template.PLAIN_CHAT_FORMAT`` ending in ``"Assistant: "``.
    """
    if self.chat_template is not None:
      return self.encode(self.render_chat(messages, add_generation_prompt=True))
    ids = self.bos_ids()
    for message in messages:
      ids += self.plain_message_ids(message)[0]
    return ids + self.encode(chat_template.PLAIN_CHAT_FORMAT["assistant"].format(content=""))

  def bos_ids(self) -> list[int]:
    """``[bos_id]``, or ``[]`` without a BOS token."""
    return [] if self.bos_id is None else [self.bos_id]

  def plain_message_ids(self, message: dict[str, Any]
                        ) -> tuple[list[int], list[bool]]:
    """Ids of ``message`` in the plain chat format and, per id, whether the
    loss counts it (an assistant message's content and its EOS)."""
    role, content = message["role"], message["content"]
    if role != "assistant":
      ids = self.encode(chat_template.PLAIN_CHAT_FORMAT[role].format(content=content))
      return ids, [False] * len(ids)
    header = self.encode(chat_template.PLAIN_CHAT_FORMAT["assistant"].format(content=""))
    body = self.encode(content) + [self.eos_id]
    return header + body, [False] * len(header) + [True] * len(body)


def _special_token(value: Any) -> str | None:
  """``tokenizer_config.json`` spells a token as a string or an AddedToken dict."""
  if isinstance(value, dict):
    return value.get("content")
  return value


def load_checkpoint_tokenizer(checkpoint: str | os.PathLike[str], *,
                              revision: str | None = None
                              ) -> CheckpointTokenizer:
  """Reads a Hugging Face checkpoint's tokenizer (a folder or a Hub id,
  resolved by :func:`apollo_lm.hub.resolve_checkpoint`).

  Reads ``tokenizer.json`` (required), ``tokenizer_config.json`` (special
  tokens and ``chat_template``; a list of named templates picks ``default``),
  ``chat_template.jinja`` (newer ``transformers``) and, for the EOS id when
  the config names none, ``generation_config.json`` / ``config.json``.

  Raises:
    FileNotFoundError: no such folder or Hub id, or no ``tokenizer.json``
      in it.
    ValueError: no EOS token can be found.
  """
  root = hub.resolve_checkpoint(checkpoint, revision=revision)
  path = root / "tokenizer.json"
  if not path.is_file():
    raise FileNotFoundError(
        f"{path}: no such file; the checkpoint folder must hold the tokenizer"
        " as tokenizer.json (the `tokenizers` format)")
  # Special tokens in text (``<|eot_id|>``) are parsed, as in transformers.
  tokenizer = load_tokenizer(path, encode_special_tokens=False)
  config = _read_json(root / "tokenizer_config.json")
  bos = _special_token(config.get("bos_token"))
  eos = _special_token(config.get("eos_token"))
  template = config.get("chat_template")
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template}
    template = named.get("default")
  if (root / "chat_template.jinja").is_file():
    template = (root / "chat_template.jinja").read_text(encoding="utf-8")
  eos_id = tokenizer.token_to_id(eos) if eos is not None else None
  if eos_id is None:
    for name in ("generation_config.json", "config.json"):
      value = _read_json(root / name).get("eos_token_id")
      if isinstance(value, list) and value:
        value = value[0]
      if isinstance(value, int):
        eos_id = value
        break
  if eos_id is None:
    try:
      eos_id = find_eos_id(tokenizer)
    except ValueError:
      raise ValueError(
          f"{root}: no EOS token: tokenizer_config.json has no eos_token and"
          " config.json / generation_config.json no eos_token_id") from None
  if eos is None:
    eos = tokenizer.id_to_token(eos_id)
  if bos is not None and tokenizer.token_to_id(bos) is None:
    bos = None
  return CheckpointTokenizer(tokenizer, eos_id, bos, eos, template)


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  if not path.is_file():
    return {}
  return json.loads(path.read_text(encoding="utf-8"))
