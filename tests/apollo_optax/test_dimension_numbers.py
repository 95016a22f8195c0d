"""dimension_numbers: every layout round-trips, shapes follow the rule, errors name the argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import apollo_optax
from apollo_optax._src import dimension_numbers as dn

D = apollo_optax.ApolloDimensionNumbers

# (shape, dimension numbers): tall and wide matrices, swapped axes, scanned
# stacks, grouped axes on either side, batch axes that are not contiguous,
# negative axes.
LAYOUTS = [
    ((6, 4), D(0, 1)),
    ((4, 6), D(0, 1)),
    ((6, 4), D(1, 0)),
    ((3, 6, 4), D(1, 2)),
    ((3, 4, 6), D(1, 2)),
    ((5, 2, 3), D(0, (1, 2))),
    ((2, 3, 5), D((0, 1), 2)),
    ((2, 7, 3, 4), D(3, 1)),
    ((4, 2, 6), D(-1, 0)),
    ((2, 3, 4, 5), D((3, 1), 0)),
]
IDS = [f"{shape}-{dims.reduction_axis}-{dims.output_axis}" for shape, dims in LAYOUTS]


def _axes(a):
  return (a,) if isinstance(a, int) else tuple(a)


def _reference(shape, dims):
  """Batch, reduction and output axes, m, n and the stored low-rank shape, by hand."""
  ndim = len(shape)
  reduction = tuple(a % ndim for a in _axes(dims.reduction_axis))
  output = tuple(a % ndim for a in _axes(dims.output_axis))
  batch = tuple(a for a in range(ndim) if a not in reduction + output)
  m = int(np.prod([shape[a] for a in reduction]))
  n = int(np.prod([shape[a] for a in output]))
  projected = output if m >= n else reduction
  return batch, reduction, output, m, n, projected


@pytest.mark.parametrize("shape,dims", LAYOUTS, ids=IDS)
def test_full_size_layout_round_trips_and_matches_numpy(shape, dims):
  layout = dn.MatrixLayout.create(shape, dims)
  batch, reduction, output, m, n, _ = _reference(shape, dims)
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  canonical = layout.to_canonical(jnp.asarray(x))
  expected = np.transpose(x, batch + reduction + output).reshape(-1, m, n)
  np.testing.assert_array_equal(canonical, expected)
  np.testing.assert_array_equal(layout.from_canonical(canonical), x)
  assert (layout.m, layout.n, layout.tall) == (m, n, m >= n)


@pytest.mark.parametrize("rank", [1, 2, 100])
@pytest.mark.parametrize("shape,dims", LAYOUTS, ids=IDS)
def test_lowrank_layout_round_trips_and_keeps_the_parameter_axes(shape, dims, rank):
  layout = dn.MatrixLayout.create(shape, dims)
  _, _, _, m, n, projected = _reference(shape, dims)
  r = min(rank, m, n)
  # The projected group is replaced by one rank axis where it started; every
  # other axis keeps its place and size.
  expected_shape = tuple(
      r if a == min(projected) else shape[a]
      for a in range(len(shape))
      if a not in projected or a == min(projected)
  )
  assert layout.lowrank_shape(rank) == expected_shape
  assert layout.lowrank_shape(rank)[layout.lowrank_rank_axis()] == r
  y = np.random.default_rng(1).normal(size=expected_shape).astype(np.float32)
  canonical = layout.lowrank_to_canonical(jnp.asarray(y))
  assert canonical.shape == ((layout.num_matrices, m, r) if m >= n else (layout.num_matrices, r, n))
  np.testing.assert_array_equal(layout.lowrank_from_canonical(canonical), y)


@pytest.mark.parametrize("shape,dims", [l for l in LAYOUTS if len(_reference(*l)[5]) == 1])
def test_identity_projection_gives_back_the_parameter_layout(shape, dims):
  # With a single projected axis and rank = its size, R = G (P = I): the
  # stored low-rank tensor is the gradient itself, axis for axis.
  layout = dn.MatrixLayout.create(shape, dims)
  x = np.random.default_rng(2).normal(size=shape).astype(np.float32)
  assert layout.lowrank_shape(layout.projected_dim) == shape
  np.testing.assert_array_equal(
      layout.lowrank_from_canonical(layout.to_canonical(jnp.asarray(x))), x
  )


@pytest.mark.parametrize("shape,dims", LAYOUTS, ids=IDS)
def test_per_matrix_values_broadcast_over_their_own_matrix(shape, dims):
  layout = dn.MatrixLayout.create(shape, dims)
  values = jnp.arange(1, layout.num_matrices + 1, dtype=jnp.float32)
  scaled = jnp.ones(shape) * layout.per_matrix_to_broadcast(values)
  canonical = np.asarray(layout.to_canonical(scaled))
  for b in range(layout.num_matrices):
    assert np.all(canonical[b] == b + 1)


def test_numpy_integer_axes_are_accepted():
  a = dn.MatrixLayout.create((3, 4, 5), D(np.int64(1), np.int32(2)))
  assert a == dn.MatrixLayout.create((3, 4, 5), D(1, 2))


NOT_AXES = [1.5, None, "a", True, (0, 1.0), [0, None]]


@pytest.mark.parametrize("bad", NOT_AXES, ids=repr)
@pytest.mark.parametrize("field", ["reduction_axis", "output_axis"])
def test_a_non_int_axis_is_a_named_error_at_construction(bad, field):
  good = 2 if field == "reduction_axis" else 0
  dims = D(**{field: bad, ("output_axis" if field == "reduction_axis" else "reduction_axis"): good})
  match = rf"`weight_dimension_numbers\.{field}` must be an int axis or a tuple of int axes"
  with pytest.raises(TypeError, match=match):
    apollo_optax.apollo(1e-2, 2, weight_dimension_numbers=dims)
  with pytest.raises(TypeError, match=match):
    apollo_optax.scale_by_apollo(2, weight_dimension_numbers=dims)
  with pytest.raises(TypeError, match=match):
    apollo_optax.norm_growth_limiter(1.01, weight_dimension_numbers=dims)


@pytest.mark.parametrize("bad", NOT_AXES, ids=repr)
def test_a_non_int_axis_in_a_tree_is_a_named_error_at_init(bad):
  tx = apollo_optax.apollo(1e-2, 2, weight_dimension_numbers={"w": D(bad, 2)})
  with pytest.raises(TypeError, match=r"reduction_axis` must be an int axis.*for the leaf 'w'"):
    tx.init({"w": jnp.zeros((3, 4, 5))})


@pytest.mark.parametrize(
    "shape,dims,match",
    [
        ((4, 5), D(0, 2), r"axis 2, out of range for shape \(4, 5\).*allowed: -2\.\.1"),
        ((4, 5), D(0, -3), "out of range"),
        ((3, 4, 5), D(2, -1), "disjoint"),
        ((3, 4, 5), D((1, 1), 2), "disjoint"),
        ((3, 4, 5), D((), 2), "reduction_axis` is empty"),
        ((5,), D(0, 1), "at least 2 axes"),
    ],
)
def test_layouts_that_do_not_fit_the_shape_are_named_errors(shape, dims, match):
  with pytest.raises(ValueError, match=match):
    dn.MatrixLayout.create(shape, dims, "w")


def test_resolve_dimension_numbers_forms():
  tree = {"a": jnp.zeros((2, 3, 4)), "b": jnp.zeros(3), "c": {"d": jnp.zeros((4, 5))}}
  # None: the last two axes of every leaf with at least two.
  assert dn.resolve_dimension_numbers(None, tree) == {
      "a": D(1, 2), "b": None, "c": {"d": D(0, 1)}}
  # One for all matrix leaves.
  assert dn.resolve_dimension_numbers(D(0, 1), tree) == {
      "a": D(0, 1), "b": None, "c": {"d": D(0, 1)}}
  # A prefix tree, and a callable returning one.
  prefix = {"a": D(2, 1), "b": None, "c": None}
  expected = {"a": D(2, 1), "b": None, "c": {"d": None}}
  assert dn.resolve_dimension_numbers(prefix, tree) == expected
  assert dn.resolve_dimension_numbers(lambda t: prefix, tree) == expected
  # Abstract leaves work too.
  abstract = jax.eval_shape(lambda: tree)
  assert dn.resolve_dimension_numbers(None, abstract) == dn.resolve_dimension_numbers(None, tree)
