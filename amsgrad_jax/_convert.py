"""Move a run's AMSGrad state to another storage: float32, bfloat16, 8-bit, flat or not.

:func:`convert_state` re-stores every moment of a state from its values, as another
optimizer (the same chain and rule, other ``mu_dtype``, ``nu_dtype`` or ``flat_state``)
stores them: ``mu`` and ``nu`` rounded to nearest, ``nu_max`` rounded up, so that the
stored running maximum never falls below the one the run had. Everything else in the
state (the step count, a schedule's count, ``inject_hyperparams``' values,
``MultiSteps``' accumulators) is carried over as it is.

An 8-bit ``nu`` is stored relative to the running maximum of the rule's second moment
(see :mod:`amsgrad_jax._blockwise`), so converting to or from it needs the rule: it is
read from ``tx``, where every :func:`~amsgrad_jax.scale_by_amsgrad` marks its update
function with its options (:data:`~amsgrad_jax._transform.OPTIONS_ATTRIBUTE`), found
through Optax's wrappers by what their functions close over.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import numpy as np
import optax

from amsgrad_jax import _blockwise
from amsgrad_jax._blockwise import is_blockwise
from amsgrad_jax._closures import closure_of, reachable
from amsgrad_jax._flat import FlatMoment
from amsgrad_jax._rules import RULES
from amsgrad_jax._transform import OPTIONS_ATTRIBUTE, ScaleByAmsgradState
from amsgrad_jax.interop._state import (
  MOMENTS,
  decoded,
  has_blockwise,
  is_masked_or_blockwise,
  placed,
  stored_like,
)


def convert_state(tx: optax.GradientTransformation, params: Any, opt_state: Any) -> Any:
  """``opt_state``, the state of an AMSGrad optimizer, stored as ``tx`` stores its state.

  Switch a running job's storage at a checkpoint: float32 state to bfloat16 or
  :func:`~amsgrad_jax.blockwise8` to save memory, 8-bit back to float32, the tree layout
  to ``flat_state=True`` and back. ``tx`` is the optimizer the run continues with: the
  same chain and update rule as the one that made ``opt_state``, with other storage
  options. Each moment is re-stored from the values it holds: ``mu`` and ``nu`` rounded
  to nearest, ``nu_max`` rounded up, so the stored running maximum is never below the
  one the run had (the algorithm's guarantee). Into float32, or into the storage it
  already has, the values are kept exactly. The step count and every other part of the
  state are kept (copied, so that donating one state leaves the other intact).

  It runs eagerly (not under ``jit``), through the host: every array must be readable
  whole by this process (one process, or arrays replicated across processes). Each new
  array is placed as ``tx.init(params)`` places it.

  Args:
    tx: the optimizer to continue with.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    opt_state: the state to convert, made by the same optimizer with other storage.

  Returns:
    A state of ``tx`` holding ``opt_state``'s values.

  Raises:
    ValueError: ``opt_state`` is not a state of ``tx``'s chain (another structure,
      moments of other shapes, other ``optax.masked`` masks), ``tx`` holds no AMSGrad,
      or a conversion to or from 8-bit state meets a rule whose maximum is of the
      bias-corrected second moment (``convention="optax"``) or a ``tx`` whose rule
      cannot be read.

  Examples:
    >>> import jax.numpy as jnp
    >>> from amsgrad_jax import amsgrad, blockwise8, convert_state
    >>> params = {"w": jnp.ones((4, 256))}
    >>> wide = amsgrad(1e-3)
    >>> state = wide.init(params)
    >>> _, state = wide.update(params, state, params)
    >>> small = amsgrad(1e-3, mu_dtype=blockwise8(), nu_dtype=blockwise8())
    >>> state = convert_state(small, params, state)
    >>> state[1].nu_max["w"].codes.dtype, int(state[1].count)
    (dtype('uint8'), 1)
  """
  target = tx.init(params)
  targets = _amsgrad_states(target)
  if not targets:
    raise ValueError("tx's state holds no ScaleByAmsgradState: tx is not an AMSGrad optimizer.")
  outline: Any = jax.tree.structure(opt_state, is_leaf=_is_amsgrad_state)
  expected: Any = jax.tree.structure(target, is_leaf=_is_amsgrad_state)
  if outline != expected:
    raise ValueError(
      "opt_state is not a state of tx's chain: it has the structure\n"
      f"  {outline}\nwhere tx.init(params) has\n  {expected}\n"
      "convert_state changes how the moments are stored, not the optimizer."
    )
  sources = _amsgrad_states(opt_state)
  if any(has_blockwise(state) for state in (*sources, *targets)):
    _check_rules_for_8_bits(tx)
  names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  new_states = iter(
    [_converted(old, new, names) for old, new in zip(sources, targets, strict=True)]
  )
  return jax.tree.map(
    lambda old, new: next(new_states) if _is_amsgrad_state(new) else _copied(old),
    opt_state,
    target,
    is_leaf=_is_amsgrad_state,
  )


def _is_amsgrad_state(node: Any) -> bool:
  return isinstance(node, ScaleByAmsgradState)


def _amsgrad_states(state: Any) -> list[ScaleByAmsgradState]:
  """Every :class:`ScaleByAmsgradState` in ``state``, in ``jax.tree.leaves`` order."""
  return [x for x in jax.tree.leaves(state, is_leaf=_is_amsgrad_state) if _is_amsgrad_state(x)]


def _copied(leaf: Any) -> Any:
  if not isinstance(leaf, jax.Array):
    return leaf
  return jax.device_put(leaf, leaf.sharding, may_alias=False)


def _check_rules_for_8_bits(tx: Any) -> None:
  """Raise ``ValueError`` unless every update rule in ``tx`` keeps the maximum of ``v``
  itself, against which an 8-bit ``nu`` is stored and read back."""
  conventions = _conventions_in(tx)
  if not conventions:
    raise ValueError(
      "converting to or from 8-bit (blockwise8) state reads the update rule from tx, and "
      "none was found inside it: build tx from amsgrad, amsgradw or scale_by_amsgrad, "
      "alone or inside Optax's wrappers (chain, masked, partition, MultiSteps, "
      "inject_hyperparams)."
    )
  for convention in sorted(conventions):
    if not RULES[convention].maximum_of_raw_v:
      raise ValueError(
        f'8-bit (blockwise8) state under convention="{convention}" stores nu against the '
        "maximum of the bias-corrected second moment, which depends on the step: convert "
        "it through a float mu_dtype and nu_dtype."
      )


def _conventions_in(tx: Any, depth: int = 12) -> set[str]:
  """The update rules of every :func:`~amsgrad_jax.scale_by_amsgrad` inside ``tx``: on
  its update function, or, inside ``optax.inject_hyperparams``, in the arguments the
  inner optimizer is built from."""
  found: set[str] = set()
  for obj in reachable(tx, depth):
    options = getattr(obj, OPTIONS_ATTRIBUTE, None)
    if options is not None:
      found.add(options.convention)
    elif inspect.isfunction(obj):
      _injected_convention(closure_of(obj), found)
  return found


def _injected_convention(closure: dict[str, Any], found: set[str]) -> None:
  """The rule of the optimizer ``optax.inject_hyperparams`` builds, from its closure:
  ``convention`` among the arguments it holds, or the factory's default."""
  factory, held = closure.get("inner_factory"), closure.get("other_hps")
  if factory is None or not isinstance(held, dict):
    return
  try:
    parameter = inspect.signature(factory).parameters.get("convention")
  except (TypeError, ValueError):
    return
  if parameter is None:
    return
  convention = held.get("convention", parameter.default)
  if isinstance(convention, str) and convention in RULES:
    found.add(convention)


def _tree(moment: Any) -> Any:
  """A moment in the tree layout (a flat one unpacked)."""
  if isinstance(moment, FlatMoment):
    return jax.tree.unflatten(moment.layout.treedef, moment.leaves())
  return moment


def _leaves(moment: Any) -> tuple[list[Any], Any]:
  return jax.tree.flatten(moment, is_leaf=is_masked_or_blockwise)


def _stops_at_8_bits(node: Any) -> bool:
  return is_blockwise(node) or _blockwise.is_unwrapped(node)


def _converted(
  source: ScaleByAmsgradState, target: ScaleByAmsgradState, names: list[str]
) -> ScaleByAmsgradState:
  """``source``'s values stored as ``target`` (a fresh state of the new optimizer) is;
  ``names`` are the parameters' key paths, for the errors."""
  held = [getattr(source, field) for field in MOMENTS]
  if any(_blockwise.is_unwrapped(x) for x in jax.tree.leaves(held, is_leaf=_stops_at_8_bits)):
    raise ValueError(
      "opt_state holds an 8-bit moment as a mapping of its codes and exponents (as "
      "nnx.update leaves it), without its block size: make each one a "
      "Blockwise8Array(codes, exponents, block_size, kind) again before converting."
    )
  values = decoded(source._replace(**{f: _tree(getattr(source, f)) for f in MOMENTS}))
  columns = {field: _leaves(getattr(values, field))[0] for field in MOMENTS}
  templates = {field: _leaves(_tree(getattr(target, field))) for field in MOMENTS}
  treedef = templates["mu"][1]
  if _leaves(values.mu)[1] != treedef:
    raise ValueError(
      f"opt_state's moments are not shaped like tx's: {_leaves(values.mu)[1]} against {treedef}."
    )
  stored: dict[str, list[Any]] = {field: [] for field in MOMENTS}
  for index, template in enumerate(zip(*(templates[f][0] for f in MOMENTS), strict=True)):
    name = names[index] if len(names) == len(templates["mu"][0]) else f"leaf {index}"
    old = [columns[field][index] for field in MOMENTS]
    masked = isinstance(template[0], optax.MaskedNode)
    if masked != isinstance(old[0], optax.MaskedNode):
      raise ValueError(
        f"the parameter {name} is masked in {'tx' if masked else 'opt_state'} only: "
        "convert_state needs the same optax.masked masks on both sides."
      )
    if masked:
      new = dict(zip(MOMENTS, template, strict=True))
    else:
      shape, wanted = np.shape(old[0]), _shape(template[0])
      if shape != wanted:
        raise ValueError(
          f"the moments of {name} in opt_state have shape {shape}, and tx's for these "
          f"parameters have shape {wanted}."
        )
      arrays = {field: np.asarray(value) for field, value in zip(MOMENTS, old, strict=True)}
      new = stored_like(arrays, dict(zip(MOMENTS, template, strict=True)))
    for field in MOMENTS:
      stored[field].append(new[field])
  moments = {
    field: _relaid(jax.tree.unflatten(treedef, stored[field]), getattr(target, field))
    for field in MOMENTS
  }
  count = placed(np.asarray(source.count, np.asarray(target.count).dtype), target.count)
  return ScaleByAmsgradState(count=count, **moments)


def _shape(leaf: Any) -> tuple[int, ...]:
  return tuple(leaf.shape) if is_blockwise(leaf) else tuple(np.shape(leaf))


def _relaid(moment: Any, like: Any) -> Any:
  """``moment`` (tree layout) in ``like``'s layout, its buffers placed as ``like``'s."""
  if not isinstance(like, FlatMoment):
    return moment
  packed = FlatMoment.pack(like.layout, jax.tree.leaves(moment, is_leaf=is_blockwise))
  return FlatMoment(jax.tree.map(placed, packed.buffers, like.buffers), like.layout)
