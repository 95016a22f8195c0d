"""Sphinx configuration of the apollo_optax documentation (`make docs`)."""

import os
import pathlib
import re
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Import on the CPU without probing for accelerators.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import apollo_optax  # pylint: disable=g-import-not-at-top,wrong-import-position

project = "apollo_optax"
author = "The apollo_optax Authors"
copyright = "2025, The apollo_optax Authors"  # pylint: disable=redefined-builtin
release = apollo_optax.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
# Some committed reports go from their title to a level-3 heading.
suppress_warnings = ["myst.header"]

myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# Google-style docstrings, as optax and Flax write them.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
add_module_names = False
# One parameter per line once a signature is longer than this.
python_maximum_signature_line_length = 88

# Nitpicky: every cross-reference must resolve, except the types of other
# libraries (no intersphinx: the build works offline).
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jnp|np|numpy|optax|flax|nnx|chex|typing|collections|"
     r"os|pathlib|enum|dataclasses|abc|types|tokenizers)(\..*)?"),
    # Type aliases of the signatures (their Args sections list the values).
    (r"py:class", r"(sba\.ScaleType|sba\.ProjectionName|MaskOrFn|"
     r"proj\.ProjectionFn|dn\.DimensionNumbersOrFn|apollo_lm\.sharding\.M|"
     r"jaxlib\..*)"),
    (r"py:class", r"(Any|Callable|Sequence|Mapping|Iterator|Iterable|"
     r"Optional|Union|Literal|NamedTuple|PathLike|ArrayLike|Array|PyTree|"
     r"Params|Updates|OptState|ScalarOrSchedule|int|float|str|bool|None|"
     r"tuple|list|dict|object|type)"),
]

# apollo_lm internals that docstrings of documented names refer to.
nitpick_ignore = [
    ("py:class", "apollo_lm.geometry.Geometry"),
    ("py:class", "apollo_lm.train.RunData"),
    ("py:func", "load_data"),
    ("py:func", "build_model"),
    ("py:func", "mesh_is_set"),
    ("py:class", "LayerSpec"),
    ("py:mod", "apollo_lm.optimizers"),
    ("py:func", "apollo_lm.steps.make_train_step"),
    ("py:func", "apollo_lm.optimizers.train_only"),
    ("py:func", "apollo_lm.layerwise.quantize_llama_params"),
]

# MathJax 4 from its CDN; DOCS_MATHJAX=<url of a MathJax 2 MathJax.js> uses a
# local copy to read the pages offline, e.g. Debian's libjs-mathjax:
# file:///usr/share/javascript/mathjax/MathJax.js?config=TeX-AMS_CHTML
if os.environ.get("DOCS_MATHJAX"):
  mathjax_path = os.environ["DOCS_MATHJAX"]
  # MyST marks the page body as ignored and math elements as processed.
  mathjax2_config = {"tex2jax": {"processClass": "math|mathjax_process",
                                 "ignoreClass": "tex2jax_ignore|mathjax_ignore"}}

html_theme = "furo"
html_title = f"apollo_optax {release}"
html_show_sourcelink = False


# Each committed report benchmarks/results/<name>.md gets a page results/<name>
# (generated here, not committed) that includes it, so the tables are the
# committed files themselves. The guides link the committed files
# (../benchmarks/results/<name>.md, which is what GitHub shows); the build
# points those links at the generated pages.
RESULTS = ROOT / "benchmarks" / "results"
GENERATED = pathlib.Path(__file__).parent / "results"


def _write_result_pages():
  GENERATED.mkdir(exist_ok=True)
  for report in sorted(RESULTS.glob("*.md")):
    title = report.read_text().split("\n", 1)[0].lstrip("# ").strip()
    page = (f"# {title}\n\n"
            f"From `benchmarks/results/{report.name}`.\n\n"
            f"```{{include}} ../../benchmarks/results/{report.name}\n"
            ":start-line: 1\n:relative-images:\n```\n")
    target = GENERATED / report.name
    if not target.exists() or target.read_text() != page:
      target.write_text(page)
  for figure in RESULTS.glob("*.png"):  # the reports link their figures
    target = GENERATED / figure.name
    if not target.exists() or target.read_bytes() != figure.read_bytes():
      shutil.copyfile(figure, target)


_write_result_pages()

_RESULT_LINK = re.compile(r"\]\(\.\./benchmarks/results/(\w+)\.md\)")
_BENCHMARKS_README = re.compile(r"\]\(\.\./benchmarks/README\.md\)")


def _local_links(app, docname, source):
  del app
  if docname.startswith("results/"):
    return
  text = _RESULT_LINK.sub(r"](results/\1.md)", source[0])
  source[0] = _BENCHMARKS_README.sub("](benchmarks.md#method)", text)


_CLASS_REPR = re.compile(r"<class '([\w.]+)'>")


def _readable_defaults(app, what, name, obj, options, signature, annotation):
  """Defaults such as ``<class 'jax.numpy.bfloat16'>`` as ``jax.numpy.bfloat16``.

  Generated signatures (dataclass fields) show a default's repr; a repr that
  is not Python makes Sphinx give up parsing the whole signature.
  """
  del app, what, name, obj, options
  if signature:
    return _CLASS_REPR.sub(r"\1", signature), annotation
  return None


def setup(app):
  app.connect("source-read", _local_links)
  app.connect("autodoc-process-signature", _readable_defaults)
