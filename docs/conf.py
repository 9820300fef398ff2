"""Sphinx configuration: MyST Markdown pages, API pages from the docstrings, no network."""

from __future__ import annotations

import re
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
  "sphinx-mathjax-offline",
]
# No sphinx.ext.intersphinx: the docs build offline (CI has no network), so references to
# JAX, Optax and NumPy names are written as literals or ignored below.

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "figures", "**/README.md"]
templates_path: list[str] = []
html_static_path = ["_static"]
html_css_files = ["tables.css"]

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
# Types by their full names (jax.Array, optax.GradientTransformation); the project's own
# names, which link to their entries, by their short ones. _public_name below turns the
# modules where a type is defined into the one it is imported from.
autodoc_typehints_format = "fully-qualified"
python_use_unqualified_type_names = True
autodoc_preserve_defaults = True
# Show Optax's aliases by name instead of the unions they stand for.
autodoc_type_aliases = {
  name: name
  for name in ("optax.ScalarOrSchedule", "optax.Params", "optax.Updates", "optax.OptState")
}

# Every reference to a name of this project must resolve; names from other libraries cannot
# (there is no intersphinx), so those alone are exempt.
nitpicky = True
nitpick_ignore_regex = [
  (r"py:.*", r"'?(jax|jaxlib|optax|numpy|np|flax|orbax|chex|typing|collections)(\..*)?'?"),
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


# Where a type is defined -> where a reader imports it from.
_PUBLIC_NAMES = [
  # Sphinx's stand-in for an alias of autodoc_type_aliases, when it sits in a subscript.
  (re.compile(r"TypeAliasForwardRef\('([\w.]+)'\)"), r"\1"),
  (re.compile(r"\b(?:jax\.)?jaxlib\._jax\.(\w+)"), r"jax.\1"),
  (re.compile(r"\b(?:collections\.abc|typing)\.(\w+)"), r"\1"),
  # amsgrad_jax._flat.FlatLayout -> amsgrad_jax.FlatLayout, optax._src.base.X -> optax.X.
  (re.compile(r"\b(amsgrad_jax|optax)(?:\.\w+)*?\._\w+(?:\.\w+)*?\.(\w+)(?![\w.])"), r"\1.\2"),
]


def _public_name(text: str) -> str:
  for pattern, replacement in _PUBLIC_NAMES:
    text = pattern.sub(replacement, text)
  return text


def _public_annotations(app, domain, objtype, contentnode):
  """Before autodoc writes the parameter and return types into the description."""
  for types in app.env.current_document.autodoc_annotations.values():
    for key, value in types.items():
      types[key] = _public_name(value)


def _public_field_types(app, what, name, obj, options, lines):
  """The ``:type:`` lines Napoleon writes for the fields of the Attributes sections."""
  lines[:] = [_public_name(line) if ":type:" in line else line for line in lines]


def setup(app):
  app.config.mathjax_path = "mathjax/tex-svg.js"
  app.connect("autodoc-process-docstring", _drop_inherited_data_docstrings)
  app.connect("autodoc-process-docstring", _public_field_types)
  app.connect("object-description-transform", _public_annotations, priority=499)
