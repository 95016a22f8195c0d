"""Which axes of a weight form the matrix that APOLLO projects.

APOLLO works on matrices G of shape (m, n). Weights stored with more axes
(scanned layer stacks ``(L, m, n)``, attention kernels ``(d, heads, head_dim)``)
are viewed as a batch of independent matrices through dimension numbers, in the
manner of ``optax.contrib.MuonDimensionNumbers``: the reduction axes form m, the
output axes form n, every other axis is a batch axis.

The low-rank moments of a leaf keep the parameter's own axes, with the group of
axes that is projected away (the shorter side) replaced by one rank axis placed
where that group started. A ``(L, d, f)`` kernel with d < f therefore has
moments of shape ``(L, rank, f)``: the layer and ``f`` axes are the parameter's
own, so a sharding of the parameter along them carries over to the state.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp


class ApolloDimensionNumbers(NamedTuple):
  """Axes of a weight that form the (m, n) matrix seen by APOLLO.

  Attributes:
    reduction_axis: axis or axes whose product is m (the input side of
      ``x @ W``).
    output_axis: axis or axes whose product is n. All other axes are batch axes:
      each index along them is an independent matrix with its own projection,
      moments, scaling factors and norm-growth limiter.

  Example: a scanned stack of kernels ``(layers, d_in, d_out)`` is
  ``ApolloDimensionNumbers(reduction_axis=1, output_axis=2)`` (also the default
  for any leaf with more than two axes); an attention kernel
  ``(d, heads, head_dim)`` is ``ApolloDimensionNumbers(0, (1, 2))``.
  """

  reduction_axis: Union[int, Sequence[int]] = 0
  output_axis: Union[int, Sequence[int]] = 1


DimensionNumbersOrFn = Union[
    ApolloDimensionNumbers, Any, Callable[[Any], Any]
]


def is_dimension_numbers(x: Any) -> bool:
  """True for ApolloDimensionNumbers and look-alikes (Muon's, GaLore's)."""
  return isinstance(x, tuple) and hasattr(x, "reduction_axis") and hasattr(
      x, "output_axis"
  )


def _is_axis(a: Any) -> bool:
  return isinstance(a, numbers.Integral) and not isinstance(a, bool)


def _as_axes(axes: Any, name: str, where: str = "") -> tuple[int, ...]:
  """``axes`` (an int or a sequence of ints) as a tuple of ints.

  Raises:
    TypeError: naming ``name`` when ``axes`` is neither.
  """
  if _is_axis(axes):
    return (int(axes),)
  if isinstance(axes, (tuple, list)) and all(_is_axis(a) for a in axes):
    return tuple(int(a) for a in axes)
  raise TypeError(
      f"`{name}` must be an int axis or a tuple of int axes, got"
      f" {axes!r}{where}."
  )


def check_dimension_numbers(dims: Any, argument: str) -> None:
  """Construction-time checks that need no shapes (empty or repeated axes)."""
  if dims is None or callable(dims) and not is_dimension_numbers(dims):
    return
  if not is_dimension_numbers(dims):
    return  # A pytree of dimension numbers: checked per leaf at init.
  reduction = _as_axes(dims.reduction_axis, f"{argument}.reduction_axis")
  output = _as_axes(dims.output_axis, f"{argument}.output_axis")
  for name, axes in (("reduction_axis", reduction), ("output_axis", output)):
    if not axes:
      raise ValueError(
          f"`{argument}.{name}` must name at least one axis, got {axes}."
      )
  if len(set(reduction + output)) != len(reduction + output):
    if all(a >= 0 for a in reduction + output) or all(
        a < 0 for a in reduction + output
    ):
      raise ValueError(
          f"`{argument}` axes must be disjoint: reduction_axis={reduction},"
          f" output_axis={output} overlap."
      )


def default_dimension_numbers(leaf: Any) -> Optional[ApolloDimensionNumbers]:
  """The last two axes form the matrix, leading axes are batch axes."""
  ndim = len(leaf.shape)
  if ndim < 2:
    return None
  return ApolloDimensionNumbers(reduction_axis=ndim - 2, output_axis=ndim - 1)


def resolve_dimension_numbers(spec: DimensionNumbersOrFn, tree: Any) -> Any:
  """Dimension numbers (or None) for every leaf of ``tree``.

  Args:
    spec: None (default rule: the last two axes of every leaf with ndim >= 2),
      one ApolloDimensionNumbers for every leaf with ndim >= 2, a pytree of
      ApolloDimensionNumbers / None matching ``tree`` (or a prefix of it), or a
      callable returning such a pytree from ``tree``.
    tree: parameters or updates; ``MaskedNode`` subtrees stay masked.

  Returns:
    A tree with the structure of ``tree`` whose leaves are
    ApolloDimensionNumbers or None.
  """
  if callable(spec) and not is_dimension_numbers(spec):
    spec = spec(tree)
  if spec is None:
    return jax.tree.map(default_dimension_numbers, tree)
  if is_dimension_numbers(spec):
    return jax.tree.map(
        lambda x: spec if len(x.shape) >= 2 else None, tree
    )

  def broadcast(dims, subtree):
    return jax.tree.map(lambda _: dims, subtree)

  return jax.tree.map(
      broadcast,
      spec,
      tree,
      is_leaf=lambda x: x is None or is_dimension_numbers(x),
  )


@dataclasses.dataclass(frozen=True)
class MatrixLayout:
  """How one leaf maps to a batch of (m, n) matrices and back.

  The canonical form is ``(batch, m, n)``. APOLLO projects the shorter side:
  when m >= n ("tall") R = G Pᵀ has shape (batch, m, rank), otherwise
  R = P G has shape (batch, rank, n). Low-rank tensors are stored in the
  parameter's axis order (see the module docstring).
  """

  shape: tuple[int, ...]
  batch_axes: tuple[int, ...]
  reduction_axes: tuple[int, ...]
  output_axes: tuple[int, ...]

  @classmethod
  def create(
      cls, shape: Sequence[int], dims: ApolloDimensionNumbers, path: str = ""
  ) -> "MatrixLayout":
    shape = tuple(shape)
    ndim = len(shape)
    where = f" for the leaf {path!r}" if path else ""
    if ndim < 2:
      raise ValueError(
          f"APOLLO needs leaves with at least 2 axes, got shape {shape}{where}."
          " Route vectors and scalars to Adam (apollo_optax.apollo does this"
          " by its `lowrank_mask`)."
      )
    axes = {}
    for name in ("reduction_axis", "output_axis"):
      raw = _as_axes(
          getattr(dims, name), f"weight_dimension_numbers.{name}", where
      )
      if not raw:
        raise ValueError(
            f"`weight_dimension_numbers.{name}` is empty{where}; it must name"
            " at least one axis."
        )
      for a in raw:
        if not -ndim <= a < ndim:
          raise ValueError(
              f"`weight_dimension_numbers.{name}` has axis {a}, out of range"
              f" for shape {shape}{where} (allowed: {-ndim}..{ndim - 1})."
          )
      axes[name] = tuple(a % ndim for a in raw)
    reduction, output = axes["reduction_axis"], axes["output_axis"]
    if len(set(reduction + output)) != len(reduction + output):
      raise ValueError(
          "`weight_dimension_numbers` axes must be disjoint and not repeated:"
          f" reduction_axis={reduction}, output_axis={output} for shape"
          f" {shape}{where}."
      )
    batch = tuple(
        a for a in range(ndim) if a not in reduction and a not in output
    )
    return cls(shape, batch, reduction, output)

  def _size(self, axes: Sequence[int]) -> int:
    return math.prod(self.shape[a] for a in axes)

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[a] for a in self.batch_axes)

  @property
  def num_matrices(self) -> int:
    return self._size(self.batch_axes)

  @property
  def m(self) -> int:
    return self._size(self.reduction_axes)

  @property
  def n(self) -> int:
    return self._size(self.output_axes)

  @property
  def tall(self) -> bool:
    """m >= n: project the output side, keep one channel per row."""
    return self.m >= self.n

  @property
  def projected_dim(self) -> int:
    """d = min(m, n), the side that the projection contracts."""
    return min(self.m, self.n)

  @property
  def projected_axes(self) -> tuple[int, ...]:
    return self.output_axes if self.tall else self.reduction_axes

  @property
  def kept_axes(self) -> tuple[int, ...]:
    """The axes of the longer side: one scaling factor per index."""
    return self.reduction_axes if self.tall else self.output_axes

  def effective_rank(self, rank: int) -> int:
    return min(rank, self.projected_dim)

  # -- full-size tensors ----------------------------------------------------
  @property
  def _canonical_order(self) -> tuple[int, ...]:
    return self.batch_axes + self.reduction_axes + self.output_axes

  def to_canonical(self, x: jax.Array) -> jax.Array:
    """(…original axes…) -> (batch, m, n); a pure reshape in usual layouts."""
    order = self._canonical_order
    if order != tuple(range(len(order))):
      x = jnp.transpose(x, order)
    return x.reshape(self.num_matrices, self.m, self.n)

  def from_canonical(self, x: jax.Array) -> jax.Array:
    order = self._canonical_order
    x = x.reshape(tuple(self.shape[a] for a in order))
    if order != tuple(range(len(order))):
      x = jnp.transpose(x, _inverse_permutation(order))
    return x

  # -- low-rank tensors -----------------------------------------------------
  def _lowrank_labels(self) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Axis labels of the unflattened canonical and of the stored layout."""
    rank_label = "rank"
    if self.tall:
      canonical = self.batch_axes + self.reduction_axes + (rank_label,)
    else:
      canonical = self.batch_axes + (rank_label,) + self.output_axes
    first_projected = min(self.projected_axes)
    stored = []
    for a in range(len(self.shape)):
      if a == first_projected:
        stored.append(rank_label)
      elif a not in self.projected_axes:
        stored.append(a)
    return canonical, tuple(stored)

  def lowrank_shape(self, rank: int) -> tuple[int, ...]:
    """Stored shape of R and its moments for this leaf."""
    _, stored = self._lowrank_labels()
    r = self.effective_rank(rank)
    return tuple(r if a == "rank" else self.shape[a] for a in stored)

  def lowrank_rank_axis(self) -> int:
    """Position of the rank axis in the stored low-rank layout."""
    _, stored = self._lowrank_labels()
    return stored.index("rank")

  def lowrank_to_canonical(self, x: jax.Array) -> jax.Array:
    canonical, stored = self._lowrank_labels()
    perm = tuple(stored.index(label) for label in canonical)
    if perm != tuple(range(len(perm))):
      x = jnp.transpose(x, perm)
    r = x.shape[canonical.index("rank")]
    if self.tall:
      return x.reshape(self.num_matrices, self.m, r)
    return x.reshape(self.num_matrices, r, self.n)

  def lowrank_from_canonical(self, x: jax.Array) -> jax.Array:
    canonical, stored = self._lowrank_labels()
    r = x.shape[2] if self.tall else x.shape[1]
    unflat = tuple(r if a == "rank" else self.shape[a] for a in canonical)
    x = x.reshape(unflat)
    perm = tuple(canonical.index(label) for label in stored)
    if perm != tuple(range(len(perm))):
      x = jnp.transpose(x, perm)
    return x

  # -- one number per matrix ------------------------------------------------
  def per_matrix_to_broadcast(self, x: jax.Array) -> jax.Array:
    """(num_matrices,) -> a shape that broadcasts against the leaf."""
    return x.reshape(
        tuple(
            self.shape[a] if a in self.batch_axes else 1
            for a in range(len(self.shape))
        )
    )


def _inverse_permutation(perm: Sequence[int]) -> tuple[int, ...]:
  inverse = [0] * len(perm)
  for i, p in enumerate(perm):
    inverse[p] = i
  return tuple(inverse)
