"""Optimizer state that follows the parameters' sharding.

Every state array of APOLLO is laid out along axes of a parameter: the
low-rank moments of a ``(L, d, f)`` kernel (d < f) are ``(L, rank, f)``, the
norm-growth limiter keeps one norm per matrix ``(L,)``, the Adam moments are
parameter-shaped. A state array is therefore sharded like the parameter along
the axes it shares with it, and unsharded along the rank axis. Each state
array is described by ``axes``: for each of its axes, the parameter axis it
comes from, or None (rank axis). Sharded that way, the update needs no
communication except reductions of low-rank-sized tensors: ``R = P G``
contracts a (possibly sharded) axis of G into a rank-sized result.

The shardings are found in the three ways states get created:

* eagerly, on concrete arrays (``tx.init(params)``, as ``nnx.Optimizer``
  does): from ``param.sharding``;
* under ``jax.jit`` with a mesh of ``Explicit`` axes: from the type
  ``jax.typeof(param).sharding`` (sharding in types);
* under ``jax.jit`` with ``Auto`` axes the shardings are not known while
  tracing: :func:`state_shardings` computes them for ``out_shardings``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from apollo_optax._src import dimension_numbers as dn



class Derivation(NamedTuple):
  """How a state array is laid out along the axes of its parameter.

  Attributes:
    axes: for each axis of the state array, the parameter axis it runs along,
      or None (the rank axis).
    receivers: parameter axes (among ``axes``) that take over the mesh axes of
      the parameter axes the state does not have: the low-rank moments of a
      ``(d, f)`` kernel sharded along d are sharded along f instead, so that
      each device still holds 1/devices of them (if f divides).
  """

  axes: tuple[Optional[int], ...]
  receivers: tuple[int, ...] = ()


def lowrank_derivation(layout: dn.MatrixLayout) -> Derivation:
  """The derivation of the stored low-rank moments of a matrix leaf.

  Example:
    >>> from apollo_optax._src import dimension_numbers as dn
    >>> layout = dn.MatrixLayout.create((4, 8, 32), dn.ApolloDimensionNumbers(1, 2))
    >>> lowrank_derivation(layout)  # (L, rank, f): d is projected away
    Derivation(axes=(0, None, 2), receivers=(2,))
  """
  kept = [a for a in range(len(layout.shape)) if a not in layout.projected_axes]
  kept.insert(layout.lowrank_rank_axis(), None)
  return Derivation(tuple(kept), layout.kept_axes)


def _names(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def derived_spec(
    spec: Sequence[Any],
    state_shape: Sequence[int],
    derivation: Derivation,
    mesh_shape: Mapping[str, int],
) -> PartitionSpec:
  """The spec of a state array derived from its parameter's ``spec``.

  Axis i of the state takes the mesh axes of parameter axis ``axes[i]``; the
  mesh axes of parameter axes the state lacks move to the first receiver axis
  whose size they divide (mesh axes of unknown size, e.g. logical names, do
  not move).

  Example:
    >>> from jax.sharding import PartitionSpec as P
    >>> d = Derivation(axes=(0, None, 2), receivers=(2,))
    >>> derived_spec(P(None, "fsdp", "tensor"), (4, 8, 32), d, {"fsdp": 4, "tensor": 2})
    P(None, None, ('tensor', 'fsdp'))
  """
  entries = [_names(e) for e in spec]
  ndim = max((a for a in derivation.axes if a is not None), default=-1) + 1
  entries += [()] * (ndim - len(entries))
  out = [() if a is None else entries[a] for a in derivation.axes]
  used = {name for names in out for name in names}
  dropped = [
      name for a, names in enumerate(entries) if a not in derivation.axes
      for name in names if name not in used
  ]
  for name in dropped:
    for i, a in enumerate(derivation.axes):
      names = out[i] + (name,)
      if a in derivation.receivers and all(n in mesh_shape for n in names):
        if state_shape[i] % math.prod(mesh_shape[n] for n in names) == 0:
          out[i] = names
          break
  return PartitionSpec(
      *(None if not n else n[0] if len(n) == 1 else n for n in out)
  )


def _is_explicit(sharding: NamedSharding) -> bool:
  return any(t == AxisType.Explicit for t in sharding.mesh.axis_types)


def explicit_sharding(x: jax.Array) -> Optional[NamedSharding]:
  """The sharding in the type of ``x`` under ``Explicit`` mesh axes, else None."""
  sharding = jax.typeof(x).sharding
  if isinstance(sharding, NamedSharding) and _is_explicit(sharding):
    return sharding
  return None


def param_sharding(param: Any) -> Optional[NamedSharding]:
  """The sharding that state derived from ``param`` follows, if any.

  A traced parameter has one only under a mesh with ``Explicit`` axes (its type
  carries it); a concrete ``jax.Array`` has its ``NamedSharding``. Otherwise
  (numpy arrays, single-device arrays, ``Auto`` axes under ``jit``) None: the
  state is created unconstrained, as by ``jnp.zeros``.
  """
  if isinstance(param, jax.core.Tracer):
    return explicit_sharding(param)
  if isinstance(param, jax.Array) and isinstance(param.sharding, NamedSharding):
    return param.sharding
  return None


def zeros(
    param: Any, shape: Sequence[int], dtype: Any, derivation: Derivation
) -> jax.Array:
  """``jnp.zeros(shape, dtype)`` sharded as derived from ``param``.

  See :func:`derived_spec` for the rule and :func:`param_sharding` for when
  the parameter's sharding is known.
  """
  sharding = param_sharding(param)
  if sharding is None:
    return jnp.zeros(shape, dtype)
  spec = derived_spec(sharding.spec, shape, derivation, dict(sharding.mesh.shape))
  out = NamedSharding(sharding.mesh, spec)
  if isinstance(param, jax.core.Tracer):
    return jnp.zeros(shape, dtype, out_sharding=out)
  return jnp.zeros(shape, dtype, device=out)


def lowrank_sharding(g: jax.Array, rank_axis: int) -> Optional[NamedSharding]:
  """Under ``Explicit`` axes: the sharding of R = P G (or G Pᵀ) for a
  canonical ``(batch, m, n)`` gradient ``g``: g's, unsharded on ``rank_axis``
  (the contracted one). Else None."""
  sharding = explicit_sharding(g)
  if sharding is None:
    return None
  spec = list(sharding.spec) + [None] * (g.ndim - len(sharding.spec))
  spec[rank_axis] = None
  return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def broadcast_sharding(x: jax.Array, like: jax.Array) -> Optional[NamedSharding]:
  """Under ``Explicit`` axes: the sharding of ``like`` on the axes where ``x``
  (which broadcasts against ``like``) is not 1, for ``jax.sharding.reshard``."""
  sharding = explicit_sharding(like)
  if sharding is None:
    return None
  spec = tuple(sharding.spec) + (None,) * (like.ndim - len(sharding.spec))
  return NamedSharding(sharding.mesh, PartitionSpec(*(
      entry if size == full else None
      for entry, size, full in zip(spec, x.shape, like.shape)
  )))


def _is_variable(x: Any) -> bool:
  """A ``flax.nnx.Variable`` (duck-typed: metadata around one value)."""
  return hasattr(x, "get_metadata") and hasattr(x, "set_metadata")


def relabel_variables(tree: Any, derivations: Sequence[Derivation]) -> Any:
  """Re-derives the ``out_sharding`` metadata of nnx Variables in ``tree``.

  ``tx.init`` on an ``nnx.State`` returns state wrapped in copies of the
  parameters' Variables, with their metadata; ``nnx.Optimizer`` then shards
  each state array by its ``out_sharding``. That is right for parameter-shaped
  state only: the annotation of state laid out by ``derivations[i]`` (one per
  leaf of ``tree``) is the spec of its value when known, else derived from the
  parameter's annotation over the current mesh. Mutates the (freshly
  unflattened) Variables; returns ``tree``.
  """
  nodes = [
      node for node in jax.tree.leaves(tree, is_leaf=_is_variable)
      if not _is_variable(node) or jax.tree.leaves(node)
  ]
  mesh_shape = dict(jax.sharding.get_abstract_mesh().shape)
  for node, derivation in zip(nodes, derivations, strict=True):
    if not _is_variable(node):
      continue
    names = node.get_metadata().get("out_sharding")
    if names is None:
      continue
    value = jax.tree.leaves(node)[0]
    known = param_sharding(value)
    spec = (
        known.spec if known is not None
        else derived_spec(names, value.shape, derivation, mesh_shape)
    )
    node.set_metadata(
        "out_sharding", tuple(spec) + (None,) * (value.ndim - len(spec))
    )
  return tree


def state_shardings(
    tx: Any, params: Any, shardings: Optional[Any] = None
) -> Any:
  """Shardings of ``tx.init(params)`` derived from the parameters' shardings.

  For any optimizer built from optax transformations, APOLLO's included: each
  state array is sharded like the parameter it belongs to, along the axes it
  shares with it (low-rank moments: unsharded rank axis; per-matrix norms: the
  batch axes), scalars are replicated. Use it as ``out_shardings`` of a
  jitted ``tx.init`` under a mesh of ``Auto`` axes, where the shardings are
  unknown while tracing (with ``Explicit`` axes, and eagerly on sharded
  arrays, ``tx.init`` already returns sharded state). Like
  ``optax.tree.map_params``, but it also covers state that is not
  parameter-shaped.

  It traces ``tx.init`` abstractly (nothing is allocated) on a copy of the
  mesh whose axes are ``Explicit``, so every array creation in ``init``
  states its sharding, and reads the shardings off the result.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> import apollo_optax
    >>> mesh = jax.make_mesh((2,), ("fsdp",), devices=jax.devices()[:2])
    >>> params = {"w": jax.ShapeDtypeStruct(
    ...     (3, 8, 32), jnp.float32, sharding=NamedSharding(mesh, P(None, None, "fsdp")))}
    >>> tx = apollo_optax.apollo(1e-3, rank=4)
    >>> shardings = apollo_optax.state_shardings(tx, params)
    >>> init = jax.jit(tx.init, out_shardings=shardings)
    >>> state = init({"w": jnp.zeros((3, 8, 32))})
    >>> state[0].inner_states["apollo"].inner_state[0].mu["w"].sharding.spec
    P(None, None, 'fsdp')

  Args:
    tx: a ``GradientTransformation`` (or any object with ``init``).
    params: the parameters: arrays or ``jax.ShapeDtypeStruct`` (only shapes
      and dtypes are used, and their ``sharding`` when ``shardings`` is None).
    shardings: ``NamedSharding`` for each leaf of ``params``, all on one mesh;
      None: each leaf's ``.sharding``. Other shardings count as replicated.

  Returns:
    A pytree of ``NamedSharding`` with the structure of ``tx.init(params)``.
  """
  if shardings is None:
    shardings = jax.tree.map(lambda p: getattr(p, "sharding", None), params)
  named = [
      s for s in jax.tree.leaves(shardings) if isinstance(s, NamedSharding)
  ]
  if not named:
    raise ValueError(
        "state_shardings needs at least one parameter with a NamedSharding"
        " (pass `shardings` or ShapeDtypeStructs with `sharding`)."
    )
  mesh = named[0].mesh
  if any(s.mesh.axis_names != mesh.axis_names for s in named):
    raise ValueError("state_shardings: all parameters must be on one mesh.")
  explicit = mesh.abstract_mesh.update_axis_types(
      {name: AxisType.Explicit for name in mesh.axis_names}
  )

  def abstract(p, s):
    spec = s.spec if isinstance(s, NamedSharding) else PartitionSpec()
    return jax.ShapeDtypeStruct(
        p.shape, p.dtype, sharding=NamedSharding(explicit, spec)
    )

  abstract_params = jax.tree.map(abstract, params, shardings)
  with jax.sharding.use_abstract_mesh(explicit):
    state = jax.eval_shape(tx.init, abstract_params)

  def concrete(leaf):
    sharding = getattr(leaf, "sharding", None)
    spec = sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()
    return NamedSharding(mesh, spec)

  return jax.tree.map(concrete, state)
