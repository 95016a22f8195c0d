"""Shared helpers of the benchmarks: metadata, optimizers, train step, timing.

Every benchmark script writes ``benchmarks/results/<name>.json`` (all numbers
plus :func:`metadata`) and ``<name>.md`` (the same numbers as Markdown tables)
through :func:`write_results`. Timings are always ratios measured side by side
in one process with :func:`interleaved_medians`, because the machine is
shared.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import optax
from optax import contrib

import apollo_optax
from apollo_lm import model as model_lib
from apollo_lm import optimizers
from apollo_lm import steps
from apollo_lm.configs import get_config
from apollo_lm.configs import LlamaConfig

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
GIB = 2**30
# The paper's GPU (A100 80GB) has 80 GiB of device memory.
GPU_MEMORY_BYTES = 80 * GIB


# ----------------------------------------------------------------- metadata --


def _lscpu() -> dict[str, str]:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True,
                         check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return {}
  fields = {}
  for line in out.splitlines():
    key, _, value = line.partition(":")
    fields[key.strip()] = value.strip()
  return fields


def _git_commit() -> str:
  try:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True,
        text=True, check=True, cwd=pathlib.Path(__file__).parent).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def _git_dirty() -> list[str]:
  """Tracked files with uncommitted changes (the tree is shared)."""
  try:
    out = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, check=True,
        cwd=pathlib.Path(__file__).parent).stdout
  except (OSError, subprocess.CalledProcessError):
    return []
  return [line[3:] for line in out.splitlines()]


def _command() -> str:
  """This run's command, with paths inside the repository made relative to it.

  ``python -m benchmarks.x`` is recorded as such (``sys.argv[0]`` would be
  the module's absolute path); an interpreter outside the repository is
  recorded as ``python``.
  """
  root = RESULTS_DIR.parents[1]

  def relative(arg: str) -> str:
    path = pathlib.Path(arg)
    if path.is_absolute() and path.is_relative_to(root):
      return str(path.relative_to(root))
    return arg

  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  script = ["-m", spec.name] if spec is not None else [relative(sys.argv[0])]
  python = relative(os.path.abspath(sys.executable))
  if pathlib.Path(python).is_absolute():
    python = "python"
  return shlex.join([python, *script, *map(relative, sys.argv[1:])])


def metadata() -> dict[str, Any]:
  """Hardware, software versions and the exact command of this run."""
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  cpu = _lscpu()
  mem_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return {
      "command": _command(),
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "git_commit": _git_commit(),
      "git_modified_files": _git_dirty(),
      "hardware": {
          "cpu_model": cpu.get("Model name", platform.processor()),
          "cpus": os.cpu_count(),
          "flags_avx512f": "avx512f" in cpu.get("Flags", ""),
          "memory_gib": round(mem_bytes / GIB, 1),
          "jax_devices": [str(d) for d in jax.devices()],
          "backend": jax.default_backend(),
      },
      "versions": {
          "python": platform.python_version(),
          "jax": jax.__version__,
          "jaxlib": jaxlib.__version__,
          "optax": optax.__version__,
          "flax": flax.__version__,
          "apollo_optax": apollo_optax.__version__,
      },
  }


# ---------------------------------------------------------------- reporting --


def markdown_table(headers: Sequence[str],
                   rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub Markdown table; floats keep the formatting given by the caller."""
  lines = ["| " + " | ".join(headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def metadata_markdown(meta: Mapping[str, Any]) -> str:
  """The metadata as a short Markdown paragraph."""
  hw, v = meta["hardware"], meta["versions"]
  return (
      f"Command: `{meta['command']}`  \n"
      f"Date: {meta['date_utc']}, commit {meta['git_commit']} (uncommitted "
      f"changes: {', '.join(meta['git_modified_files']) or 'none'})  \n"
      f"Hardware: {hw['cpu_model']}, {hw['cpus']} CPUs, "
      f"{hw['memory_gib']} GiB, backend {hw['backend']}  \n"
      f"Versions: python {v['python']}, jax {v['jax']}, jaxlib {v['jaxlib']}, "
      f"optax {v['optax']}, flax {v['flax']}, apollo_optax "
      f"{v['apollo_optax']}")


def write_results(name: str, results: Mapping[str, Any], markdown: str,
                  out_dir: pathlib.Path | str = RESULTS_DIR) -> pathlib.Path:
  """Writes ``<out_dir>/<name>.json`` and ``<name>.md``; returns the JSON path.

  Args:
    name: file stem, e.g. ``"memory"``.
    results: JSON-serialisable numbers; :func:`metadata` is added under
      ``"metadata"``.
    markdown: the body of the Markdown report (tables, notes); a title and the
      metadata paragraph are prepended.
    out_dir: output directory, created if needed.

  Returns:
    The path of the JSON file.
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  meta = metadata()
  payload = {"metadata": meta, **results}
  json_path = out_dir / f"{name}.json"
  json_path.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
  (out_dir / f"{name}.md").write_text(
      f"# {name}\n\n{metadata_markdown(meta)}\n\n{markdown.strip()}\n")
  return json_path


def pyplot() -> Any:
  """``matplotlib.pyplot`` on the file-only Agg backend (no display needed)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def gb(num_bytes: float) -> str:
  """Bytes as decimal gigabytes with two decimals (the paper's 'G')."""
  return f"{num_bytes / 1e9:.2f}"


# --------------------------------------------------------------- optimizers --

OPTIMIZERS = ("adamw", "apollo", "apollo_mini", "galore", "adafactor",
              "sgd_momentum")


def smoke_config(**overrides: Any) -> LlamaConfig:
  """The ``tiny`` shape with a 512-token vocabulary, for ``--smoke`` runs."""
  return get_config("tiny", vocab_size=512, **overrides)


def make_tx(name: str, config: LlamaConfig, *, mu_dtype: Any = None,
            **apollo_options: Any) -> optax.GradientTransformation:
  """The optimizer ``name`` (one of :data:`OPTIMIZERS`) for ``config``.

  ``apollo_lm.optimizers.make_optimizer`` with its (the paper's) defaults,
  including :func:`apollo_lm.optimizers.default_rank`; the schedule does not
  matter here. ``sgd_momentum`` is
  ``optax.sgd(momentum=0.9)``. ``mu_dtype`` (bfloat16 states of APOLLO with
  bfloat16 params, whose moments otherwise stay at least float32) builds
  ``apollo_optax.apollo``/``apollo_mini`` directly with that moment dtype,
  and so do ``apollo_options`` (e.g. ``projection="rademacher",
  projection_dtype=jnp.bfloat16``), which only APOLLO variants take.
  """
  if name == "sgd_momentum":
    return optax.sgd(1e-3, momentum=0.9)
  if apollo_options and name not in optimizers.APOLLO_NAMES:
    raise ValueError(f"apollo_options {sorted(apollo_options)} are only for"
                     f" 'apollo' and 'apollo_mini', got {name!r}.")
  lr = optimizers.RECIPES[name].pretrain.learning_rate
  if (mu_dtype is not None or apollo_options) and name == "apollo":
    rank = optimizers.default_rank(config.hidden_size)
    return apollo_optax.apollo(lr, rank, mu_dtype=mu_dtype, **apollo_options)
  if (mu_dtype is not None or apollo_options) and name == "apollo_mini":
    return apollo_optax.apollo_mini(lr, mu_dtype=mu_dtype, **apollo_options)
  return optimizers.make_optimizer(name, total_steps=1000, warmup_steps=100,
                                   config=config)


def force_galore_refresh(state: Any) -> Any:
  """``state`` with every GaLore step counter at 0.

  The next update then refreshes the projectors (runs the SVDs).
  """
  return jax.tree.map(
      lambda s: s._replace(count=jnp.zeros_like(s.count))
      if isinstance(s, contrib.GaLoreState) else s,
      state, is_leaf=lambda s: isinstance(s, contrib.GaLoreState))


# --------------------------------------------------------------- train step --


def abstract_params(config: LlamaConfig, dtype: Any = None) -> Any:
  """:func:`apollo_lm.model.abstract_state` as a plain dict (optionally recast)."""
  tree = nnx.to_pure_dict(model_lib.abstract_state(config))
  if dtype is None:
    return tree
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), tree)


def init_params(config: LlamaConfig, seed: int = 0) -> Any:
  """Real parameters of ``config`` (a plain dict), built by one jitted call."""

  @jax.jit
  def build():
    model = model_lib.Llama(config, rngs=nnx.Rngs(seed))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))

  return build()


def random_grads(params: Any, scale: float = 1e-3, seed: int = 1) -> Any:
  """Gaussian "gradients" shaped like ``params`` (times ``scale``), one key
  per leaf: the input of the update-speed benchmarks."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
      treedef, [scale * jax.random.normal(k, p.shape, p.dtype)
                for k, p in zip(keys, leaves)])


def make_train_step(config: LlamaConfig, tx: optax.GradientTransformation,
                    ) -> Callable[..., tuple[Any, Any, jax.Array]]:
  """``step(params, opt_state, tokens[B, T+1]) -> (params, opt_state, loss)``.

  :func:`apollo_lm.steps.make_train_step` (no accumulation, no gradient-norm
  metric: the compiled program is the update alone) on
  ``steps.Batch.from_tokens(tokens)``.
  """
  graphdef = nnx.graphdef(
      nnx.eval_shape(lambda: model_lib.Llama(config, rngs=nnx.Rngs(0))))
  return on_tokens(steps.make_train_step(graphdef, tx, with_grad_norm=False))


def on_tokens(step: steps.TrainStep) -> Callable[..., tuple[Any, Any, jax.Array]]:
  """An :mod:`apollo_lm.steps` train step taking ``tokens[B, T+1]``.

  Returns ``step(params, opt_state, tokens) -> (params, opt_state, loss)``:
  the benchmarks' inputs are one token array (:func:`token_spec`).
  """

  def train_step(params, opt_state, tokens):
    params, opt_state, metrics = step(params, opt_state,
                                      steps.Batch.from_tokens(tokens))
    return params, opt_state, metrics["loss"]

  return train_step


def token_spec(batch: int, seq_len: int) -> jax.ShapeDtypeStruct:
  """Abstract int32 tokens of a batch: ``[batch, seq_len + 1]``."""
  return jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)


# ------------------------------------------------------------------- timing --


def block(tree: Any) -> Any:
  """Waits for every array of ``tree``; returns it."""
  return jax.block_until_ready(tree)


def interleaved_medians(
    runners: Mapping[str, Callable[[int], list[float]]],
    rounds: int,
) -> dict[str, dict[str, Any]]:
  """Runs each runner once per round, all interleaved, rounds after rounds.

  Args:
    runners: name -> ``run(round_index) -> list of per-call seconds`` (the
      runner does its own set-up and warm-up and must block on results).
    rounds: number of rounds; the order of the runners rotates every round so
      none is always first after another's allocation.

  Returns:
    name -> ``{"best_median_s", "median_of_medians_s", "round_medians_s"}``:
    the best (smallest) per-round median, the median of per-round medians,
    and all per-round medians.
  """
  names = list(runners)
  per_round: dict[str, list[float]] = {n: [] for n in names}
  for r in range(rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for n in order:
      per_round[n].append(statistics.median(runners[n](r)))
  return {
      n: {"best_median_s": min(v), "median_of_medians_s": statistics.median(v),
          "round_medians_s": v}
      for n, v in per_round.items()
  }


def time_calls(fn: Callable[[], Any], calls: int) -> list[float]:
  """Seconds of each of ``calls`` consecutive blocking calls of ``fn``."""
  times = []
  for _ in range(calls):
    t0 = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - t0)
  return times

