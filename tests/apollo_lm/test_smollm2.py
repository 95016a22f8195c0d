"""A real pretrained model: SmolLM2-135M-Instruct against `transformers`.

Needs `make smollm2` (a side venv with torch and transformers writes the
float32 folder `.cache/smollm2` and transformers' logits and greedy tokens
`.cache/smollm2_reference.{npz,json}`); skipped without it, so never in CI.
The fine-tuning test also runs transformers on our exported folder, through
the side venv that wrote the reference (tools/make_smollm2.py --check).
"""

import json
import os
import pathlib
import shutil
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

from apollo_lm import finetune
from apollo_lm import generate
from apollo_lm import hf
from apollo_lm import tokenizer as tokenizer_lib

REPO = pathlib.Path(__file__).resolve().parents[2]
FOLDER = REPO / ".cache" / "smollm2"
REFERENCE = REPO / ".cache" / "smollm2_reference"
TOOL = REPO / "tools" / "make_smollm2.py"
# max |logit - transformers' logit| <= RTOL * max |transformers' logit|.
RTOL = 1e-3

pytestmark = [
    pytest.mark.xdist_group("apollo_lm_smollm2"),
    pytest.mark.skipif(
        not (FOLDER / "config.json").is_file()
        or not REFERENCE.with_suffix(".json").is_file(),
        reason=f"no {FOLDER} or its reference: run `make smollm2`"),
]


@pytest.fixture(scope="module")
def reference():
  record = json.loads(REFERENCE.with_suffix(".json").read_text())
  logits = np.load(REFERENCE.with_suffix(".npz"))
  return record, [logits[f"logits_{i}"] for i in range(len(record["prompts"]))]


@pytest.fixture(scope="module")
def model():
  return hf.load_pretrained(FOLDER)[0]


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load_checkpoint_tokenizer(FOLDER)


def _prompt_ids(tok, text):
  return tok.chat_prompt_ids([{"role": "user", "content": text}])


def _assert_logits_close(ours, theirs):
  scale = np.abs(theirs).max()
  assert scale > 1.0  # far from trivial, so the check below can fail
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=RTOL * scale)


def test_config_is_smollm2(model):
  config = model.config
  assert (config.num_layers, config.hidden_size, config.num_heads,
          config.num_kv_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
  assert config.tie_embeddings and config.param_dtype == jnp.float32


@pytest.mark.parametrize("index", range(3))
def test_logits_match_transformers(model, tok, reference, index):
  record, logits = reference
  prompt = record["prompts"][index]
  # Our chat template rendering gives transformers' prompt ids.
  assert _prompt_ids(tok, prompt["prompt"]) == prompt["prompt_ids"]
  ours = np.asarray(model(jnp.asarray([prompt["prompt_ids"]])))[0]
  _assert_logits_close(ours, logits[index])


@pytest.mark.parametrize("index", range(3))
def test_greedy_tokens_match_transformers(model, tok, reference, index):
  record, _ = reference
  prompt = record["prompts"][index]
  expected = prompt["greedy_ids"]
  eos_ids = hf.eos_token_ids(FOLDER)
  assert eos_ids == (record["eos_token_id"],) == (tok.eos_id,)
  new = generate.generate(model, jnp.asarray([prompt["prompt_ids"]]),
                          max_new_tokens=len(expected), eos_ids=eos_ids)
  assert np.asarray(new)[0].tolist() == expected, (
      tok.decode(np.asarray(new)[0]), prompt["greedy_text"])
  # transformers stopped at EOS or at its token budget.
  assert expected[-1] in eos_ids or len(expected) == record["max_new_tokens"]


def _torch_python(record) -> str | None:
  for python in (record.get("torch_python"),
                 os.fspath(REPO / ".venv-torch" / "bin" / "python")):
    if python and os.access(python, os.X_OK):
      return python
  return None


def test_finetune_save_hf_loads_in_transformers(model, tok, reference,
                                                tmp_path):
  """Two APOLLO steps on chat records, --save-hf, then transformers loads the
  folder (weights, config and tokenizer files) with our logits."""
  record, _ = reference
  python = _torch_python(record)
  if python is None:
    pytest.skip("no side venv with transformers: run `make smollm2`")
  data = tmp_path / "train.jsonl"
  data.write_text("".join(
      json.dumps({"messages": [
          {"role": "user", "content": f"What is {a} plus {a % 7}?"},
          {"role": "assistant", "content": str(a + a % 7)}]}) + "\n"
      for a in range(40)))
  out = tmp_path / "hf"
  args = ["--checkpoint", str(FOLDER), "--data", str(data), "--optimizer",
          "apollo", "--lr", "1e-3", "--steps", "2", "--batch-size", "2",
          "--seq-len", "64", "--eval-every", "0", "--eval-batches", "0",
          "--no-progress", "--num-devices", "1", "--out",
          str(tmp_path / "run"), "--save-hf", str(out)]
  try:
    config = finetune.cli.parse_or_exit(
        finetune.cli.build_parser(finetune.FinetuneConfig), args,
        finetune.FinetuneConfig)
    result = finetune.finetune(config)
    assert result.step == 2 and np.all(np.isfinite(result.losses))
    saved = json.loads((out / "config.json").read_text())
    base = json.loads((FOLDER / "config.json").read_text())
    # The checkpoint's context and token ids, not the run's --seq-len.
    for key in ("max_position_embeddings", "bos_token_id", "eos_token_id"):
      assert saved[key] == base[key], key
    tuned, _ = hf.load_pretrained(out)
    q = lambda m: np.asarray(m.layers.attn.q_proj.kernel[...])
    assert np.any(q(tuned) != q(model))

    stem = tmp_path / "transformers"
    # One thread: pytest runs other tests on the other core.
    run = subprocess.run([python, str(TOOL), "--check", str(out),
                          "--check-out", str(stem)], cwd=REPO,
                         env=dict(os.environ, OMP_NUM_THREADS="1"),
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = json.loads(stem.with_suffix(".json").read_text())
    assert theirs["architecture"] == "LlamaForCausalLM"
    their_logits = np.load(stem.with_suffix(".npz"))
    for i, prompt in enumerate(theirs["prompts"]):
      # transformers renders the copied chat template as we do.
      assert prompt["prompt_ids"] == _prompt_ids(tok, prompt["prompt"])
      ours = np.asarray(tuned(jnp.asarray([prompt["prompt_ids"]])))[0]
      _assert_logits_close(ours, their_logits[f"logits_{i}"])
  finally:
    shutil.rmtree(out, ignore_errors=True)  # 540 MB of float32 weights
