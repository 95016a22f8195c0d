"""The README quickstart and every docstring example run as written."""

import doctest
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = [
    "apollo_optax._src.adam",
    "apollo_optax._src.alias",
    "apollo_optax._src.dimension_numbers",
    "apollo_optax._src.limiter",
    "apollo_optax._src.memory",
    "apollo_optax._src.projection",
    "apollo_optax._src.scale_by_apollo",
]


def test_readme_quickstart_runs():
  readme = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
  assert blocks, "the README has no Python quickstart"
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["state"] is not None


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
  result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
  assert result.failed == 0
