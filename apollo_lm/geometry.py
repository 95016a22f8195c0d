"""Batch and mesh geometry of a run: devices, mesh, micro-batches, rows.

:func:`make_geometry` checks the batch flags against the devices and builds
the ``(data, fsdp, tensor)`` mesh; :func:`global_batch` turns this process's
rows of a batch into the global ``steps.Batch`` of ``(A, B / A, T)`` arrays
the step takes (``A`` = gradient-accumulation micro-batches).
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

from apollo_lm import sharding as sharding_lib
from apollo_lm import steps
from apollo_lm.run_config import TrainConfig
from apollo_lm.errors import ConfigError

BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Mesh and batch geometry of a run, validated against the devices."""

  mesh: jax.sharding.Mesh
  batch_size: int
  grad_accum: int
  seq_len: int
  process_index: int
  process_count: int

  @property
  def micro_batch(self) -> int:
    return self.batch_size // self.grad_accum

  @property
  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec(None, BATCH_AXES, None))

  def for_eval(self) -> Geometry:
    """Evaluation batches: one micro-batch, no accumulation."""
    return dataclasses.replace(self, batch_size=self.micro_batch,
                               grad_accum=1)


def _devices(num_devices: int | None) -> list[jax.Device]:
  devices = jax.devices()
  if num_devices is None:
    return devices
  if not 1 <= num_devices <= len(devices):
    raise ConfigError("--num-devices",
                      f"must be in [1, {len(devices)}], got {num_devices}.")
  return devices[:num_devices]


def parse_mesh(spec: str | None, num_devices: int) -> tuple[int, int, int]:
  """``"DATA,FSDP,TENSOR"`` (None: all devices on data) -> three sizes."""
  if spec is None:
    return num_devices, 1, 1
  try:
    sizes = tuple(int(s) for s in spec.split(","))
  except ValueError:
    sizes = ()
  if len(sizes) != 3 or min(sizes) < 1:
    raise ConfigError(
        "--mesh", f"expected three positive ints DATA,FSDP,TENSOR, got "
        f"{spec!r}.")
  if math.prod(sizes) != num_devices:
    raise ConfigError(
        "--mesh", f"{spec} multiplies to {math.prod(sizes)}, but "
        f"{num_devices} devices are used; DATA*FSDP*TENSOR must equal the "
        "device count.")
  return sizes


def make_geometry(config: TrainConfig) -> Geometry:
  """Checks the mesh and batch options against the devices; builds the mesh."""
  devices = _devices(config.num_devices)
  data, fsdp, tensor = parse_mesh(config.mesh, len(devices))
  batch, accum = config.batch_size, config.grad_accum
  if batch % accum:
    raise ConfigError("--batch-size", f"{batch} is not divisible by "
                      f"--grad-accum {accum}.")
  micro = batch // accum
  if micro % (data * fsdp):
    raise ConfigError(
        "--batch-size", f"each of the {accum} micro-batch(es) has {micro} "
        f"sequences, not divisible by the data-parallel size data*fsdp = "
        f"{data * fsdp}; use a multiple of {data * fsdp * accum}.")
  count = jax.process_count()
  if batch % (count * accum):
    raise ConfigError(
        "--batch-size", f"{batch} must be divisible by the number of "
        f"processes times --grad-accum, {count} * {accum}.")
  return Geometry(
      mesh=sharding_lib.make_mesh(data, fsdp, tensor, devices),
      batch_size=batch, grad_accum=accum, seq_len=config.seq_len,
      process_index=jax.process_index(), process_count=count)


def global_batch(rows: tuple[np.ndarray, ...],
                 geometry: Geometry) -> steps.Batch:
  """This process's ``(inputs, targets)`` rows -> the global batch.

  Rows with more fields in the order of :class:`apollo_lm.steps.Batch`
  (fine-tuning: loss mask, segment ids, positions) keep them.

  Local row ``i`` goes to micro-batch ``i % A``: with every process holding
  a multiple of ``A`` consecutive global rows, micro-batch ``a`` is global
  rows ``a, a + A, ...`` whatever the number of processes.
  """
  a = geometry.grad_accum
  shape = (a, geometry.micro_batch, geometry.seq_len)

  def put(local_rows: np.ndarray) -> jax.Array:
    local = local_rows.reshape(-1, a, geometry.seq_len).swapaxes(0, 1)
    return jax.make_array_from_process_local_data(
        geometry.batch_sharding, np.ascontiguousarray(local), shape)

  return steps.Batch(*(None if r is None else put(r) for r in rows))
