"""amsgrad_jax.interop: every public name documented, and neither framework imported by it.

The API page documents the subpackage after ``.. automodule:: amsgrad_jax.interop``, by
bare name; its docstrings follow the layout of the rest of the API (tests/test_docs.py).
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from amsgrad_jax import interop

API_PAGE = Path(__file__).resolve().parent.parent / "docs" / "api.md"
SECTIONS = ["Args", "Returns", "Raises", "Examples"]


def documented() -> set[str]:
  text = API_PAGE.read_text().split(".. automodule:: amsgrad_jax.interop", 1)[1]
  return set(re.findall(r"\.\.\s+autofunction::\s+(\w+)\s*$", text, re.M))


def test_the_api_page_documents_exactly_the_public_names():
  assert documented() == set(interop.__all__)


@pytest.mark.parametrize("name", interop.__all__)
def test_public_functions_have_optax_style_docstrings(name):
  function = getattr(interop, name)
  docstring = inspect.getdoc(function)
  assert docstring, f"{name} has no docstring"
  assert docstring.splitlines()[0].rstrip().endswith("."), f"{name}: no one-line summary"
  found = re.findall(r"^(\w+):$", docstring, re.M)
  ordered = [section for section in found if section in SECTIONS]
  assert ordered == sorted(ordered, key=SECTIONS.index), f"{name}: sections out of order"
  assert {"Args", "Returns", "Examples"} <= set(found), f"{name}: has {found}"
  args = docstring.split("Args:")[1].split("Returns:")[0]
  for parameter in inspect.signature(function).parameters:
    assert re.search(rf"^\s+{parameter}:", args, re.M), f"{name}: Args misses {parameter}"
  assert ">>>" in docstring.split("Examples:")[1]


def test_importing_interop_imports_neither_pytorch_nor_keras():
  code = "import sys, amsgrad_jax.interop; print(sorted({'torch', 'keras'} & set(sys.modules)))"
  result = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
  )
  assert result.stdout.strip() == "[]"
