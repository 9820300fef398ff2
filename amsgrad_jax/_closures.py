"""What a function closes over: how Optax's wrappers are looked into.

An Optax optimizer is a pair of closures; the transformations inside a wrapper
(``optax.chain``, ``optax.masked``, ``optax.inject_hyperparams``, ...) are found among the
variables its functions close over.
"""

from __future__ import annotations

from typing import Any


def closure_of(fn: Any) -> dict[str, Any]:
  """The variables ``fn`` closes over that are set, by name (a cell not yet assigned, as
  in a function that refers to itself before its definition ends, is left out)."""
  code = getattr(fn, "__code__", None)
  if code is None:
    return {}
  cells = zip(code.co_freevars, getattr(fn, "__closure__", None) or (), strict=True)
  found = {}
  for name, cell in cells:
    try:
      found[name] = cell.cell_contents
    except ValueError:  # an empty cell
      continue
  return found
