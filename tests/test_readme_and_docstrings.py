"""The README, the docs' guide pages and every docstring example run as written."""

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


DOCS = ROOT / "docs"
GUIDES = sorted(DOCS.glob("*.md"))
# A ```python block preceded by this comment is shown, not run (it needs files
# or takes minutes); keep them few: MAX_SKIPPED in all.
SKIP_MARKER = "<!-- skip-test"
MAX_SKIPPED = 4
# A block may be followed by "prints" and a ```text block: its exact output.
_BLOCK = re.compile(r"(<!-- skip-test[^\n]*-->\n)?```python\n(.*?)```"
                    r"(?:\n+prints\n+```text\n(.*?)```)?", re.S)


def _python_blocks(text, with_output=False):
  """(skipped, code[, printed]) of every ```python block of a Markdown text."""
  blocks = [(bool(skip), code, printed) for skip, code, printed in _BLOCK.findall(text)]
  return blocks if with_output else [b[:2] for b in blocks]


def _lines(text):
  return [line.rstrip() for line in text.strip().splitlines()]


def test_docs_skip_markers_are_few():
  skipped = [(page.name, i + 1) for page in GUIDES
             for i, (skip, _) in enumerate(_python_blocks(page.read_text()))
             if skip]
  markers = sum(page.read_text().count(SKIP_MARKER) for page in GUIDES)
  assert markers == len(skipped), "a skip-test marker that is not right before a ```python block"
  assert len(skipped) <= MAX_SKIPPED, f"too many skipped docs blocks: {skipped}"


@pytest.mark.parametrize("page", GUIDES, ids=lambda p: p.name)
def test_docs_python_blocks_run(page, tmp_path, monkeypatch, capsys):
  """Every ```python block of a docs page, in order, in one namespace.

  A block followed by "prints" must print that text.
  """
  monkeypatch.chdir(tmp_path)  # blocks that write files write them here
  namespace = {}
  blocks = _python_blocks(page.read_text(), with_output=True)
  for i, (skip, block, printed) in enumerate(blocks):
    if skip:
      continue
    capsys.readouterr()
    exec(compile(block, f"docs/{page.name} (python block {i + 1})", "exec"), namespace)  # pylint: disable=exec-used
    if printed:
      assert _lines(capsys.readouterr().out) == _lines(printed), (
          f"docs/{page.name} python block {i + 1} prints something else")


def _documented(pages, module):
  """Names of ``module`` in autodoc (or ``py:data``) directives of ``pages``."""
  names = set()
  for page in pages:
    current = None
    for line in page.read_text().splitlines():
      if m := re.match(r"\.\. currentmodule:: (\S+)", line.strip()):
        current = m.group(1)
      m = re.match(r"\.\. (?:auto(?:function|class|data|exception|module)|py:data)::"
                   r" (\S+)", line.strip())
      if m:
        name = m.group(1)
        full = name if "." in name or current is None else f"{current}.{name}"
        prefix = module + "."
        if full.startswith(prefix) and "." not in full[len(prefix):]:
          names.add(full[len(prefix):])
  return names


@pytest.mark.parametrize("module", ["apollo_optax", "apollo_optax.quantization"])
def test_every_public_name_has_an_api_entry(module):
  """Each name of ``__all__`` is in an autodoc directive of docs/api.md.

  A submodule counts through its ``automodule`` directive.
  """
  public = set(importlib.import_module(module).__all__)
  documented = _documented([DOCS / "api.md"], module)
  missing = sorted(public - documented)
  assert not missing, f"public names without an autodoc entry in docs/api.md: {missing}"


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
