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
"""Text generation with a KV cache: greedy, temperature and top-p sampling.

:func:`generate` runs the prompt through :meth:`Llama.decode` once (prefill)
and then one token per step, all inside one ``jax.jit`` (a ``lax.scan`` over
the new tokens), reading keys and values of earlier positions from a
:class:`apollo_lm.model.KVCache` instead of recomputing them.

Sampling: with ``temperature == 0`` the most likely token (greedy); otherwise
from ``softmax(logits / temperature)`` restricted to the smallest set of
most likely tokens whose probability reaches ``top_p`` (nucleus sampling).

Command line, on a Hugging Face folder (e.g. written by ``--save-hf``) or a
Hub model id such as ``Qwen/Qwen3-0.6B``::

  python -m apollo_lm.generate --checkpoint DIR|ID --prompt "Once upon a time" \
      [--chat] [--max-new-tokens 64] [--temperature 0.7 --top-p 0.9 --seed 0]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from apollo_lm import model as model_lib


def sample_token(logits: jax.Array, key: jax.Array | None, *,
                 temperature: float = 0.0, top_p: float = 1.0) -> jax.Array:
  """Picks one token per row of ``logits[B, V]``.

  Args:
    logits: Next-token logits.
    key: PRNG key (unused when greedy).
    temperature: 0 for greedy (argmax), else the softmax temperature.
    top_p: Keep the most likely tokens up to this cumulative probability
      (the most likely token is always kept); 1 keeps all.

  Returns:
    ``int32[B]`` token ids.
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, -1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Probability of the tokens strictly before each one in sorted order.
    before = jnp.cumsum(probs, axis=-1) - probs
    sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(key, sorted_logits, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], -1)[:, 0].astype(
        jnp.int32)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _check(max_new_tokens: int, temperature: float, top_p: float,
           key: jax.Array | None):
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"generate: `max_new_tokens` must be a positive int, got "
                     f"{max_new_tokens!r}.")
  if not temperature >= 0:
    raise ValueError(f"generate: `temperature` must be >= 0 (0 = greedy), got "
                     f"{temperature!r}.")
  if not 0 < top_p <= 1:
    raise ValueError(f"generate: `top_p` must be in (0, 1], got {top_p!r}.")
  if temperature > 0 and key is None:
    raise ValueError("generate: sampling (`temperature` > 0) needs a `key`.")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0,
             ) -> tuple[np.ndarray, np.ndarray]:
  """Prompts of different lengths as one batch, padded on the left.

  Returns:
    ``(int32[B, T] tokens, int32[B] pad)``: ``T`` is the longest prompt and
    row ``b`` starts with ``pad[b]`` copies of ``pad_id``.

  Raises:
    ValueError: no prompts, or an empty one.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("left_pad: `prompts` must be a non-empty list of "
                     "non-empty token id sequences.")
  length = max(len(p) for p in prompts)
  pad = np.asarray([length - len(p) for p in prompts], np.int32)
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  for row, p in enumerate(prompts):
    tokens[row, pad[row]:] = p
  return tokens, pad


def generate(model: model_lib.Llama,
             prompt: jax.Array | Sequence[Sequence[int]], *,
             max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, key: jax.Array | None = None,
             eos_ids: Sequence[int] = (), pad_id: int | None = None
             ) -> jax.Array:
  """Continues every row of ``prompt`` by ``max_new_tokens`` tokens.

  Prompts of different lengths are decoded together: they are padded on the
  left (:func:`left_pad`), padding is masked out of attention and each row's
  positions start at its first token, so every row gets the tokens it would
  get alone.

  Args:
    model: The language model.
    prompt: ``int[B, T]`` prompts of equal length, or a list of ``B`` token
      id lists of any lengths.
    max_new_tokens: How many tokens to generate; ``T + max_new_tokens`` must
      not exceed ``model.config.max_seq_len``.
    temperature: 0 for greedy decoding, else the sampling temperature.
    top_p: Nucleus sampling threshold (with ``temperature > 0``).
    key: PRNG key for sampling.
    eos_ids: Ids that end a row; what follows in that row is ``pad_id``.
    pad_id: Filler after the end; default the first of ``eos_ids`` (or 0).

  Returns:
    ``int32[B, max_new_tokens]``, the new tokens only.

  Example::

    model, config = hf.load_pretrained("ckpt")
    new = generate(model, jnp.array([[1, 15043, 29892]]), max_new_tokens=20)
    new = generate(model, [[1, 15043], [1, 910, 338, 263]], max_new_tokens=20)
  """
  _check(max_new_tokens, temperature, top_p, key)
  pad = None
  if isinstance(prompt, (list, tuple)):
    prompt, pad = left_pad(prompt, 0 if pad_id is None else pad_id)
    pad = jnp.asarray(pad) if pad.any() else None
  prompt = jnp.asarray(prompt)
  if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f"generate: `prompt` must be an integer array [batch, "
                     f"seq_len], got {prompt.dtype}{list(prompt.shape)}.")
  total = prompt.shape[1] + max_new_tokens
  if total > model.config.max_seq_len:
    raise ValueError(
        f"generate: prompt length {prompt.shape[1]} + `max_new_tokens` "
        f"{max_new_tokens} = {total} exceeds `max_seq_len`="
        f"{model.config.max_seq_len}.")
  if pad_id is None:
    pad_id = eos_ids[0] if eos_ids else 0
  key = jax.random.key(0) if key is None else key
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, prompt.astype(jnp.int32), pad, key,
                   max_new_tokens, float(temperature), float(top_p),
                   tuple(int(i) for i in eos_ids), int(pad_id))


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8, 9))
def _generate(graphdef, state, prompt, pad, key, max_new_tokens, temperature,
              top_p, eos_ids, pad_id):
  model = nnx.merge(graphdef, state)
  batch, length = prompt.shape
  cache = model.init_cache(batch, length + max_new_tokens, pad=pad)
  logits, cache = model.decode(prompt, cache)
  eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

  def pick(logits, key, done):
    token = sample_token(logits, key, temperature=temperature, top_p=top_p)
    token = jnp.where(done, pad_id, token)
    return token, done | jnp.isin(token, eos)

  keys = jax.random.split(key, max_new_tokens)
  token, done = pick(logits[:, -1], keys[0], jnp.zeros((batch,), bool))

  def step(carry, key):
    token, done, cache, state = carry
    # The parameters ride in the carry and the model is merged inside the
    # scan: nnx modules may not cross trace levels.
    logits, cache = nnx.merge(graphdef, state).decode(token[:, None], cache)
    new, done = pick(logits[:, -1], key, done)
    return (new, done, cache, state), token

  (last, _, _, _), tokens = jax.lax.scan(
      step, (token, done, cache, state), keys[1:])
  return jnp.concatenate([tokens.T, last[:, None]], axis=1)


def main(argv: Sequence[str] | None = None) -> None:
  """Command line: generate from a Hugging Face checkpoint (folder or id);
  bad options and checkpoints exit with status 2 and one line."""
  # Imported here: the library functions above need none of them.
  from apollo_lm import cli  # pylint: disable=g-import-not-at-top
  from apollo_lm import hf  # pylint: disable=g-import-not-at-top
  from apollo_lm import hub  # pylint: disable=g-import-not-at-top
  from apollo_lm import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(
      prog="python -m apollo_lm.generate",
      description="Generate text from a Hugging Face checkpoint (a folder "
      "with config.json, safetensors and tokenizer.json, or a Hub model id) "
      "with a KV cache.")
  parser.add_argument("--checkpoint", required=True,
                      help="Hugging Face folder (e.g. from --save-hf) or Hub "
                      "model id org/name (from the Hugging Face cache; "
                      "downloaded unless HF_HUB_OFFLINE=1)")
  parser.add_argument("--revision", default=None,
                      help="branch, tag or commit of a Hub --checkpoint")
  parser.add_argument("--prompt", action="append", required=True,
                      help="prompt text; repeat for several prompts")
  parser.add_argument("--chat", action="store_true",
                      help="wrap each prompt as a user message in the "
                      "checkpoint's chat template (or the plain format)")
  parser.add_argument("--max-new-tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=0.0,
                      help="0 = greedy (default)")
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                      default="float32",
                      help="parameter and compute dtype")
  args = parser.parse_args(argv)
  try:
    _check(args.max_new_tokens, args.temperature, args.top_p, 0)
  except ValueError as e:
    cli.fail(parser.prog, str(e).replace(
        "generate: `max_new_tokens`", "--max-new-tokens").replace(
            "`temperature`", "--temperature").replace("`top_p`", "--top-p"))
  try:
    folder = hub.resolve_checkpoint(args.checkpoint, revision=args.revision)
    tok = tokenizer_lib.load_checkpoint_tokenizer(folder)
    eos_ids = hf.eos_token_ids(folder) or (tok.eos_id,)
    model, _ = hf.load_pretrained(folder, dtype=jnp.dtype(args.dtype))
  except (OSError, ValueError) as e:
    cli.fail(parser.prog, f"--checkpoint: {e}")
  prompts = []
  for text in args.prompt:
    if args.chat:
      prompts.append(tok.chat_prompt_ids([{"role": "user", "content": text}]))
    else:
      prompts.append(([] if tok.bos_id is None else [tok.bos_id])
                     + tok.encode(text))
  new = generate(model, prompts, key=jax.random.key(args.seed),
                 max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_p=args.top_p,
                 eos_ids=eos_ids)
  for i, (text, row) in enumerate(zip(args.prompt, np.asarray(new).tolist())):
    # Cut at the first end-of-sequence token (it is not printed).
    row = next((row[:j] for j, t in enumerate(row) if t in eos_ids), row)
    print(f"### prompt {i + 1}: {text}\n{tok.decode(row, skip_special_tokens=True)}\n")


if __name__ == "__main__":
  main()
