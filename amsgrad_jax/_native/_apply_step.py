"""``apply_step``: a whole training step, natively on CPU when it can be, else through Optax.

The native step reads ``params``, ``grads``, ``mu``, ``nu`` and ``nu_max`` once and writes
``params``, ``mu``, ``nu`` and ``nu_max`` once (36 bytes a float32 parameter, where the
Optax chain compiled by XLA:CPU moves 52), in place under ``jit`` with donation. Every
scalar of the step (bias corrections, the rule's coefficients, the scheduled learning
rate) is computed here, in JAX, by the same functions the transformation uses.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from amsgrad_jax import _numerics
from amsgrad_jax._aliases import AliasSpec
from amsgrad_jax._flat import FlatLayout, FlatMoment
from amsgrad_jax._native import _loader
from amsgrad_jax._native._sharding import per_shard
from amsgrad_jax._rules import RULES
from amsgrad_jax._transform import ScaleByAmsgradState, step_scalars

NO_DECAY, COUPLED, DECOUPLED = 0, 1, 2
# Leaves per kernel call. XLA's compile time grows faster than linearly with the number of
# aliased results of one custom call (400 leaves in one call: 7 s; in calls of 64: 0.5 s),
# while a call costs microseconds; groups larger than this take several calls.
LEAVES_PER_CALL = 64
_NARROW = {np.dtype(jnp.bfloat16), np.dtype(np.float32)}
_WIDE = {np.dtype(np.float32), np.dtype(np.float64)}


@dataclass(frozen=True)
class NativeStatus:
  """Whether :func:`apply_step` runs natively here, and why not when it does not.

  Attributes:
    active: ``True`` when the kernel is built and registered and JAX's default backend
      is the CPU.
    reason: a sentence saying why (or why not).
    library: the compiled kernel's path, when it is loaded.
  """

  active: bool
  reason: str
  library: str | None = None

  def __bool__(self) -> bool:
    return self.active


def native_status() -> NativeStatus:
  """Say whether :func:`apply_step` takes the native path on this machine, and why.

  The first call builds the kernel with the system C++ compiler (a few seconds) unless a
  cached build exists; set ``AMSGRAD_JAX_DISABLE_NATIVE=1`` to never build or use it.

  Returns:
    A :class:`NativeStatus`; it is truthy when the native step is active.

  Examples:
    >>> from amsgrad_jax import native_status
    >>> status = native_status()
    >>> isinstance(status.reason, str)
    True
  """
  loaded = _loader.load()
  if not loaded.ok:
    return NativeStatus(False, loaded.reason)
  backend = jax.default_backend()
  if backend != "cpu":
    return NativeStatus(False, f"JAX's default backend is {backend}, not cpu", loaded.library)
  return NativeStatus(True, loaded.reason, loaded.library)


def pure_step(
  tx: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any
) -> tuple[Any, Any]:
  """The Optax composition :func:`apply_step` always equals."""
  updates, new_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), new_state


def apply_step(
  tx: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any
) -> tuple[Any, Any]:
  r"""One optimizer step: returns ``(new_params, new_opt_state)``.

  Always equal to

  .. code-block:: python

    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)

  for any Optax transformation. When ``tx`` is built by :func:`amsgrad_jax.amsgrad` or
  :func:`amsgrad_jax.amsgradw` (any rule, weight decay, mask, learning-rate schedule)
  and the step runs on CPU with the native kernel available (:func:`native_status`),
  the step is one pass over memory per dtype group of leaves: each parameter, its
  gradient and its three state values are read once and written once,

  .. math::

    m \leftarrow \beta_1 m + (1-\beta_1) g, \quad
    v \leftarrow \beta_2 v + (1-\beta_2) g^2, \quad
    \hat v \leftarrow \max(\hat v, a v), \quad
    \theta \leftarrow \theta - \eta \frac{b\, m}{d \sqrt{\hat v + \epsilon_{root}} + \epsilon},

  with the rule's coefficients :math:`a, b, d` (see :func:`amsgrad_jax.scale_by_amsgrad`),
  and every intermediate rounded as the jitted Optax chain rounds it. Parameters and state
  are updated in place when a jitted step donates them and returns them in the order it
  takes them, as ``train_step(params, opt_state, batch) -> (params, opt_state, ...)`` with
  ``donate_argnums=(0, 1)`` does (``jit`` pairs donated inputs with outputs in order).
  Under a mesh the kernel runs on each shard; under ``pmap`` on each device. On trees of
  many small leaves, build ``tx`` with ``flat_state=True``: the state is then three buffers
  per dtype instead of three arrays per leaf, which cuts the per-array cost of the jitted
  call (bit-identical results; see :func:`amsgrad_jax.scale_by_amsgrad`).

  Args:
    tx: an Optax transformation (natively stepped when built by our aliases).
    grads: the gradients, a tree shaped like ``params``.
    opt_state: ``tx``'s state.
    params: the parameters.

  Returns:
    ``(new_params, new_opt_state)``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from amsgrad_jax import amsgrad, apply_step
    >>> tx = amsgrad(learning_rate=0.1)
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def loss_grad(params):
    ...   return jax.grad(lambda p: jnp.sum(p["w"] * jnp.array([1.0, -1.0])))(params)
    >>> def train_step(params, state):
    ...   return apply_step(tx, loss_grad(params), state, params)
    >>> train_step = jax.jit(train_step, donate_argnums=(0, 1))
    >>> params, state = train_step(params, state)
    >>> params["w"]
    Array([0.9, 2.1], dtype=float32)

  References:
    Reddi, Kale & Kumar, `On the Convergence of Adam and Beyond
    <https://openreview.net/forum?id=ryQu7f-RZ>`_, ICLR 2018.
  """
  if _plan(tx, grads, opt_state, params) is None:
    return pure_step(tx, grads, opt_state, params)
  return _native_unless_vmapped(tx)(grads, opt_state, params)


def _native_unless_vmapped(tx: Any) -> Any:
  """The native step; under ``jax.vmap``, the Optax path vmapped (the kernel has no rule
  for a batch axis, and ``custom_partitioning`` none for batching)."""

  @jax.custom_batching.custom_vmap
  def native(grads: Any, opt_state: Any, params: Any) -> tuple[Any, Any]:
    plan = _plan(tx, grads, opt_state, params)
    assert plan is not None  # _plan has accepted these trees once already
    return _native_step(plan, grads, params)

  @native.def_vmap
  def batched(
    axis_size: int, in_batched: Any, grads: Any, opt_state: Any, params: Any
  ) -> tuple[tuple[Any, Any], Any]:
    del axis_size
    in_axes = jax.tree.map(lambda is_batched: 0 if is_batched else None, tuple(in_batched))
    step = jax.vmap(functools.partial(pure_step, tx), in_axes=in_axes)
    result = step(grads, opt_state, params)
    return result, jax.tree.map(lambda _: True, result)

  return native


@dataclass(frozen=True)
class _Plan:
  """What the native step needs, found in ``tx`` and ``opt_state``."""

  spec: AliasSpec
  opt_state: tuple
  amsgrad_index: int
  schedule_index: int | None
  decay_flags: list[int]


def _plan(tx: Any, grads: Any, opt_state: Any, params: Any) -> _Plan | None:
  """A :class:`_Plan`, or ``None`` when the step must take the Optax path."""
  spec = getattr(tx, "spec", None)
  if not isinstance(spec, AliasSpec) or not native_status().active:
    return None
  if not _is_number(spec.weight_decay) or not (
    callable(spec.learning_rate) or _is_number(spec.learning_rate)
  ):
    return None
  if not isinstance(opt_state, tuple) or len(opt_state) != 3:
    return None
  amsgrad_index = 0 if spec.decoupled else 1
  if not isinstance(opt_state[amsgrad_index], ScaleByAmsgradState):
    return None
  schedule_index = None
  if callable(spec.learning_rate):
    if not isinstance(opt_state[2], optax.ScaleByScheduleState):
      return None
    schedule_index = 2
  elif not isinstance(opt_state[2], optax.EmptyState):
    return None
  decay_index = 1 if spec.decoupled else 0
  decay_state = opt_state[decay_index]
  if isinstance(decay_state, optax.MaskedState):
    decay_state = decay_state.inner_state
  if not isinstance(decay_state, optax.EmptyState):
    return None
  if not _buffers_fit(grads, opt_state[amsgrad_index], params):
    return None
  decay_flags = _decay_flags(spec, grads)
  if decay_flags is None:
    return None
  return _Plan(spec, opt_state, amsgrad_index, schedule_index, decay_flags)


def _is_number(value: Any) -> bool:
  return isinstance(value, int | float) and not isinstance(value, bool)


def _buffers_fit(grads: Any, state: ScaleByAmsgradState, params: Any) -> bool:
  """Same trees and shapes, real supported dtypes, gradients in the parameters' dtype."""
  if isinstance(state.mu, FlatMoment):
    return _flat_buffers_fit(grads, state, params)
  treedef = jax.tree.structure(params)
  trees = (grads, state.mu, state.nu, state.nu_max)
  if any(jax.tree.structure(tree) != treedef for tree in trees):
    return False
  for p, g, mu, nu, nu_max in zip(*(jax.tree.leaves(t) for t in (params, *trees)), strict=True):
    if not all(isinstance(x, jax.Array) for x in (p, g, mu, nu, nu_max)):
      return False
    if not (p.shape == g.shape == mu.shape == nu.shape == nu_max.shape):
      return False
    if not _supported(p, g, mu.dtype, nu.dtype, nu_max.dtype):
      return False
  return True


def _flat_buffers_fit(grads: Any, state: ScaleByAmsgradState, params: Any) -> bool:
  """As :func:`_buffers_fit`, for state in the flat layout."""
  layout: FlatLayout = state.mu.layout
  moments = (state.mu, state.nu, state.nu_max)
  if any(not isinstance(m, FlatMoment) or m.layout != layout for m in moments):
    return False
  if not (layout.covers(params) and layout.covers(grads)):
    return False
  sizes = layout.sizes()
  for moment in moments:
    if set(moment.buffers) != set(sizes):
      return False
    for group, buffer in moment.buffers.items():
      if not isinstance(buffer, jax.Array) or buffer.shape != (sizes[group],):
        return False
  leaves = zip(jax.tree.leaves(params), jax.tree.leaves(grads), layout.leaf_specs(), strict=True)
  for p, g, (shape, group) in leaves:
    if not (isinstance(p, jax.Array) and isinstance(g, jax.Array)):
      return False
    if p.shape != shape or g.shape != shape or np.dtype(p.dtype).name != group:
      return False
    state_dtypes = (m.buffers[group].dtype for m in moments)
    if not _supported(p, g, *state_dtypes):
      return False
  return True


def _supported(p: jax.Array, g: jax.Array, mu_dtype: Any, nu_dtype: Any, nu_max_dtype: Any) -> bool:
  """Dtypes the kernel takes, and parameters that live on the CPU."""
  if g.dtype != p.dtype or nu_max_dtype != nu_dtype:
    return False
  dtypes = {np.dtype(p.dtype), np.dtype(mu_dtype), np.dtype(nu_dtype)}
  if not (dtypes <= _NARROW or dtypes <= _WIDE):
    return False
  on_device = not isinstance(p, jax.core.Tracer)
  return not (on_device and any(device.platform != "cpu" for device in p.devices()))


def _decay_flags(spec: AliasSpec, grads: Any) -> list[int] | None:
  """Each leaf's weight-decay mode, or ``None`` when the mask is not concrete booleans.

  A callable mask is called on the updates, as ``optax.masked`` calls it (the gradients'
  tree, shapes and dtypes).
  """
  leaves = jax.tree.leaves(grads)
  if spec.weight_decay == 0:
    return [NO_DECAY] * len(leaves)
  if not spec.decoupled:
    return [COUPLED] * len(leaves)
  if spec.mask is None:
    return [DECOUPLED] * len(leaves)
  mask = spec.mask(grads) if callable(spec.mask) else spec.mask
  try:
    flags = _broadcast(mask, grads)
  except ValueError:
    return None
  if len(flags) != len(leaves) or not all(isinstance(f, bool | np.bool_) for f in flags):
    return None
  return [DECOUPLED if flag else NO_DECAY for flag in flags]


def _broadcast(mask: Any, params: Any) -> list[Any]:
  """``mask``, a prefix of ``params``, expanded to one entry per leaf of ``params``."""
  expanded = jax.tree.map(lambda flag, subtree: jax.tree.map(lambda _: flag, subtree), mask, params)
  return jax.tree.leaves(expanded)


def _native_step(plan: _Plan, grads: Any, params: Any) -> tuple[Any, Any]:
  spec = plan.spec
  state: ScaleByAmsgradState = plan.opt_state[plan.amsgrad_index]
  count = _numerics.safe_increment(state.count)
  step_size = _step_size(spec, plan)
  hyper = {"b1": spec.b1, "b2": spec.b2, "eps": spec.eps, "eps_root": spec.eps_root}
  rule = RULES[spec.convention]

  def scalars_for(param_dtype: np.dtype, mu_dtype: Any, nu_dtype: Any) -> jax.Array:
    compute = _numerics.real_dtype(_numerics.compute_dtype(param_dtype, mu_dtype, nu_dtype))
    return _scalar_operand(hyper, rule, count, compute, param_dtype, step_size, spec)

  step = _flat_layout_step if isinstance(state.mu, FlatMoment) else _tree_layout_step
  new_params, mu, nu, nu_max = step(state, grads, params, plan.decay_flags, scalars_for)
  new_state = list(plan.opt_state)
  new_state[plan.amsgrad_index] = ScaleByAmsgradState(count=count, mu=mu, nu=nu, nu_max=nu_max)
  if plan.schedule_index is not None:
    schedule_state = plan.opt_state[plan.schedule_index]
    new_state[plan.schedule_index] = optax.ScaleByScheduleState(
      count=optax.safe_increment(schedule_state.count)
    )
  return new_params, tuple(new_state)


def _tree_layout_step(
  state: ScaleByAmsgradState,
  grads: Any,
  params: Any,
  decay_flags: list[int],
  scalars_for: Callable[..., jax.Array],
) -> tuple[Any, Any, Any, Any]:
  """New params, mu, nu and nu_max: one kernel call per dtype group (and decay mode), in
  calls of at most :data:`LEAVES_PER_CALL` leaves."""
  param_leaves, treedef = jax.tree.flatten(params)
  columns = [param_leaves, *(jax.tree.leaves(t) for t in (grads, state.mu, state.nu, state.nu_max))]
  leaves = list(zip(*columns, strict=True))
  results: list[tuple[jax.Array, ...]] = [(p, mu, nu, nu_max) for p, _, mu, nu, nu_max in leaves]

  groups: dict[tuple[Any, ...], list[int]] = {}
  for index, (p, _, mu, nu, _) in enumerate(leaves):
    if p.size == 0:
      continue
    key = (np.dtype(p.dtype), np.dtype(mu.dtype), np.dtype(nu.dtype), decay_flags[index])
    groups.setdefault(key, []).append(index)

  for (param_dtype, mu_dtype, nu_dtype, decay), indices in groups.items():
    scalars = scalars_for(param_dtype, mu_dtype, nu_dtype)
    for start in range(0, len(indices), LEAVES_PER_CALL):
      batch = indices[start : start + LEAVES_PER_CALL]
      outputs = per_shard(_kernel_call, scalars, [leaves[i] for i in batch], decay)
      for index, output in zip(batch, outputs, strict=True):
        results[index] = output
  return tuple(treedef.unflatten([r[i] for r in results]) for i in range(4))


def _flat_layout_step(
  state: ScaleByAmsgradState,
  grads: Any,
  params: Any,
  decay_flags: list[int],
  scalars_for: Callable[..., jax.Array],
) -> tuple[Any, Any, Any, Any]:
  """As :func:`_tree_layout_step` for the flat layout: each call updates its leaves'
  parameters and their ranges of the group's three buffers, which pass from call to call
  (aliased, so in place). The buffers are not partitioned: under a mesh XLA replicates
  the call, which is why sharded models keep the tree layout."""
  layout: FlatLayout = state.mu.layout
  param_leaves, treedef = jax.tree.flatten(params)
  grad_leaves = jax.tree.leaves(grads)
  new_params = list(param_leaves)
  moments = {
    group: tuple(m.buffers[group] for m in (state.mu, state.nu, state.nu_max))
    for group in layout.sizes()
  }
  calls: dict[tuple[str, int], list[int]] = {}
  for index, ((shape, group), decay) in enumerate(
    zip(layout.leaf_specs(), decay_flags, strict=True)
  ):
    if math.prod(shape) > 0:
      calls.setdefault((group, decay), []).append(index)
  for (group, decay), indices in calls.items():
    buffers = moments[group]
    param_dtype = np.dtype(param_leaves[indices[0]].dtype)
    scalars = scalars_for(param_dtype, buffers[0].dtype, buffers[1].dtype)
    for start in range(0, len(indices), LEAVES_PER_CALL):
      batch = indices[start : start + LEAVES_PER_CALL]
      leaves = [(param_leaves[i], grad_leaves[i]) for i in batch]
      offsets = [layout.offsets[i] for i in batch]
      buffers, outputs = _flat_kernel_call(scalars, buffers, leaves, offsets, decay)
      for index, output in zip(batch, outputs, strict=True):
        new_params[index] = output
    moments[group] = buffers
  mu, nu, nu_max = (
    FlatMoment({group: buffers[k] for group, buffers in moments.items()}, layout) for k in range(3)
  )
  return treedef.unflatten(new_params), mu, nu, nu_max


def _step_size(spec: AliasSpec, plan: _Plan) -> Callable[[Any], jax.Array]:
  """``dtype -> -lr`` in ``dtype``, exactly as ``optax.scale_by_learning_rate`` forms it."""
  if plan.schedule_index is None:
    negative = -1 * spec.learning_rate
    # optax.scale multiplies the update by the Python number, which JAX rounds to its dtype.
    return lambda dtype: jnp.multiply(negative, jnp.ones((), dtype))
  count = plan.opt_state[plan.schedule_index].count
  negative = -1 * spec.learning_rate(count)
  return lambda dtype: jnp.array(negative, dtype=dtype)


def _scalar_operand(
  hyper: dict[str, Any],
  rule: Any,
  count: jax.Array,
  compute: np.dtype,
  param_dtype: np.dtype,
  step_size: Callable[[Any], jax.Array],
  spec: AliasSpec,
) -> jax.Array:
  """The kernel's 11 scalars in the compute dtype (see ``amsgrad_step.cc``)."""
  s = step_scalars(hyper, rule, count, compute)
  # add_decayed_weights multiplies the parameter by the Python number, rounded to its dtype.
  weight_decay = jnp.multiply(spec.weight_decay, jnp.ones((), param_dtype))
  values = [
    s.b1,
    s.b2,
    s.one_minus_b1,
    s.one_minus_b2,
    s.eps,
    s.eps_root,
    *s.coefficients,
    step_size(param_dtype),
    weight_decay,
  ]
  return jnp.stack([jnp.asarray(v).astype(compute) for v in values])


def _kernel_call(
  scalars: jax.Array, leaves: list[tuple[jax.Array, ...]], decay: int
) -> list[tuple[jax.Array, ...]]:
  """One FFI call over every leaf of a dtype group; params and state alias the results."""
  operands = [x for leaf in leaves for x in leaf]
  result_shapes = [
    jax.ShapeDtypeStruct(x.shape, x.dtype)
    for p, _, mu, nu, nu_max in leaves
    for x in (p, mu, nu, nu_max)
  ]
  aliases = {
    1 + 5 * leaf + operand: 4 * leaf + result
    for leaf in range(len(leaves))
    for result, operand in enumerate((0, 2, 3, 4))
  }
  call = jax.ffi.ffi_call(
    _loader.TARGET_NAME, result_shapes, input_output_aliases=aliases, vmap_method="sequential"
  )
  flat = call(scalars, *operands, decay=np.int64(decay))
  return [tuple(flat[4 * i : 4 * i + 4]) for i in range(len(leaves))]


def _flat_kernel_call(
  scalars: jax.Array,
  buffers: tuple[jax.Array, ...],
  leaves: list[tuple[jax.Array, jax.Array]],
  offsets: list[int],
  decay: int,
) -> tuple[tuple[jax.Array, ...], list[jax.Array]]:
  """One FFI call over some leaves of a dtype group in the flat layout: returns the
  group's new ``(mu, nu, nu_max)`` buffers and each leaf's new parameters, all aliased to
  their operands."""
  operands = [*buffers, *(x for leaf in leaves for x in leaf)]
  result_shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in buffers]
  result_shapes += [jax.ShapeDtypeStruct(p.shape, p.dtype) for p, _ in leaves]
  aliases = {1 + k: k for k in range(3)}
  aliases |= {4 + 2 * leaf: 3 + leaf for leaf in range(len(leaves))}
  call = jax.ffi.ffi_call(
    _loader.FLAT_TARGET_NAME,
    result_shapes,
    input_output_aliases=aliases,
    vmap_method="sequential",
  )
  flat = call(scalars, *operands, decay=np.int64(decay), offsets=np.asarray(offsets, np.int64))
  return tuple(flat[:3]), list(flat[3:])
