"""The README quickstart and every docstring example run as written."""

import doctest
import importlib
import pathlib
import pkgutil
import re

import pytest

import apollo_optax._src

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = sorted(
    f"apollo_optax._src.{info.name}"
    for info in pkgutil.iter_modules(apollo_optax._src.__path__)  # pylint: disable=protected-access
)


def test_readme_python_blocks_run():
  """Every ```python block of the README, in order, in one namespace."""
  readme = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
  assert blocks, "the README has no Python block"
  namespace = {}
  for i, block in enumerate(blocks):
    exec(compile(block, f"README.md (python block {i + 1})", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["state"] is not None  # the quickstart's optimizer state


# apollo_optax modules without docstring examples (checked: they have none).
NO_EXAMPLES = ("apollo_optax._src.dimension_numbers", "apollo_optax._src.utils")

# apollo_lm modules with docstring examples; each must attempt at least one.
APOLLO_LM_MODULES = ("apollo_lm.run_config", "apollo_lm.optimizers",
                     "apollo_lm.steps", "apollo_lm.batch",
                     "apollo_lm.chat_template")


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
  result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
  if module in NO_EXAMPLES:
    assert result.attempted == 0, f"{module} has examples: drop it from NO_EXAMPLES"
  else:
    assert result.attempted > 0, f"{module} has no docstring example"
  assert result.failed == 0


@pytest.mark.parametrize("module", APOLLO_LM_MODULES)
def test_apollo_lm_docstring_examples(module):
  result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0, f"{module} has no docstring example"
  assert result.failed == 0
