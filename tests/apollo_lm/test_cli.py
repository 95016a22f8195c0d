"""Command-line errors of every apollo_lm entry point: one line naming the
option and the file, exit status 2, no traceback."""

import json
import pathlib
import subprocess
import sys

import pytest

from apollo_lm import finetune
from apollo_lm import generate
from apollo_lm import train
from tests.apollo_lm.conftest import write_hf_checkpoint

GGUF_HEADER = b"GGUF\x03\x00\x00\x00" + b"\x00" * 24


def _broken(tmp_path: pathlib.Path, case: str) -> pathlib.Path:
  """A checkpoint path with one defect (``case``)."""
  if case == "missing folder":
    return tmp_path / "nowhere"
  if case == "gguf file":
    path = tmp_path / "model-q4_k_m.gguf"
    path.write_bytes(GGUF_HEADER)
    return path
  if case == "uncached hub id":
    return pathlib.Path("nobody/no-model")
  folder = write_hf_checkpoint(tmp_path / "ckpt")
  if case == "missing tokenizer":
    (folder / "tokenizer.json").unlink()
  elif case == "unsupported architecture":
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(config))
  elif case == "truncated safetensors":
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[:len(weights) // 2])
  elif case == "gguf folder":
    (folder / "model.safetensors").unlink()
    (folder / "model-q4_k_m.gguf").write_bytes(GGUF_HEADER)
  return folder


# The one line each case prints after "--checkpoint: " ({} is the path).
CASES = {
    "missing folder": "{}: no such folder (and not a Hugging Face Hub id org/name).",
    "gguf file": "{}: a GGUF file (llama.cpp format); apollo_lm reads "
                 "safetensors folders: convert it with transformers, "
                 "AutoModelForCausalLM.from_pretrained(folder, gguf_file="
                 "'model-q4_k_m.gguf')",
    "uncached hub id": "{}: no such folder, and not in the Hugging Face cache "
                       "(HF_HUB_OFFLINE is set); cache ",
    "missing tokenizer": "{}/tokenizer.json: no such file",
    "unsupported architecture": "architectures: unsupported architecture "
                                "['GPT2LMHeadModel']; supported architectures: "
                                "LlamaForCausalLM, MistralForCausalLM",
    "truncated safetensors": "{}/model.safetensors: not a readable "
                             "safetensors file",
    "gguf folder": "{}/model-q4_k_m.gguf: a GGUF file (llama.cpp format)",
}


@pytest.fixture
def offline(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.chdir(tmp_path)


def _error_line(capsys, exit_info) -> str:
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err and "usage:" not in err
  errors = [line for line in err.splitlines() if " error: " in line]
  assert len(errors) == 1, err
  return errors[0]


@pytest.mark.parametrize("case", list(CASES))
def test_generate_checkpoint_errors(tmp_path, capsys, offline, case):
  path = _broken(tmp_path, case)
  with pytest.raises(SystemExit) as exit_info:
    generate.main(["--checkpoint", str(path), "--prompt", "ab",
                   "--max-new-tokens", "2"])
  line = _error_line(capsys, exit_info)
  assert line.startswith("python -m apollo_lm.generate: error: --checkpoint: "
                         + CASES[case].format(path)), line


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "train.jsonl"
  path.write_text("".join(
      json.dumps({"instruction": f"{a}+{a}=", "output": f"{2 * a}."}) + "\n"
      for a in range(40)))
  return path


@pytest.mark.parametrize("case", list(CASES))
def test_finetune_checkpoint_errors(tmp_path, capsys, offline, sft_file, case):
  path = _broken(tmp_path, case)
  with pytest.raises(SystemExit) as exit_info:
    finetune.main(["--checkpoint", str(path), "--data", str(sft_file),
                   "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                   "--num-devices", "1", "--no-progress", "--eval-every", "0",
                   "--out", str(tmp_path / "out")])
  line = _error_line(capsys, exit_info)
  assert line.startswith("python -m apollo_lm.finetune: error: --checkpoint: "
                         + CASES[case].format(path)), line


@pytest.mark.parametrize("args, message", [
    (["--data", "{tmp}/nowhere"],
     "--data: {tmp}/nowhere: no such file or directory"),
    (["--c4", "--hf-tokenizer", "{tmp}/empty"],
     "--hf-tokenizer: source: '{tmp}/empty' is neither a tokenizer.json file"),
    (["--c4", "--hf-tokenizer", "{tmp}/tokenizer.json"],
     "--hf-tokenizer: {tmp}/tokenizer.json: not a readable tokenizer.json"),
])
def test_train_file_errors(tmp_path, capsys, offline, args, message):
  (tmp_path / "tokenizer.json").write_text("{not a tokenizer")
  (tmp_path / "empty").mkdir()
  args = [a.format(tmp=tmp_path) for a in args]
  with pytest.raises(SystemExit) as exit_info:
    train.main(args + ["--steps", "2", "--num-devices", "1", "--no-progress",
                       "--out", str(tmp_path / "out")])
  line = _error_line(capsys, exit_info)
  assert line.startswith("python -m apollo_lm.train: error: "
                         + message.format(tmp=tmp_path)), line


@pytest.mark.parametrize("args, message", [
    (["--data-format", "csv"], "argument --data-format: invalid choice: 'csv'"),
    (["--data-columns", "question"],
     "--data-columns: 'question' is not key=column"),
])
def test_finetune_data_option_errors(tmp_path, capsys, sft_file, args, message):
  folder = write_hf_checkpoint(tmp_path / "ckpt")
  with pytest.raises(SystemExit) as exit_info:
    finetune.main(["--checkpoint", str(folder), "--data", str(sft_file),
                   *args])
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


def test_no_traceback_in_a_real_process(tmp_path):
  """The entry point as users run it: status 2, one line, no traceback."""
  folder = _broken(tmp_path, "truncated safetensors")
  done = subprocess.run(
      [sys.executable, "-m", "apollo_lm.generate", "--checkpoint",
       str(folder), "--prompt", "ab"], capture_output=True, text=True,
      cwd=pathlib.Path(__file__).resolve().parents[2], timeout=300,
      check=False)
  assert done.returncode == 2, done.stderr
  assert "Traceback" not in done.stderr
  errors = [l for l in done.stderr.splitlines() if " error: " in l]
  assert len(errors) == 1, done.stderr
  assert errors[0].startswith(
      f"python -m apollo_lm.generate: error: --checkpoint: "
      f"{folder}/model.safetensors: not a readable safetensors file ("), errors
