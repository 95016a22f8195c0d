"""Checks an installed apollo-optax as a new user meets it (run by `make dist`).

Run with the interpreter of a fresh environment holding only the wheel and its
dependencies, from outside the repository (so that the installed package is
imported): runs the README's Quickstart, then checks that `import apollo_lm`
without the `lm` extra is one ImportError naming the extra.

Usage: python .ci/check_wheel.py README.md
"""

import pathlib
import re
import sys


def quickstart(readme: str) -> str:
  """The first Python block after the heading that names the Quickstart."""
  section = re.search(r"^#+ [^\n]*Quickstart[^\n]*\n(.*?)(?=^#+ |\Z)", readme,
                      re.M | re.S)
  if section is None:
    raise SystemExit("README.md has no Quickstart heading")
  block = re.search(r"```python\n(.*?)```", section.group(1), re.S)
  if block is None:
    raise SystemExit("the README's Quickstart has no Python block")
  return block.group(1)


def main() -> None:
  import apollo_optax  # pylint: disable=g-import-not-at-top
  if "site-packages" not in apollo_optax.__file__:
    raise SystemExit(f"apollo_optax came from {apollo_optax.__file__}, not the wheel")
  code = quickstart(pathlib.Path(sys.argv[1]).read_text())
  exec(compile(code, "README.md (Quickstart)", "exec"), {})  # pylint: disable=exec-used
  try:
    import apollo_lm  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    if 'pip install "apollo-optax[lm]"' not in str(e):
      raise SystemExit(f"import apollo_lm failed without naming the extra: {e!r}")
    print(f"import apollo_lm without the extra: {e}")
  else:
    raise SystemExit("import apollo_lm worked without the `lm` extra; check the venv")
  print(f"apollo_optax {apollo_optax.__version__} from the wheel: Quickstart ran")


if __name__ == "__main__":
  main()
