"""The code of ``docs/guides/scaling.md`` runs as written.

Every ```` ```python ```` block of the page is executed, in order, in one namespace, in
this process with its 8 CPU devices, so the page cannot drift from the library. (Its
multi-host code is included from ``tests/_multiprocess_worker.py``, which
``tests/test_multiprocess.py`` runs.)
"""

from __future__ import annotations

import pathlib
import re

import jax

GUIDE = pathlib.Path(__file__).parent.parent / "docs" / "guides" / "scaling.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def python_blocks(text: str) -> list[tuple[int, str]]:
  """``(line number, code)`` of every Python block."""
  return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in PYTHON_BLOCK.finditer(text)]


def test_every_python_block_of_the_scaling_guide_runs():
  assert jax.device_count() == 8
  text = GUIDE.read_text()
  blocks = python_blocks(text)
  assert len(blocks) >= 8, "the guide's code blocks were not found"
  namespace: dict = {"__name__": "scaling_guide"}
  for line, code in blocks:
    exec(compile(code, f"{GUIDE.name}:{line}", "exec"), namespace)


def test_the_guide_includes_the_multiprocess_worker_it_describes():
  text = GUIDE.read_text()
  assert "{literalinclude} ../../tests/_multiprocess_worker.py" in text
  assert ":pyobject: main" in text
