"""Decide whether a step can run natively, and say why not when it cannot.

:func:`plan` looks at the optimizer, its state and the trees of one step and returns
either a :class:`Plan` (everything the native step needs) or a :class:`Fallback` whose
``reason`` names what sends the step down the Optax path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import optax

from amsgrad_jax import _blockwise
from amsgrad_jax._blockwise import Blockwise8
from amsgrad_jax._flat import FlatLayout, FlatMoment
from amsgrad_jax._native import _loader
from amsgrad_jax._native._interface import Decay
from amsgrad_jax._native._loader import NativeStatus
from amsgrad_jax._options import AliasOptions, AmsgradwOptions, numeric
from amsgrad_jax._transform import ScaleByAmsgradState, with_blockwise_moments

# Storage dtypes the kernel computes in float32 (all narrow) or float64 (all wide).
_NARROW = {np.dtype(jax.numpy.bfloat16), np.dtype(np.float32)}
_WIDE = {np.dtype(np.float32), np.dtype(np.float64)}


@dataclass(frozen=True)
class Plan:
  """What the native step needs, found in the optimizer and its state.

  Attributes:
    options: the record the alias was built from.
    opt_state: the alias chain's state, a 3-tuple.
    amsgrad_index: where :class:`ScaleByAmsgradState` sits in ``opt_state``.
    schedule_index: where the learning-rate schedule's count sits, if scheduled.
    decay: each leaf's weight-decay mode.
  """

  options: AliasOptions
  opt_state: tuple
  amsgrad_index: int
  schedule_index: int | None
  decay: list[Decay]


@dataclass(frozen=True)
class Fallback:
  """The step takes the Optax path, because of ``reason``."""

  reason: str


def machine_status() -> NativeStatus:
  """Whether the kernel is loaded here and JAX computes on the CPU."""
  loaded = _loader.load()
  backend = jax.default_backend()
  if loaded.active and backend != "cpu":
    return NativeStatus(False, f"JAX's default backend is {backend}, not cpu", loaded.library)
  return loaded


def plan(options: AliasOptions, grads: Any, opt_state: Any, params: Any) -> Plan | Fallback:
  """A :class:`Plan` for one alias's step, or the :class:`Fallback` that explains why not.

  ``opt_state`` is the alias's own state (its chain's 3-tuple). Hyperparameters may be
  Python numbers or scalars (traced ones under ``optax.inject_hyperparams``); they enter
  the kernel as operands either way.
  """
  blockwise = [isinstance(d, Blockwise8) for d in (options.mu_dtype, options.nu_dtype)]
  if any(blockwise) and not all(blockwise):
    return Fallback("blockwise8 for only one of mu_dtype and nu_dtype")
  if callable(options.weight_decay):
    return Fallback("weight_decay is a schedule; the native step takes a number")
  if not (callable(options.learning_rate) or _scalar(options.learning_rate)):
    return Fallback("learning_rate is neither a number nor a schedule")
  if not _scalar(options.weight_decay):
    return Fallback("weight_decay is not a scalar")
  if not isinstance(opt_state, tuple) or len(opt_state) != 3:
    return Fallback("opt_state is not the state this optimizer's init builds")
  amsgrad_index = 0 if options.decoupled else 1
  state = opt_state[amsgrad_index]
  if not isinstance(state, ScaleByAmsgradState):
    return Fallback("opt_state is not the state this optimizer's init builds")
  state = with_blockwise_moments(state, options)
  opt_state = (*opt_state[:amsgrad_index], state, *opt_state[amsgrad_index + 1 :])
  schedule_index = None
  if callable(options.learning_rate):
    if not isinstance(opt_state[2], optax.ScaleByScheduleState):
      return Fallback("opt_state has no schedule count for the scheduled learning rate")
    schedule_index = 2
  elif not isinstance(opt_state[2], optax.EmptyState):
    return Fallback("opt_state is not the state this optimizer's init builds")
  decay_state = opt_state[1 if options.decoupled else 0]
  if isinstance(decay_state, optax.MaskedState):
    decay_state = decay_state.inner_state
  if not isinstance(decay_state, optax.EmptyState):
    return Fallback("opt_state is not the state this optimizer's init builds")
  problem = (
    _flat_buffers_problem(grads, state, params)
    if isinstance(state.mu, FlatMoment)
    else _buffers_problem(grads, state, params)
  )
  if problem is not None:
    return Fallback(problem)
  problem = _array_hyperparameter_problem(options, params)
  if problem is not None:
    return Fallback(problem)
  decay = _decay_modes(options, grads)
  if isinstance(decay, Fallback):
    return decay
  return Plan(options, opt_state, amsgrad_index, schedule_index, decay)


def _scalar(value: Any) -> bool:
  return numeric(value) or (hasattr(value, "shape") and np.shape(value) == ())


def _array_hyperparameter_problem(options: AliasOptions, params: Any) -> str | None:
  """An array learning rate or weight decay (``optax.inject_hyperparams`` makes them)
  multiplies each update in its own dtype, not the parameter's, under JAX's promotion:
  the kernel rounds to the parameter dtype, so it takes only parameters of that dtype."""
  for name in ("learning_rate", "weight_decay"):
    value = getattr(options, name)
    if numeric(value) or callable(value):
      continue
    dtype = np.dtype(value.dtype)
    for leaf in jax.tree.leaves(params):
      if np.dtype(leaf.dtype) != dtype:
        return (
          f"{name} is a {dtype} array and a parameter is {np.dtype(leaf.dtype)}: Optax "
          f"forms that update in {dtype}, the kernel in the parameter's dtype"
        )
  return None


def _buffers_problem(grads: Any, state: ScaleByAmsgradState, params: Any) -> str | None:
  """Why the trees cannot be stepped by the kernel, or ``None`` when they can."""
  trees = (grads, state.mu, state.nu, state.nu_max)
  structures: list[Any] = [
    jax.tree.structure(t, is_leaf=_blockwise.is_blockwise) for t in (params, *trees)
  ]
  if any(structure != structures[0] for structure in structures[1:]):
    return "the gradients or the state do not have the parameters' tree structure"
  leaves = zip(*(_blockwise.moment_leaves(t) for t in (params, *trees)), strict=True)
  for p, g, mu, nu, nu_max in leaves:
    moments = (mu, nu, nu_max)
    if any(_blockwise.is_blockwise(m) for m in moments):
      problem = _blockwise_problem(p, g, moments)
      if problem is not None:
        return problem
      continue
    if not all(isinstance(x, jax.Array) for x in (p, g, mu, nu, nu_max)):
      return "a parameter, gradient or state leaf is not a JAX array"
    if not (p.shape == g.shape == mu.shape == nu.shape == nu_max.shape):
      return "a gradient or state leaf is not shaped like its parameter"
    problem = _dtypes_problem(p, g, mu.dtype, nu.dtype, nu_max.dtype)
    if problem is not None:
      return problem
  return None


def _blockwise_problem(p: Any, g: Any, moments: tuple[Any, ...], flat: bool = False) -> str | None:
  """Why a leaf with :func:`~amsgrad_jax.blockwise8` state cannot be stepped, or ``None``.
  ``moments`` are the leaf's own (tree layout) or its group's buffers (``flat``)."""
  if not all(_blockwise.is_blockwise(m) for m in moments):
    return "a leaf has blockwise8 state for only some of its moments"
  if len({m.block_size for m in moments}) != 1:
    return "a leaf's moments have different block sizes"
  if not (isinstance(p, jax.Array) and isinstance(g, jax.Array)):
    return "a parameter or gradient leaf is not a JAX array"
  if g.dtype != p.dtype:
    return f"a gradient's dtype ({g.dtype}) differs from its parameter's ({p.dtype})"
  if np.dtype(p.dtype) not in _NARROW:
    return f"blockwise8 state beside a {np.dtype(p.dtype)} parameter (the kernel takes float32 and bfloat16)"
  if not flat:
    blocks = _blockwise.exponents_shape(p.shape, moments[0].block_size)
    for m in moments:
      if m.codes.shape != p.shape or m.exponents.shape != blocks or g.shape != p.shape:
        return "a gradient or state leaf is not shaped like its parameter"
  on_device = not isinstance(p, jax.core.Tracer)
  if on_device and any(device.platform != "cpu" for device in p.devices()):
    return "a parameter lives on a device that is not the CPU"
  return None


def _flat_buffers_problem(grads: Any, state: ScaleByAmsgradState, params: Any) -> str | None:
  """As :func:`_buffers_problem`, for state in the flat layout."""
  layout: FlatLayout = state.mu.layout
  moments = (state.mu, state.nu, state.nu_max)
  if any(not isinstance(m, FlatMoment) or m.layout != layout for m in moments):
    return "the flat state's moments have different layouts"
  if not (layout.covers(params) and layout.covers(grads)):
    return "the parameters or gradients do not match the flat state's layout"
  sizes = layout.sizes()
  for moment in moments:
    if set(moment.buffers) != set(sizes):
      return "the flat state's buffers do not match its layout"
    for group, buffer in moment.buffers.items():
      if not _flat_buffer_fits(buffer, layout, group, sizes[group]):
        return "the flat state's buffers do not match its layout"
  leaves = zip(jax.tree.leaves(params), jax.tree.leaves(grads), layout.leaf_specs(), strict=True)
  for p, g, (shape, group) in leaves:
    if not (isinstance(p, jax.Array) and isinstance(g, jax.Array)):
      return "a parameter or gradient leaf is not a JAX array"
    if p.shape != shape or g.shape != shape or np.dtype(p.dtype).name != group:
      return "the parameters or gradients do not match the flat state's layout"
    buffers = [m.buffers[group] for m in moments]
    if any(_blockwise.is_blockwise(b) for b in buffers):
      problem = _blockwise_problem(p, g, tuple(buffers), flat=True)
    else:
      problem = _dtypes_problem(p, g, *(b.dtype for b in buffers))
    if problem is not None:
      return problem
  return None


def _flat_buffer_fits(buffer: Any, layout: FlatLayout, group: str, size: int) -> bool:
  """Whether one flat moment buffer of ``group`` has the layout's size (codes and block
  exponents, for :func:`~amsgrad_jax.blockwise8`)."""
  if not _blockwise.is_blockwise(buffer):
    return isinstance(buffer, jax.Array) and buffer.shape == (size,)
  blocks = layout.block_counts(buffer.block_size)[group]
  codes, exponents = buffer.codes, buffer.exponents
  return (
    isinstance(codes, jax.Array)
    and isinstance(exponents, jax.Array)
    and codes.shape == (size,)
    and exponents.shape == (blocks,)
    and codes.dtype == np.uint8
    and exponents.dtype == np.int8
  )


def _dtypes_problem(
  p: jax.Array, g: jax.Array, mu_dtype: Any, nu_dtype: Any, nu_max_dtype: Any
) -> str | None:
  """Why the kernel cannot take these dtypes or this placement, or ``None``."""
  if g.dtype != p.dtype:
    return f"a gradient's dtype ({g.dtype}) differs from its parameter's ({p.dtype})"
  if nu_max_dtype != nu_dtype:
    return "nu and nu_max are stored in different dtypes"
  dtypes = {np.dtype(p.dtype), np.dtype(mu_dtype), np.dtype(nu_dtype)}
  if not (dtypes <= _NARROW or dtypes <= _WIDE):
    names = ", ".join(sorted(d.name for d in dtypes))
    return (
      f"the kernel takes float32 and bfloat16, or float32 and float64, not {names} "
      "(complex, float16, and bfloat16 beside float64 take the Optax path)"
    )
  on_device = not isinstance(p, jax.core.Tracer)
  if on_device and any(device.platform != "cpu" for device in p.devices()):
    return "a parameter lives on a device that is not the CPU"
  return None


def _decay_modes(options: AliasOptions, grads: Any) -> list[Decay] | Fallback:
  """Each leaf's weight-decay mode, or a :class:`Fallback` when the mask is not concrete
  booleans. A callable mask is called on the updates, as ``optax.masked`` calls it."""
  leaves = jax.tree.leaves(grads)
  if not options.decays:
    return [Decay.NONE] * len(leaves)
  if not options.decoupled:
    return [Decay.COUPLED] * len(leaves)
  mask = options.mask if isinstance(options, AmsgradwOptions) else None
  if mask is None:
    return [Decay.DECOUPLED] * len(leaves)
  mask = mask(grads) if callable(mask) else mask
  try:
    flags = _broadcast(mask, grads)
  except ValueError:
    return Fallback("the weight-decay mask is not a prefix of the parameter tree")
  if len(flags) != len(leaves) or not all(isinstance(f, bool | np.bool_) for f in flags):
    return Fallback("the weight-decay mask is not made of concrete booleans")
  return [Decay.DECOUPLED if flag else Decay.NONE for flag in flags]


def _broadcast(mask: Any, params: Any) -> list[Any]:
  """``mask``, a prefix of ``params``, expanded to one entry per leaf of ``params``."""
  expanded = jax.tree.map(lambda flag, subtree: jax.tree.map(lambda _: flag, subtree), mask, params)
  return jax.tree.leaves(expanded)
