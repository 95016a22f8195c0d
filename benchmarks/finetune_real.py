"""Fine-tuning a real pretrained model: who wins, APOLLO, AdamW or LoRA?

SmolLM2-135M-Instruct (``make smollm2`` writes its float32 Hugging Face
folder) fine-tuned with ``apollo_lm.finetune`` on two tasks at once, each
measured on held-out items by exact match of the greedy answer:

* ``add3``: "What is 347 + 589?" -> "936", three-digit addition (generated
  pairs; the held-out pairs never occur in training);
* ``iso3``: "What is the ISO 3166-1 alpha-3 code of Norway?" -> "NOR", the
  249 countries of ISO 3166-1 as Debian's ``iso-codes`` package ships them
  (``/usr/share/iso-codes/json/iso_3166-1.json``); held-out countries never
  occur in training. Real data: a third of the codes are not the first three
  letters of the name, so the model must know them or learn the pattern.

Records are chat ``messages`` (user question, assistant answer) rendered by
the checkpoint's own chat template, loss on the answer only, the same packed
rows, steps and tokens for every method.

Methods (``METHODS``): AdamW, APOLLO (rank 32, scale 5), APOLLO-Mini,
GaLore (the fine-tuning defaults of ``apollo_lm.finetune``) and LoRA (rank
16, alpha 32, all seven projections, AdamW on the adapters), each at a
three-point learning-rate sweep around its documented default; the best lr
of each method (mean accuracy over the tasks) is re-run with a second seed.

Measured per run: accuracy before/after per task, held-out completion loss,
loss on held-out general text before/after (forgetting: English prose of the
Python standard library's module docstrings, which no task touches),
optimizer state bytes and wall time. Separately, in one process (``--speed``),
training-step time of every method interleaved in rounds, best per-round
median, as a ratio to AdamW's; and (``--memory``) the compiled step memory of
every method at this model's shape.

Resumable: every finished run is a JSON file in
``benchmarks/results/finetune_real_runs/`` (committed, so a later session
continues where this one stopped) and is skipped on a rerun; ``--shard i/n`` takes every n-th run, so two processes
(one per core, ``make bench-finetune-real``) share the plan.

Usage::

  python -m benchmarks.finetune_real --shard 0/2     # runs, half of them
  python -m benchmarks.finetune_real --speed --memory --report
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import pathlib
import pkgutil
import random
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

ISO_3166 = pathlib.Path("/usr/share/iso-codes/json/iso_3166-1.json")
DEFAULT_CHECKPOINT = ".cache/smollm2"
TASKS = ("add3", "iso3")


@dataclasses.dataclass(frozen=True)
class Method:
  """A fine-tuning method: optimizer, its lr sweep, extra finetune options."""

  optimizer: str
  learning_rates: tuple[float, ...]
  options: tuple[tuple[str, Any], ...] = ()

  def config_options(self) -> dict[str, Any]:
    return dict(self.options)


# Sweeps: a half-decade grid around each method's documented default
# (apollo_lm.optimizers.RECIPES: AdamW 2e-5, the APOLLO family and GaLore
# 3e-4; apollo_lm.lora: 1e-4, LLaMA-Factory's LoRA default).
METHODS = {
    "adamw": Method("adamw", (1e-5, 3e-5, 1e-4)),
    "apollo": Method("apollo", (1e-4, 3e-4, 1e-3)),
    "apollo_mini": Method("apollo_mini", (1e-4, 3e-4, 1e-3)),
    "galore": Method("galore", (1e-4, 3e-4, 1e-3)),
    "lora": Method("adamw", (3e-5, 1e-4, 3e-4),
                   (("lora_rank", 16), ("lora_alpha", 32.0))),
}


# ---------------------------------------------------------------------------
# Tasks.


def _countries() -> list[tuple[str, str]]:
  """(name, alpha-3) of every ISO 3166-1 country, Debian's iso-codes."""
  if not ISO_3166.is_file():
    raise SystemExit(f"{ISO_3166}: not found; install Debian's iso-codes "
                     "package (apt-get install iso-codes).")
  entries = json.loads(ISO_3166.read_text())["3166-1"]
  return sorted((e.get("common_name", e["name"]), e["alpha_3"])
                for e in entries)


def _record(question: str, answer: str) -> dict[str, Any]:
  return {"messages": [{"role": "user", "content": question},
                       {"role": "assistant", "content": answer}]}


def task_records(seed: int, *, add_train: int, add_eval: int,
                 iso_eval: int) -> dict[str, list[dict[str, Any]]]:
  """Train records (both tasks, shuffled) and held-out records per task.

  Deterministic from ``seed``; held-out questions never occur in training.
  """
  rng = random.Random(seed)
  pairs: set[tuple[int, int]] = set()
  while len(pairs) < add_train + add_eval:
    pairs.add((rng.randrange(100, 1000), rng.randrange(100, 1000)))
  pairs_list = sorted(pairs)
  rng.shuffle(pairs_list)
  add = [_record(f"What is {a} + {b}?", str(a + b)) for a, b in pairs_list]
  countries = _countries()
  rng.shuffle(countries)
  iso = [_record(f"What is the ISO 3166-1 alpha-3 code of {name}?", code)
         for name, code in countries]
  train = add[add_eval:] + iso[iso_eval:]
  rng.shuffle(train)
  return {"train": train, "add3": add[:add_eval], "iso3": iso[:iso_eval]}


def general_text(max_chars: int) -> str:
  """English prose: docstrings of the Python standard library's modules."""
  import importlib  # pylint: disable=g-import-not-at-top
  import warnings  # pylint: disable=g-import-not-at-top
  parts, total = [], 0
  names = sorted(m.name for m in pkgutil.iter_modules()
                 if m.name in sys.stdlib_module_names
                 and not m.name.startswith("_"))
  for name in names:
    if name in ("antigravity", "this", "idlelib", "turtledemo", "tkinter"):
      continue
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        doc = inspect.getdoc(importlib.import_module(name))
    except Exception:  # pylint: disable=broad-except
      continue
    if doc and len(doc) > 400:
      parts.append(doc)
      total += len(doc)
    if total >= max_chars:
      break
  return "\n\n".join(parts)[:max_chars]


def write_jsonl(path: pathlib.Path, records: Sequence[dict[str, Any]]) -> None:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))


# ---------------------------------------------------------------------------
# Evaluation of a Hugging Face folder.


def answers(checkpoint: str, records: Sequence[dict[str, Any]], *,
            max_new_tokens: int) -> list[str]:
  """Greedy answers to ``records``' user questions through the chat template,
  all prompts in one left-padded batch."""
  from apollo_lm import generate as generate_lib  # pylint: disable=g-import-not-at-top
  from apollo_lm import hf  # pylint: disable=g-import-not-at-top
  from apollo_lm import sft  # pylint: disable=g-import-not-at-top
  from apollo_lm import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  tok = tokenizer_lib.load_checkpoint_tokenizer(checkpoint)
  model, _ = hf.load_pretrained(checkpoint)
  eos = hf.eos_token_ids(checkpoint) or (tok.eos_id,)
  prompts = [tok.chat_prompt_ids(r["messages"][:-1]) for r in records]
  new = generate_lib.generate(model, prompts, max_new_tokens=max_new_tokens,
                              eos_ids=eos)
  out = []
  for row in new.tolist():
    row = next((row[:j] for j, t in enumerate(row) if t in eos), row)
    out.append(tok.decode(row, skip_special_tokens=True).strip())
  return out


def accuracy(checkpoint: str, records: Sequence[dict[str, Any]],
             max_new_tokens: int) -> dict[str, Any]:
  """Exact match (and answer-contained) rate of the greedy answers."""
  got = answers(checkpoint, records, max_new_tokens=max_new_tokens)
  want = [r["messages"][-1]["content"] for r in records]
  exact = sum(g == w for g, w in zip(got, want))
  contained = sum(w in g for g, w in zip(got, want))
  return {"exact": exact / len(want), "contained": contained / len(want),
          "items": len(want),
          "samples": [{"q": r["messages"][0]["content"], "want": w, "got": g}
                      for r, w, g in list(zip(records, want, got))[:4]]}


def mean_loss(checkpoint: str, rows: Any) -> float:
  """Mean next-token loss over the counted tokens of ``rows``."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from apollo_lm import hf  # pylint: disable=g-import-not-at-top
  from apollo_lm import sft  # pylint: disable=g-import-not-at-top
  from apollo_lm import steps  # pylint: disable=g-import-not-at-top

  model, _ = hf.load_pretrained(checkpoint, max_seq_len=rows.inputs.shape[1])
  graphdef, params = nnx.split(model, nnx.Param)
  eval_step = jax.jit(steps.make_eval_step(graphdef))
  total, count = 0.0, 0.0
  for batch in sft.eval_row_batches(rows, 8):
    s, c = eval_step(params, steps.Batch(*batch))
    total, count = total + float(s), count + float(c)
  return total / count


def evaluate(checkpoint: str, work: pathlib.Path, seq_len: int,
             tasks: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
  """Accuracy per task, held-out completion loss, general-text loss."""
  from apollo_lm import sft  # pylint: disable=g-import-not-at-top
  from apollo_lm import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  tok = tokenizer_lib.load_checkpoint_tokenizer(checkpoint)
  examples, _ = sft.read_records(work / "eval.jsonl", tok,
                               max_tokens=seq_len + 1)
  completion = mean_loss(checkpoint,
                         sft.pack_examples(examples, seq_len, seed=None))
  text = mean_loss(checkpoint, sft.text_rows([work / "general.txt"], tok,
                                             seq_len))
  result: dict[str, Any] = {"completion_loss": completion,
                            "general_text_loss": text, "tasks": {}}
  for task in TASKS:
    result["tasks"][task] = accuracy(checkpoint, tasks[task],
                                     max_new_tokens=8)
  result["mean_exact"] = sum(
      t["exact"] for t in result["tasks"].values()) / len(TASKS)
  return result


# ---------------------------------------------------------------------------
# Runs.


def run_name(method: str, lr: float, seed: int) -> str:
  return f"{method}_lr{lr:g}_s{seed}"


def sweep_plan(positions: Sequence[int] = (1, 0, 2),
               ) -> list[tuple[str, float, int]]:
  """(method, lr, seed): the middle lr of every method first, then the low
  and high ones, so a partial run covers every method."""
  plan = []
  for position in positions:
    for method, m in METHODS.items():
      plan.append((method, m.learning_rates[position], 0))
  return plan


def best_lr(results: dict[str, Any], method: str) -> float | None:
  """The swept lr of ``method`` with the highest mean exact match (seed 0)."""
  done = [(r["mean_exact"], -r["completion_loss"], r["lr"])
          for r in results.values()
          if r["method"] == method and r["seed"] == 0]
  if len(done) < len(METHODS[method].learning_rates):
    return None
  return max(done)[2]  # Ties: the lower held-out completion loss.


def finetune_run(args, work: pathlib.Path, method: str, lr: float,
                 seed: int, tasks) -> dict[str, Any]:
  """One fine-tuning run, evaluated; its JSON is written by the caller."""
  from apollo_lm import finetune as finetune_lib  # pylint: disable=g-import-not-at-top
  from benchmarks import common  # pylint: disable=g-import-not-at-top

  m = METHODS[method]
  out = work / "runs" / run_name(method, lr, seed)
  config = _run_config(args, work, method, lr, seed, out=str(out),
                       save_hf=str(out / "hf"))
  t0 = time.perf_counter()
  result = finetune_lib.finetune(config)
  train_s = time.perf_counter() - t0
  entry = evaluate(str(out / "hf"), work, args.seq_len, tasks)
  entry.update(method=method, optimizer=m.optimizer, lr=lr, seed=seed,
               hparams=result.hparams, state_bytes=result.state_bytes,
               tokens_per_s=result.tokens_per_s, train_wall_s=train_s,
               eval_wall_s=time.perf_counter() - t0 - train_s,
               train_loss_first_last=[result.losses[0], result.losses[-1]],
               metadata=common.metadata())
  if not args.keep_models:
    shutil.rmtree(out, ignore_errors=True)
  return entry


def load_results(runs_dir: pathlib.Path) -> dict[str, Any]:
  return {p.stem: json.loads(p.read_text())
          for p in sorted(runs_dir.glob("*.json"))
          if p.stem not in ("base", "speed", "memory")}


def prepare(args) -> tuple[pathlib.Path, dict[str, Any]]:
  """The work dir with train/eval files and general text; the tasks."""
  work = pathlib.Path(args.work_dir)
  work.mkdir(parents=True, exist_ok=True)
  args.runs_dir.mkdir(parents=True, exist_ok=True)
  tasks = task_records(args.data_seed, add_train=args.add_train,
                       add_eval=args.add_eval, iso_eval=args.iso_eval)
  write_jsonl(work / "train.jsonl", tasks["train"])
  write_jsonl(work / "eval.jsonl", tasks["add3"] + tasks["iso3"])
  (work / "general.txt").write_text(general_text(args.general_chars))
  return work, tasks


def run_all(args, work: pathlib.Path, tasks) -> None:
  """Base evaluation, the sweep, then second seeds of each best lr."""
  shard, shards = (int(x) for x in args.shard.split("/"))
  base_path = args.runs_dir / "base.json"
  if shard == 0 and not base_path.is_file():
    base = evaluate(args.checkpoint, work, args.seq_len, tasks)
    base_path.write_text(json.dumps(base, indent=1))
  for phase in ("sweep", "seeds"):
    if phase == "sweep":
      plan = sweep_plan(args.lr_positions)
    else:
      results = load_results(args.runs_dir)
      plan = [(method, lr, 1) for method in METHODS
              if (lr := best_lr(results, method)) is not None]
    for index, (method, lr, seed) in enumerate(plan):
      if index % shards != shard or method not in args.methods:
        continue
      path = args.runs_dir / f"{run_name(method, lr, seed)}.json"
      if path.is_file():
        continue
      entry = finetune_run(args, work, method, lr, seed, tasks)
      path.write_text(json.dumps(entry, indent=1))
      print(path.stem, f"exact {entry['mean_exact']:.3f}",
            f"loss {entry['completion_loss']:.3f}", flush=True)


def _run_config(args, work: pathlib.Path, method: str, lr: float, seed: int,
                **changes: Any):
  """The ``FinetuneConfig`` of one run of ``method``: the same data, steps,
  batch and schedule for every method."""
  from apollo_lm import finetune as finetune_lib  # pylint: disable=g-import-not-at-top

  m = METHODS[method]
  options = dict(
      checkpoint=args.checkpoint, data=(str(work / "train.jsonl"),),
      eval_data=(str(work / "eval.jsonl"),), optimizer=m.optimizer, lr=lr,
      steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
      warmup_steps=args.warmup_steps, seed=seed, eval_every=0,
      eval_batches=0, no_progress=True) | m.config_options() | changes
  return finetune_lib.FinetuneConfig(**options)


def speed(args, work: pathlib.Path) -> dict[str, Any]:
  """Training-step time of every method, interleaved in one process.

  Each method's step is built as ``apollo_lm.finetune`` builds it (its
  model, optimizer and data hooks), compiled and warmed up; then rounds of
  ``--speed-steps`` steps per method on the same batch, the order rotating
  (:func:`benchmarks.common.interleaved_medians`); the best per-round median
  counts.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from apollo_lm import finetune as finetune_lib  # pylint: disable=g-import-not-at-top
  from apollo_lm import geometry as geometry_lib  # pylint: disable=g-import-not-at-top
  from apollo_lm import steps  # pylint: disable=g-import-not-at-top
  from benchmarks import common  # pylint: disable=g-import-not-at-top

  runners = {}
  for method in args.methods:
    config = _run_config(args, work, method,
                         METHODS[method].learning_rates[1], 0)
    llama = finetune_lib.checkpoint_config(config)
    geometry = geometry_lib.make_geometry(config)
    with jax.set_mesh(geometry.mesh):
      data = finetune_lib.load_data(config, geometry)
      graphdef, params = finetune_lib.load_model(config, llama, geometry)
      tx, _, _ = finetune_lib.make_optimizer(config, llama)
      step = jax.jit(steps.make_train_step(
          graphdef, tx, grad_accum=geometry.grad_accum,
          trainable=config.trainable), donate_argnums=(0, 1))
      state = [params, jax.jit(tx.init)(params)]
      batch = geometry_lib.global_batch(data.train.batch(0), geometry)

    def run(round_index, step=step, state=state, batch=batch,
            mesh=geometry.mesh):
      del round_index

      def call():
        with jax.set_mesh(mesh):
          state[0], state[1], metrics = step(state[0], state[1], batch)
        return metrics["loss"]

      return common.time_calls(call, args.speed_steps)

    run(-1)  # Compiles and warms up.
    runners[method] = run
    print("speed: built", method, flush=True)
  timings = common.interleaved_medians(runners, args.speed_rounds)
  tokens = args.batch_size * args.seq_len
  best = {m: tokens / t["best_median_s"] for m, t in timings.items()}
  return {"timings": timings, "best_tokens_per_s": best,
          "steps_per_round": args.speed_steps, "rounds": args.speed_rounds,
          "cpu_cores": (len(os.sched_getaffinity(0))  # Linux: taskset's.
                        if hasattr(os, "sched_getaffinity") else os.cpu_count()),
          "vs_adamw": ({m: v / best["adamw"] for m, v in best.items()}
                       if "adamw" in best else {})}


# Compiled-memory variants of benchmarks.finetune_memory per method, measured
# in the runs' precision (float32 weights, moments and compute).
MEMORY_VARIANTS = {"adamw": "adamw_f32", "apollo": "apollo",
                   "apollo_mini": "apollo_mini", "galore": "galore",
                   "lora": "lora_bf16"}


def memory(args) -> dict[str, Any]:
  """Compiled step memory of every method at this checkpoint's shape, batch
  and sequence length, float32 as the runs (XLA:CPU)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from apollo_lm import hf  # pylint: disable=g-import-not-at-top
  from benchmarks import finetune_memory  # pylint: disable=g-import-not-at-top

  config = hf.config_from_hf(json.loads(
      pathlib.Path(args.checkpoint, "config.json").read_text()),
                             max_seq_len=args.seq_len, dtype=jnp.float32)
  out = {}
  for method in args.methods:
    variant = dataclasses.replace(
        finetune_memory.VARIANTS[MEMORY_VARIANTS[method]],
        param_dtype=jnp.float32)
    out[method] = {"variant": MEMORY_VARIANTS[method], **finetune_memory.measure(
        config, variant, batch=args.batch_size)}
    print("memory", method, out[method]["total_bytes"], flush=True)
  return out


def _pct(x: float) -> str:
  return f"{100 * x:.1f}"


def summary(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """Per method: its best swept lr and the runs (seeds) at that lr."""
  out = {}
  for method in METHODS:
    lr = best_lr(results, method)
    if lr is None:
      continue
    runs = [r for r in results.values()
            if r["method"] == method and r["lr"] == lr]
    out[method] = {"lr": lr, "runs": runs}
  return out


def _exact(runs: Sequence[dict[str, Any]], task: str) -> list[float]:
  """Exact match on ``task`` of each run (seed)."""
  return [r["tasks"][task]["exact"] for r in runs]


GOAL_POINTS = 0.02  # Accuracy within 2 points of AdamW's best ...
GOAL_SPEED = 0.95  # ... and tokens/s at least 0.95x AdamW's (issue 23).
GOAL_METHODS = ("apollo", "apollo_mini")


def goal_checks(best: dict[str, dict[str, Any]],
                speed_data: dict[str, Any] | None) -> list[dict[str, Any]]:
  """Issue 23's goals for APOLLO and APOLLO-Mini, each at its best lr.

  Per task, the method's exact match (mean over seeds) against AdamW's best
  lr (mean over seeds): met when it is at most ``max(2 points, the range of
  AdamW's seeds, the range of the method's seeds)`` below it; and against
  LoRA's best lr: met when at or above it. Speed: tokens/s at least
  ``GOAL_SPEED`` x AdamW's. A check whose runs are missing is left out.
  """
  def stats(method: str, task: str) -> tuple[float, float] | None:
    if method not in best:
      return None
    values = _exact(best[method]["runs"], task)
    return sum(values) / len(values), max(values) - min(values)

  checks = []
  for method in GOAL_METHODS:
    for task in TASKS:
      ours = stats(method, task)
      if ours is None:
        continue
      for ref in ("adamw", "lora"):
        theirs = stats(ref, task)
        if theirs is None:
          continue
        if ref == "adamw":
          margin = max(GOAL_POINTS, ours[1], theirs[1])
          met, goal = ours[0] >= theirs[0] - margin, (
              f"within {100 * margin:.1f} points of AdamW")
        else:
          met, goal = ours[0] >= theirs[0], "at or above LoRA"
        checks.append(dict(method=method, what=f"{task} exact %", goal=goal,
                           ours=100 * ours[0], theirs=100 * theirs[0],
                           met=met))
    if speed_data and method in speed_data["vs_adamw"]:
      ratio = speed_data["vs_adamw"][method]
      checks.append(dict(method=method, what="tokens/s x AdamW",
                         goal=f">= {GOAL_SPEED}", ours=ratio, theirs=1.0,
                         met=ratio >= GOAL_SPEED))
  return checks


def write_report(args, work: pathlib.Path) -> None:
  """benchmarks/results/finetune_real.{json,md} from the finished runs."""
  from benchmarks import common  # pylint: disable=g-import-not-at-top

  base = json.loads((args.runs_dir / "base.json").read_text())
  results = load_results(args.runs_dir)
  speed_data = _maybe_json(args.runs_dir / "speed.json")
  memory_data = _maybe_json(args.runs_dir / "memory.json")
  rows = [["base model", "-", "-"] + [
      _pct(base["tasks"][t]["exact"]) for t in TASKS] + [
          f"{base['completion_loss']:.3f}",
          f"{base['general_text_loss']:.3f}", "-", "-"]]
  for name, r in results.items():
    rows.append([r["method"], f"{r['lr']:g}", str(r["seed"])] + [
        _pct(r["tasks"][t]["exact"]) for t in TASKS] + [
            f"{r['completion_loss']:.3f}",
            f"{r['general_text_loss']:.3f} "
            f"({r['general_text_loss'] - base['general_text_loss']:+.3f})",
            f"{r['state_bytes'] / 2**20:.1f}",
            f"{r['train_wall_s'] / 60:.1f}"])
  cpu_s = sum(r["train_wall_s"] + r["eval_wall_s"] for r in results.values())
  parts = [
      f"SmolLM2-135M-Instruct (float32), {args.steps} steps of "
      f"{args.batch_size} packed rows of {args.seq_len} positions, "
      f"{args.warmup_steps} warm-up steps then linear decay; tasks "
      f"{', '.join(TASKS)} trained together; exact match of the greedy "
      f"answer on {base['tasks']['add3']['items']} / "
      f"{base['tasks']['iso3']['items']} held-out items. "
      f"{len(results)} runs, {cpu_s / 3600:.2f} hours of wall time (train +"
      " eval, summed over runs; one process per core).",
      common.markdown_table(
          ["method", "lr", "seed", "add3 exact %", "iso3 exact %",
           "held-out completion loss", "general text loss (vs base)",
           "opt. state MiB", "train min"], rows)]
  best = summary(results)
  if best:
    brows = []
    for method, b in best.items():
      exact = {t: _exact(b["runs"], t) for t in TASKS}
      mean = lambda key: sum(r[key] for r in b["runs"]) / len(b["runs"])
      brows.append([method, f"{b['lr']:g}", str(len(b["runs"]))] + [
          f"{_pct(sum(v) / len(v))} ({_pct(min(v))}-{_pct(max(v))})"
          for v in exact.values()] + [
              f"{mean('completion_loss'):.3f}",
              f"{mean('general_text_loss') - base['general_text_loss']:+.3f}"])
    parts += ["### Best learning rate of each method (mean over seeds, "
              "range)", common.markdown_table(
                  ["method", "best lr", "seeds"] +
                  [f"{t} exact %" for t in TASKS] +
                  ["held-out completion loss", "general text loss change"],
                  brows)]
  checks = goal_checks(best, speed_data)
  if checks:
    parts += ["### Goals (issue 23), each method at its best lr, means over "
              "seeds", common.markdown_table(
                  ["method", "measure", "goal", "method's", "reference's",
                   "met"],
                  [[c["method"], c["what"], c["goal"], f"{c['ours']:.2f}",
                    f"{c['theirs']:.2f}", "yes" if c["met"] else "**no**"]
                   for c in checks])]
  if speed_data:
    parts += ["### Training speed (tokens/s: best per-round median of "
              f"{speed_data['steps_per_round']} steps, {speed_data['rounds']}"
              " interleaved rounds, one process"
              + (f" on {speed_data['cpu_cores']} core(s)"
                 if "cpu_cores" in speed_data else "") + ")", common.markdown_table(
                  ["method", "tokens/s", "x AdamW"],
                  [[m, f"{v:.0f}", f"{speed_data['vs_adamw'].get(m, 0):.2f}"]
                   for m, v in speed_data["best_tokens_per_s"].items()])]
  if memory_data:
    parts += [f"### Compiled training step at this model's shape (XLA:CPU,"
              f" batch {args.batch_size} x {args.seq_len}, float32 as the"
              " runs; GB = 1e9 bytes)",
              common.markdown_table(
                  ["method", "weights", "optimizer state", "temporaries",
                   "total", "x AdamW"],
                  [[m, common.gb(v["params_bytes"]),
                    common.gb(v["opt_state_bytes"]),
                    common.gb(v["temp_bytes"]), common.gb(v["total_bytes"]),
                    f"{v['total_bytes'] / memory_data['adamw']['total_bytes']:.2f}"
                    if "adamw" in memory_data else "-"]
                   for m, v in memory_data.items()])]
  payload = {"setup": {k: v for k, v in vars(args).items()
                       if k not in ("out_dir", "runs_dir")},
             "base": base, "runs": results, "speed": speed_data,
             "memory": memory_data}
  common.write_results("finetune_real", payload, "\n\n".join(parts),
                       args.out_dir)


def _maybe_json(path: pathlib.Path) -> Any:
  return json.loads(path.read_text()) if path.is_file() else None


def main(argv: Sequence[str] | None = None) -> None:
  from benchmarks import common  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
  parser.add_argument("--work-dir", default=".cache/finetune_real")
  parser.add_argument("--steps", type=int, default=80)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=64)
  parser.add_argument("--warmup-steps", type=int, default=8)
  parser.add_argument("--add-train", type=int, default=2000)
  parser.add_argument("--add-eval", type=int, default=100)
  parser.add_argument("--iso-eval", type=int, default=80)
  parser.add_argument("--general-chars", type=int, default=16000)
  parser.add_argument("--data-seed", type=int, default=0)
  parser.add_argument("--methods", nargs="+", default=list(METHODS),
                      choices=list(METHODS))
  parser.add_argument("--shard", default="0/1", help="i/n: every n-th run")
  parser.add_argument("--lr-positions", type=int, nargs="+", default=[1, 0, 2],
                      choices=[0, 1, 2], help="which points of each sweep, "
                      "in order (0: lowest lr)")
  parser.add_argument("--runs", action="store_true", default=None,
                      help="fine-tuning runs (default when nothing else is "
                      "asked)")
  parser.add_argument("--speed", action="store_true")
  parser.add_argument("--speed-rounds", type=int, default=3)
  parser.add_argument("--speed-steps", type=int, default=5)
  parser.add_argument("--memory", action="store_true")
  parser.add_argument("--report", action="store_true")
  parser.add_argument("--keep-models", action="store_true")
  parser.add_argument("--out-dir", default=str(common.RESULTS_DIR))
  args = parser.parse_args(argv)
  args.runs_dir = pathlib.Path(args.out_dir, "finetune_real_runs")
  if not pathlib.Path(args.checkpoint, "config.json").is_file():
    raise SystemExit(f"--checkpoint {args.checkpoint}: no Hugging Face folder;"
                     " run `make smollm2` first.")
  work, tasks = prepare(args)
  if args.runs or not (args.speed or args.memory or args.report):
    run_all(args, work, tasks)
  if args.speed:
    (args.runs_dir / "speed.json").write_text(
        json.dumps(speed(args, work), indent=1))
  if args.memory:
    (args.runs_dir / "memory.json").write_text(
        json.dumps(memory(args), indent=1))
  if args.report:
    write_report(args, work)


if __name__ == "__main__":
  main()
