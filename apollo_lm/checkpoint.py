"""Orbax checkpoints of a training run: params, optimizer state, data position.

A checkpoint at step ``k`` holds everything an uninterrupted run has after
``k`` updates: the parameters, the full optimizer state (moments, step counts,
APOLLO's projection counters and norm-limiter state) and a small JSON record
with the step. The step is also the data position: ``TokenBatches.batch`` is a
pure function of it and ``c4_batches`` resumes from it, so nothing else about
the input pipeline needs saving.

Arrays are restored with the shardings of a template (the freshly initialised
state on the current mesh), so a run resumes on the mesh it is started with.

The optimizer state is stored as a flat dict of its leaves in
``jax.tree.leaves`` order, keyed by position, because Orbax refuses zero-size
arrays (``optax.contrib.galore`` keeps ``(0, 0)`` projectors for leaves it
does not project) and needs no knowledge of optax's state classes that way;
zero-size leaves are skipped and rebuilt from the template on restore.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

PathLike = str | pathlib.Path


class Checkpointer:
  """Saves and restores ``(params, opt_state, metadata)`` by step.

  A thin wrapper over ``orbax.checkpoint.CheckpointManager`` that fixes the
  layout: item ``state`` (a ``StandardSave`` of ``{"params", "opt_state"}``)
  and item ``meta`` (a ``JsonSave`` dict with at least ``step``). Saving is
  asynchronous; :meth:`close` (or :meth:`wait`) blocks until it is on disk.
  """

  def __init__(self, directory: PathLike, *, save_interval_steps: int = 1,
               max_to_keep: int | None = 2):
    """Opens (or creates) the checkpoint directory.

    Args:
      directory: Where step subdirectories are written.
      save_interval_steps: :meth:`save` without ``force`` only writes when the
        step is a multiple of this.
      max_to_keep: Keep the newest this many checkpoints; None keeps all.
    """
    self.directory = pathlib.Path(directory).absolute()
    self.save_interval_steps = save_interval_steps
    # The interval is checked here: Orbax's own policy also writes the first
    # step it sees, whatever the interval.
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True),
        item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    """The newest saved step, or None if there is none."""
    return self._manager.latest_step()

  def save(self, step: int, params: Any, opt_state: Any, *,
           metadata: dict[str, Any] | None = None, force: bool = False) -> bool:
    """Saves the state after ``step`` updates; returns whether it was written.

    Args:
      step: Number of updates applied, which is also the data position.
      params: Parameter pytree.
      opt_state: Optimizer state pytree.
      metadata: Extra JSON-serialisable values recorded with the step.
      force: Write even if ``step`` is not on the save interval.
    """
    if not force and step % self.save_interval_steps:
      return False
    meta = dict(metadata or {}, step=int(step))
    return self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(
                {"params": params, "opt_state": _flatten(opt_state)}),
            meta=ocp.args.JsonSave(meta)),
        force=True)

  def restore(self, step: int | None, params: Any, opt_state: Any
              ) -> tuple[Any, Any, dict[str, Any]]:
    """Restores step ``step`` (None: the latest) shaped and sharded as given.

    Args:
      step: The step to restore, or None for :meth:`latest_step`.
      params: Template parameters (arrays or ``ShapeDtypeStruct`` with
        shardings); only their structure, shapes, dtypes and shardings are
        used.
      opt_state: Template optimizer state, likewise.

    Returns:
      ``(params, opt_state, metadata)``.

    Raises:
      FileNotFoundError: no checkpoint in the directory.
    """
    if step is None:
      step = self.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    target = jax.tree.map(
        ocp.utils.to_shape_dtype_struct,
        {"params": params, "opt_state": _flatten(opt_state)})
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            meta=ocp.args.JsonRestore()))
    state = restored["state"]
    return (state["params"], _unflatten(state["opt_state"], opt_state),
            dict(restored["meta"]))

  def metadata(self, step: int | None = None) -> dict[str, Any]:
    """The metadata saved with ``step`` (None: the latest), no arrays read."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restored = self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()



def _flatten(tree: Any) -> dict[str, Any]:
  """The non-empty leaves of ``tree``, keyed by their position."""
  return {f"{i:06d}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))
          if leaf.size}


def _unflatten(flat: dict[str, Any], template: Any) -> Any:
  """Inverse of :func:`_flatten`, zero-size leaves rebuilt from ``template``."""
  leaves, treedef = jax.tree.flatten(template)
  restored = [
      flat[f"{i:06d}"] if leaf.size else jnp.zeros(
          leaf.shape, leaf.dtype, device=getattr(leaf, "sharding", None))
      for i, leaf in enumerate(leaves)]
  return jax.tree.unflatten(treedef, restored)
