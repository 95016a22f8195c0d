"""The fine-tuning memory report for accelerator targets (no compile)."""

import json

import pytest

from benchmarks import finetune_memory


def _entry(total=None, oom=False):
  entry = {"oom": oom, "params_bytes": 16e9, "opt_state_bytes": 4e9,
           "compile_s": 30.0}
  if total is not None:
    entry["total_bytes"] = total
  if not oom:
    entry["temp_bytes"] = total - 20e9
  return entry


@pytest.mark.parametrize("target,capacity", [("tpu_v5p", 95 * 10**9),
                                             ("h100", 80 * 2**30)])
def test_report_marks_over_capacity_and_oom(target, capacity):
  results = {"batch": 1, "seq_len": 1024, "target": {
      "name": target, "memory_bytes": capacity}, "models": {"llama-3.1-8b": {
          "param_count": 8.03e9, "lora_base_bytes": 16.06e9, "variants": {
              "adamw_f32": _entry(126.2e9, oom=(target == "tpu_v5p")),
              "adamw_bf16": _entry(capacity + 1e9),
              "apollo_mini": _entry(60e9),
              "lora_bf16": _entry(30e9)}}}}
  text = finetune_memory.report(results)
  lines = {line.split(" | ")[0].strip("| "): line
           for line in text.splitlines() if line.startswith("| ")}
  if target == "tpu_v5p":
    assert "| OOM (126.20) |" in lines["AdamW (f32 master weights + moments)"]
  else:
    assert "**126.20** ✗" in lines["AdamW (f32 master weights + moments)"]
  assert "**" + f"{(capacity + 1e9) / 1e9:.2f}" + "** ✗" in lines[
      "AdamW, pure bf16"]
  assert "**60.00** |" in lines["APOLLO-Mini, bf16"]
  # The smallest full fine-tuning row skips OOM and LoRA rows.
  assert "Smallest full fine-tuning: APOLLO-Mini, bf16, 60.00 GB" in text
  assert f"Device memory {capacity / 2**30:.0f} GiB" in text
  assert "On XLA:CPU" not in text


def test_report_with_only_a_refused_variant():
  results = {"batch": 1, "seq_len": 1024, "target": {
      "name": "tpu_v5p", "memory_bytes": 95 * 10**9}, "models": {
          "llama-3.1-8b": {"param_count": 8.03e9, "lora_base_bytes": 16.06e9,
                           "variants": {"adamw_f32": _entry(oom=True)}}}}
  text = finetune_memory.report(results)
  assert "| OOM |" in text
  assert "No full fine-tuning variant compiled." in text


def _results_file(path, target):
  path.write_text(json.dumps({
      "batch": 1, "seq_len": 1024, "target": {"name": target},
      "metadata": {
          "command": "python -m benchmarks.finetune_memory",
          "date_utc": "2026-12-07", "git_commit": "abc",
          "git_modified_files": [], "hardware": {
              "cpu_model": "cpu", "cpus": 2, "memory_gib": 23.5,
              "backend": "cpu"}, "versions": {
                  k: "1" for k in ("python", "jax", "jaxlib", "optax", "flax",
                                   "apollo_optax")}},
      "models": {"llama-3.1-8b": {
          "param_count": 8.03e9, "lora_base_bytes": 16.06e9,
          "variants": {"apollo_mini": _entry(60e9)}}}}))


def test_a_target_reads_and_adds_to_its_own_file(tmp_path):
  _results_file(tmp_path / "finetune_memory_h100.json", "h100")
  results = finetune_memory.main(["--report-only", "--target", "h100",
                                  "--out-dir", str(tmp_path)])
  assert results["target"]["name"] == "h100"
  assert "**60.00**" in (tmp_path / "finetune_memory_h100.md").read_text()
  assert not (tmp_path / "finetune_memory.md").exists()
  # --add refuses to merge into another target's results.
  _results_file(tmp_path / "finetune_memory.json", "h100")
  with pytest.raises(SystemExit):
    finetune_memory.main(["--add", "--out-dir", str(tmp_path)])
