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
"""Where a checkpoint lives: a local folder, or a Hugging Face Hub model id.

Every reader of checkpoints (:func:`apollo_lm.hf.load_pretrained`,
:func:`apollo_lm.tokenizer.load_checkpoint_tokenizer`, the ``--checkpoint``
option of ``apollo_lm.finetune`` and ``apollo_lm.generate``) goes through
:func:`resolve_checkpoint`:

* an existing folder is used as it is (it wins over a Hub id of the same
  spelling);
* otherwise an ``org/name`` id is fetched with
  ``huggingface_hub.snapshot_download`` (only :data:`ALLOW_PATTERNS`: weights,
  configs, tokenizer and chat template; no PyTorch ``.bin``, no GGUF), into
  the Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, as
  ``transformers`` uses it). With ``HF_HUB_OFFLINE=1`` (read at each call)
  nothing is downloaded: a model already in the cache loads with no network.

Errors are one line naming the checkpoint: a GGUF file (with how to convert
it), an id that is neither cached nor reachable (with the cache path).

Example::

  folder = resolve_checkpoint("Qwen/Qwen3-0.6B")
  folder = resolve_checkpoint("Qwen/Qwen3-0.6B", revision="main")
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Final

PathLike = str | os.PathLike

ALLOW_PATTERNS: Final[tuple[str, ...]] = (
    "*.safetensors", "model.safetensors.index.json", "config.json",
    "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "chat_template.json")
"""The files fetched for a Hub id (``snapshot_download(allow_patterns=)``)."""

GGUF_MAGIC: Final[bytes] = b"GGUF"

# `org/name` as the Hub spells it; a path such as ./x/y or ../x is not one.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")

_TRUE = ("1", "on", "yes", "true")


def is_repo_id(name: PathLike) -> bool:
  """Whether ``name`` is spelled as a Hub model id ``org/name``."""
  name = os.fspath(name)
  return bool(_REPO_ID.match(name)) and ".." not in name and "--" not in name


def hub_cache_dir() -> pathlib.Path:
  """The Hugging Face hub cache as the environment names it now.

  ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
  ``$XDG_CACHE_HOME/huggingface/hub`` or ``~/.cache/huggingface/hub``: the
  order of ``huggingface_hub.constants``, but read at call time, so a
  variable set after import counts.
  """
  env = os.environ
  if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
    cache = env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]
  else:
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    cache = os.path.join(home, "hub")
  return pathlib.Path(os.path.expandvars(os.path.expanduser(cache)))


def is_offline() -> bool:
  """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value."""
  value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get(
      "TRANSFORMERS_OFFLINE") or ""
  return value.strip().lower() in _TRUE


def is_gguf(path: PathLike) -> bool:
  """``path`` is a file in llama.cpp's GGUF format (by its magic bytes)."""
  path = pathlib.Path(path)
  if not path.is_file():
    return False
  with open(path, "rb") as f:
    return f.read(4) == GGUF_MAGIC or path.suffix.lower() == ".gguf"


def gguf_message(path: PathLike) -> str:
  """Why a GGUF file is refused, and how to convert it."""
  return (f"{path}: a GGUF file (llama.cpp format); apollo_lm reads "
          f"safetensors folders: convert it with transformers, "
          f"AutoModelForCausalLM.from_pretrained(folder, gguf_file="
          f"{pathlib.Path(path).name!r}).save_pretrained(out) (and the "
          f"tokenizer the same way), then pass --checkpoint out.")


def resolve_checkpoint(checkpoint: PathLike, *, revision: str | None = None,
                       ) -> pathlib.Path:
  """The local folder of ``checkpoint``: itself, or a Hub id's snapshot.

  Args:
    checkpoint: a folder, or a Hub model id ``org/name``.
    revision: branch, tag or commit of a Hub id (default ``main``); unused
      for a folder.

  Returns:
    The folder (for an id: ``<cache>/models--org--name/snapshots/<commit>``).

  Raises:
    FileNotFoundError: ``checkpoint`` is neither a folder nor a Hub id that
      is cached or can be downloaded (the message names the id and the
      cache); or it is a file (a GGUF file is named as such).
  """
  path = pathlib.Path(checkpoint)
  if path.is_dir():
    return path
  if path.is_file():
    if is_gguf(path):
      raise FileNotFoundError(gguf_message(path))
    raise FileNotFoundError(
        f"{path}: a file; expected a Hugging Face model folder (config.json, "
        f"*.safetensors, tokenizer.json) or a Hub id org/name.")
  if not is_repo_id(checkpoint):
    raise FileNotFoundError(
        f"{checkpoint}: no such folder (and not a Hugging Face Hub id "
        f"org/name).")
  return _snapshot(os.fspath(checkpoint), revision)


def _snapshot(repo_id: str, revision: str | None) -> pathlib.Path:
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise FileNotFoundError(
        f"{repo_id}: no such folder; loading it as a Hub id needs "
        f"huggingface_hub: pip install \"apollo-optax[lm]\"") from None
  cache = hub_cache_dir()
  offline = is_offline()
  try:
    folder = huggingface_hub.snapshot_download(
        repo_id, revision=revision, cache_dir=cache,
        allow_patterns=list(ALLOW_PATTERNS), local_files_only=offline)
  except Exception as e:  # network, auth, missing repo or revision, cache
    at = f" at revision {revision!r}" if revision else ""
    if offline:
      why = f"not in the Hugging Face cache{at} (HF_HUB_OFFLINE is set)"
    else:
      reason = (str(e).strip().splitlines() or [""])[0]
      why = (f"neither in the Hugging Face cache{at} nor downloadable "
             f"({type(e).__name__}: {reason})")
    raise FileNotFoundError(
        f"{repo_id}: no such folder, and {why}; cache {cache}") from None
  return pathlib.Path(folder)
