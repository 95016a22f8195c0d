"""Tests of benchmarks/targets.py: batch search, target configs, CPU path.

The accelerator compiles need the side environment (``make accel-env``:
libtpu, the CUDA plugin); without it (as in CI) those tests are skipped.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import apollo_optax
from apollo_lm.configs import get_config
from benchmarks import accel_claims
from benchmarks import common
from benchmarks import qapollo_memory
from benchmarks import targets
from benchmarks import update_cost


# ------------------------------------------------------------ batch search --


@pytest.mark.parametrize("threshold", [0, 1, 2, 3, 7, 8, 13, 24, 100, 255, 256])
@pytest.mark.parametrize("start", [1, 4])
def test_largest_fitting_finds_threshold(threshold, start):
  calls = []

  def fits(n):
    calls.append(n)
    return n <= threshold

  found, tried = targets.largest_fitting(fits, start=start, limit=256)
  expected = threshold if threshold >= start else 0
  assert found == expected
  assert tried == {n: n <= threshold for n in calls}
  assert len(calls) == len(set(calls))  # no value compiled twice
  # Doubling then bisection: O(log2(limit)) evaluations.
  assert len(calls) <= 2 * math.ceil(math.log2(256)) + 1


@pytest.mark.parametrize("threshold", [0, 1, 5, 9, 10, 11, 12, 40, 200])
@pytest.mark.parametrize("guess", [1, 10, 11, 300])
def test_largest_fitting_from_a_guess(threshold, guess):
  calls = []

  def fits(n):
    calls.append(n)
    return n <= threshold

  found, tried = targets.largest_fitting(fits, start=1, limit=256, guess=guess)
  assert found == min(threshold, 256)
  assert tried == {n: n <= threshold for n in calls}
  assert len(calls) == len(set(calls))
  if threshold == guess:  # An exact guess costs two evaluations.
    assert sorted(calls) == [guess, guess + 1]


@pytest.mark.parametrize("threshold", [2, 3, 10, 22, 23, 31, 32])
@pytest.mark.parametrize("guess", [None, 2, 23, 33, 60])
def test_largest_fitting_within_known_bounds(threshold, guess):
  """bounds=(2, 33): 2 fits and 33 does not, known; neither evaluated."""
  calls = []

  def fits(n):
    calls.append(n)
    return n <= threshold

  found, tried = targets.largest_fitting(fits, limit=256, guess=guess,
                                         bounds=(2, 33))
  assert found == threshold
  assert tried == {n: n <= threshold for n in calls}
  assert len(calls) == len(set(calls))
  assert all(2 < n < 33 for n in calls)
  # Pinned: found fits and found + 1 does not, evaluated or known.
  assert found == 2 or tried[found] is True
  assert found + 1 == 33 or tried[found + 1] is False
  if guess is None:  # Bisection of (2, 33): at most ceil(log2(31)) = 5.
    assert len(calls) <= 5
  elif guess == threshold:  # An exact guess: itself and one more.
    assert sorted(calls) == [n for n in (guess, guess + 1) if 2 < n < 33]


@pytest.mark.parametrize("bounds", [(0, 5), (5, 5), (6, 5)])
def test_largest_fitting_rejects_bad_bounds(bounds):
  with pytest.raises(ValueError, match="bounds"):
    targets.largest_fitting(lambda n: True, bounds=bounds)


def test_largest_fitting_stops_at_limit():
  found, tried = targets.largest_fitting(lambda n: True, start=3, limit=20)
  assert found == 20
  assert max(tried) == 20


@pytest.mark.parametrize("start,limit", [(0, 10), (5, 4)])
def test_largest_fitting_rejects_bad_range(start, limit):
  with pytest.raises(ValueError, match="start, limit"):
    targets.largest_fitting(lambda n: True, start=start, limit=limit)


# ----------------------------------------------------------------- targets --


def test_unknown_target_names_the_allowed_values():
  with pytest.raises(ValueError, match="h100.*a100.*tpu_v5p"):
    targets.get("v100")


@pytest.mark.parametrize("name,memory,bandwidth", [
    ("h100", 80 * 2**30, 3.35e12),
    ("a100", 80 * 2**30, 2.039e12),
])
def test_gpu_target_figures_come_from_the_config_file(name, memory, bandwidth):
  target = targets.get(name)
  text = (targets.GPU_TARGETS_DIR / target.gpu_config).read_text()
  fields = targets.gpu_config_fields(text)
  assert fields["device_memory_size"] == target.memory_bytes == memory
  assert fields["memory_bandwidth"] == target.hbm_bytes_per_s == bandwidth
  assert 'platform_name: "CUDA"' in text
  assert target.device_kind in text


def test_gpu_config_fields_ignores_comments_and_nesting():
  text = """gpu_device_info {
  core_count: 108  # SMs
  # memory_bandwidth: 1
  cuda_compute_capability {
    major: 8
  }
}"""
  assert targets.gpu_config_fields(text) == {"core_count": 108.0, "major": 8.0}


def test_cpu_devices_and_bad_count():
  assert [d.platform for d in targets.devices("cpu", 8)] == ["cpu"] * 8
  with pytest.raises(ValueError, match="count"):
    targets.devices("cpu", 9)


def test_compile_memory_turns_resource_exhausted_into_a_result():

  class Lowered:

    def compile(self):
      raise RuntimeError(
          "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used "
          "101.50G of 95.74G hbm. Exceeded hbm capacity by 5.76G.")

  out = targets.compile_memory(Lowered)
  assert out["oom"] is True
  assert out["total_bytes"] == int(101.50 * 2**30)

  class Broken:

    def compile(self):
      raise RuntimeError("INVALID_ARGUMENT: something else")

  with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
    targets.compile_memory(Broken)


# ---------------------------------------------------------------- CPU path --


def _matmul_memory(target_name: str) -> dict:
  devices = targets.devices(target_name, 2)
  a = targets.on_devices(jax.ShapeDtypeStruct((512, 256), jnp.bfloat16),
                         devices, jax.sharding.PartitionSpec("data"))
  b = targets.on_devices(jax.ShapeDtypeStruct((256, 384), jnp.bfloat16),
                         devices)
  return targets.compile_memory(
      lambda: jax.jit(lambda a, b: a @ b).lower(a, b))


def test_cpu_compile_memory_is_per_device():
  out = _matmul_memory("cpu")
  assert out["oom"] is False
  # Per device: half of a (row-sharded), all of b, half of the output.
  assert out["argument_bytes"] == (256 * 256 + 256 * 384) * 2
  assert out["output_bytes"] == 256 * 384 * 2
  assert out["total_bytes"] == (out["argument_bytes"] + out["output_bytes"]
                                - out["alias_bytes"] + out["temp_bytes"])


def test_qapollo_memory_cpu_target():
  config = get_config("tiny", vocab_size=512, num_layers=1, remat=True,
                      dtype=jnp.bfloat16,
                      param_dtype=jnp.bfloat16, max_seq_len=256)
  out = qapollo_memory.measure(config, "apollo_mini_layerwise",
                               targets.get("cpu"))
  assert out["argument_bytes"] == (out["params_bytes"] + out["opt_state_bytes"]
                                   + (1 * (256 + 1)) * 4)
  assert 0 < out["total_bytes"] < 3 * out["argument_bytes"] + out["temp_bytes"]


# ---------------------------------------------- accelerators (side env only) --


@pytest.mark.parametrize("name,module", [("h100", "jax_cuda12_plugin"),
                                         ("a100", "jax_cuda12_plugin"),
                                         ("tpu_v5p", "libtpu")])
def test_accelerator_compile(name, module):
  pytest.importorskip(module)
  target = targets.get(name)
  assert targets.missing_runtime(target) is None
  out = _matmul_memory(name)
  assert out["oom"] is False
  assert out["argument_bytes"] == (256 * 256 + 256 * 384) * 2
  assert out["output_bytes"] == 256 * 384 * 2
  devices = targets.devices(name, 8)
  assert len({d.id for d in devices}) == 8
  assert np.all([d.device_kind == target.device_kind for d in devices])


@pytest.mark.parametrize("name,module", [("h100", "jax_cuda12_plugin"),
                                         ("tpu_v5p", "libtpu")])
def test_missing_runtime_explains_how_to_get_it(monkeypatch, name, module):
  # The runtime is hidden, so this checks the message whether or not the
  # accelerator runtimes are installed here.
  import importlib.util  # pylint: disable=g-import-not-at-top
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda m, *a: None if m == module else find_spec(m, *a))
  reason = targets.missing_runtime(targets.get(name))
  assert f"the {module} package is missing" in reason
  assert "make accel-env" in reason
  with pytest.raises(RuntimeError, match="accel-env"):
    targets.devices(name, 1)
  assert targets.missing_runtime(targets.get("cpu")) is None


# ------------------------------------------------------------ accel_claims --


def _tiny_bf16(remat=False):
  return accel_claims._config("tiny", remat=remat, smoke=True)  # pylint: disable=protected-access


@pytest.mark.parametrize("layout,n", [("ddp", 2), ("fsdp", 2)])
def test_accel_claims_step_on_cpu(layout, n):
  config = _tiny_bf16(remat=True)
  out = accel_claims.compile_step(config, "apollo_mini", targets.get("cpu"),
                                  n, layout, 1)
  assert out["fits"] and not out["oom"]
  per_device = out["params_bytes"] + out["state_bytes"]
  if layout == "fsdp":  # Sharded: about half per device (scalars replicated).
    assert out["argument_bytes"] < 0.75 * per_device
  else:
    assert out["argument_bytes"] >= per_device


@pytest.mark.parametrize("fixed,per_sample,capacity,expected", [
    (10, 3, 30, 6), (10, 3, 31, 7), (10, 3, 12, 0), (56, 2.4, 85.9, 12)])
def test_accel_claims_batch_search(monkeypatch, fixed, per_sample, capacity,
                                   expected):
  """The search on a toy memory model: total = fixed + per_sample · micro."""
  seen = []

  def fake_compile(config, method, target, n, layout, micro):
    seen.append(micro)
    total = fixed + per_sample * micro
    return {"oom": False, "total_bytes": total, "compile_s": 0,
            "fits": total <= target.memory_bytes}

  monkeypatch.setattr(accel_claims, "compile_step", fake_compile)
  target = dataclasses.replace(targets.get("cpu"), memory_bytes=capacity)
  found = accel_claims.largest_batch(None, "adamw", target, "ddp", 8,
                                     limit=64, log=lambda s: None)
  assert found["largest_micro_batch"] == expected
  assert len(seen) == len(set(seen))
  if expected >= 2:  # 1 and 2 give an exact line: two more compiles pin it.
    assert sorted(seen) == [1, 2, expected, expected + 1]
    assert found["compiles"][str(expected)]["fits"]
    assert not found["compiles"][str(expected + 1)]["fits"]


@pytest.mark.parametrize("guess", [None, 7, 12, 20])
def test_accel_claims_batch_search_from_bounds(monkeypatch, guess):
  """--batch-bounds 2 30 on the toy model 56 + 2.4 · micro <= 85.9 (12)."""
  seen = []

  def fake_compile(config, method, target, n, layout, micro):
    seen.append(micro)
    total = 56 + 2.4 * micro
    return {"oom": False, "total_bytes": total, "compile_s": 0,
            "fits": total <= target.memory_bytes}

  monkeypatch.setattr(accel_claims, "compile_step", fake_compile)
  target = dataclasses.replace(targets.get("cpu"), memory_bytes=85.9)
  found = accel_claims.largest_batch(None, "galore", target, "ddp", 8,
                                     limit=64, log=lambda s: None,
                                     bounds=(2, 30), guess=guess)
  assert found["largest_micro_batch"] == 12
  assert found["bounds"] == [2, 30]
  assert 1 not in seen and 2 not in seen and 30 not in seen
  assert len(seen) == len(set(seen))
  assert found["compiles"]["12"]["fits"]
  assert not found["compiles"]["13"]["fits"]
  if guess == 12:
    assert sorted(seen) == [12, 13]


def test_accel_claims_rejects_bad_batch_bounds():
  with pytest.raises(SystemExit):
    accel_claims.main(["--smoke", "--batch-bounds", "5", "3"])


def test_accel_claims_rejects_bad_layout():
  with pytest.raises(ValueError, match="layout"):
    accel_claims.build(_tiny_bf16(), "adamw", targets.devices("cpu", 1),
                       "zero3", 1)


# ------------------------------------------------------------- update_cost --


def test_kernel_bytes_counts_top_level_kernels():
  hlo = """HloModule m

%fused (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %n = f32[4]{0} negate(%p)
}

ENTRY %main (a: f32[4], b: bf16[2,8]) -> (f32[4], bf16[2,8]) {
  %a = f32[4]{0} parameter(0)
  %b = bf16[2,8]{1,0} parameter(1)
  %f = f32[4]{0} fusion(%a), kind=kLoop, calls=%fused
  %c = bf16[2,8]{1,0} copy(%b)
  ROOT %t = (f32[4]{0}, bf16[2,8]{1,0}) tuple(%f, %c)
}
"""
  by_opcode = {}
  # fusion: reads 16, writes 16; copy: reads 32, writes 32; no others.
  assert update_cost.kernel_bytes(hlo, by_opcode) == 96
  assert by_opcode == {"fusion": 32, "copy": 64}


def test_kernel_bytes_of_slicing_and_in_place_fusions():
  hlo = """HloModule m

%upd (p0: f32[8,100], p1: f32[100], p2: s32[]) -> f32[8,100] {
  %p1 = f32[100]{0} parameter(1)
  %p0 = f32[8,100]{1,0} parameter(0)
  %p2 = s32[] parameter(2)
  %z = s32[] constant(0)
  %r = f32[1,100]{1,0} reshape(%p1)
  ROOT %d = f32[8,100]{1,0} dynamic-update-slice(%p0, %r, %p2, %z)
}

%sl (q0: f32[8,100], q1: s32[]) -> f32[1,100] {
  %q0 = f32[8,100]{1,0} parameter(0)
  %q1 = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %s = f32[1,100]{1,0} dynamic-slice(%q0, %q1, %z), dynamic_slice_sizes={1,100}
}

ENTRY %main (a: f32[8,100], b: f32[100], i: s32[]) -> f32[8,100] {
  %a = f32[8,100]{1,0} parameter(0)
  %b = f32[100]{0} parameter(1)
  %i = s32[] parameter(2)
  %s = f32[1,100]{1,0} fusion(%a, %i), kind=kLoop, calls=%sl
  ROOT %u = f32[8,100]{1,0} fusion(%a, %b, %i), kind=kLoop, calls=%upd
}
"""
  # Slice: reads one row (400) and the index (4), writes 400. Update in
  # place: reads the new row (400) and the index (4), writes one row (400).
  assert update_cost.kernel_bytes(hlo) == 404 + 400 + 404 + 400


def test_update_cost_on_cpu():
  config = common.smoke_config(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  out = update_cost.measure(config, "adamw", targets.get("cpu"))
  params = apollo_optax.state_bytes(
      common.abstract_params(config, jnp.bfloat16))
  # AdamW reads params, grads and two moments and writes three of them.
  assert out["kernel_bytes"] >= 7 * params * 0.9
  assert out["flops"] > 0
  assert "predicted_s" not in out  # The CPU has no roofline figures.
