"""Tests of the pre-training job ``apollo_lm.train``."""

import gzip
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from apollo_lm import train as train_lib

pytestmark = pytest.mark.xdist_group("apollo_lm_train")

_REPO = pathlib.Path(__file__).resolve().parents[2]


def _python(*args: str, **kwargs) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, "-m", "apollo_lm.train", *args], cwd=_REPO,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_help_lists_the_flags():
  out, err = _python("--help").communicate(timeout=120)
  assert not err
  for flag in ("--config", "--optimizer", "--lr", "--warmup-steps", "--steps",
               "--batch-size", "--seq-len", "--grad-accum", "--grad-clip",
               "--rank", "--scale", "--weight-decay", "--data", "--c4",
               "--c4-files", "--hf-tokenizer", "--vocab-size", "--mesh",
               "--remat", "--eval-every", "--eval-batches", "--out",
               "--checkpoint-dir", "--checkpoint-every", "--resume", "--seed",
               "--coordinator", "--num-processes", "--process-id"):
    assert flag in out


def test_run_writes_metrics_and_evaluates(cache_env, tmp_path, small_run):
  result = train_lib.train(small_run(
      eval_every=2, eval_batches=2, out=str(tmp_path)))
  records = [json.loads(line) for line in
             (tmp_path / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in records if "loss" in r]
  evals = [r for r in records if "eval_loss" in r]
  assert steps == [1, 2, 3]
  assert [r["step"] for r in evals] == [2, 3]
  assert result.losses == [r["loss"] for r in records if "loss" in r]
  assert result.eval_loss == evals[-1]["eval_loss"]
  assert result.eval_ppl == pytest.approx(np.exp(result.eval_loss))
  assert result.state_bytes > 0 and result.tokens_per_s > 0
  # Warm-up of 10% of 3 steps is 0 steps: the first update uses the peak lr.
  assert records[0]["lr"] == pytest.approx(1e-2)


def test_resume_is_bit_identical(cache_env, tmp_path, small_run):
  full = train_lib.train(small_run())
  first = train_lib.train(small_run(
      stop_at_step=2, checkpoint_dir=str(tmp_path)))
  second = train_lib.train(small_run(
      resume=True, checkpoint_dir=str(tmp_path)))
  assert (first.step, second.start_step, second.step) == (2, 2, 3)
  assert first.losses + second.losses == full.losses


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(
    corpus_dir, tmp_path, small_cli):
  env = dict(os.environ, APOLLO_LM_CACHE=str(corpus_dir.parent / "cache"))
  process = _python(*small_cli, "--steps", "100000",
                    "--checkpoint-dir", str(tmp_path / "ckpt"),
                    "--out", str(tmp_path), env=env)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.monotonic() + 180
  while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    assert process.poll() is None, process.communicate()
    assert time.monotonic() < deadline, "no training step within 180 s"
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  out, err = process.communicate(timeout=120)
  assert process.returncode == 0, err
  summary = json.loads(out)
  assert summary["interrupted"] == "SIGTERM"
  last = json.loads(metrics.read_text().splitlines()[-1])["step"]
  assert 2 <= summary["step"] == last < 100000
  assert (tmp_path / "ckpt" / str(last)).is_dir()


def test_grad_accum_matches_the_big_batch(cache_env, small_run):
  big = train_lib.train(small_run(steps=3))
  accumulated = train_lib.train(small_run(steps=3, grad_accum=4))
  np.testing.assert_allclose(accumulated.losses, big.losses, rtol=2e-5)


def test_eight_device_mesh_matches_one_device(cache_env, small_run):
  one = train_lib.train(small_run())
  eight = train_lib.train(small_run(num_devices=None,
                                    mesh="2,2,2"))
  np.testing.assert_allclose(eight.losses, one.losses, rtol=1e-5)


def test_c4_format_files(corpus_dir, cache_env, tmp_path, small_run):
  def write(name: str, files: list[pathlib.Path]) -> str:
    path = tmp_path / name
    with gzip.open(path, "wt", encoding="utf-8") as f:
      for file in files:
        f.write(json.dumps({"text": file.read_text(), "url": str(file),
                            "timestamp": "2019-04-25T00:00:00Z"}) + "\n")
    return str(path)

  files = sorted(corpus_dir.rglob("*.py"))
  tokenizer = next(cache_env.glob("corpus-*/tokenizer.json"))
  result = train_lib.train(small_run(
      c4=True, c4_files=[write("train.json.gz", files[1:])],
      c4_eval_files=[write("eval.json.gz", files[:1])], eval_batches=2,
      hf_tokenizer=str(tokenizer)))
  assert len(result.losses) == 3 and np.isfinite(result.losses).all()
  assert np.isfinite(result.eval_loss)


@pytest.mark.parametrize("flags, match", [
    (dict(config="3m"), r"--config: unknown config '3m'; allowed: tiny, 9m"),
    (dict(optimizer="sgd"),
     r"--optimizer: unknown optimizer 'sgd'; allowed: adamw, apollo, "
     r"apollo_mini, galore, adafactor"),
    (dict(num_devices=None, mesh="3,1,1"),
     r"--mesh: 3,1,1 multiplies to 3, but 8 devices"),
    (dict(mesh="1,1"), r"--mesh: expected three positive ints"),
    (dict(num_devices=None, mesh="4,2,1", batch_size=12),
     r"--batch-size: .* 12 sequences, not divisible by the data-parallel "
     r"size data\*fsdp = 8"),
    (dict(grad_accum=3), r"--batch-size: 8 is not divisible by --grad-accum"),
    (dict(resume=True), r"--resume: needs --checkpoint-dir"),
    (dict(warmup_steps=3), r"--warmup-steps: must be in \[0, --steps=3\)"),
    (dict(optimizer="adamw", rank=8), r"--rank: 'adamw' has no rank"),
    (dict(optimizer="adamw", scale_type="tensor"),
     r"--scale-type: 'adamw' has no scale_type"),
    (dict(optimizer="galore", limiter=False), r"--no-limiter: 'galore' has no"),
    (dict(non_lowrank_lr=0.0), r"--non-lowrank-lr: must be > 0, got 0.0"),
    (dict(c4=True, c4_files=["/nonexistent/c4.json.gz"]),
     r"--c4-files: /nonexistent/c4.json.gz: no such file"),
    (dict(learning_rate=1.0), r"unknown option 'learning_rate'"),
    (dict(lr=-1.0), r"--lr: must be > 0, got -1.0"),
    (dict(rank=0), r"--rank: must be an int >= 1, got 0\.$"),
    (dict(weight_decay=-0.1), r"--weight-decay: must be >= 0, got -0.1"),
    (dict(grad_clip=0.0), r"--grad-clip: must be > 0, got 0.0"),
    (dict(warmup_steps=-1), r"--warmup-steps: must be an int >= 0, got -1"),
])
def test_flag_errors(cache_env, flags, match, small_run):
  with pytest.raises(ValueError, match=match):
    train_lib.train(small_run(**flags))


def test_resume_without_a_checkpoint(cache_env, tmp_path, small_run):
  with pytest.raises(ValueError, match=r"--resume: no checkpoint in "
                     r"--checkpoint-dir"):
    train_lib.train(small_run(resume=True,
                              checkpoint_dir=str(tmp_path)))


def test_data_errors(cache_env, tmp_path, small_run):
  with pytest.raises(ValueError, match=r"--data: .*no such file"):
    train_lib.train(small_run(data=[str(tmp_path / "missing")]))
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "a.txt").write_text("")
  with pytest.raises(ValueError, match=r"--data: .*are empty"):
    train_lib.train(small_run(data=[str(empty)]))
  binary = tmp_path / "binary"
  binary.mkdir()
  for name in ("a.bin", "b.bin"):
    (binary / name).write_bytes(b"\xff\xfe\x00 not utf-8")
  with pytest.raises(ValueError, match=r"--data: .*not valid UTF-8"):
    train_lib.train(small_run(data=[str(binary)]))


def test_layerwise_run_matches_the_ordinary_step(cache_env, small_run):
  ordinary = train_lib.train(small_run())
  layer_wise = train_lib.train(small_run(layerwise=True))
  assert layer_wise.losses[-1] < layer_wise.losses[0]
  np.testing.assert_allclose(layer_wise.losses, ordinary.losses,
                             rtol=1e-5)


def test_q_apollo_run_evaluates_and_resumes_bit_identically(
    cache_env, tmp_path, small_run):
  # The small model's kernels have 32 or 64 input rows.
  flags = dict(layerwise=True, quantize_weights="int8", quant_group_size=32,
               steps=4)
  full = train_lib.train(small_run(eval_batches=1, **flags))
  assert full.losses[-1] < full.losses[0]
  assert np.isfinite(full.eval_loss)
  # Step 4's loss depends on the stochastic rounding of step 3, i.e. on the
  # restored PRNG key; the int8 parameters are restored too.
  first = train_lib.train(small_run(
      stop_at_step=2, checkpoint_dir=str(tmp_path), **flags))
  second = train_lib.train(small_run(
      resume=True, checkpoint_dir=str(tmp_path), **flags))
  assert first.losses + second.losses == full.losses


@pytest.mark.parametrize("flags, match", [
    (dict(layerwise=True, grad_clip=1.0),
     r"--grad-clip: --layerwise cannot clip the global gradient norm"),
    (dict(layerwise=True, grad_accum=2),
     r"--grad-accum: --layerwise .* \(got 2\); use --grad-accum 1"),
    (dict(quantize_weights="int8"),
     r"--quantize-weights: int8 weights need --layerwise"),
    (dict(layerwise=True, quantize_weights="int4"),
     r"--quantize-weights: expected one of none, int8, got 'int4'"),
    (dict(layerwise=True, quantize_weights="int8", quant_group_size=24),
     r"--quant-group-size: quantize: group_size=24 does not divide the input"
     r" dimension m=32"),
])
def test_layerwise_and_quantization_flag_errors(
    cache_env, flags, match, small_run):
  with pytest.raises(ValueError, match=match):
    train_lib.train(small_run(**flags))


def test_layerwise_and_quantization_cli(capsys):
  text = " ".join(train_lib.build_parser().format_help().split())
  for flag in ("--layerwise", "--quantize-weights", "--quant-group-size",
               "13.5 GB", "6.7 GB"):
    assert flag in text
  with pytest.raises(SystemExit) as exit_info:
    train_lib.main(["--quantize-weights", "int8"])
  assert exit_info.value.code == 2
  assert "--quantize-weights: int8 weights need --layerwise" in (
      capsys.readouterr().err)


def test_resume_with_other_structural_options_is_refused(
    cache_env, tmp_path, small_run):
  train_lib.train(small_run(stop_at_step=2, checkpoint_dir=str(tmp_path)))
  before = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns)
                  for p in tmp_path.rglob("*"))
  with pytest.raises(ValueError) as error:
    train_lib.train(small_run(
        resume=True, checkpoint_dir=str(tmp_path), optimizer="adamw",
        seq_len=16, steps=5))
  message = str(error.value)
  assert message.startswith("--resume: the checkpoint at step 2")
  assert "--optimizer: checkpoint 'apollo', given 'adamw'" in message
  assert "--seq-len: checkpoint 32, given 16" in message
  assert "--steps" not in message  # steps may change on resume
  assert error.value.option == "--resume"
  after = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns)
                 for p in tmp_path.rglob("*"))
  assert after == before  # a refused resume leaves the checkpoint alone
  # Only non-structural options changed: the resume runs.
  resumed = train_lib.train(small_run(
      resume=True, checkpoint_dir=str(tmp_path), steps=3, eval_every=1))
  assert (resumed.start_step, resumed.step) == (2, 3)


def test_one_file_and_eval_data(corpus_dir, cache_env, tmp_path, small_run):
  big = tmp_path / "one_big_file.txt"
  files = sorted(corpus_dir.rglob("*.py"))
  big.write_text("\n\n".join(f.read_text() for f in files[:12]))
  single = train_lib.train(small_run(data=[str(big)], eval_batches=1))
  assert np.isfinite(single.eval_loss)
  held = train_lib.train(small_run(eval_data=[str(files[0])], eval_batches=1))
  assert np.isfinite(held.eval_loss)
