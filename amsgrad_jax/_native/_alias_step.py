"""One alias's step in the kernel: the step's scalars, the calls per dtype group.

Every scalar of the step (bias corrections, the rule's coefficients, the scheduled or
injected learning rate, a global-norm clip in front) is computed here, in JAX, by the
functions the Optax path uses, and passed to the kernel as an operand.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental.shard_alike import shard_alike

from amsgrad_jax import _numerics, _rounding
from amsgrad_jax._blockwise import Blockwise8Array, is_blockwise, moment_leaves
from amsgrad_jax._flat import FlatLayout, FlatMoment
from amsgrad_jax._native import _interface
from amsgrad_jax._native._interface import Decay, Rounding
from amsgrad_jax._native._plan import Plan
from amsgrad_jax._native._sharding import per_shard
from amsgrad_jax._transform import ScaleByAmsgradState, step_scalars

# Leaves per kernel call. XLA's compile time grows faster than linearly with the number of
# aliased results of one custom call (400 leaves in one call: 7 s; in calls of 64: 0.5 s),
# while a call costs microseconds; groups larger than this take several calls.
LEAVES_PER_CALL = 64
_BFLOAT16 = np.dtype(jnp.bfloat16)  # the moments stochastic state rounding can affect


class GradScale(NamedTuple):
  """A global-norm clip the kernel applies as it reads each gradient: ``g`` while
  ``trigger`` (the norm is under ``max_norm``), else ``(g / norm) * max_norm``."""

  trigger: jax.Array
  norm: jax.Array
  max_norm: Any


def alias_check(plan: Plan, grads: Any, params: Any, clip: GradScale | None) -> jax.Array:
  """Whether the alias's step would leave the gradient, its update and its stored state
  finite (what :func:`~amsgrad_jax.skip_nonfinite` looks at), read by the kernel without
  writing anything."""
  state: ScaleByAmsgradState = plan.opt_state[plan.amsgrad_index]
  scalars_for = _scalars(plan, clip)
  leaves = list(
    zip(
      *(jax.tree.leaves(t) for t in (params, grads, state.mu, state.nu, state.nu_max)), strict=True
    )
  )
  flags = [jnp.ones((), np.int32)]
  for (param_dtype, mu_dtype, nu_dtype, mode), indices in _groups(leaves, plan.decay).items():
    scalars = scalars_for(param_dtype, mu_dtype, nu_dtype)
    for start in range(0, len(indices), LEAVES_PER_CALL):
      batch = [leaves[i] for i in indices[start : start + LEAVES_PER_CALL]]
      flags.append(_interface.check_call(scalars, batch, mode))
  return jnp.all(jnp.stack(flags) == 1)


def _groups(leaves: list[tuple[Any, ...]], decay: list[Decay]) -> dict[tuple, list[int]]:
  """Leaf indices by (param, mu, nu storage, decay mode): one kernel call each (or more).
  A :func:`~amsgrad_jax.blockwise8` moment's storage is its block size."""

  def storage(moment: Any) -> Any:
    return moment.block_size if is_blockwise(moment) else np.dtype(moment.dtype)

  groups: dict[tuple[Any, ...], list[int]] = {}
  for index, (p, _, mu, nu, _) in enumerate(leaves):
    if p.size == 0:
      continue
    key = (np.dtype(p.dtype), storage(mu), storage(nu), decay[index])
    groups.setdefault(key, []).append(index)
  return groups


def alias_step(plan: Plan, grads: Any, params: Any, clip: GradScale | None) -> tuple[Any, tuple]:
  """One alias's step in the kernel: its new parameters and its new (chain) state."""
  state: ScaleByAmsgradState = plan.opt_state[plan.amsgrad_index]
  count = _numerics.safe_increment(state.count)
  scalars_for = _scalars(plan, clip)
  step = _flat_layout_step if isinstance(state.mu, FlatMoment) else _tree_layout_step
  options = plan.options
  rounding = Roundings(
    Rounding.STOCHASTIC if options.param_rounding == "stochastic" else Rounding.NEAREST,
    Rounding.NEAREST if options.state_rounding == "nearest" else Rounding.STOCHASTIC,
    Rounding.STOCHASTIC if options.state_rounding == "stochastic" else Rounding.NEAREST,
  )
  new_params, mu, nu, nu_max = step(state, grads, params, plan.decay, scalars_for, rounding)
  new_state = list(plan.opt_state)
  new_state[plan.amsgrad_index] = ScaleByAmsgradState(count=count, mu=mu, nu=nu, nu_max=nu_max)
  if plan.schedule_index is not None:
    schedule_state = plan.opt_state[plan.schedule_index]
    new_state[plan.schedule_index] = optax.ScaleByScheduleState(
      count=optax.safe_increment(schedule_state.count)
    )
  return new_params, tuple(new_state)


def _scalars(plan: Plan, clip: GradScale | None) -> Callable[..., jax.Array]:
  """``(param dtype, mu dtype, nu dtype) -> the kernel's scalars`` for this step."""
  options = plan.options
  state: ScaleByAmsgradState = plan.opt_state[plan.amsgrad_index]
  count = _numerics.safe_increment(state.count)
  step_size = _step_size(plan)

  key = _rounding.step_key(options.rounding_seed, count)

  def scalars_for(param_dtype: np.dtype, mu_dtype: Any, nu_dtype: Any) -> jax.Array:
    widths = [d for d in (param_dtype, mu_dtype, nu_dtype) if not isinstance(d, int)]
    compute = _numerics.real_dtype(_numerics.compute_dtype(*widths))
    s = step_scalars(options, count, compute)
    ones = jnp.ones((), param_dtype)

    def in_param_dtype(value: Any) -> jax.Array:
      return jnp.multiply(value, ones)

    values = {
      "b1": s.b1,
      "b2": s.b2,
      "one_minus_b1": s.one_minus_b1,
      "one_minus_b2": s.one_minus_b2,
      "eps": s.eps,
      "eps_root": s.eps_root,
      **s.coefficients._asdict(),
      "nu_unscale_before": s.nu_unscale_before,
      "neg_lr": step_size(param_dtype),
      # add_decayed_weights multiplies the parameter by the number, in its dtype.
      "weight_decay": in_param_dtype(options.weight_decay),
      "grad_divisor": 1.0 if clip is None else _unless(clip.trigger, clip.norm.astype(param_dtype)),
      "grad_multiplier": 1.0
      if clip is None
      else _unless(clip.trigger, in_param_dtype(clip.max_norm)),
      "round_key_high": key >> 16,
      "round_key_low": key & np.uint32(0xFFFF),
    }
    return jnp.stack([jnp.asarray(values[name]).astype(compute) for name in _interface.SCALARS])

  return scalars_for


def _tree_layout_step(
  state: ScaleByAmsgradState,
  grads: Any,
  params: Any,
  decay: list[Decay],
  scalars_for: Callable[..., jax.Array],
  rounding: Roundings,
) -> tuple[Any, Any, Any, Any]:
  """New params, mu, nu and nu_max: one kernel call per dtype group (and decay mode), in
  calls of at most :data:`LEAVES_PER_CALL` leaves."""
  param_leaves, treedef = jax.tree.flatten(params)
  moments = (state.mu, state.nu, state.nu_max)
  columns = [param_leaves, jax.tree.leaves(grads), *(moment_leaves(m) for m in moments)]
  leaves = list(zip(*columns, strict=True))
  results: list[tuple[Any, ...]] = [(p, mu, nu, nu_max) for p, _, mu, nu, nu_max in leaves]

  for (param_dtype, mu_storage, nu_storage, mode), indices in _groups(leaves, decay).items():
    scalars = scalars_for(param_dtype, mu_storage, nu_storage)
    for start in range(0, len(indices), LEAVES_PER_CALL):
      batch = indices[start : start + LEAVES_PER_CALL]
      # Stochastic rounding numbers the elements of each whole parameter, and blockwise8
      # exponents are not shaped like their parameters: those calls see whole arrays
      # (XLA gathers a parameter split over devices first), the others run per shard.
      narrow_state = _BFLOAT16 in (mu_storage, nu_storage)
      state_rounding = rounding.float_state if narrow_state else Rounding.NEAREST
      if isinstance(mu_storage, int):
        outputs = _blockwise_call(scalars, [leaves[i] for i in batch], mode, rounding, batch)
      elif Rounding.STOCHASTIC in (rounding.param, state_rounding):
        outputs = _interface.tree_call(
          scalars,
          [leaves[i] for i in batch],
          mode,
          rounding=rounding.param,
          state_rounding=state_rounding,
          leaf_ids=batch,
        )
      else:
        outputs = per_shard(_interface.tree_call, scalars, [leaves[i] for i in batch], mode)
      for index, output in zip(batch, outputs, strict=True):
        results[index] = _placed_like(results[index], output)
  return tuple(jax.tree.unflatten(treedef, [r[i] for r in results]) for i in range(4))


def _placed_like(before: tuple[Any, ...], after: tuple[Any, ...]) -> tuple[Any, ...]:
  """``after`` (a leaf's new params and moments) placed as ``before`` was: a call that saw
  whole arrays returns them unsplit, and each result goes back to its operand's sharding."""
  if jax.device_count() == 1:
    return after
  return tuple(
    jax.tree.map(lambda old, new: shard_alike(old, new)[1], old, new)
    for old, new in zip(before, after, strict=True)
  )


class Roundings(NamedTuple):
  """How the step rounds the parameters, the 8-bit moments (stochastically unless
  ``state_rounding="nearest"``) and float moments (to nearest unless
  ``state_rounding="stochastic"``; only bfloat16 ones are affected)."""

  param: Rounding
  state: Rounding
  float_state: Rounding


def _blockwise_call(
  scalars: jax.Array,
  leaves: list[tuple[Any, ...]],
  mode: Decay,
  rounding: Roundings,
  leaf_ids: list[int],
) -> list[tuple[Any, ...]]:
  """The kernel over leaves whose moments are :class:`~amsgrad_jax.Blockwise8Array`:
  each leaf's new ``(params, mu, nu, nu_max)``."""
  operands = [
    (p, g, *(x for m in (mu, nu, nu_max) for x in (m.codes, m.exponents)))
    for p, g, mu, nu, nu_max in leaves
  ]
  block_size = leaves[0][2].block_size
  outputs = _interface.blockwise_call(
    scalars,
    operands,
    mode,
    block_size=block_size,
    rounding=rounding.param,
    state_rounding=rounding.state,
    leaf_ids=leaf_ids,
  )
  results = []
  for (_, _, *stored), (p, *parts) in zip(leaves, outputs, strict=True):
    new = [
      Blockwise8Array(codes, exponents, m.block_size, m.kind)
      for m, codes, exponents in zip(stored, parts[0::2], parts[1::2], strict=True)
    ]
    results.append((p, *new))
  return results


def _flat_layout_step(
  state: ScaleByAmsgradState,
  grads: Any,
  params: Any,
  decay: list[Decay],
  scalars_for: Callable[..., jax.Array],
  rounding: Roundings,
) -> tuple[Any, Any, Any, Any]:
  """As :func:`_tree_layout_step` for the flat layout: each call updates its leaves'
  parameters and their ranges of the group's three buffers, which pass from call to call
  (aliased, so in place); :func:`~amsgrad_jax.blockwise8` buffers pass as their codes and
  exponents. The buffers are not partitioned: under a mesh XLA replicates
  the call, which is why sharded models keep the tree layout."""
  layout: FlatLayout = state.mu.layout
  param_leaves, treedef = jax.tree.flatten(params)
  grad_leaves = jax.tree.leaves(grads)
  new_params = list(param_leaves)
  moments = {
    group: tuple(m.buffers[group] for m in (state.mu, state.nu, state.nu_max))
    for group in layout.sizes()
  }
  calls: dict[tuple[str, Decay], list[int]] = {}
  for index, ((shape, group), mode) in enumerate(zip(layout.leaf_specs(), decay, strict=True)):
    if math.prod(shape) > 0:
      calls.setdefault((group, mode), []).append(index)
  for (group, mode), indices in calls.items():
    stored = moments[group]
    param_dtype = np.dtype(param_leaves[indices[0]].dtype)
    blockwise = is_blockwise(stored[0])
    if blockwise:
      block_size = stored[0].block_size
      block_offsets = layout.block_offsets(block_size)
      buffers = tuple(x for m in stored for x in (m.codes, m.exponents))
      scalars = scalars_for(param_dtype, block_size, block_size)
      state_rounding = rounding.state
    else:
      buffers = stored
      scalars = scalars_for(param_dtype, buffers[0].dtype, buffers[1].dtype)
      state_rounding = rounding.float_state
    for start in range(0, len(indices), LEAVES_PER_CALL):
      batch = indices[start : start + LEAVES_PER_CALL]
      leaves = [(param_leaves[i], grad_leaves[i]) for i in batch]
      offsets = [layout.offsets[i] for i in batch]
      blocks = (
        {"block_size": block_size, "block_offsets": [block_offsets[i] for i in batch]}
        if blockwise
        else {}
      )
      buffers, outputs = _interface.flat_call(
        scalars,
        buffers,
        leaves,
        offsets,
        mode,
        rounding=rounding.param,
        state_rounding=state_rounding,
        leaf_ids=batch,
        **blocks,
      )
      for index, output in zip(batch, outputs, strict=True):
        new_params[index] = output
    if blockwise:
      buffers = tuple(
        Blockwise8Array(codes, exponents, block_size, m.kind)
        for m, codes, exponents in zip(stored, buffers[0::2], buffers[1::2], strict=True)
      )
    moments[group] = buffers
  mu, nu, nu_max = (
    FlatMoment({group: buffers[k] for group, buffers in moments.items()}, layout) for k in range(3)
  )
  return jax.tree.unflatten(treedef, new_params), mu, nu, nu_max


def _step_size(plan: Plan) -> Callable[[Any], jax.Array]:
  """``dtype -> -lr`` in ``dtype``, exactly as ``optax.scale_by_learning_rate`` forms it."""
  learning_rate = plan.options.learning_rate
  if plan.schedule_index is None:
    negative = -1 * learning_rate
    # optax.scale multiplies the update by the Python number, which JAX rounds to its dtype.
    return lambda dtype: jnp.multiply(negative, jnp.ones((), dtype))
  count = plan.opt_state[plan.schedule_index].count
  negative = -1 * learning_rate(count)
  return lambda dtype: jnp.array(negative, dtype=dtype)


def _unless(trigger: jax.Array, value: jax.Array) -> jax.Array:
  """``1`` where ``trigger``, else ``value``: the kernel's ``(g / 1) * 1`` is ``g``."""
  return jnp.where(trigger, jnp.ones((), value.dtype), value)
