"""Compile for accelerators that are not present: H100, A100, TPU v5p.

JAX compiles ahead of time for *compile-only* devices: with the TPU runtime
(``libtpu``) or the CUDA plugin installed (``make accel-env`` builds the side
environment ``.venv-accel``; neither is a project dependency),
``jax.experimental.topologies.get_topology_desc`` returns device objects of a
target that this machine does not have. A program lowered on
``jax.ShapeDtypeStruct`` inputs placed on those devices (``sharding=``)
compiles with that backend's compiler, and ``compiled.memory_analysis()``
reports the bytes *per device* that its buffer assignment needs, without
allocating anything. A program that does not fit the device fails to compile
(TPU) or reports more bytes than the device has (GPU).

Targets (:data:`TARGETS`):

* ``cpu``: this machine's XLA:CPU (``jax_num_cpu_devices`` host devices);
* ``h100`` / ``a100``: XLA:GPU for an H100 SXM5 80GB / A100 SXM4 80GB,
  described by the target configs in ``benchmarks/gpu_targets/*.txtpb`` that
  we wrote from NVIDIA's datasheets (the device memory and HBM bandwidth are
  read from there). CUDA's ``ptxas`` compiles the kernels. No device means no
  autotuning: GEMMs get the compiler's default (Triton) fusions and no cuBLAS
  workspace is counted;
* ``tpu_v5p``: libtpu's compiler for TPU v5p chips (``v5p:2x2x2``, 8 chips;
  ``TPU_SKIP_MDS_QUERY=1`` stops libtpu from looking for a cloud metadata
  server).

Device memory, HBM bandwidth and dense bf16 peak per device are in
:class:`Target`, from the vendors' tables (NVIDIA H100/A100 datasheets,
Google Cloud's TPU v5p page).

Usage::

  target = targets.get("h100")
  devices = targets.devices(target, 8)
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  compiled = jax.jit(step).lower(*abstract_args_on(mesh)).compile()
  targets.memory_bytes(compiled)["total_bytes"] <= target.memory_bytes
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import re
from typing import Any, Callable

import jax

GPU_TARGETS_DIR = pathlib.Path(__file__).resolve().parent / "gpu_targets"
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Target:
  """A device to compile for.

  Attributes:
    name: the ``--target`` value.
    label: how reports name the backend, e.g. ``"H100 compiled"``.
    platform: ``"cpu"``, ``"cuda"`` or ``"tpu"``.
    device_kind: what the device calls itself (checked after creation).
    memory_bytes: device memory per device (None for the CPU: host RAM).
    hbm_bytes_per_s: memory bandwidth per device (None for the CPU).
    peak_flops: dense bfloat16 peak per device (None for the CPU).
    gpu_config: file name in :data:`GPU_TARGETS_DIR` (GPU targets only).
    tpu_topology: topology name of 8 chips (TPU targets only).
    source: where the figures come from.
  """

  name: str
  label: str
  platform: str
  device_kind: str
  memory_bytes: int | None = None
  hbm_bytes_per_s: float | None = None
  peak_flops: float | None = None
  gpu_config: str | None = None
  tpu_topology: str | None = None
  source: str = ""


def gpu_config_fields(text: str) -> dict[str, float]:
  """Top-level numeric fields of ``gpu_device_info`` in a target config.

  Only ``name: number`` lines are read (comments after ``#`` dropped), e.g.
  ``{"memory_bandwidth": 3.35e12, "device_memory_size": 85899345920, ...}``.
  """
  fields: dict[str, float] = {}
  for line in text.splitlines():
    line = line.split("#", 1)[0].strip()
    match = re.fullmatch(r"([a-z_]+)\s*:\s*([0-9.eE+-]+)", line)
    if match and match.group(1) not in fields:
      fields[match.group(1)] = float(match.group(2))
  return fields


def _gpu_target(name: str, label: str, config: str, kind: str,
                peak_flops: float, source: str) -> Target:
  fields = gpu_config_fields((GPU_TARGETS_DIR / config).read_text())
  return Target(
      name=name, label=label, platform="cuda", device_kind=kind,
      memory_bytes=int(fields["device_memory_size"]),
      hbm_bytes_per_s=fields["memory_bandwidth"], peak_flops=peak_flops,
      gpu_config=config, source=source)


TARGETS: dict[str, Target] = {
    "cpu": Target(name="cpu", label="XLA:CPU", platform="cpu",
                  device_kind="cpu", source="this machine"),
    "h100": _gpu_target(
        "h100", "H100 compiled", "h100_sxm_80gb.txtpb",
        "NVIDIA H100 80GB HBM3", 989.4e12,
        "NVIDIA H100 SXM5 datasheet: 80 GB HBM3, 3.35 TB/s, 989.4 dense "
        "bf16 TFLOPS"),
    "a100": _gpu_target(
        "a100", "A100 compiled", "a100_sxm_80gb.txtpb",
        "NVIDIA A100-SXM4-80GB", 312e12,
        "NVIDIA A100 SXM4 80GB datasheet: 80 GB HBM2e, 2,039 GB/s, 312 dense "
        "bf16 TFLOPS"),
    "tpu_v5p": Target(
        name="tpu_v5p", label="TPU v5p compiled", platform="tpu",
        device_kind="TPU v5", memory_bytes=95 * 10**9,
        hbm_bytes_per_s=2765e9, peak_flops=459e12, tpu_topology="v5p:2x2x2",
        source="Google Cloud TPU v5p page: 95 GB HBM2e, 2,765 GB/s, 459 bf16 "
        "TFLOPS per chip"),
}


def get(name: str) -> Target:
  """The :class:`Target` called ``name``.

  Raises:
    ValueError: ``name`` is not one of :data:`TARGETS`.
  """
  if name not in TARGETS:
    raise ValueError(
        f"target: unknown target {name!r}; allowed values: "
        f"{', '.join(TARGETS)}.")
  return TARGETS[name]


def missing_runtime(target: Target) -> str | None:
  """Why ``target`` cannot be compiled for here, or None if it can."""
  if target.platform == "cpu":
    return None
  import importlib.util  # pylint: disable=g-import-not-at-top
  module = {"cuda": "jax_cuda12_plugin", "tpu": "libtpu"}[target.platform]
  if importlib.util.find_spec(module) is None:
    return (f"target {target.name}: the {module} package is missing; build "
            "the side environment with `make accel-env` and run with "
            ".venv-accel/bin/python")
  return None


@functools.cache
def _topology_devices(name: str) -> tuple[Any, ...]:
  target = get(name)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if target.platform == "tpu":
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    topo = topologies.get_topology_desc(target.tpu_topology, platform="tpu")
  else:
    topo = topologies.get_topology_desc(
        platform="cuda", topology="1x1x8",
        target_config=(GPU_TARGETS_DIR / target.gpu_config).read_text())
  devices = tuple(topo.devices)
  if devices[0].device_kind != target.device_kind:
    raise RuntimeError(
        f"target {name}: got devices of kind {devices[0].device_kind!r}, "
        f"expected {target.device_kind!r}")
  return devices


def devices(target: Target | str, count: int) -> list[Any]:
  """``count`` devices of ``target`` (compile-only ones for accelerators).

  Args:
    target: a :class:`Target` or its name.
    count: 1 to 8.

  Raises:
    ValueError: bad ``count``, or too few CPU devices (set
      ``jax.config.update("jax_num_cpu_devices", 8)`` before using JAX).
    RuntimeError: the accelerator runtime is missing (see
      :func:`missing_runtime`).
  """
  target = get(target) if isinstance(target, str) else target
  if not 1 <= count <= 8:
    raise ValueError(f"count: must be between 1 and 8, got {count}.")
  if target.platform == "cpu":
    found = jax.devices("cpu")
    if len(found) < count:
      raise ValueError(
          f"count: {count} CPU devices wanted, {len(found)} exist; call "
          "jax.config.update('jax_num_cpu_devices', 8) before using JAX.")
    return list(found[:count])
  reason = missing_runtime(target)
  if reason:
    raise RuntimeError(reason)
  return list(_topology_devices(target.name)[:count])


def memory_bytes(compiled: Any) -> dict[str, int]:
  """Byte counts of ``compiled.memory_analysis()`` (per device).

  ``total_bytes`` = argument + output − alias + temp: donated outputs alias
  their arguments and are not counted twice. This is the peak estimate of the
  buffer assignment (code and constants are a few MB more on GPU/TPU).
  """
  m = compiled.memory_analysis()
  out = {
      "argument_bytes": int(m.argument_size_in_bytes),
      "output_bytes": int(m.output_size_in_bytes),
      "alias_bytes": int(m.alias_size_in_bytes),
      "temp_bytes": int(m.temp_size_in_bytes),
  }
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"]
                        - out["alias_bytes"] + out["temp_bytes"])
  return out


_BYTES_NEEDED = re.compile(
    r"(?:Used|needed|requires?|allocat\w*)\D{0,40}?([0-9.]+)\s*([KMGT]i?B?)",
    re.IGNORECASE)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def compile_memory(lower: Callable[[], Any]) -> dict[str, Any]:
  """``memory_bytes`` of ``lower().compile()``; out-of-memory as a result.

  A TPU program larger than the chip fails to compile with
  ``RESOURCE_EXHAUSTED``; that is returned as ``{"oom": True, "error": ...}``
  (with ``total_bytes`` when the message states the bytes used) instead of
  raised, so a search can treat it as "does not fit".
  """
  try:
    compiled = lower().compile()
  except Exception as e:  # pylint: disable=broad-except
    message = str(e)
    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
      raise
    out: dict[str, Any] = {"oom": True, "error": message.splitlines()[0][:300]}
    match = _BYTES_NEEDED.search(message)
    if match:
      out["total_bytes"] = int(float(match.group(1))
                               * _UNITS[match.group(2)[0].upper()])
    return out
  return {"oom": False, **memory_bytes(compiled)}


def largest_fitting(fits: Callable[[int], bool], start: int = 1,
                    limit: int = 4096, guess: int | None = None,
                    bounds: tuple[int, int] | None = None,
                    ) -> tuple[int, dict[int, bool]]:
  """The largest ``n`` in ``[start, limit]`` with ``fits(n)``, by search.

  Without ``guess``: doubles ``n`` from ``start`` until ``fits`` fails. With
  ``guess`` (e.g. from a linear fit of two compiles): checks ``guess``, then
  gallops up (or down) from it in steps 1, 2, 4, ... until the answer
  changes. Then bisects between the last fitting and the first failing
  value. ``fits`` must be monotone (true up to some ``n``, false after); each
  value is evaluated at most once, so a good guess costs two evaluations.

  ``bounds=(lo, hi)``: results already known (e.g. from an earlier run's
  compiles): ``lo`` fits and ``hi`` does not. Neither is evaluated again;
  the search stays strictly between them (replacing ``start`` and
  ``limit``): from ``guess`` as above, or by bisection without one.

  Returns:
    ``(n, tried)``: ``n`` is 0 when even ``start`` does not fit; ``tried``
    maps every evaluated value to its result (not the ``bounds``).

  Raises:
    ValueError: ``start`` < 1 or ``limit`` < ``start``; ``bounds`` not
      ``1 <= lo < hi``.
  """
  known: dict[int, bool] = {}
  if bounds is not None:
    lo, hi = bounds
    if not 1 <= lo < hi:
      raise ValueError(
          f"bounds: need 1 <= lo < hi (lo fits, hi does not), got {bounds}.")
    known = {lo: True, hi: False}
    start, limit = lo, hi
  if start < 1 or limit < start:
    raise ValueError(
        f"start, limit: need 1 <= start <= limit, got {start}, {limit}.")
  tried: dict[int, bool] = {}

  def check(n: int) -> bool:
    if n in known:
      return known[n]
    if n not in tried:
      tried[n] = bool(fits(n))
    return tried[n]

  good: int | None = None
  bad: int | None = None
  if bounds is not None and guess is None:
    good, bad = bounds
  elif guess is not None:
    guess = min(max(guess, start), limit)
    step = 1
    if check(guess):
      good = guess
      while bad is None and good < limit:
        nxt = min(good + step, limit)
        if check(nxt):
          good = nxt
        else:
          bad = nxt
        step *= 2
      if bad is None:
        return good, tried
    else:
      bad = guess
      while good is None and bad > start:
        nxt = max(bad - step, start)
        if check(nxt):
          good = nxt
        else:
          bad = nxt
        step *= 2
      if good is None:
        return 0, tried
  else:
    if not check(start):
      return 0, tried
    good = start
    while bad is None:
      nxt = min(good * 2, limit)
      if nxt == good:
        return good, tried
      if check(nxt):
        good = nxt
      else:
        bad = nxt
  while bad - good > 1:
    mid = (good + bad) // 2
    if check(mid):
      good = mid
    else:
      bad = mid
  return good, tried


def on_devices(tree: Any, devices_: list[Any], spec: Any = None) -> Any:
  """``tree``'s arrays as ``ShapeDtypeStruct``s placed on ``devices_``.

  ``spec`` is a ``PartitionSpec`` over a mesh axis ``"data"`` of all the
  devices (None: replicated). Lowering a jitted function on such inputs
  compiles it for those devices' backend.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.Mesh(np.array(devices_), ("data",))
  sharding = NamedSharding(mesh, spec if spec is not None else PartitionSpec())
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      tree)


def add_argument(parser: Any) -> None:
  """Adds ``--target`` (one of :data:`TARGETS`, default ``cpu``)."""
  parser.add_argument(
      "--target", default="cpu", choices=list(TARGETS),
      help="backend to compile for: cpu (this machine) or a compile-only "
      "accelerator (needs `make accel-env`, run with .venv-accel/bin/python)")


def describe(target: Target) -> dict[str, Any]:
  """What a results file records about ``target``: figures, config, versions."""
  out: dict[str, Any] = dataclasses.asdict(target)
  out["compiler_versions"] = versions()
  if target.gpu_config:
    out["gpu_config_text"] = (GPU_TARGETS_DIR / target.gpu_config).read_text()
    out["ptxas"] = _ptxas_version()
  return out


def _ptxas_version() -> str:
  import shutil  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  path = shutil.which("ptxas")
  if path is None:
    return "not found"
  try:
    text = subprocess.run([path, "--version"], capture_output=True, text=True,
                          check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return path
  return f"{path}: {text.strip().splitlines()[-1]}"


def versions() -> dict[str, str]:
  """Versions of the compilers used (jaxlib, CUDA plugin, libtpu) if present."""
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  out = {}
  for dist in ("jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "libtpu"):
    try:
      out[dist] = md.version(dist)
    except md.PackageNotFoundError:
      pass
  return out
