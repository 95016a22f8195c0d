"""Evidence that fine-tuning learns: held-out completion loss before/after.

On a CPU, in minutes:

1. **Base model.** ``tiny`` LLaMA pre-trained by the job itself
   (``python -m apollo_lm.train``, AdamW, on the Python standard library's
   source), exported as a Hugging Face folder (``apollo_lm.hf``) with the
   job's ``tokenizer.json``. Cached in ``--work-dir``.
2. **Instruction set.** Generated here, deterministic from ``--seed``: four
   small string and arithmetic tasks (:func:`instruction_records`) as
   ``{"prompt", "completion"}`` JSON lines; a separate held-out file whose
   inputs never occur in the training file.
3. **Fine-tuning** with ``python -m apollo_lm.finetune`` (the same step and
   loop as pre-training) for AdamW (a few learning rates), APOLLO and
   APOLLO-Mini at the fine-tuning defaults, same steps, batch and data.
4. **Measured:** loss on the held-out completion tokens before and after,
   and greedy completions of a few held-out prompts.

Usage::

  python -m benchmarks.finetune_quality            # make bench-finetune
"""

from __future__ import annotations

import builtins
import json
import keyword
import random
from typing import Any

# Words the stdlib-trained tokenizer knows well: Python keywords and builtins.
WORDS = sorted({w for w in keyword.kwlist + dir(builtins)
                if w.isalpha() and w.islower() and 2 <= len(w) <= 8})

TASKS = ("reverse", "copy", "add", "upper")


def _task(kind: str, rng: random.Random) -> tuple[str, str, str]:
  """(task, input, output) of one example."""
  if kind == "add":
    a, b = rng.randrange(100), rng.randrange(100)
    return kind, f"{a} + {b}", str(a + b)
  words = rng.sample(WORDS, rng.randint(2, 5))
  if kind == "reverse":
    return kind, " ".join(words), " ".join(reversed(words))
  if kind == "copy":
    return kind, " ".join(words), " ".join(words)
  return kind, " ".join(words), " ".join(words).upper()


def prompt_of(task: str, text: str) -> str:
  """The prompt format of the instruction set; the completion is a space and
  the output (byte-level BPE keeps the space with the next word)."""
  return f"# task: {task}\n# input: {text}\n# output:"


def instruction_records(count: int, seed: int, *,
                        exclude: set[str] | None = None) -> list[dict[str, Any]]:
  """``count`` distinct prompt/completion records, tasks in turn.

  Args:
    count: number of records.
    seed: seeds ``random.Random``; the same seed gives the same records.
    exclude: prompts that must not occur (the other split's).
  """
  rng = random.Random(seed)
  exclude = set() if exclude is None else exclude
  seen: set[str] = set()
  records = []
  while len(records) < count:
    task, text, output = _task(TASKS[len(records) % len(TASKS)], rng)
    prompt = prompt_of(task, text)
    if prompt in seen or prompt in exclude:
      continue
    seen.add(prompt)
    records.append({"prompt": prompt, "completion": " " + output})
  return records


def export_base(checkpoint_dir: str, tokenizer_json: str, out_dir: str, *,
                seq_len: int, vocab_size: int) -> None:
  """Writes the job's ``tiny`` checkpoint as a Hugging Face folder.

  The parameters of the last step in ``checkpoint_dir`` (an AdamW run of
  ``apollo_lm.train``), ``config.json`` + ``model.safetensors``
  (``apollo_lm.hf.save_pretrained``), the job's ``tokenizer.json`` and a
  ``tokenizer_config.json`` naming its EOS token (no BOS, no chat template:
  the plain prompt/completion format of ``apollo_lm.sft``).
  """
  import json
  import pathlib
  import shutil

  from flax import nnx
  import jax

  from apollo_lm import checkpoint as checkpoint_lib
  from apollo_lm import hf
  from apollo_lm import model as model_lib
  from apollo_lm import optimizers
  from apollo_lm import tokenizer as tokenizer_lib
  from apollo_lm.configs import get_config

  config = get_config("tiny", vocab_size=vocab_size, max_seq_len=seq_len)
  model = model_lib.Llama(config, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tx = optimizers.make_optimizer("adamw", total_steps=2, warmup_steps=1,
                                 config=config)
  opt_state = jax.eval_shape(tx.init, params)
  checkpointer = checkpoint_lib.Checkpointer(checkpoint_dir)
  restored, _, _ = checkpointer.restore(None, params, opt_state)
  checkpointer.close()
  nnx.update(model, restored)
  out = pathlib.Path(out_dir)
  hf.save_pretrained(model, config, out)
  shutil.copy(tokenizer_json, out / "tokenizer.json")
  (out / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": tokenizer_lib.EOS_TOKEN, "bos_token": None}, indent=1))


def heldout_loss(checkpoint: str, eval_path: str, seq_len: int) -> dict[str, float]:
  """Mean loss over every held-out completion token of ``eval_path``.

  The same evaluation step as the loop (``apollo_lm.steps.make_eval_step``:
  loss sum and counted tokens per batch of packed rows), summed over all
  held-out rows.
  """
  from flax import nnx
  import jax
  import numpy as np

  from apollo_lm import hf
  from apollo_lm import sft
  from apollo_lm import steps
  from apollo_lm import tokenizer as tokenizer_lib

  tok = tokenizer_lib.load_checkpoint_tokenizer(checkpoint)
  examples, _ = sft.read_records(eval_path, tok, max_tokens=seq_len + 1)
  rows = sft.pack_examples(examples, seq_len, seed=None)
  model, _ = hf.load_pretrained(checkpoint, max_seq_len=seq_len)
  graphdef, params = nnx.split(model, nnx.Param)
  eval_step = jax.jit(steps.make_eval_step(graphdef))
  total, count = 0.0, 0.0
  for batch in sft.eval_row_batches(rows, 16):
    s, c = eval_step(params, steps.Batch(*batch))
    total, count = total + float(s), count + float(c)
  return {"loss": total / count, "tokens": count,
          "examples": len(examples)}


def samples(checkpoint: str, records: list[dict[str, Any]],
            max_new_tokens: int = 12) -> list[dict[str, str]]:
  """Greedy completions (``apollo_lm.generate``) of ``records``' prompts."""
  import jax.numpy as jnp

  from apollo_lm import generate as generate_lib
  from apollo_lm import hf
  from apollo_lm import tokenizer as tokenizer_lib

  tok = tokenizer_lib.load_checkpoint_tokenizer(checkpoint)
  model, _ = hf.load_pretrained(checkpoint)
  out = []
  for record in records:
    prompt = tok.encode(record["prompt"])
    new = generate_lib.generate(model, jnp.asarray([prompt]),
                                max_new_tokens=max_new_tokens,
                                eos_ids=(tok.eos_id,))
    ids = [int(i) for i in new[0] if int(i) != tok.eos_id]
    out.append({"prompt": record["prompt"], "expected": record["completion"],
                "generated": tok.decode(ids)})
  return out


RUNS = {  # name: (optimizer, lr or None for the fine-tuning default)
    "adamw": ("adamw", None),
    "adamw_lr1e-4": ("adamw", 1e-4),
    "adamw_lr1e-3": ("adamw", 1e-3),
    "apollo": ("apollo", None),
    "apollo_mini": ("apollo_mini", None),
}


def _base(work, args) -> str:
  """The base model's Hugging Face folder, pre-training it if needed."""
  import glob
  import pathlib

  from apollo_lm import data as data_lib
  from apollo_lm import train as train_lib

  folder = pathlib.Path(work, "base_hf")
  if (folder / "config.json").is_file():
    return str(folder)
  ckpt = pathlib.Path(work, "base_ckpt")
  result = train_lib.train(dict(
      config="tiny", optimizer="adamw", steps=args.base_steps, batch_size=16,
      seq_len=args.seq_len, eval_every=100, checkpoint_dir=str(ckpt),
      no_progress=True))
  corpus = data_lib.load_corpus(vocab_size=8192)
  export_base(str(ckpt), str(corpus.cache_dir / "tokenizer.json"),
              str(folder), seq_len=args.seq_len, vocab_size=corpus.vocab_size)
  pathlib.Path(work, "base_result.json").write_text(
      json.dumps(result.summary(), indent=1))
  return str(folder)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  import argparse
  import pathlib

  from apollo_lm import finetune as finetune_lib
  from benchmarks import common

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--work-dir", default=".cache/finetune_quality")
  parser.add_argument("--base-steps", type=int, default=400)
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=128)
  parser.add_argument("--train-records", type=int, default=4000)
  parser.add_argument("--eval-records", type=int, default=200)
  parser.add_argument("--runs", nargs="+", default=list(RUNS),
                      choices=list(RUNS))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out-dir", default=str(common.RESULTS_DIR))
  parser.add_argument("--out-name", default="finetune_quality")
  args = parser.parse_args(argv)
  work = pathlib.Path(args.work_dir)
  work.mkdir(parents=True, exist_ok=True)
  base = _base(work, args)
  held = instruction_records(args.eval_records, args.seed + 1)
  train = instruction_records(args.train_records, args.seed,
                              exclude={r["prompt"] for r in held})
  for name, records in (("train", train), ("eval", held)):
    (work / f"{name}.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records))
  eval_path = str(work / "eval.jsonl")
  shown = held[:len(TASKS) * 2]
  results: dict[str, Any] = {
      "setup": vars(args), "base": heldout_loss(base, eval_path, args.seq_len),
      "runs": {}}
  results["base"]["samples"] = samples(base, shown)
  for name in args.runs:
    optimizer, lr = RUNS[name]
    out = work / "runs" / name
    config = finetune_lib.FinetuneConfig(
        checkpoint=base, data=(str(work / "train.jsonl"),),
        eval_data=(eval_path,), optimizer=optimizer, lr=lr,
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
        seed=args.seed, eval_every=0, eval_batches=0, no_progress=True,
        out=str(out), save_hf=str(out / "hf"))
    result = finetune_lib.finetune(config)
    entry = heldout_loss(str(out / "hf"), eval_path, args.seq_len)
    entry.update(optimizer=optimizer, hparams=result.hparams,
                 state_bytes=result.state_bytes,
                 tokens_per_s=result.tokens_per_s,
                 wall_time_s=result.wall_time_s,
                 train_loss_first_last=[result.losses[0], result.losses[-1]],
                 samples=samples(str(out / "hf"), shown))
    results["runs"][name] = entry
    print(name, entry["loss"], flush=True)
  common.write_results(args.out_name, results, report(results), args.out_dir)
  return results


def report(results: dict[str, Any]) -> str:
  from benchmarks import common

  s = results["setup"]
  base = results["base"]["loss"]
  rows = [["base (no fine-tuning)", "-", "-", f"{base:.3f}", "-"]]
  for name, r in results["runs"].items():
    rows.append([name, r["optimizer"], f"{r['hparams']['learning_rate']:g}",
                 f"{r['loss']:.3f}", f"{r['loss'] - base:+.3f}"])
  text = [
      f"Base: `tiny` pre-trained by `apollo_lm.train` (AdamW, {s['base_steps']}"
      f" steps of 16 x {s['seq_len']} tokens of the Python standard library)."
      f" Fine-tuning: {s['train_records']} generated instruction records"
      f" (tasks {', '.join(TASKS)}), {s['steps']} steps of {s['batch_size']}"
      f" packed rows of {s['seq_len']} positions, defaults of"
      " `apollo_lm.finetune` (linear schedule); loss on the"
      f" {results['base']['tokens']:.0f} completion tokens of"
      f" {results['base']['examples']} held-out records whose inputs are not"
      " in the training set.",
      common.markdown_table(
          ["run", "optimizer", "peak lr", "held-out completion loss",
           "change"], rows),
      "### Greedy samples (held-out prompts)"]
  for name, entry in [("base", results["base"])] + list(results["runs"].items()):
    lines = [f"**{name}**"]
    for sample in entry["samples"]:
      prompt = sample["prompt"].replace("\n", " | ")
      lines.append(f"- `{prompt}` expected `{sample['expected']}` got"
                   f" `{sample['generated']!r}`")
    text.append("\n".join(lines))
  return "\n\n".join(text)


if __name__ == "__main__":
  main()
