"""``make demo``: AdamW vs APOLLO vs APOLLO-Mini on a CPU in minutes.

Trains the ``tiny`` LLaMA on the Python standard library's sources (no
download) with each optimizer under the same token budget and the paper's
recipe (``apollo_lm.optimizers.RECIPES``: warm-up over 10% of the steps, then
cosine to 10% of the peak; APOLLO rank = hidden_size / 4; APOLLO-Mini scale
hidden_size / 4 = 32, as the paper's scripts scale it with the width), then prints a
table, saves the loss curves as a PNG and writes ``summary.json``::

  {"runs": {"adamw": {"eval_loss": ..., "eval_ppl": ..., "state_bytes": ...,
                      "lowrank_state_bytes": ..., "state_bytes_7b": ...,
                      "tokens_per_s": ..., "steps": ...}, ...},
   "unigram_entropy": ..., "hardware": ..., "versions": ..., ...}

The budget (default 150 steps of 16 x 128 tokens, 0.3M tokens per run) costs
about 7.5 CPU-minutes in all (tokenizer training and compilation included),
i.e. well under 15 minutes of wall time on two otherwise idle cores; the
held-out losses end below the unigram baseline, i.e. the models use context.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

from flax import nnx
import jax
import numpy as np

import apollo_optax
from apollo_lm import configs
from apollo_lm import data as data_lib
from apollo_lm import model as model_lib
from apollo_lm import optimizers
from apollo_lm import train as train_lib

DEMO_OPTIMIZERS = ("adamw", "apollo", "apollo_mini")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m apollo_lm.demo", description=__doc__.split("\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--steps", type=int, default=150)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--vocab-size", type=int, default=8192)
  p.add_argument("--eval-batches", type=int, default=8)
  p.add_argument("--optimizers", nargs="+", default=list(DEMO_OPTIMIZERS))
  p.add_argument("--out", default="results/demo")
  p.add_argument("--seed", type=int, default=0)
  # The paper's scripts set APOLLO-Mini's scale to hidden_size / 4 = APOLLO's
  # rank (60M: 512/4 = 128, 130M: 768/4 = 192): alpha^2 = n/r relative to the
  # rank-n/4 APOLLO whose alpha is folded into the lr. For tiny (hidden 128)
  # that is 32; the table default 128 (the 60M value) over-steps here:
  # benchmarks/results/demo_investigation.md.
  p.add_argument("--mini-scale", type=float, default=32.0,
                 help="APOLLO-Mini scale (hidden_size / 4 for tiny)")
  return p


def _plot(runs: dict[str, train_lib.TrainResult], unigram: float,
          path: pathlib.Path) -> None:
  """Train-loss curves (smoothed) and held-out evaluations, one PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, result in runs.items():
    losses = np.asarray(result.losses)
    window = max(1, len(losses) // 30)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    line, = ax.plot(np.arange(window, len(losses) + 1), smooth,
                    label=f"{name} (train)")
    evals = result.eval_history
    ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o--",
            color=line.get_color(), label=f"{name} (held-out)")
  ax.axhline(unigram, color="gray", ls=":", label="unigram baseline")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.set_title("tiny LLaMA on the Python stdlib, same token budget")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def state_memory(name: str, config: configs.LlamaConfig) -> dict[str, int]:
  """Optimizer-state bytes that show the memory claim (nothing allocated).

  ``lowrank_state_bytes``: optimizer ``name`` (as the demo builds it) on the
  low-rank leaves alone (``apollo_optax.default_lowrank_mask``: attention and
  MLP kernels), the same leaves for AdamW, APOLLO and APOLLO-Mini.
  ``state_bytes_7b``: its whole state at LLaMA-7B shapes (float32), by
  ``jax.eval_shape``.
  """

  def state_bytes(cfg: configs.LlamaConfig, lowrank_only: bool) -> int:
    params = nnx.to_pure_dict(model_lib.abstract_state(cfg))
    if lowrank_only:
      mask = apollo_optax.default_lowrank_mask(params)
      params = jax.tree.map(lambda p, is_lowrank: p if is_lowrank else None,
                            params, mask)
    tx = optimizers.make_optimizer(name, total_steps=100, warmup_steps=10,
                                   config=cfg)
    return apollo_optax.state_bytes(jax.eval_shape(tx.init, params))

  return {"lowrank_state_bytes": state_bytes(config, lowrank_only=True),
          "state_bytes_7b": state_bytes(configs.get_config("7b"), False)}


def _table(runs: dict[str, dict[str, Any]], unigram: float) -> str:
  """The printed results table."""
  header = (f"{'optimizer':<12} {'eval loss':>9} {'ppl':>8} "
            f"{'state bytes':>12} {'low-rank leaves':>15} {'7B state':>9} "
            f"{'tokens/s':>9} {'steps':>6}")
  lines = [header, "-" * len(header)]
  for name, r in runs.items():
    lines.append(f"{name:<12} {r['eval_loss']:>9.4f} {r['eval_ppl']:>8.2f} "
                 f"{r['state_bytes']:>12,} {r['lowrank_state_bytes']:>15,} "
                 f"{r['state_bytes_7b'] / 1e9:>7.2f}GB "
                 f"{r['tokens_per_s']:>9.0f} {r['steps']:>6}")
  lines.append("low-rank leaves: the optimizer state of the attention and MLP "
               "kernels alone (the\nsame leaves for every optimizer); 7B "
               "state: the whole optimizer state at LLaMA-7B\nshapes "
               "(float32, jax.eval_shape). The tiny model's embedding and "
               "head, on AdamW\nin every optimizer, are most of its "
               "parameters, hence the small gap in 'state bytes'.")
  lines.append(f"unigram baseline: {unigram:.4f} nats "
               f"(ppl {math.exp(unigram):.1f})")
  return "\n".join(lines)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the demo; returns the summary that is also written as JSON."""
  args = build_parser().parse_args(argv)
  start = time.perf_counter()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)

  corpus = data_lib.load_corpus(vocab_size=args.vocab_size)
  unigram = data_lib.unigram_entropy(corpus.train_tokens, corpus.eval_tokens,
                                     corpus.vocab_size)
  print(f"{corpus.description}\nunigram baseline: {unigram:.3f} nats "
        f"(ppl {math.exp(unigram):.0f})", flush=True)

  results = {}
  for name in args.optimizers:
    results[name] = train_lib.train({
        "config": "tiny", "optimizer": name, "steps": args.steps,
        "batch_size": args.batch_size, "seq_len": args.seq_len,
        "vocab_size": args.vocab_size, "eval_every": max(1, args.steps // 5),
        "eval_batches": args.eval_batches, "seed": args.seed,
        "scale": args.mini_scale if name == "apollo_mini" else None,
        "out": str(out / name)})

  tiny = configs.get_config("tiny", vocab_size=corpus.vocab_size,
                            max_seq_len=args.seq_len)
  runs = {name: {"eval_loss": r.eval_loss, "eval_ppl": r.eval_ppl,
                 "state_bytes": int(r.state_bytes),
                 **state_memory(name, tiny),
                 "tokens_per_s": r.tokens_per_s, "steps": r.step}
          for name, r in results.items()}
  print(_table(runs, unigram))

  _plot(results, unigram, out / "loss_curves.png")
  first = next(iter(results.values()))
  summary = {
      "runs": runs,
      "unigram_entropy": unigram,
      "unigram_ppl": math.exp(unigram),
      "tokens_per_run": args.steps * args.batch_size * args.seq_len,
      "corpus": corpus.description,
      "config": first.config,
      "hparams": {name: r.hparams for name, r in results.items()},
      "param_count": first.param_count,
      "hardware": {"platform": platform.platform(),
                   "processor": platform.processor(),
                   "cpu_count": os.cpu_count(),
                   "jax_devices": [str(d) for d in jax.devices()]},
      "versions": {"python": platform.python_version(),
                   "jax": jax.__version__,
                   "apollo_optax": apollo_optax.__version__},
      "command": " ".join([sys.executable, "-m", "apollo_lm.demo",
                           *(argv if argv is not None else sys.argv[1:])]),
      "wall_time_s": time.perf_counter() - start,
  }
  (out / "summary.json").write_text(json.dumps(summary, indent=1))
  print(f"wrote {out / 'summary.json'} and {out / 'loss_curves.png'} "
        f"in {summary['wall_time_s']:.0f} s")
  return summary


if __name__ == "__main__":
  run()
