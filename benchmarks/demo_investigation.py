"""Why does APOLLO-Mini lag AdamW in ``make demo``? Short runs, one JSON line each.

Usage (each RUN is NAME:key=value,key=value with train() flag names; the
extra keys ``no_limiter=1`` (``--no-limiter``) and ``log_limiter=1``)::

  python benchmarks/demo_investigation.py --log runs.jsonl \\
      adamw_150:optimizer=adamw,steps=150 \\
      mini_nolim:optimizer=apollo_mini,steps=150,no_limiter=1

Every run uses the demo's setup (tiny LLaMA, stdlib corpus, batch 16 x 128,
8 held-out batches, seed 0) unless overridden, and records the held-out loss,
perplexity and the CPU (user + sys) and wall time of its ``train()`` call.
``rest_lr_mult=X`` gives the leaves that are not low-rank (embedding, head,
norms) X times the peak lr (``apollo_lm.train``'s ``--non-lowrank-lr``): adamw with X=10 updates the embeddings and head at 1e-2
as the APOLLO runs do, apollo_mini with X=0.1 at AdamW's 1e-3.
``log_limiter=1`` records, per step, the fraction of APOLLO-Mini's low-rank
matrices whose update the norm-growth limiter shrank (factor < 1) and the
mean factor; it patches ``apollo_optax._src.limiter.growth_limit`` at run
time (no source change).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import jax
import numpy as np

from apollo_optax._src import limiter as limiter_lib
from apollo_lm import configs as configs_lib
from apollo_lm import optimizers as optimizers_lib
from apollo_lm import train as train_lib

_BASE = {"config": "tiny", "steps": 150, "batch_size": 16, "seq_len": 128,
         "vocab_size": 8192, "eval_batches": 8, "seed": 0,
         "no_progress": True}


def _cpu() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def _parse(spec: str) -> tuple[str, dict]:
  name, _, rest = spec.partition(":")
  kv = {}
  for item in filter(None, rest.split(",")):
    k, v = item.split("=")
    for cast in (int, float):
      try:
        v = cast(v)
        break
      except ValueError:
        pass
    if v == "None":
      v = None
    kv[k] = v
  return name, kv


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--log", required=True)
  p.add_argument("--cache", default="/tmp/apollo_demo_xla_cache")
  p.add_argument("runs", nargs="+")
  args = p.parse_args()
  original_limit = limiter_lib.growth_limit
  for spec in args.runs:
    name, kv = _parse(spec)
    no_limiter = kv.pop("no_limiter", 0)
    log_limiter = kv.pop("log_limiter", 0)
    rest_lr_mult = kv.pop("rest_lr_mult", None)
    if rest_lr_mult is not None:
      # X times the optimizer's peak lr on the embedding, head and norms.
      peak = optimizers_lib.resolve_hparams(
          kv.get("optimizer", "apollo"),
          configs_lib.get_config(kv.get("config", _BASE["config"])),
          learning_rate=kv.get("lr"))["learning_rate"]
      kv["non_lowrank_lr"] = float(rest_lr_mult) * peak
    if no_limiter:
      kv["limiter"] = False  # apollo_lm.train's --no-limiter
    factors: list[np.ndarray] = []
    if log_limiter:
      def logged(norm, previous, gamma):
        factor, remembered = original_limit(norm, previous, gamma)
        jax.debug.callback(lambda f: factors.append(np.asarray(f)), factor)
        return factor, remembered
      limiter_lib.growth_limit = logged
    else:
      limiter_lib.growth_limit = original_limit
    flags = dict(_BASE, compilation_cache=args.cache) | kv
    flags.setdefault("eval_every", max(1, flags["steps"] // 5))
    cpu0, wall0 = _cpu(), time.perf_counter()
    result = train_lib.train(flags)
    record = {
        "name": name, "flags": kv | ({"no_limiter": 1} if no_limiter else {})
        | ({"rest_lr_mult": rest_lr_mult} if rest_lr_mult is not None
           else {}),
        "optimizer": result.optimizer, "hparams": result.hparams,
        "steps": result.step,
        "tokens": result.step * flags["batch_size"] * flags["seq_len"],
        "eval_loss": result.eval_loss, "eval_ppl": result.eval_ppl,
        "eval_history": result.eval_history,
        "final_train_loss_mean10": float(np.mean(result.losses[-10:])),
        "cpu_s": _cpu() - cpu0, "wall_s": time.perf_counter() - wall0,
        "tokens_per_s": result.tokens_per_s,
        "param_count": result.param_count,
    }
    if log_limiter and factors:
      # One callback per low-rank leaf (a stack of L matrices) per step.
      k = len(factors) // result.step
      per_step = [np.concatenate([np.ravel(f) for f in factors[i:i + k]])
                  for i in range(0, k * result.step, k)]
      clipped = [float(np.mean(f < 1.0)) for f in per_step]
      record["limiter"] = {
          "n_callbacks": len(factors),
          "frac_clipped_overall": float(np.mean(clipped)),
          "frac_clipped_by_decile": [
              float(np.mean(c)) for c in np.array_split(clipped, 10)],
          "mean_factor_by_decile": [
              float(np.mean(np.concatenate(c))) for c in
              np.array_split(np.array(per_step, dtype=object), 10)],
          "min_factor": float(min(np.min(f) for f in per_step)),
      }
    print(json.dumps({k: v for k, v in record.items()
                      if k != "eval_history"}), flush=True)
    with open(args.log, "a") as f:
      f.write(json.dumps(record) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
  main()
