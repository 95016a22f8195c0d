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
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

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


def load_tokenizer(path: str) -> tokenizers.Tokenizer:
  """Loads a tokenizer saved with ``Tokenizer.save`` (a ``tokenizer.json``)."""
  tokenizer = tokenizers.Tokenizer.from_file(str(path))
  # Not part of the serialised file: a literal EOS string in a document must
  # stay text, only the pipeline inserts the EOS id.
  tokenizer.encode_special_tokens = True
  return tokenizer


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
