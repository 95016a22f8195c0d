"""Quality: held-out perplexity after the same token budget (issue 6, section 5).

Every run is ``apollo_lm.train.train`` on the embedded corpus (the Python
standard library, byte-level BPE, vocabulary 8192) with the paper's recipe
(warm-up over 10% of the steps, cosine to 10% of the peak lr, no weight
decay), the same batches for every optimizer of a seed, and the held-out loss
on the same held-out batches at the end. The seed sets the model init, the data
order and APOLLO's projections.

Main table, per config (``tiny`` and ``20m`` by default), every seed:

* AdamW at each lr of ``--adamw-lrs`` (default 1e-3, the paper's baseline,
  3e-3 and 1e-2); the table's AdamW row is the lr with the lowest mean
  held-out loss, selected on the held-out set itself, i.e. in AdamW's favour;
* APOLLO (rank hidden/4, lr 1e-2, scale 1), APOLLO-Mini (rank 1, lr 1e-2,
  scale hidden/4: the paper scripts' width rule, 32 for tiny and 64 for
  20m, see ``results/demo_investigation.md``) and GaLore (rank hidden/4,
  lr 1e-2, scale 0.25), at their paper defaults, not tuned;
* a control: AdamW at 1e-3 on the attention/MLP matrices and 1e-2 on the
  embedding, head and norms, the lr those leaves get in the APOLLO and GaLore
  runs (the official code's choice), which separates the effect of that lr
  from the effect of the low-rank updates.

Ablations (``--ablation-config``, default ``tiny``), APOLLO with one change
each against the main APOLLO run: tensor instead of channel scaling, SVD
instead of Gaussian projection (and both: the paper's Table 9 grid), no
norm-growth limiter, and rank 1, 8 and 128 (the main run is rank 32 =
hidden/4; 128 = full rank at hidden 128). The scale stays 1 at every rank.

Fast projection (issue 12, ``--no-fast`` leaves it out, ``--only-fast`` runs
only it and the main APOLLO / APOLLO-Mini runs it is compared with): APOLLO and
APOLLO-Mini with Rademacher projections, with bfloat16 product inputs, and
with both, on every config and seed of the main table; the report gives each
one's held-out loss difference to its main run (paired by seed) with its
spread.

Runs are appended to ``results/quality_runs.jsonl`` as they finish (one JSON
line each, the train-loss curve and the eval history included), and a rerun
skips the runs already in the log, so the sweep can be stopped, resumed and
split over processes (``--configs tiny`` in one, ``--configs 20m`` in
another). ``--report-only`` rebuilds ``quality.{json,md}`` and
``quality_curves.png`` from the log.

Usage::

  python -m benchmarks.quality                       # the whole sweep
  python -m benchmarks.quality --configs 20m --no-ablations
  python -m benchmarks.quality --report-only
  python -m benchmarks.quality --configs tiny --only-fast   # issue 12's rows
  python -m benchmarks.quality --c4 --steps 10000 --batch-size 512 --seq-len 256
      # the paper's setting on C4 (streamed, T5 tokenizer; a GPU job)

With ``--c4`` (or ``--c4-files``) the runs use ``apollo_lm.train``'s C4
pipeline and the report is ``quality_c4.*``; the data source is part of each
run's key, so C4 and stdlib runs never mix.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import math
import pathlib
import resource
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from apollo_lm import configs as configs_lib
from apollo_lm import data as data_lib
from apollo_lm import train as train_lib
from benchmarks import common

MAIN_OPTIMIZERS = ("adamw", "apollo", "apollo_mini", "galore")
# name -> train() flags changed against the main APOLLO run.
ABLATIONS: dict[str, dict[str, Any]] = {
    "apollo_tensor": {"scale_type": "tensor"},
    "apollo_svd": {"projection": "svd"},
    "apollo_svd_tensor": {"projection": "svd", "scale_type": "tensor"},
    "apollo_no_limiter": {"limiter": False},
    "apollo_rank1": {"rank": 1},
    "apollo_rank8": {"rank": 8},
    "apollo_rank128": {"rank": 128},
}
# Issue 12's fast projection, for APOLLO and APOLLO-Mini on every config of
# the main table: name suffix -> train() flags on top of the main run's.
FAST: dict[str, dict[str, Any]] = {
    "rademacher": {"projection": "rademacher"},
    "bf16": {"projection_dtype": "bfloat16"},
    "fast": {"projection": "rademacher", "projection_dtype": "bfloat16"},
}


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the sweep.

  Attributes:
    group: ``"main"``, ``"control"``, ``"ablation"`` or ``"fast"``.
    variant: Name in the tables, e.g. ``"adamw_lr3e-03"`` or
      ``"apollo_svd"``.
    config: Model config name.
    seed: Seed of the init, data order and projections.
    flags: ``train()`` flags on top of the shared budget.
  """

  group: str
  variant: str
  config: str
  seed: int
  flags: dict[str, Any]

  def key(self, budget: dict[str, Any]) -> str:
    """Identifies the run (and its budget) in the log."""
    return json.dumps([self.variant, self.config, self.seed, budget],
                      sort_keys=True)


def plan(configs: Sequence[str], seeds: Sequence[int],
         adamw_lrs: Sequence[float], ablation_config: str | None,
         fast: bool = True) -> list[Run]:
  """The runs of the sweep, seed-major so that early stops keep seeds whole."""
  runs = []
  for seed in seeds:
    for config in configs:
      hidden = configs_lib.get_config(config).hidden_size
      for lr in adamw_lrs:
        runs.append(Run("main", f"adamw_lr{lr:.0e}", config, seed,
                        {"optimizer": "adamw", "lr": lr}))
      runs.append(Run("main", "apollo", config, seed, {"optimizer": "apollo"}))
      runs.append(Run("main", "apollo_mini", config, seed,
                      {"optimizer": "apollo_mini", "scale": hidden / 4}))
      runs.append(Run("main", "galore", config, seed, {"optimizer": "galore"}))
      runs.append(Run("control", "adamw_lr1e-03_nonlowrank1e-02", config, seed,
                      {"optimizer": "adamw", "lr": 1e-3,
                       "non_lowrank_lr": 1e-2}))
      if fast:
        for suffix, flags in FAST.items():
          runs.append(Run("fast", f"apollo_{suffix}", config, seed,
                          {"optimizer": "apollo", **flags}))
          runs.append(Run("fast", f"apollo_mini_{suffix}", config, seed,
                          {"optimizer": "apollo_mini", "scale": hidden / 4,
                           **flags}))
    if ablation_config is not None:
      for variant, flags in ABLATIONS.items():
        runs.append(Run("ablation", variant, ablation_config, seed,
                        {"optimizer": "apollo", **flags}))
  return runs


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _read_log(path: pathlib.Path) -> list[dict[str, Any]]:
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line]


def _append(path: pathlib.Path, record: dict[str, Any]) -> None:
  """Appends one line under an exclusive lock (several sweeps may share it)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    f.write(json.dumps(record) + "\n")
    fcntl.flock(f, fcntl.LOCK_UN)


def execute(run: Run, budget: dict[str, Any], cache_dir: str
            ) -> dict[str, Any]:
  """Trains one run and returns its log record."""
  flags = {"config": run.config, "seed": run.seed, "no_progress": True,
           "compilation_cache": cache_dir, **budget, **run.flags}
  flags["eval_every"] = max(1, budget["steps"] // 5)
  cpu0, wall0 = _cpu_seconds(), time.perf_counter()
  result = train_lib.train(flags)
  if result.step != budget["steps"]:
    # train() stops early and still evaluates on SIGTERM (preemption): such
    # a run must not enter the log as a finished one.
    raise SystemExit(f"{run.config} {run.variant} seed {run.seed} stopped at "
                     f"step {result.step} of {budget['steps']} "
                     f"({result.interrupted or 'early'}); not logged (a rerun "
                     "continues the sweep)")
  return {
      "key": run.key(budget), "group": run.group, "variant": run.variant,
      "config": run.config, "seed": run.seed, "flags": run.flags,
      "budget": budget, "optimizer": result.optimizer,
      "hparams": result.hparams, "param_count": result.param_count,
      "state_bytes": int(result.state_bytes),
      "tokens": result.step * budget["batch_size"] * budget["seq_len"],
      "eval_loss": result.eval_loss, "eval_ppl": result.eval_ppl,
      "eval_history": result.eval_history, "losses": result.losses,
      "tokens_per_s": result.tokens_per_s,
      "cpu_s": _cpu_seconds() - cpu0, "wall_s": time.perf_counter() - wall0,
  }


# ---------------------------------------------------------------- reporting --


def _summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
  """Per (config, variant): mean/sd held-out loss over seeds, ppl, cost."""
  groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
  for r in records:
    groups.setdefault((r["config"], r["variant"]), []).append(r)
  out: dict[str, dict[str, Any]] = {}
  for (config, variant), rs in groups.items():
    rs = sorted(rs, key=lambda r: r["seed"])
    losses = [r["eval_loss"] for r in rs]
    mean = statistics.fmean(losses)
    out.setdefault(config, {})[variant] = {
        "group": rs[0]["group"], "optimizer": rs[0]["optimizer"],
        "flags": rs[0]["flags"],
        "hparams": rs[0]["hparams"], "seeds": [r["seed"] for r in rs],
        "eval_losses": losses, "eval_loss_mean": mean,
        "eval_loss_sd": statistics.stdev(losses) if len(losses) > 1 else None,
        "eval_ppl_of_mean": math.exp(mean),
        "state_bytes": rs[0]["state_bytes"],
        "param_count": rs[0]["param_count"], "tokens": rs[0]["tokens"],
        "cpu_s_mean": statistics.fmean(r["cpu_s"] for r in rs),
    }
  for variants in out.values():
    adamw = {v: s for v, s in variants.items()
             if s["optimizer"] == "adamw" and s["group"] == "main"}
    if adamw:
      best = min(adamw, key=lambda v: adamw[v]["eval_loss_mean"])
      for s in variants.values():
        s["ppl_vs_best_adamw"] = (s["eval_ppl_of_mean"]
                                  / adamw[best]["eval_ppl_of_mean"])
        s["is_best_adamw"] = s is adamw[best]
  return out


def _loss_cell(s: dict[str, Any]) -> str:
  sd = "" if s["eval_loss_sd"] is None else f" ± {s['eval_loss_sd']:.3f}"
  return f"{s['eval_loss_mean']:.3f}{sd}"


def _seeds_cell(s: dict[str, Any]) -> str:
  return ", ".join(f"{x:.3f}" for x in s["eval_losses"])


_LABELS = {"apollo": "APOLLO", "apollo_mini": "APOLLO-Mini",
           "galore": "GaLore"}


def _main_rows(variants: dict[str, Any]) -> list[list[Any]]:
  rows = []
  for name in MAIN_OPTIMIZERS:
    candidates = {v: s for v, s in variants.items()
                  if s["group"] == "main" and s["optimizer"] == name}
    if name == "adamw":
      candidates = {v: s for v, s in candidates.items() if s["is_best_adamw"]}
      candidates.update({v: s for v, s in variants.items()
                         if s["group"] == "control"})
    for variant, s in candidates.items():
      hp = s["hparams"]
      if s["group"] == "control":
        label = (f"control: AdamW, embedding/head/norms at "
                 f"{hp['non_lowrank_lr']:g}")
      else:
        label = ("AdamW (best of sweep)" if name == "adamw"
                 else _LABELS[name])
      rows.append([
          label, f"{hp['learning_rate']:g}", hp.get("rank") or "—",
          f"{hp['scale']:g}" if hp.get("scale") is not None else "—",
          f"{s['state_bytes'] / 1e6:.2f}", _loss_cell(s),
          f"{s['eval_ppl_of_mean']:.1f}",
          (f"{s['ppl_vs_best_adamw']:.3f}" if "ppl_vs_best_adamw" in s
           else "— (no AdamW run)"),
          _seeds_cell(s)])
  return rows


def _fast_rows(variants: dict[str, Any]) -> list[list[Any]]:
  """Rows of the fast-projection table, each against its main run."""
  rows = []
  for variant, s in sorted(variants.items()):
    if s["group"] != "fast":
      continue
    base = variants.get(s["optimizer"])
    hp = s["hparams"]
    # The run's flags, not hparams: the latter lack projection_dtype.
    product_dtype = s["flags"].get("projection_dtype") or "float32"
    if product_dtype != "float32" and hp.get("rank") == 1:
      product_dtype += " (P only)"  # rank 1 keeps G in float32
    row = [variant, hp.get("projection") or "gaussian", product_dtype,
           _loss_cell(s),
           _seeds_cell(s)]
    if base is None:
      rows.append(row + ["(no main run)", "—", "—"])
      continue
    paired = dict(zip(base["seeds"], base["eval_losses"]))
    diffs = [loss - paired[seed]
             for seed, loss in zip(s["seeds"], s["eval_losses"])
             if seed in paired]
    if not diffs:
      rows.append(row + ["(no common seed)", "—", "—"])
      continue
    delta = statistics.fmean(diffs)
    spread = statistics.stdev(diffs) if len(diffs) > 1 else None
    bar = base["eval_loss_sd"]
    row.append(f"{delta:+.4f}" + ("" if spread is None else f" ± {spread:.4f}")
               + f" ({len(diffs)} seed{'s' * (len(diffs) > 1)})")
    row.append("—" if bar is None else f"{bar:.4f}")
    row.append("—" if bar is None else ("yes" if abs(delta) <= bar else "NO"))
    rows.append(row)
  return rows


def report(records: list[dict[str, Any]], unigram: dict[str, float]
           ) -> tuple[dict[str, Any], str]:
  """The results dict and the Markdown body from the run records."""
  summary = _summarise(records)
  parts = []
  for config, variants in summary.items():
    any_run = next(iter(variants.values()))
    seeds = sorted({seed for s in variants.values() for seed in s["seeds"]})
    budget = next(r["budget"] for r in records if r["config"] == config)
    parts.append(
        f"## {config} ({any_run['param_count'] / 1e6:.1f}M params), "
        f"{budget['steps']} steps × {budget['batch_size']} × "
        f"{budget['seq_len']} tokens = {any_run['tokens']:,} tokens per run, "
        f"seeds {', '.join(map(str, seeds))}")
    if config in unigram:
      parts.append(f"Unigram baseline: {unigram[config]:.3f} nats "
                   f"(ppl {math.exp(unigram[config]):.0f}).")
    main_rows = _main_rows(variants)
    if main_rows:
      parts.append(common.markdown_table(
          ["optimizer", "peak lr", "rank", "scale", "state MB",
           "held-out loss (mean ± sd)", "ppl (of mean loss)",
           "ppl / best AdamW", "per-seed losses"], main_rows))
    sweep = [[f"{s['hparams']['learning_rate']:g}", _loss_cell(s),
              f"{s['eval_ppl_of_mean']:.1f}", _seeds_cell(s),
              "best" if s["is_best_adamw"] else ""]
             for v, s in sorted(variants.items(),
                                key=lambda kv: kv[1]["hparams"]
                                ["learning_rate"])
             if s["optimizer"] == "adamw" and s["group"] == "main"]
    if sweep:
      parts.append("AdamW learning-rate sweep:\n\n" + common.markdown_table(
          ["peak lr", "held-out loss", "ppl", "per-seed", ""], sweep))
    ablations = [(v, s) for v, s in variants.items()
                 if s["group"] == "ablation"]
    if ablations:
      base = variants.get("apollo")
      rows = []
      if base is not None:
        ablations.insert(0, ("apollo (main run)", base))
      for v, s in ablations:
        hp = s["hparams"]
        delta = ("" if base is None else
                 f"{s['eval_loss_mean'] - base['eval_loss_mean']:+.3f}")
        rows.append([v, hp["rank"], hp["scale_type"], hp["projection"],
                     "on" if hp["limiter"] else "off", _loss_cell(s),
                     f"{s['eval_ppl_of_mean']:.1f}", delta, _seeds_cell(s)])
      parts.append("Ablations (APOLLO, one change each):\n\n"
                   + common.markdown_table(
                       ["variant", "rank", "scaling", "projection", "limiter",
                        "held-out loss", "ppl", "Δ loss vs APOLLO",
                        "per-seed"], rows))
    fast = _fast_rows(variants)
    if fast:
      parts.append(
          "Fast projection (Rademacher signs and/or bfloat16 "
          "product inputs), against the main run of the same optimizer: Δ is "
          "the mean of the per-seed differences (same seed = same init, data "
          "and projection keys) ± their sd; the bar is one seed sd of the "
          "main run:\n\n" + common.markdown_table(
              ["variant", "projection", "product dtype", "held-out loss",
               "per-seed", "Δ loss vs main (± sd)", "main run's seed sd",
               "within"], fast))
  cpu_hours = sum(r["cpu_s"] for r in records) / 3600
  parts.insert(0, (
      f"{len(records)} runs, {cpu_hours:.2f} CPU-hours in all (user + sys "
      f"of each train() call, compilation included): every finished run "
      f"with this budget in the log (a rerun skips those; `make "
      f"bench-quality` runs one process per config, each pinned to a "
      f"core)."))
  results = {"summary": summary, "unigram_entropy": unigram,
             "runs": [{k: v for k, v in r.items() if k != "losses"}
                      for r in records]}
  return results, "\n\n".join(parts)


def plot(records: list[dict[str, Any]], summary: dict[str, Any],
         path: pathlib.Path) -> None:
  """Loss curves (main runs and control, mean over seeds) per config."""
  plt = common.pyplot()
  configs = list(summary)
  fig, axes = plt.subplots(1, len(configs), figsize=(6.5 * len(configs), 4.5),
                           squeeze=False)
  for ax, config in zip(axes[0], configs):
    variants = summary[config]
    shown = [v for v, s in variants.items() if s["group"] == "control" or (
        s["group"] == "main" and
        (s["optimizer"] != "adamw" or s["is_best_adamw"]))]
    for variant in shown:
      rs = [r for r in records
            if r["config"] == config and r["variant"] == variant]
      curves = np.array([r["losses"] for r in rs])
      mean = curves.mean(axis=0)
      window = max(1, len(mean) // 30)
      smooth = np.convolve(mean, np.ones(window) / window, mode="valid")
      tokens_per_step = rs[0]["tokens"] / len(mean)
      x = np.arange(window, len(mean) + 1) * tokens_per_step / 1e6
      line, = ax.plot(x, smooth, label=f"{variant} (train)")
      steps = [e["step"] for e in rs[0]["eval_history"]]
      evals = np.mean([[e["eval_loss"] for e in r["eval_history"]]
                       for r in rs], axis=0)
      ax.plot(np.array(steps) * tokens_per_step / 1e6, evals, "o--",
              color=line.get_color(), label=f"{variant} (held-out)")
    ax.set_xlabel("tokens (millions)")
    ax.set_ylabel("cross-entropy (nats/token), mean over seeds")
    ax.set_title(f"{config}: same token budget")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.quality", description=__doc__.split("\n")[0])
  parser.add_argument("--configs", nargs="+", default=["tiny", "20m"])
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
  parser.add_argument("--adamw-lrs", nargs="+", type=float,
                      default=[1e-3, 3e-3, 1e-2])
  parser.add_argument("--ablation-config", default="tiny")
  parser.add_argument("--no-ablations", action="store_true")
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--seq-len", type=int, default=128)
  parser.add_argument("--vocab-size", type=int, default=8192)
  parser.add_argument("--eval-batches", type=int, default=16)
  parser.add_argument("--data", nargs="+", default=None,
                      help="text files/directories instead of the stdlib")
  parser.add_argument("--c4", action="store_true",
                      help="C4 (streamed, or --c4-files) as apollo_lm.train")
  parser.add_argument("--c4-files", nargs="+", default=None)
  parser.add_argument("--c4-eval-files", nargs="+", default=None)
  parser.add_argument("--hf-tokenizer", default="t5-base")
  parser.add_argument("--cache", default="/tmp/apollo_quality_xla_cache",
                      help="XLA compilation cache directory")
  parser.add_argument("--out-dir", default=str(common.RESULTS_DIR))
  parser.add_argument("--name", default=None,
                      help="report name (default: quality, quality_c4)")
  parser.add_argument("--report-only", action="store_true")
  parser.add_argument("--note", default=None,
                      help="a paragraph for the report: how its runs were made")
  fast = parser.add_mutually_exclusive_group()
  fast.add_argument("--no-fast", action="store_true",
                    help="leave out the fast-projection rows (issue 12)")
  fast.add_argument("--only-fast", action="store_true",
                    help="only the fast-projection rows and the APOLLO /"
                    " APOLLO-Mini runs they are compared with")
  parser.add_argument("--variants", nargs="+", default=None,
                      help="run only these variants (e.g. apollo"
                      " apollo_fast); the report still uses the whole log")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny at vocab 512, 4 steps, AdamW at two lrs, "
                      "APOLLO, the control, one ablation, one seed")
  args = parser.parse_args(argv)
  if args.smoke:
    args.configs, args.seeds, args.adamw_lrs = ["tiny"], [0], [1e-3, 1e-2]
    args.steps, args.batch_size, args.seq_len = 4, 4, 32
    args.vocab_size, args.eval_batches = 512, 1
  for config in args.configs + [args.ablation_config]:
    if config not in configs_lib.CONFIG_NAMES:
      raise ValueError(f"--configs/--ablation-config: unknown config "
                       f"{config!r}; allowed: "
                       f"{', '.join(configs_lib.CONFIG_NAMES)}.")
  c4 = args.c4 or args.c4_files is not None
  if args.name is None:
    args.name = "quality_c4" if c4 else "quality"
  out_dir = pathlib.Path(args.out_dir)
  log_path = out_dir / f"{args.name}_runs.jsonl"
  budget = {"steps": args.steps, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "eval_batches": args.eval_batches}
  if c4:
    budget.update(c4=True, c4_files=args.c4_files,
                  c4_eval_files=args.c4_eval_files,
                  hf_tokenizer=args.hf_tokenizer)
  else:
    budget["vocab_size"] = args.vocab_size
    if args.data is not None:
      budget["data"] = list(args.data)
  runs = plan(args.configs, args.seeds, args.adamw_lrs,
              None if args.no_ablations or args.only_fast
              else args.ablation_config, fast=not args.no_fast)
  if args.only_fast:
    runs = [r for r in runs if r.group == "fast"
            or r.variant in ("apollo", "apollo_mini")]
  if args.variants is not None:
    runs = [r for r in runs if r.variant in args.variants]
  if args.smoke:
    runs = [r for r in runs if r.variant not in ("galore", "apollo_mini")
            and r.group != "fast"
            and (r.group != "ablation" or r.variant == "apollo_no_limiter")]

  if not args.report_only:
    done = {r["key"] for r in _read_log(log_path)}
    todo = [r for r in runs if r.key(budget) not in done]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs already in "
          f"{log_path}; running {len(todo)}", flush=True)
    for i, run in enumerate(todo, 1):
      record = execute(run, budget, args.cache)
      _append(log_path, record)
      print(f"[{i}/{len(todo)}] {run.config} {run.variant} seed {run.seed}: "
            f"held-out loss {record['eval_loss']:.4f} "
            f"({record['cpu_s']:.0f} CPU-s, {record['wall_s']:.0f} s)",
            flush=True)

  records = [r for r in _read_log(log_path)
             if r["budget"] == budget and r["eval_loss"] is not None]
  if not records:
    raise SystemExit(f"no finished runs with this budget in {log_path}")
  unigrams, description = {}, "C4 (apollo_lm.data.c4_batches)"
  if not c4:
    corpus = data_lib.load_corpus(args.data, vocab_size=args.vocab_size)
    unigram = data_lib.unigram_entropy(corpus.train_tokens,
                                       corpus.eval_tokens, corpus.vocab_size)
    unigrams = {c: unigram for c in {r["config"] for r in records}}
    description = corpus.description
  results, markdown = report(records, unigrams)
  results["budget"] = budget
  results["corpus"] = description
  plot_name = f"{args.name}_curves.png"
  plot(records, results["summary"], out_dir / plot_name)
  if args.note:
    markdown += f"\n\n{args.note}"
  markdown += (f"\n\nLoss curves: [{plot_name}]({plot_name}). Every run "
               f"(with its train-loss curve) is in `{log_path.name}`.")
  common.write_results(args.name, results, markdown, out_dir)
  print(markdown)
  return results


if __name__ == "__main__":
  main()
