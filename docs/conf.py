"""Sphinx configuration: MyST Markdown pages, API pages from the docstrings, no network."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import amsgrad_jax  # noqa: E402

project = "amsgrad_jax"
author = "amsgrad_jax authors"
copyright = "amsgrad_jax authors"
release = amsgrad_jax.__version__
version = release

extensions = [
  "myst_parser",
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
]
# No sphinx.ext.intersphinx: the docs build offline (CI has no network), so references to
# JAX, Optax and NumPy names are written as literals or ignored below.

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "figures", "**/README.md"]
templates_path: list[str] = []
html_static_path = ["_static"]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# Google-style docstrings, as Optax writes them: Args, Returns, Raises, Examples, References.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_custom_sections = [("References", "notes_style")]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
# Show Optax's aliases by name instead of the unions they stand for.
autodoc_type_aliases = {
  name: name
  for name in ("optax.ScalarOrSchedule", "optax.Params", "optax.Updates", "optax.OptState")
}
autodoc_default_options = {"show-inheritance": False}

# Every reference to a name of this project must resolve; names from other libraries cannot
# (there is no intersphinx), so those alone are exempt.
nitpicky = True
nitpick_ignore_regex = [
  (r"py:.*", r"'?(jax|jaxlib|optax|numpy|np|flax|orbax|chex|typing|collections)(\..*)?'?"),
  # What Sphinx names an alias it shows inside a subscript, as in Callable[[optax.Params], Any].
  (r"py:.*", r"TypeAliasForwardRef"),
  (r"py:.*", r"(Any|Callable|NamedTuple|ArrayLike|Array|Params|Updates|OptState)"),
  (r"py:.*", r"(int|float|bool|str|tuple|dict|list|None|object|type)"),
]

html_theme = "furo"
html_title = f"amsgrad_jax {release}"
pygments_style = "sphinx"
pygments_dark_style = "monokai"


def _drop_inherited_data_docstrings(app, what, name, obj, options, lines):
  """A constant such as ``CONVENTIONS`` is a plain tuple: do not show ``tuple``'s docstring
  for it (its description is written in the API page instead)."""
  if what == "data" and lines and type(obj).__doc__ and lines[0] in type(obj).__doc__:
    lines.clear()


def setup(app):
  app.connect("autodoc-process-docstring", _drop_inherited_data_docstrings)
