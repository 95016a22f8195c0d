"""Unit tests of ``benchmarks.quality`` that need no training."""

import pytest

from apollo_lm.metrics import TrainResult
from benchmarks import quality

BUDGET = {"steps": 150, "batch_size": 16, "seq_len": 128, "eval_batches": 16,
          "vocab_size": 8192}


def _result(step: int, interrupted: str | None) -> TrainResult:
  return TrainResult(
      optimizer="apollo", config={}, hparams={}, step=step, start_step=0,
      losses=[7.0] * step, eval_loss=6.5, eval_ppl=665.1,
      eval_history=[], state_bytes=1, param_count=1, tokens_per_s=1.0,
      memory_bytes=1, wall_time_s=1.0, interrupted=interrupted,
      checkpoint=None)


@pytest.mark.parametrize("step, interrupted, finished", [
    (150, None, True), (112, "SIGTERM", False), (112, None, False),
    (150, "SIGTERM", True)])  # stopped after the last step: complete
def test_only_finished_runs_are_logged(monkeypatch, step, interrupted,
                                       finished):
  # A run that SIGTERM stopped early still evaluates; its record would pass
  # for a finished run with the same key and be skipped on the rerun.
  monkeypatch.setattr(quality.train_lib, "train",
                      lambda flags: _result(step, interrupted))
  run = quality.Run("main", "apollo", "tiny", 0, {"optimizer": "apollo"})
  if finished:
    record = quality.execute(run, BUDGET, "/tmp/unused")
    assert record["tokens"] == 150 * 16 * 128
    assert record["key"] == run.key(BUDGET)
  else:
    with pytest.raises(SystemExit, match=f"stopped at step {step} of 150"):
      quality.execute(run, BUDGET, "/tmp/unused")
