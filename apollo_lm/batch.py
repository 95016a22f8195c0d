"""The one batch type of ``apollo_lm``: what a step reads.

Data pipelines (:mod:`apollo_lm.data`, :mod:`apollo_lm.sft`) produce it with
NumPy rows; :func:`apollo_lm.geometry.global_batch` turns the rows into
sharded arrays of the same type; the steps (:mod:`apollo_lm.steps`) read it.

Example::

  >>> import numpy as np
  >>> from apollo_lm.batch import Batch
  >>> b = Batch.from_tokens(np.arange(6).reshape(2, 3))
  >>> b.inputs.tolist(), b.targets.tolist(), b.loss_mask
  ([[0, 1], [3, 4]], [[1, 2], [4, 5]], None)
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Batch(NamedTuple):
  """One batch of next-token prediction (NumPy rows or jax arrays).

  Attributes:
    inputs: ``int[..., B, T]`` tokens fed to the model.
    targets: ``int[..., B, T]`` the token that follows each input position
      (the inputs shifted left by one).
    loss_mask: optional ``[..., B, T]`` weights (1 = count the position,
      0 = ignore it: padding, prompt tokens); None counts every position.
    segment_ids: optional ``int[..., B, T]`` ids of the examples packed in
      a row: attention stays within an example (``apollo_lm.model.Llama``).
    positions: optional ``int[..., B, T]`` rotary positions (default: per
      segment with ``segment_ids``, else ``0 .. T-1``).
  """

  inputs: Any
  targets: Any
  loss_mask: Any | None = None
  segment_ids: Any | None = None
  positions: Any | None = None

  @classmethod
  def from_tokens(cls, tokens: Any) -> Batch:
    """``tokens[..., T + 1]`` -> inputs ``tokens[..., :-1]``, targets ``[..., 1:]``."""
    return cls(inputs=tokens[..., :-1], targets=tokens[..., 1:])
