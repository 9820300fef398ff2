"""What a function closes over: how Optax's wrappers are looked into.

An Optax optimizer is a pair of closures; the transformations inside a wrapper
(``optax.chain``, ``optax.masked``, ``optax.inject_hyperparams``, ...) are found among the
variables its functions close over.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from typing import Any

import optax


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


def reachable(root: Any, depth: int) -> Iterator[Any]:
  """Every object reachable from ``root`` (``root`` first, each once, at most ``depth``
  steps away) through what Optax's wrappers are made of: ``functools.partial``'s function
  and arguments, the items of dicts, lists and tuples (a ``GradientTransformation`` is a
  tuple), a bound method's instance, a function's closure and ``optax.MultiSteps``'
  attributes."""
  seen: set[int] = set()
  pending = [(root, depth)]
  while pending:
    obj, left = pending.pop()
    if left < 0 or id(obj) in seen:
      continue
    seen.add(id(obj))
    yield obj
    children: list[Any] = []
    if isinstance(obj, functools.partial):
      children = [obj.func, *obj.args, *obj.keywords.values()]
    elif isinstance(obj, dict):
      children = list(obj.values())
    elif isinstance(obj, list | tuple):
      children = list(obj)
    elif inspect.ismethod(obj):
      children = [vars(obj.__self__)]
    elif inspect.isfunction(obj):
      children = list(closure_of(obj).values())
    elif isinstance(obj, optax.MultiSteps):
      children = [vars(obj)]
    pending.extend((child, left - 1) for child in reversed(children))
