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


def test_readme_quickstart_runs():
  readme = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
  assert blocks, "the README has no Python quickstart"
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["state"] is not None


# apollo_lm modules with docstring examples; each must attempt at least one.
APOLLO_LM_MODULES = ("apollo_lm.run_config", "apollo_lm.optimizers", "apollo_lm.steps")


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
  result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
  assert result.failed == 0


@pytest.mark.parametrize("module", APOLLO_LM_MODULES)
def test_apollo_lm_docstring_examples(module):
  result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0, f"{module} has no docstring example"
  assert result.failed == 0
