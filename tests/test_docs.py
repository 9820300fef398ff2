"""The documentation covers the public API, its docstrings follow Optax's layout, the code
on its pages runs, and the built site works offline.

Doctests of the docstrings themselves run through ``--doctest-modules`` (pyproject.toml).
The site is built once, strictly, into a temporary folder (``built_docs``), and every
check of the HTML reads that build.
"""

from __future__ import annotations

import dataclasses
import html.parser
import inspect
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import pytest
from _peers import require

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
# Every ```python block of a page runs, in order, in one namespace: the page is one program.
# A fragment that cannot run alone (PyTorch code, one line out of a loop) is written as a
# ```{code-block} python block instead.
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)
# The site's pages (not _static/ or _build/, which Sphinx does not read as pages).
PAGES = sorted(
  page.relative_to(DOCS).as_posix()
  for page in DOCS.rglob("*.md")
  if not any(part.startswith("_") for part in page.relative_to(DOCS).parts)
)
RUNNABLE_PAGES = [page for page in PAGES if PYTHON_BLOCK.search((DOCS / page).read_text())]
# The pages whose code shards over 8 devices.
SHARDED_PAGES = {"guides/scaling.md"}
CODE_COLUMN = 88
# Measured times and rates belong to the benchmarks page alone; the others link to it.
MEASUREMENT = re.compile(r"\d\s*(?:ms|µs|us|ns|GB/s|MB/s)\b|\bratios?\b[^.\n]*\d\.\d")

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
  elif dataclasses.is_dataclass(cls):
    fields = tuple(field.name for field in dataclasses.fields(cls))
  else:
    fields = ()  # a warning category, say
  attributes = docstring.split("Attributes:")[1] if "Attributes:" in docstring else ""
  for field in fields:
    assert re.search(rf"^\s+{field}:", attributes, re.M), f"{name}: Attributes misses {field}"


def test_every_page_is_in_a_toctree_and_every_figure_exists():
  index = (DOCS / "index.md").read_text()
  for page in PAGES:
    name = page.removesuffix(".md")
    if name == "index":
      continue
    assert re.search(rf"^{name}$", index, re.M), f"index.md's toctree lacks {name}"
  for page in PAGES:
    for image in re.findall(r"\{(?:figure|image)\}\s+(\S+)", (DOCS / page).read_text()):
      assert (DOCS / page).parent.joinpath(image).is_file(), f"{page} shows a missing {image}"


def listings(text: str) -> list[list[str]]:
  """The lines of each code listing: fenced blocks of a language or {code-block}, not the
  fences of other directives ({figure}, {toctree}, {eval-rst}, ...)."""
  found: list[list[str]] = []
  lines: list[str] | None = None
  for line in text.splitlines():
    if not line.startswith("```"):
      if lines is not None:
        lines.append(line)
    elif lines is None:
      lines, is_code = [], bool(re.fullmatch(r"\w*|\{code-block\}.*", line[3:].strip()))
    else:
      if is_code:
        found.append(lines)
      lines = None
  return found


@pytest.mark.parametrize("page", PAGES)
def test_code_listings_fit_the_text_column(page):
  """Furo's column holds 90 characters of code; a longer line hides behind a scroll bar."""
  for listing in listings((DOCS / page).read_text()):
    for line in listing:
      assert len(line) <= CODE_COLUMN, f"{page}: {len(line)} characters: {line}"


@pytest.mark.parametrize("page", [page for page in PAGES if page != "benchmarks.md"])
def test_only_the_benchmarks_page_states_measured_times(page):
  found = MEASUREMENT.findall((DOCS / page).read_text())
  assert not found, f"{page} states {found}: say it in words and link to benchmarks.md"


def code_blocks(page: str) -> list[str]:
  return PYTHON_BLOCK.findall((DOCS / page).read_text())


def test_the_pages_with_code_include_the_guides():
  assert {"getting_started.md", "guides/flax.md", "guides/scaling.md"} <= set(RUNNABLE_PAGES)


def page_marks(page: str) -> list[pytest.MarkDecorator]:
  """``host_devices`` for a page that shards over 8 devices, ``keras`` for one that imports
  Keras."""
  marks = [pytest.mark.host_devices] if page in SHARDED_PAGES else []
  if re.search(r"^\s*(import|from) keras\b", "".join(code_blocks(page)), re.M):
    marks.append(pytest.mark.keras)
  return marks


@pytest.mark.parametrize(
  "page", [pytest.param(page, marks=page_marks(page)) for page in RUNNABLE_PAGES]
)
def test_the_code_on_the_page_runs(page, tmp_path, monkeypatch):
  blocks = code_blocks(page)
  if page in SHARDED_PAGES:
    assert len(jax.devices()) == 8  # the 8 CPU devices of tests/conftest.py
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # Checkpoints go to tmp_path.
  namespace: dict = {"__name__": f"docs_{Path(page).stem}"}
  # Readers run the code with JAX's default promotion rules, not this suite's strict ones.
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    for number, block in enumerate(blocks):
      code = compile(block, f"{page} (block {number + 1})", "exec")
      exec(code, namespace)


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
  """One strict build of the whole site (every page read afresh), and its HTML folder."""
  require("sphinx")
  out = tmp_path_factory.mktemp("docs")
  command = ["-W", "--keep-going", "-q", "-b", "html", "-d", str(out / "doctrees")]
  result = subprocess.run(
    [sys.executable, "-m", "sphinx", *command, str(DOCS), str(out / "html")],
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  return result, out / "html"


@pytest.fixture
def built_html(built_docs) -> Path:
  result, html = built_docs
  if not (html / "index.html").is_file():
    pytest.fail("the docs did not build:\n" + result.stdout + result.stderr)
  return html


class Assets(html.parser.HTMLParser):
  """What a page makes the browser load: scripts, stylesheets, images, icons."""

  def __init__(self):
    super().__init__()
    self.urls: list[str] = []
    self.math = False

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag in ("script", "img") and attrs.get("src"):
      self.urls.append(attrs["src"])
    rel = set((attrs.get("rel") or "").split())
    if tag == "link" and rel & {"stylesheet", "preload", "modulepreload", "icon"}:
      self.urls.append(attrs["href"])
    if "math" in (attrs.get("class") or "").split():
      self.math = True


def assets(page: Path) -> Assets:
  parser = Assets()
  parser.feed(page.read_text())
  return parser


def built_pages(html: Path) -> list[Path]:
  return [page for page in html.rglob("*.html") if "_static" not in page.parts]


@pytest.mark.slow
def test_the_docs_build_without_a_warning(built_docs):
  result, _ = built_docs
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_the_built_api_page_has_an_entry_for_every_public_name(built_html):
  api = (built_html / "api.html").read_text()
  for name in PUBLIC:
    assert f'id="amsgrad_jax.{name}"' in api, f"the built API page has no anchor for {name}"


@pytest.mark.slow
def test_no_page_loads_anything_from_the_network(built_html):
  """Opened from disk without a network, every page has its scripts, styles and images."""
  pages = built_pages(built_html)
  assert len(pages) >= len(PAGES)
  for page in pages:
    for url in assets(page).urls:
      assert not re.match(r"(https?:)?//", url), f"{page.name} loads {url} from the network"
      local = (page.parent / url.split("?")[0].split("#")[0]).resolve()
      assert local.is_file(), f"{page.name} loads {url}, which the build does not contain"
  for stylesheet in (built_html / "_static").rglob("*.css"):
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", stylesheet.read_text()), stylesheet


@pytest.mark.slow
def test_the_maths_is_typeset_by_a_local_mathjax(built_html):
  pages_with_maths = [page for page in built_pages(built_html) if assets(page).math]
  assert {"algorithm.html", "api.html"} <= {page.name for page in pages_with_maths}
  for page in pages_with_maths:
    scripts = [url for url in assets(page).urls if re.search(r"mathjax/tex-\w+\.js$", url)]
    assert scripts, f"{page.name} has maths but loads no MathJax"
    assert (page.parent / scripts[0]).resolve().is_file()
  # MathJax loads the TeX packages it lacks (\\begin{cases}, ...) from beside itself.
  assert (built_html / "_static" / "mathjax" / "input" / "tex" / "extensions").is_dir()


@pytest.mark.slow
def test_the_api_page_names_types_as_they_are_imported(built_html):
  text = re.sub(r"<[^>]+>", "", (built_html / "api.html").read_text())
  for leak in (r"TypeAliasForwardRef", r"jaxlib", r"amsgrad_jax\._[a-z]", r"optax\._src"):
    assert not re.search(leak, text), f"the API page shows {leak!r} in a type"
