"""Smoke tests: every benchmark script runs in ``--smoke`` mode and writes
results of the expected structure with sane values.

The scripts run as subprocesses (their own JAX runtime, one CPU device, not
this session's eight virtual ones), all four at once.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = ("memory", "step_memory", "update_speed", "throughput", "quality",
           "projection_profile")
# The quality smoke trains on this repository's own sources.
QUALITY_DATA = ["--data", "apollo_optax", "apollo_lm"]
# One worker runs the whole module, so the module fixture's six subprocesses
# start once in `make test` (--dist loadgroup), not once per worker.
pytestmark = [pytest.mark.xdist_group("benchmarks_smoke"), pytest.mark.slow]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
  out = tmp_path_factory.mktemp("bench")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["APOLLO_LM_CACHE"] = str(out / "data_cache")
  extra_args = {"quality": [*QUALITY_DATA, "--cache", str(out / "xla")]}
  procs = {
      name: subprocess.Popen(
          [sys.executable, "-m", f"benchmarks.{name}", "--smoke",
           "--out-dir", str(out), *extra_args.get(name, [])],
          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          text=True)
      for name in SCRIPTS}
  loaded = {}
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{err[-3000:]}"
    assert (out / f"{name}.md").read_text().startswith(f"# {name}")
    loaded[name] = json.loads((out / f"{name}.json").read_text())
  loaded["out_dir"] = out
  return loaded


def _check_metadata(meta: dict) -> None:
  assert "benchmarks" in meta["command"] and "--smoke" in meta["command"]
  assert meta["hardware"]["cpus"] >= 1
  assert set(meta["versions"]) >= {"python", "jax", "jaxlib", "optax", "flax"}


def test_memory(results):
  r = results["memory"]
  _check_metadata(r["metadata"])
  assert (results["out_dir"] / "memory.png").stat().st_size > 0
  for dtype, itemsize in (("float32", 4), ("bfloat16", 2)):
    for row in r[dtype].values():
      opts = row["optimizers"]
      assert row["weights_bytes"] == row["params"] * itemsize
      # AdamW keeps two moments plus int32 step counters.
      assert opts["adamw"]["formula_bytes"] == 2 * row["weights_bytes"]
      assert 0 < opts["adamw"]["scalars_bytes"] <= 16
      for entry in opts.values():
        assert 0 <= entry["scalars_bytes"] < 4096
      assert (opts["apollo_mini"]["state_bytes"]
              < opts["apollo"]["state_bytes"]
              < opts["adamw"]["state_bytes"])


def test_step_memory(results):
  r = results["step_memory"]
  _check_metadata(r["metadata"])
  by_opt = r["configs"]["smoke"]
  for entry in by_opt.values():
    small, large = entry["by_batch"]["1"], entry["by_batch"]["2"]
    assert 0 < small["total_bytes"] < large["total_bytes"] < 2**32
    assert small["alias_bytes"] > 0  # params and state were donated
    assert entry["fit"]["bytes_per_sample"] > 0
    assert entry["fit"]["max_batch_80gib"] > 1
  assert (by_opt["apollo_mini"]["update_only"]["argument_bytes"]
          < by_opt["adamw"]["update_only"]["argument_bytes"])


def test_update_speed(results):
  r = results["update_speed"]
  _check_metadata(r["metadata"])
  cfg = r["configs"]["smoke"]
  assert 0.1 < cfg["copy_bandwidth_gbs"] < 1000
  for t in cfg["timings"].values():
    assert len(t["round_medians_s"]) == 2
    assert 0 < t["best_median_s"] < 30
    # The smoke tree fits in cache, so the DRAM floor can be beaten: check
    # the bookkeeping, not a bound.
    assert t["floor_s"] == pytest.approx(
        t["traffic_bytes"] / (cfg["copy_bandwidth_gbs"] * 1e9), rel=1e-6)
    assert t["floor_fraction"] == pytest.approx(
        t["floor_s"] / t["best_median_s"])
  assert cfg["timings"]["adamw"]["vs_adamw"] == 1.0


def test_projection_profile(results):
  r = results["projection_profile"]
  _check_metadata(r["metadata"])
  assert r["matrices"] == 7 * 4  # 7 stacked kernels of the 4-layer smoke tree
  for t in r["timings"].values():
    assert len(t["round_medians_s"]) == 2 and 0 < t["best_median_s"] < 30
  for dtype in ("f32", "bf16"):
    assert r["matmul_gflops"][dtype] == pytest.approx(
        r["product_gflop"] / r["timings"][f"product_{dtype}"]["best_median_s"])
  passes = r["hlo_passes_over_g"]
  assert len(passes["apollo"]["passes_per_lowrank_leaf"]) == 7
  # Every update reads each gradient at least once; APOLLO's product, limiter
  # norm and update cannot share one pass.
  for variant in passes.values():
    assert min(variant["passes_per_lowrank_leaf"].values()) >= 1
  assert passes["apollo"]["mean"] >= 2


def test_gradient_passes_follows_bitcasts():
  from benchmarks import projection_profile  # pylint: disable=g-import-not-at-top
  hlo = """HloModule m

ENTRY %main (grads_a: f32[4,4], p: f32[4,4]) -> f32[4,4] {
  %grads_a = f32[4,4]{1,0} parameter(0)
  %p = f32[4,4]{1,0} parameter(1)
  %bitcast.1 = f32[16]{0} bitcast(%grads_a)
  %fusion.1 = f32[4]{0} fusion(%bitcast.1, %p), kind=kLoop, calls=%c1
  %fusion.2 = f32[4,4]{1,0} fusion(%p, %grads_a, %fusion.1), kind=kLoop, calls=%c2
  ROOT %tuple = (f32[4,4]{1,0}) tuple(%fusion.2)
}
"""
  assert projection_profile.gradient_passes(hlo, ["%grads_a", "%p"]) == {
      "%grads_a": 2, "%p": 2}


def test_throughput(results):
  r = results["throughput"]
  _check_metadata(r["metadata"])
  timings = r["configs"]["smoke"]["timings"]
  assert set(timings) == {"adamw", "apollo_mini"}
  for t in timings.values():
    assert t["tokens_per_s"] == pytest.approx(
        t["batch"] * r["seq_len"] / t["best_median_s"])
    assert t["tokens_per_s"] > 0


def test_quality(results):
  r = results["quality"]
  _check_metadata(r["metadata"])
  assert r["budget"]["steps"] == 4
  runs = r["runs"]
  assert {x["variant"] for x in runs} == {
      "adamw_lr1e-03", "adamw_lr1e-02", "apollo", "apollo_no_limiter",
      "adamw_lr1e-03_nonlowrank1e-02"}
  tiny = r["summary"]["tiny"]
  adamw = {v: s for v, s in tiny.items()
           if s["optimizer"] == "adamw" and s["group"] == "main"}
  best = min(adamw, key=lambda v: adamw[v]["eval_loss_mean"])
  assert adamw[best]["is_best_adamw"]
  assert sum(s["is_best_adamw"] for s in adamw.values()) == 1
  for s in tiny.values():
    assert s["eval_ppl_of_mean"] == pytest.approx(
        math.exp(s["eval_loss_mean"]))
    assert s["ppl_vs_best_adamw"] == pytest.approx(
        s["eval_ppl_of_mean"] / adamw[best]["eval_ppl_of_mean"])
  assert tiny["apollo_no_limiter"]["hparams"]["limiter"] is False
  assert tiny["apollo"]["hparams"]["limiter"] is True
  assert tiny["apollo"]["state_bytes"] < adamw[best]["state_bytes"]
  markdown = (results["out_dir"] / "quality.md").read_text()
  assert "AdamW (best of sweep)" in markdown and "apollo_no_limiter" in markdown
  assert "control: AdamW, embedding/head/norms at 0.01" in markdown
  control = tiny["adamw_lr1e-03_nonlowrank1e-02"]
  assert not control["is_best_adamw"]
  assert control["hparams"]["non_lowrank_lr"] == 1e-2
  assert (results["out_dir"] / "quality_curves.png").stat().st_size > 0
  log = (results["out_dir"] / "quality_runs.jsonl").read_text()
  assert len(log.splitlines()) == 5
