"""What a run reports: the metrics file while it runs, a TrainResult after.

:class:`MetricsWriter` appends one JSON record per step and per evaluation to
``<out>/metrics.jsonl`` (and TensorBoard scalars when ``tensorboardX`` is
installed). :class:`TrainResult` is the typed result of
:func:`apollo_lm.train.train_and_evaluate`; :meth:`TrainResult.to_json` has
the same keys as the dict earlier versions returned, so committed results and
``summary.json`` files keep their form.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """The outcome of one (possibly resumed or interrupted) run.

  Attributes:
    optimizer: the optimizer's name.
    config: the model config as a dict (``dtype`` and ``param_dtype`` names).
    hparams: the optimizer's resolved hyper-parameters and the run's
      schedule, memory and clipping options.
    step: updates done in total (including those before a resume).
    start_step: the step this call started at.
    losses: train loss of each step run by this call.
    eval_loss: last held-out loss (None if no evaluation ran).
    eval_ppl: ``exp(eval_loss)``.
    eval_history: ``{"step", "eval_loss", "eval_ppl"}`` of each evaluation.
    state_bytes: optimizer state bytes (``apollo_optax.state_bytes``).
    param_count: number of model parameters.
    tokens_per_s: train throughput, excluding the first (compiling) step and
      the evaluations; None if fewer than two steps ran.
    memory_bytes: device bytes in use (or peak RSS on CPU) at the end.
    wall_time_s: seconds of the whole call.
    interrupted: the signal's name if SIGTERM/SIGINT stopped the run.
    checkpoint: the checkpoint directory, if any.
  """

  optimizer: str
  config: dict[str, Any]
  hparams: dict[str, Any]
  step: int
  start_step: int
  losses: list[float]
  eval_loss: float | None
  eval_ppl: float | None
  eval_history: list[dict[str, float]]
  state_bytes: int
  param_count: int
  tokens_per_s: float | None
  memory_bytes: int
  wall_time_s: float
  interrupted: str | None
  checkpoint: str | None

  def to_json(self) -> dict[str, Any]:
    """A JSON-ready dict with one key per field."""
    return dataclasses.asdict(self)

  def summary(self) -> dict[str, Any]:
    """:meth:`to_json` without the per-step lists and the model config."""
    return {k: v for k, v in self.to_json().items()
            if k not in ("losses", "eval_history", "config")}


class MetricsWriter:
  """metrics.jsonl (and TensorBoard, if available) under ``out``."""

  def __init__(self, out: str | None, enabled: bool):
    self._file = None
    self._tb = None
    if out is None or not enabled:
      return
    directory = pathlib.Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    self._file = open(directory / "metrics.jsonl", "a", encoding="utf-8")
    try:
      import tensorboardX  # pylint: disable=g-import-not-at-top
    except ImportError:
      return
    self._tb = tensorboardX.SummaryWriter(str(directory / "tensorboard"))

  def write(self, record: dict[str, Any]) -> None:
    if self._file is not None:
      self._file.write(json.dumps(record) + "\n")
      self._file.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
          self._tb.add_scalar(key, value, record["step"])

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
