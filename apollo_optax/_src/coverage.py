"""Which leaves APOLLO actually treats as low-rank, and a warning when few do.

APOLLO saves memory only on the leaves it projects. When parameters are
flattened to 1-D (FSDP-style flat parameters) or the low-rank mask matches
nothing, every leaf silently falls back to AdamW and the memory does not drop.
This module owns:

- :class:`LowRankCoverageWarning`, emitted once by ``init`` of
  :func:`apollo_optax.apollo` / :func:`apollo_optax.apollo_mini` when the
  low-rank leaves hold no parameter, or fewer than
  :data:`MIN_LOWRANK_FRACTION` of them while matrices fell back to AdamW;
- :func:`lowrank_summary`, the same breakdown with the state bytes of each
  part, for people to print.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from typing import Any, Iterator, NamedTuple, Optional

import jax
import optax

from apollo_optax._src import adam
from apollo_optax._src import limiter
from apollo_optax._src import memory
from apollo_optax._src import scale_by_apollo as sba
from apollo_optax._src import utils

#: Below this fraction of the parameters on low-rank leaves (with matrices
#: left on AdamW), ``init`` of :func:`apollo_optax.apollo` warns with
#: :class:`apollo_optax.LowRankCoverageWarning`.
MIN_LOWRANK_FRACTION = 0.05

# Kinds of leaves: low-rank, or why a leaf fell back to AdamW.
LOWRANK = "lowrank"
ONE_D = "1-D"
MASK = "mask"
NO_DIMENSION_NUMBERS = "no dimension numbers"
FALLBACK_REASONS = (ONE_D, MASK, NO_DIMENSION_NUMBERS)


class LowRankCoverageWarning(UserWarning):
  """APOLLO's low-rank mask covers no or almost no parameter.

  A ``UserWarning``: silence it with ``warnings.filterwarnings("ignore",
  category=apollo_optax.LowRankCoverageWarning)`` or turn it into an error
  with ``"error"``.
  """


class LowRankSummary(NamedTuple):
  """What :func:`lowrank_summary` returns; ``print`` it for a table.

  Attributes:
    lowrank_params: parameters on low-rank (APOLLO) leaves.
    fallback_params: parameters on AdamW leaves, by reason: ``"1-D"`` (fewer
      than 2 axes), ``"mask"`` (``lowrank_mask`` excludes them: embeddings,
      head, norms, biases by default), ``"no dimension numbers"``.
    lowrank_leaves: paths of the low-rank leaves.
    fallback_leaves: (path, reason) of the AdamW leaves.
    lowrank_state_bytes: bytes of APOLLO's state (low-rank moments, stored
      projections, limiter norms, its step count); None when only parameters
      were counted.
    adam_state_bytes: bytes of the AdamW leaves' moments; None likewise.
    other_state_bytes: everything else in the state (step counts,
      hyperparameters, states of other transformations); None likewise.
  """

  lowrank_params: int
  fallback_params: dict[str, int]
  lowrank_leaves: tuple[str, ...]
  fallback_leaves: tuple[tuple[str, str], ...]
  lowrank_state_bytes: Optional[int] = None
  adam_state_bytes: Optional[int] = None
  other_state_bytes: Optional[int] = None

  @property
  def total_params(self) -> int:
    return self.lowrank_params + sum(self.fallback_params.values())

  @property
  def lowrank_fraction(self) -> float:
    total = self.total_params
    return self.lowrank_params / total if total else 0.0

  @property
  def state_bytes(self) -> Optional[int]:
    parts = (self.lowrank_state_bytes, self.adam_state_bytes,
             self.other_state_bytes)
    return None if None in parts else sum(parts)

  def __str__(self) -> str:
    rows = [
        ("low-rank (APOLLO)", self.lowrank_params, len(self.lowrank_leaves),
         self.lowrank_state_bytes),
    ]
    for reason in FALLBACK_REASONS:
      leaves = sum(kind == reason for _, kind in self.fallback_leaves)
      rows.append((f"AdamW: {reason}", self.fallback_params[reason], leaves,
                   None))
    lines = [f"{'part':<30}{'params':>14}{'leaves':>8}{'state bytes':>16}"]
    rows.append(("AdamW moments (all reasons)", None, None,
                 self.adam_state_bytes))
    rows.append(("other (counts, ...)", None, None, self.other_state_bytes))
    rows.append(("total", self.total_params,
                 len(self.lowrank_leaves) + len(self.fallback_leaves),
                 self.state_bytes))
    text = lambda x: "" if x is None else f"{x:,}"
    for label, params, leaves, state in rows:
      lines.append(f"{label:<30}{text(params):>14}{text(leaves):>8}"
                   f"{text(state):>16}")
    lines.append(f"low-rank fraction: {self.lowrank_fraction:.1%}")
    return "\n".join(lines)


def coverage_of(kinds: Any, params: Any) -> LowRankSummary:
  """Counts the parameters of ``params`` by the kinds in ``kinds``.

  Args:
    kinds: a tree with the structure of ``params`` whose leaves are one of
      ``"lowrank"``, ``"1-D"``, ``"mask"``, ``"no dimension numbers"``.
    params: arrays or ``jax.ShapeDtypeStruct``.
  """
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  lowrank, fallback_leaves = [], []
  counts = {reason: 0 for reason in FALLBACK_REASONS}
  lowrank_params = 0
  for (key_path, leaf), kind in zip(path_leaves, treedef.flatten_up_to(kinds)):
    path, size = utils.path_str(key_path), math.prod(leaf.shape)
    if kind == LOWRANK:
      lowrank.append(path)
      lowrank_params += size
    else:
      fallback_leaves.append((path, kind))
      counts[kind] += size
  return LowRankSummary(
      lowrank_params, counts, tuple(lowrank), tuple(fallback_leaves)
  )


def _examples(coverage: LowRankSummary, reason: str) -> str:
  paths = [path for path, kind in coverage.fallback_leaves if kind == reason]
  shown = ", ".join(repr(p) for p in paths[:3])
  more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
  noun = "leaf" if len(paths) == 1 else "leaves"
  return f"{len(paths)} {noun}: {shown}{more}"


def coverage_message(coverage: LowRankSummary, name: str) -> Optional[str]:
  """The warning's text, or None when the coverage is fine."""
  total = coverage.total_params
  if total == 0:
    return None
  matrices_on_adam = any(
      kind != ONE_D for _, kind in coverage.fallback_leaves
  )
  if coverage.lowrank_params and not (
      coverage.lowrank_fraction < MIN_LOWRANK_FRACTION and matrices_on_adam
  ):
    return None
  fallback = total - coverage.lowrank_params
  threshold = (
      f" (below MIN_LOWRANK_FRACTION = {MIN_LOWRANK_FRACTION:.0%})"
      if coverage.lowrank_params
      else ""
  )
  lines = [
      f"{name}: {coverage.lowrank_params:,} of {total:,} parameters"
      f" ({coverage.lowrank_fraction:.1%}) are low-rank{threshold};"
      f" {fallback:,} fell back to AdamW, so the optimizer state is about"
      " AdamW's:"
  ]
  reasons = {
      ONE_D: "in leaves with fewer than 2 axes (vectors, scalars, flattened"
      " parameters)",
      MASK: "excluded by `lowrank_mask` (by default: leaves named embed*,"
      " *norm*, lm_head, wte, wpe, bias)",
      NO_DIMENSION_NUMBERS: "selected by the mask but given no"
      " `weight_dimension_numbers` (None)",
  }
  for reason in FALLBACK_REASONS:
    if coverage.fallback_params[reason]:
      lines.append(
          f"  {coverage.fallback_params[reason]:,} {reasons[reason]}"
          f" ({_examples(coverage, reason)})"
      )
  lines.append(
      "To fix: keep weight matrices 2-D (do not flatten them, e.g. FSDP"
      " flat parameters), pass `lowrank_mask` (a pytree of bools or a"
      " callable) selecting the attention and MLP kernels, or"
      " `weight_dimension_numbers` for other layouts. Check with"
      " apollo_optax.lowrank_summary(params, tx); silence with"
      " warnings.filterwarnings('ignore',"
      " category=apollo_optax.LowRankCoverageWarning)."
  )
  return "\n".join(lines)


# lowrank_summary collects the coverage of every apollo init it traces.
_RECORDER: contextvars.ContextVar[Optional[list[LowRankSummary]]] = (
    contextvars.ContextVar("apollo_optax_coverage", default=None)
)


def report_coverage(coverage: LowRankSummary, name: str) -> None:
  """Warns (once per call) about poor coverage, or records it for a summary."""
  recorded = _RECORDER.get()
  if recorded is not None:
    recorded.append(coverage)
    return
  message = coverage_message(coverage, name)
  if message is not None:
    # stacklevel: warn -> report_coverage -> init_fn -> the caller's init.
    warnings.warn(message, LowRankCoverageWarning, stacklevel=3)


@contextlib.contextmanager
def _recording() -> Iterator[list[LowRankSummary]]:
  recorded: list[LowRankSummary] = []
  token = _RECORDER.set(recorded)
  try:
    yield recorded
  finally:
    _RECORDER.reset(token)


_APOLLO_STATES = (sba.ScaleByApolloState, limiter.NormGrowthLimiterState)


def _state_bytes_by_part(state: Any) -> tuple[int, int, int]:
  is_part = lambda x: isinstance(
      x, _APOLLO_STATES + (adam.ScaleByAdamMomentsState,)
  )
  lowrank = adam_bytes = other = 0
  for node in jax.tree.leaves(state, is_leaf=is_part):
    size = memory.state_bytes(node)
    if isinstance(node, _APOLLO_STATES):
      lowrank += size
    elif isinstance(node, adam.ScaleByAdamMomentsState):
      adam_bytes += size
    else:
      other += size
  return lowrank, adam_bytes, other


def lowrank_summary(
    params: Any, tx: optax.GradientTransformation
) -> LowRankSummary:
  """Which parameters ``tx`` treats as low-rank, and the state bytes of each part.

  ``tx`` is :func:`apollo_optax.apollo` / :func:`apollo_optax.apollo_mini`
  or any transformation containing them (a chain, ``optax.MultiSteps``,
  ``optax.inject_hyperparams``). Nothing is allocated: the state is traced
  with ``jax.eval_shape``, and no :class:`LowRankCoverageWarning` is emitted.

  Example:
    >>> import jax.numpy as jnp
    >>> import apollo_optax
    >>> params = {"embed": jnp.zeros((1000, 64)), "kernel": jnp.zeros((64, 256)),
    ...           "bias": jnp.zeros(256)}
    >>> summary = apollo_optax.lowrank_summary(params, apollo_optax.apollo(1e-2, rank=16))
    >>> summary.lowrank_params, summary.fallback_params["mask"], summary.fallback_params["1-D"]
    (16384, 64000, 256)
    >>> summary.lowrank_state_bytes  # 2 x (16, 256) float32, limiter norm, count
    32776

  Args:
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    tx: the optimizer.

  Returns:
    A :class:`LowRankSummary` (``print`` it for a table).

  Raises:
    ValueError: ``tx`` contains no ``apollo()`` / ``apollo_mini()``.
  """
  with _recording() as recorded:
    # A new function each time: a cached trace of tx.init would not run the
    # init (and report nothing).
    state = jax.eval_shape(lambda p: tx.init(p), params)  # pylint: disable=unnecessary-lambda
  if not recorded:
    raise ValueError(
        "lowrank_summary: `tx` contains no apollo_optax.apollo() or"
        " apollo_mini() (its init reported no low-rank leaves)."
    )
  counts = {reason: 0 for reason in FALLBACK_REASONS}
  for coverage in recorded:
    for reason in FALLBACK_REASONS:
      counts[reason] += coverage.fallback_params[reason]
  lowrank_bytes, adam_bytes, other_bytes = _state_bytes_by_part(state)
  return LowRankSummary(
      lowrank_params=sum(c.lowrank_params for c in recorded),
      fallback_params=counts,
      lowrank_leaves=tuple(p for c in recorded for p in c.lowrank_leaves),
      fallback_leaves=tuple(p for c in recorded for p in c.fallback_leaves),
      lowrank_state_bytes=lowrank_bytes,
      adam_state_bytes=adam_bytes,
      other_state_bytes=other_bytes,
  )
