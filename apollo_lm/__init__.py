"""LLaMA pre-training stack (model, data, training) for the APOLLO runs."""

import importlib.util

# One clear error instead of a ModuleNotFoundError from deep inside a module:
# the wheel ships apollo_lm, its dependencies come with the `lm` extra.
_LM_DEPENDENCIES = {
    "flax": "flax", "orbax": "orbax-checkpoint", "tokenizers": "tokenizers",
    "safetensors": "safetensors", "tqdm": "tqdm", "matplotlib": "matplotlib",
    "jinja2": "jinja2",
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
