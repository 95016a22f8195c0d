# Copyright 2025 The apollo_optax Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Device mesh and parameter sharding for the LLaMA model.

Parameters carry ``nnx.with_partitioning`` annotations over the mesh axes in
:data:`MESH_AXES`; the helpers here build such a mesh and place parameters
according to those annotations.

The mesh uses ``AxisType.Auto``: the partitioner (GSPMD/Shardy) propagates
shardings from the parameters and from the activation hints in
:func:`constrain`. With ``AxisType.Explicit`` shardings become part of array
types and every matmul whose operands disagree (e.g. a batch-sharded
activation times an fsdp-sharded kernel, which is the normal FSDP case) must
state its output sharding or reshard by hand, which would put mesh-specific
code into every layer of the model for no gain in what gets compiled.
"""

from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar

from flax import nnx
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

MESH_AXES: Final[tuple[str, str, str]] = ("data", "fsdp", "tensor")

M = TypeVar("M", bound=nnx.Module)


def make_mesh(data: int, fsdp: int, tensor: int,
              devices: Sequence[jax.Device] | None = None
              ) -> jax.sharding.Mesh:
  """Returns a ``(data, fsdp, tensor)`` mesh with axis names :data:`MESH_AXES`.

  Args:
    data: Size of the pure data-parallel axis (parameters replicated).
    fsdp: Size of the axis over which parameters and the batch are sharded.
    tensor: Size of the tensor-parallel axis (heads / MLP features).
    devices: Devices to use; all of ``jax.devices()`` by default.

  Raises:
    ValueError: if ``data * fsdp * tensor`` is not the number of devices.
  """
  num_devices = len(devices) if devices is not None else jax.device_count()
  if min(data, fsdp, tensor) < 1 or data * fsdp * tensor != num_devices:
    raise ValueError(
        f"make_mesh: data * fsdp * tensor = {data} * {fsdp} * {tensor} must "
        f"equal the number of devices, {num_devices}, with every axis >= 1.")
  return jax.make_mesh(
      (data, fsdp, tensor), MESH_AXES,
      axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
      devices=devices)


def mesh_is_set() -> bool:
  """Whether the current mesh (``jax.set_mesh``) has all of :data:`MESH_AXES`.

  Without such a mesh, sharding annotations and hints are inert, so the model
  runs unchanged on one device or under an unrelated mesh.
  """
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and set(MESH_AXES) <= set(mesh.axis_names)


def constrain(x: jax.Array, spec: Sequence[Any]) -> jax.Array:
  """Hints the sharding of activation ``x`` if :func:`mesh_is_set`."""
  if not mesh_is_set():
    return x
  return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def param_shardings(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """``NamedSharding`` for every variable of ``tree`` from its annotation.

  Args:
    tree: An ``nnx`` module or ``nnx.State`` (concrete or abstract).
    mesh: The mesh the annotations refer to.

  Returns:
    An ``nnx.State`` of ``NamedSharding`` (unannotated arrays replicated),
    e.g. for ``jax.jit(out_shardings=...)`` or checkpoint restoration.
  """
  state = tree if isinstance(tree, nnx.State) else nnx.state(tree)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                      nnx.get_partition_spec(state))


def shard_model(model: M, mesh: jax.sharding.Mesh) -> M:
  """Moves the state of ``model`` onto ``mesh`` per its annotations, in place.

  Returns ``model`` for chaining. Use :func:`create_sharded` instead when the
  unsharded model would not fit on one device.
  """
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, param_shardings(state, mesh)))
  return model


def create_sharded(make_model: Callable[[], M], mesh: jax.sharding.Mesh) -> M:
  """Builds ``make_model()`` directly sharded over ``mesh``.

  Initialisation runs inside ``nnx.jit`` with a sharding constraint on every
  variable, so each device only ever materialises its own shards.

  Args:
    make_model: Constructs the module, e.g.
      ``lambda: Llama(config, rngs=nnx.Rngs(0))``.
    mesh: Mesh with the axis names used by the annotations.
  """

  @nnx.jit
  def create() -> M:
    model = make_model()
    state = nnx.state(model)
    nnx.update(model, jax.lax.with_sharding_constraint(
        state, nnx.get_partition_spec(state)))
    return model

  with jax.set_mesh(mesh):
    return create()
