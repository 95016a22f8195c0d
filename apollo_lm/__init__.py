"""LLaMA-family language models on apollo_optax: model, data, training.

The Flax NNX decoder of Llama, Mistral, Qwen2, Qwen3 and Gemma 3 (text)
checkpoints with Hugging Face I/O (local folders or Hub ids), its data
pipelines (local corpora, C4, supervised fine-tuning data in the common
layouts), and one training loop for pre-training, full-parameter fine-tuning
(APOLLO, APOLLO-Mini, AdamW, GaLore, Adafactor) and LoRA, plus batched
KV-cache generation. Entry points: ``python -m apollo_lm.train``,
``apollo_lm.finetune``, ``apollo_lm.generate`` and ``apollo_lm.demo``.
"""

import importlib.util

# One clear error instead of a ModuleNotFoundError from deep inside a module:
# the wheel ships apollo_lm, its dependencies come with the `lm` extra.
_LM_DEPENDENCIES = {
    "flax": "flax", "orbax": "orbax-checkpoint", "tokenizers": "tokenizers",
    "safetensors": "safetensors", "tqdm": "tqdm", "matplotlib": "matplotlib",
    "jinja2": "jinja2", "huggingface_hub": "huggingface_hub",
}
_missing = [
    package for module, package in _LM_DEPENDENCIES.items()
    if importlib.util.find_spec(module) is None
]
if _missing:
  raise ImportError(
      f"apollo_lm needs the `lm` extra of apollo-optax (missing:"
      f' {", ".join(_missing)}): pip install "apollo-optax[lm]"'
  )
