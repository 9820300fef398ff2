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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from amsgrad_jax import _numerics, _validation
from amsgrad_jax._flat import FlatLayout, FlatMoment
from amsgrad_jax._native import _interface
from amsgrad_jax._native._interface import Decay
from amsgrad_jax._native._loader import NativeStatus
from amsgrad_jax._native._plan import Fallback, Plan, machine_status, plan
from amsgrad_jax._native._sharding import per_shard
from amsgrad_jax._transform import ScaleByAmsgradState, step_scalars

# Leaves per kernel call. XLA's compile time grows faster than linearly with the number of
# aliased results of one custom call (400 leaves in one call: 7 s; in calls of 64: 0.5 s),
# while a call costs microseconds; groups larger than this take several calls.
LEAVES_PER_CALL = 64


def native_status(tx: Any = None, opt_state: Any = None, params: Any = None) -> NativeStatus:
  """Say whether :func:`apply_step` takes the native path, and why not when it does not.

  Without arguments it answers for this machine: is the kernel built and loaded, and is
  JAX's default backend the CPU. Given an optimizer, its state and the parameters, it
  answers for that step: whether :func:`apply_step` would run it natively (the gradients
  are taken to be shaped and typed like ``params``).

  The first call builds the kernel with the system C++ compiler (a few seconds) unless a
  cached build exists; set ``AMSGRAD_JAX_DISABLE_NATIVE=1`` to never build or use it.

  Args:
    tx: an optimizer, or ``None`` to ask about the machine only.
    opt_state: ``tx``'s state (``tx.init(params)``).
    params: the parameters.

  Returns:
    A :class:`NativeStatus`; it is truthy when the native step is active.

  Examples:
    >>> import jax.numpy as jnp
    >>> from amsgrad_jax import amsgrad, native_status
    >>> isinstance(native_status().reason, str)
    True
    >>> import optax
    >>> tx = optax.chain(optax.scale(1.0), amsgrad(1e-3))
    >>> params = {"w": jnp.zeros(3)}
    >>> native_status(tx, tx.init(params), params).active
    False
  """
  status = machine_status()
  if tx is None or not status.active:
    return status
  decision = plan(tx, params, opt_state, params)
  if isinstance(decision, Fallback):
    return NativeStatus(False, decision.reason, status.library)
  return status


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
  _validation.check_initialised(opt_state, "apply_step")
  if isinstance(plan(tx, grads, opt_state, params), Fallback):
    return pure_step(tx, grads, opt_state, params)
  return _native_unless_vmapped(tx)(grads, opt_state, params)


def _native_unless_vmapped(tx: Any) -> Any:
  """The native step; under ``jax.vmap``, the Optax path vmapped (the kernel has no rule
  for a batch axis, and ``custom_partitioning`` none for batching)."""

  @jax.custom_batching.custom_vmap
  def native(grads: Any, opt_state: Any, params: Any) -> tuple[Any, Any]:
    decision = plan(tx, grads, opt_state, params)
    assert isinstance(decision, Plan)  # plan has accepted these trees once already
    return _native_step(decision, grads, params)

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


def _native_step(plan: Plan, grads: Any, params: Any) -> tuple[Any, Any]:
  options = plan.options
  state: ScaleByAmsgradState = plan.opt_state[plan.amsgrad_index]
  count = _numerics.safe_increment(state.count)
  step_size = _step_size(plan)

  def scalars_for(param_dtype: np.dtype, mu_dtype: Any, nu_dtype: Any) -> jax.Array:
    compute = _numerics.real_dtype(_numerics.compute_dtype(param_dtype, mu_dtype, nu_dtype))
    s = step_scalars(options, count, compute)
    values = {
      "b1": s.b1,
      "b2": s.b2,
      "one_minus_b1": s.one_minus_b1,
      "one_minus_b2": s.one_minus_b2,
      "eps": s.eps,
      "eps_root": s.eps_root,
      **s.coefficients._asdict(),
      "neg_lr": step_size(param_dtype),
      # add_decayed_weights multiplies the parameter by the Python number, in its dtype.
      "weight_decay": jnp.multiply(options.weight_decay, jnp.ones((), param_dtype)),
    }
    return jnp.stack([jnp.asarray(values[name]).astype(compute) for name in _interface.SCALARS])

  step = _flat_layout_step if isinstance(state.mu, FlatMoment) else _tree_layout_step
  new_params, mu, nu, nu_max = step(state, grads, params, plan.decay, scalars_for)
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
  decay: list[Decay],
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
    key = (np.dtype(p.dtype), np.dtype(mu.dtype), np.dtype(nu.dtype), decay[index])
    groups.setdefault(key, []).append(index)

  for (param_dtype, mu_dtype, nu_dtype, mode), indices in groups.items():
    scalars = scalars_for(param_dtype, mu_dtype, nu_dtype)
    for start in range(0, len(indices), LEAVES_PER_CALL):
      batch = indices[start : start + LEAVES_PER_CALL]
      outputs = per_shard(_interface.tree_call, scalars, [leaves[i] for i in batch], mode)
      for index, output in zip(batch, outputs, strict=True):
        results[index] = output
  return tuple(jax.tree.unflatten(treedef, [r[i] for r in results]) for i in range(4))


def _flat_layout_step(
  state: ScaleByAmsgradState,
  grads: Any,
  params: Any,
  decay: list[Decay],
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
  calls: dict[tuple[str, Decay], list[int]] = {}
  for index, ((shape, group), mode) in enumerate(zip(layout.leaf_specs(), decay, strict=True)):
    if math.prod(shape) > 0:
      calls.setdefault((group, mode), []).append(index)
  for (group, mode), indices in calls.items():
    buffers = moments[group]
    param_dtype = np.dtype(param_leaves[indices[0]].dtype)
    scalars = scalars_for(param_dtype, buffers[0].dtype, buffers[1].dtype)
    for start in range(0, len(indices), LEAVES_PER_CALL):
      batch = indices[start : start + LEAVES_PER_CALL]
      leaves = [(param_leaves[i], grad_leaves[i]) for i in batch]
      offsets = [layout.offsets[i] for i in batch]
      buffers, outputs = _interface.flat_call(scalars, buffers, leaves, offsets, mode)
      for index, output in zip(batch, outputs, strict=True):
        new_params[index] = output
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
