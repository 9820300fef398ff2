"""Move a run's AMSGrad state to another storage: float32, bfloat16, 8-bit, flat or not.

:func:`convert_state` re-stores every moment of a state from its values, as another
optimizer (the same chain and rule, other ``mu_dtype``, ``nu_dtype`` or ``flat_state``)
stores them: ``mu`` and ``nu`` rounded to nearest, ``nu_max`` rounded up, so that the
stored running maximum never falls below the one the run had. Everything else in the
state (the step count, a schedule's count, ``inject_hyperparams``' values,
``MultiSteps``' accumulators) is carried over as it is.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

from amsgrad_jax._blockwise import is_blockwise
from amsgrad_jax._flat import FlatMoment
from amsgrad_jax._transform import ScaleByAmsgradState

MOMENTS = ("mu", "nu", "nu_max")


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
  state are kept.

  It runs eagerly, on the host (not under ``jit``), and places each new array like the
  one ``tx.init(params)`` makes.

  Args:
    tx: the optimizer to continue with.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    opt_state: the state to convert, made by the same optimizer with other storage.

  Returns:
    A state of ``tx`` holding ``opt_state``'s values.

  Raises:
    ValueError: ``opt_state`` is not a state of ``tx``'s chain (another structure, or
      moments of other shapes), holds no AMSGrad state, or a conversion to or from 8-bit
      state needs a rule ``tx`` does not say (see :func:`~amsgrad_jax.blockwise8`: build
      ``tx`` with :func:`~amsgrad_jax.amsgrad` or :func:`~amsgrad_jax.amsgradw`) or keeps
      the maximum of the bias-corrected second moment (``convention="optax"``).

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
  from amsgrad_jax.interop import _state  # the storage rules the interop shares

  target = tx.init(params)
  targets = _state.amsgrad_states(target)
  if not targets:
    raise ValueError("tx's state holds no ScaleByAmsgradState: tx is not an AMSGrad optimizer.")
  _state.check_blockwise_rules(tx, opt_state)
  _state.check_blockwise_rules(tx, target)
  outline: Any = jax.tree.structure(opt_state, is_leaf=_is_amsgrad_state)
  expected: Any = jax.tree.structure(target, is_leaf=_is_amsgrad_state)
  if outline != expected:
    raise ValueError(
      "opt_state is not a state of tx's chain: it has the structure\n"
      f"  {outline}\nwhere tx.init(params) has\n  {expected}\n"
      "convert_state changes how the moments are stored, not the optimizer."
    )
  sources = iter(_state.amsgrad_states(opt_state))
  converted = {id(state): _converted(next(sources), state) for state in targets}
  return jax.tree.map(
    lambda old, new: converted[id(new)] if _is_amsgrad_state(new) else old,
    opt_state,
    target,
    is_leaf=_is_amsgrad_state,
  )


def _is_amsgrad_state(node: Any) -> bool:
  return isinstance(node, ScaleByAmsgradState)


def _tree(moment: Any) -> Any:
  """A moment in the tree layout (a flat one unpacked)."""
  if isinstance(moment, FlatMoment):
    return jax.tree.unflatten(moment.layout.treedef, moment.leaves())
  return moment


def _leaves(moment: Any) -> tuple[list[Any], Any]:
  return jax.tree.flatten(moment, is_leaf=_is_masked_or_blockwise)


def _is_masked_or_blockwise(node: Any) -> bool:
  return isinstance(node, optax.MaskedNode) or is_blockwise(node)


def _converted(source: ScaleByAmsgradState, target: ScaleByAmsgradState) -> ScaleByAmsgradState:
  """``source``'s values stored as ``target`` (a fresh state of the new optimizer) is."""
  from amsgrad_jax.interop import _state

  values = _state.decoded(source._replace(**{f: _tree(getattr(source, f)) for f in MOMENTS}))
  columns = {field: _leaves(getattr(values, field))[0] for field in MOMENTS}
  templates = {field: _leaves(_tree(getattr(target, field))) for field in MOMENTS}
  treedef = templates["mu"][1]
  if _leaves(values.mu)[1] != treedef:
    raise ValueError(
      f"opt_state's moments are not shaped like tx's: {_leaves(values.mu)[1]} against {treedef}."
    )
  stored: dict[str, list[Any]] = {field: [] for field in MOMENTS}
  for index, template in enumerate(zip(*(templates[f][0] for f in MOMENTS), strict=True)):
    old = [columns[field][index] for field in MOMENTS]
    masked = isinstance(template[0], optax.MaskedNode)
    if masked != isinstance(old[0], optax.MaskedNode):
      raise ValueError(
        f"leaf {index} of the parameters is masked in {'tx' if masked else 'opt_state'} "
        "only: convert_state needs the same optax.masked masks on both sides."
      )
    if masked:
      new = dict(zip(MOMENTS, template, strict=True))
    else:
      shape, wanted = np.shape(old[0]), _shape(template[0])
      if shape != wanted:
        raise ValueError(
          f"leaf {index} of opt_state's moments has shape {shape}, and tx's for these "
          f"parameters has shape {wanted}."
        )
      arrays = {field: np.asarray(value) for field, value in zip(MOMENTS, old, strict=True)}
      new = _state.stored_like(arrays, dict(zip(MOMENTS, template, strict=True)))
    for field in MOMENTS:
      stored[field].append(new[field])
  moments = {
    field: _relaid(jax.tree.unflatten(treedef, stored[field]), getattr(target, field))
    for field in MOMENTS
  }
  count = _state.placed(np.asarray(source.count, np.asarray(target.count).dtype), target.count)
  return ScaleByAmsgradState(count=count, **moments)


def _shape(leaf: Any) -> tuple[int, ...]:
  return tuple(leaf.shape) if is_blockwise(leaf) else tuple(np.shape(leaf))


def _relaid(moment: Any, like: Any) -> Any:
  """``moment`` (tree layout) in ``like``'s layout, its buffers placed as ``like``'s."""
  if not isinstance(like, FlatMoment):
    return moment
  packed = FlatMoment.pack(like.layout, jax.tree.leaves(moment, is_leaf=is_blockwise))
  placed = jax.tree.map(
    lambda new, old: jax.device_put(new, old.sharding) if hasattr(old, "sharding") else new,
    packed.buffers,
    like.buffers,
  )
  return FlatMoment(placed, like.layout)
