"""The documentation covers the public API, its docstrings follow Optax's layout, and the
code on the guide pages runs.

Doctests of the docstrings themselves run through ``--doctest-modules`` (pyproject.toml).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import pytest

import amsgrad_jax

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
API_PAGE = DOCS / "api.md"
DIRECTIVE = re.compile(r"(?:\.\.\s+|\{)auto(function|class|data)(?:::|\})\s+amsgrad_jax\.(\w+)")
SECTION = re.compile(r"^(Args|Returns|Raises|Examples|References|Attributes):$", re.M)
# Optax's order: summary, maths, Args, Returns, (Raises), Examples, References.
SECTION_ORDER = ["Args", "Returns", "Raises", "Examples", "References"]
# The callables that compute AMSGrad steps cite the paper.
CITES_THE_PAPER = {"amsgrad", "amsgradw", "scale_by_amsgrad", "apply_step"}
# The optimizers state their update rule in maths.
STATES_THE_MATHS = {"amsgrad", "amsgradw", "scale_by_amsgrad"}
# Pages whose Python code blocks form a program (blocks starting with an import, in order).
RUNNABLE_PAGES = [
  "getting_started.md",
  "migrating.md",
  "guides/flax.md",
  "guides/schedules.md",
  "guides/checkpointing.md",
]

PUBLIC = sorted(amsgrad_jax.__all__)
PUBLIC_CALLABLES = [name for name in PUBLIC if inspect.isfunction(getattr(amsgrad_jax, name))]
PUBLIC_CLASSES = [name for name in PUBLIC if inspect.isclass(getattr(amsgrad_jax, name))]


def documented_names() -> dict[str, str]:
  """``{name: "function" | "class" | "data"}`` for every autodoc directive of the API page."""
  return {name: kind for kind, name in DIRECTIVE.findall(API_PAGE.read_text())}


def sections(docstring: str) -> list[str]:
  return SECTION.findall(docstring)


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_has_an_entry_on_the_api_page(name):
  documented = documented_names()
  assert name in documented, f"amsgrad_jax.{name} is public but docs/api.md does not document it"
  obj = getattr(amsgrad_jax, name)
  expected = "function" if inspect.isfunction(obj) else "class" if inspect.isclass(obj) else "data"
  assert documented[name] == expected


def test_the_api_page_documents_nothing_that_is_not_public():
  assert set(documented_names()) <= set(PUBLIC)


def test_the_coverage_check_sees_a_missing_entry(tmp_path, monkeypatch):
  page = tmp_path / "api.md"
  page.write_text(API_PAGE.read_text().replace("autofunction:: amsgrad_jax.amsgradw", ""))
  monkeypatch.setattr(sys.modules[__name__], "API_PAGE", page)
  assert "amsgradw" not in documented_names()
  assert "amsgrad" in documented_names()


@pytest.mark.parametrize("name", PUBLIC_CALLABLES)
def test_public_callables_have_optax_style_docstrings(name):
  function = getattr(amsgrad_jax, name)
  docstring = inspect.getdoc(function)
  assert docstring, f"{name} has no docstring"
  summary = docstring.splitlines()[0]
  assert summary.strip(), f"{name}: the docstring must open with a one-line summary"
  assert summary.rstrip().endswith("."), f"{name}: the summary must be a sentence"
  found = sections(docstring)
  signature = inspect.signature(function)
  expected = {"Examples"}
  if signature.parameters:
    expected.add("Args")
  if signature.return_annotation not in (None, "None", inspect.Signature.empty):
    expected.add("Returns")
  if name in CITES_THE_PAPER:
    expected.add("References")
  missing = expected - set(found)
  assert not missing, f"{name}'s docstring lacks {sorted(missing)} (has {found})"
  ordered = [s for s in found if s in SECTION_ORDER]
  assert ordered == sorted(ordered, key=SECTION_ORDER.index), f"{name}: sections out of order"
  assert len(found) == len(set(found)), f"{name}: a section appears twice"
  assert ">>>" in docstring.split("Examples:")[1], f"{name}: Examples without a doctest"
  if "Args" in found:
    args = docstring.split("Args:")[1]
    for parameter in signature.parameters:
      assert re.search(rf"^\s+{parameter}:", args, re.M), f"{name}: Args misses {parameter}"
  if name in CITES_THE_PAPER:
    assert "Reddi" in docstring.split("References:")[1]
  if name in STATES_THE_MATHS:
    assert ".. math::" in docstring or ":math:" in docstring, f"{name}: no maths"


@pytest.mark.parametrize("name", PUBLIC_CLASSES)
def test_public_classes_document_every_field(name):
  cls = getattr(amsgrad_jax, name)
  docstring = inspect.getdoc(cls)
  assert docstring, f"{name} has no docstring"
  assert docstring.splitlines()[0].strip(), f"{name}: no summary"
  if hasattr(cls, "_fields"):
    fields = cls._fields
  else:
    fields = tuple(field.name for field in dataclasses.fields(cls))
  attributes = docstring.split("Attributes:")[1] if "Attributes:" in docstring else ""
  for field in fields:
    assert re.search(rf"^\s+{field}:", attributes, re.M), f"{name}: Attributes misses {field}"


def test_every_page_is_in_a_toctree_and_every_figure_exists():
  index = (DOCS / "index.md").read_text()
  for page in ["getting_started", "algorithm", "migrating", "api", "benchmarks"]:
    assert re.search(rf"^{page}$", index, re.M), f"index.md's toctree lacks {page}"
    assert (DOCS / f"{page}.md").is_file()
  assert re.search(r"^:glob:$", index, re.M)
  assert re.search(r"^guides/\*$", index, re.M)
  for page in DOCS.rglob("*.md"):
    if "_build" in page.parts:
      continue
    for image in re.findall(r"\{(?:figure|image)\}\s+(\S+)", page.read_text()):
      assert (page.parent / image).is_file(), f"{page.name} shows a missing {image}"


def code_blocks(page: str) -> list[str]:
  """The page's Python blocks that start with an import: together, one program."""
  blocks = re.findall(r"^```python\n(.*?)^```", (DOCS / page).read_text(), re.M | re.S)
  return [block for block in blocks if re.match(r"(import|from) ", block)]


@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_the_code_on_the_page_runs(page, tmp_path, monkeypatch):
  blocks = code_blocks(page)
  assert blocks, f"{page} has no runnable code"
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # Checkpoints go to tmp_path.
  namespace: dict = {"__name__": f"docs_{Path(page).stem}"}
  # Readers run the code with JAX's default promotion rules, not this suite's strict ones.
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    for number, block in enumerate(blocks):
      code = compile(block, f"{page} (block {number + 1})", "exec")
      exec(code, namespace)


@pytest.mark.slow
def test_the_docs_build_without_a_warning(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "sphinx",
      "-W",
      "--keep-going",
      "-q",
      "-b",
      "html",
      "-d",
      str(tmp_path / "doctrees"),
      str(DOCS),
      str(tmp_path / "html"),
    ],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  api = (tmp_path / "html" / "api.html").read_text()
  for name in PUBLIC:
    assert f'id="amsgrad_jax.{name}"' in api, f"the built API page has no anchor for {name}"
