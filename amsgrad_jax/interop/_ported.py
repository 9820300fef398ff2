"""The optimizer a framework's optimizer becomes: one AMSGrad per parameter group.

One group is a plain :func:`~amsgrad_jax.amsgrad` or :func:`~amsgrad_jax.amsgradw`; several
become ``optax.partition`` over subtrees labelled by group index. Clipping, which the
frameworks apply to the gradients before the optimizer, is chained in front. The result
keeps the options of each group (``groups``), so that a state can be checked against the
framework's hyperparameters and written back with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

from amsgrad_jax._options import AliasOptions


class PortedOptimizer(optax.GradientTransformationExtraArgs):
  """An Optax optimizer built from a framework's, with each group's options in ``groups``.

  It is a plain ``(init, update)`` pair for every Optax use; ``groups`` is an attribute,
  not a field, as :class:`~amsgrad_jax._aliases.AliasTransformation`'s ``options`` is.
  """

  groups: tuple[AliasOptions, ...]

  def __new__(
    cls, chain: optax.GradientTransformation, groups: tuple[AliasOptions, ...]
  ) -> PortedOptimizer:
    ported = super().__new__(cls, chain.init, chain.update)
    ported.groups = groups
    return ported


def groups_of(tx: Any) -> tuple[AliasOptions, ...] | None:
  """The options of each group of ``tx``, when it says (``None`` for a plain chain)."""
  groups = getattr(tx, "groups", None)
  if groups is not None:
    return tuple(groups)
  options = getattr(tx, "options", None)
  return (options,) if isinstance(options, AliasOptions) else None


def build(
  optimizers: Sequence[optax.GradientTransformation],
  labels: Any | None,
  front: Sequence[optax.GradientTransformation] = (),
) -> optax.GradientTransformationExtraArgs:
  """``front`` chained before one optimizer, or before ``optax.partition`` of several over
  ``labels`` (a tree of group indices shaped like the parameters)."""
  groups = tuple(getattr(tx, "options") for tx in optimizers)  # noqa: B009  (the aliases')
  if len(optimizers) == 1 and not front:
    # The alias itself, so that apply_step can still run it natively.
    alias: Any = optimizers[0]
    alias.groups = groups
    return alias
  if len(optimizers) == 1:
    inner: optax.GradientTransformation = optimizers[0]
  else:
    inner = optax.partition(dict(enumerate(optimizers)), labels)
  chain = optax.chain(*front, inner) if front else inner
  return PortedOptimizer(chain, groups)


def number(value: Any) -> float:
  """A hyperparameter a framework may hold as a tensor or a variable, as a Python float."""
  if hasattr(value, "item"):
    return float(value.item())
  return float(np.asarray(value))


def learning_rate_at(options: AliasOptions, count: int) -> float:
  """The learning rate of the step after ``count`` steps: the schedule's value there,
  computed in float64 (a framework keeps its rates as Python floats)."""
  rate = options.learning_rate
  if not callable(rate):
    return number(rate)
  with jax.enable_x64(True):
    return number(jax.device_get(jax.jit(rate)(count)))


def mismatches(
  options: AliasOptions, theirs: dict[str, Any], convention: str, count: int
) -> list[str]:
  """The hyperparameters in which ``options`` and a framework's differ, one line each.

  ``theirs`` may hold ``b1``, ``b2``, ``eps``, ``weight_decay``, ``decoupled`` and
  ``learning_rate``, the rate of the framework's next step, compared with ``options``'
  rate after ``count`` steps.
  """
  found = []
  ours = {
    "b1": options.b1,
    "b2": options.b2,
    "eps": options.eps,
    "weight_decay": options.weight_decay,
  }
  for name, value in ours.items():
    if name in theirs and not np.isclose(number(value), theirs[name], rtol=1e-6, atol=0):
      found.append(f"{name}: {number(value)!r} in tx, {theirs[name]!r} in the framework")
  decays = theirs.get("weight_decay", 0.0) != 0.0
  if decays and "decoupled" in theirs and theirs["decoupled"] != options.decoupled:
    kinds = {True: "decoupled", False: "coupled"}
    found.append(
      f"weight decay: {kinds[options.decoupled]} in tx, {kinds[theirs['decoupled']]} in the "
      "framework"
    )
  if options.convention != convention:
    found.append(f'convention: {options.convention!r} in tx, "{convention}" for the framework')
  if "learning_rate" in theirs:
    ours_rate, their_rate = learning_rate_at(options, count), theirs["learning_rate"]
    if not np.isclose(ours_rate, their_rate, rtol=1e-5, atol=1e-12):
      found.append(
        f"learning rate of the next step: {ours_rate!r} in tx, {their_rate!r} in the "
        "framework (does its schedule count optimizer steps?)"
      )
  return found
