"""Which optimizers step natively: an AMSGrad alias, alone or inside Optax's wrappers.

An Optax optimizer is a pair of closures, so :func:`native_step` recognises the wrappers
users build from (``optax.chain``, ``optax.clip_by_global_norm``,
``optax.inject_hyperparams``, ``optax.masked``, ``optax.multi_transform``,
``optax.MultiSteps``) by their update functions and what those close over, and runs each
one's own logic in JAX around the kernel, exactly as the wrapper would around
``tx.update``. Anything else raises :class:`Unsupported` with the reason, and the step
takes the Optax path: a wrapper this module does not know is never guessed at.

Each node receives the gradients as they reach it and returns an *outcome* tree: for
every leaf either :class:`Written` (the kernel has written the new parameter) or
:class:`Update` (an update for ``optax.apply_updates``). A global-norm clip directly in
front of what follows is not applied to the gradients: it travels down as a
:class:`GradScale`, and the kernel applies it as it reads each gradient, so the clip
costs the one read pass that computing the norm needs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax

from amsgrad_jax import _guard, _numerics
from amsgrad_jax._aliases import OPTIONS_ATTRIBUTE
from amsgrad_jax._blockwise import Blockwise8
from amsgrad_jax._closures import reachable
from amsgrad_jax._flat import FlatMoment
from amsgrad_jax._native._alias_step import GradScale, alias_check, alias_step
from amsgrad_jax._native._plan import Fallback, Plan, plan
from amsgrad_jax._options import AliasOptions


class Unsupported(Exception):
  """The step cannot run natively, because of ``reason``."""

  def __init__(self, reason: str) -> None:
    super().__init__(reason)
    self.reason = reason


@dataclass(frozen=True)
class Written:
  """A new parameter the kernel has written."""

  value: jax.Array


@dataclass(frozen=True)
class Update:
  """An update to add to the parameter, as ``optax.apply_updates`` adds it."""

  value: jax.Array


def fallback_reason(tx: Any, grads: Any, opt_state: Any, params: Any) -> str | None:
  """Why :func:`native_step` cannot run this step, or ``None`` when it can.

  Decided by tracing the native step abstractly (no computation)."""
  for leaf in jax.tree.leaves(params):
    concrete = isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
    if concrete and any(device.platform != "cpu" for device in leaf.devices()):
      return "a parameter lives on a device that is not the CPU"
  if not contains_alias(tx):
    return (
      "the optimizer holds no amsgrad_jax.amsgrad or amsgrad_jax.amsgradw (or holds a copy, "
      "which drops what the native step reads)"
    )
  try:
    jax.eval_shape(lambda g, s, p: native_step(tx, g, s, p), grads, opt_state, params)
  except Unsupported as unsupported:
    return unsupported.reason
  return None


def native_step(tx: Any, grads: Any, opt_state: Any, params: Any) -> tuple[Any, Any]:
  """``(new_params, new_opt_state)`` with every AMSGrad alias stepped by the kernel.

  Raises:
    Unsupported: naming what keeps the step from running natively.
  """
  outcome, new_state = _walk(_update_fn(tx), grads, opt_state, params, None)
  return _finish(params, outcome), new_state


def _update_fn(tx: Any) -> Callable[..., Any]:
  update = getattr(tx, "update", None)
  if not callable(update):
    raise Unsupported(f"{type(tx).__name__} is not an Optax transformation")
  return update


def _finish(params: Any, outcome: Any) -> Any:
  """The new parameters: written ones as they are, the others ``p + u`` as Optax adds."""

  def finish(p: Any, result: Any) -> Any:
    if isinstance(result, Written):
      return result.value
    update = result.value if isinstance(result, Update) else result
    return jnp.asarray(p + update).astype(jnp.asarray(p).dtype)

  return jax.tree.map(finish, params, outcome, is_leaf=lambda x: x is None)


def _unwrap(fn: Any) -> Any:
  """``fn`` without ``optax.with_extra_args_support``'s adapter (``optax.chain`` puts one
  around every transformation that takes no extra arguments)."""
  while getattr(fn, "__qualname__", "") == "with_extra_args_support.<locals>.update" and (
    getattr(fn, "__module__", "") or ""
  ).startswith("optax."):
    fn = inspect.getclosurevars(fn).nonlocals["tx"].update
  return fn


def _walk(fn: Any, grads: Any, state: Any, params: Any, clip: GradScale | None) -> tuple:
  fn = _unwrap(fn)
  options = getattr(fn, OPTIONS_ATTRIBUTE, None)
  if isinstance(options, AliasOptions):
    return _alias(options, grads, state, params, clip)
  guard = getattr(fn, "amsgrad_jax_guard", None)
  if guard is not None:
    inner, max_errors = guard
    return _skip_nonfinite(inner, max_errors, grads, state, params, clip)
  self = getattr(fn, "__self__", None)
  if isinstance(self, optax.MultiSteps) and fn.__name__ == "update":
    return _multi_steps(self, grads, state, params, clip)
  kind = _optax_kind(fn)
  handler = _HANDLERS.get(kind) if kind is not None else None
  if handler is None:
    raise Unsupported(f"{_describe(fn)} is not a transformation the native step runs")
  return handler(inspect.getclosurevars(fn).nonlocals, grads, state, params, clip)


def _optax_kind(fn: Any) -> str | None:
  """``"chain"``, ``"masked"``, ...: the Optax function whose update ``fn`` is."""
  qualname = getattr(fn, "__qualname__", "")
  module = getattr(fn, "__module__", "") or ""
  if not module.startswith("optax.") or not qualname.endswith(".update_fn"):
    return None
  return qualname.split(".<locals>.")[0]


def _describe(fn: Any) -> str:
  qualname = getattr(fn, "__qualname__", None) or type(fn).__name__
  if (getattr(fn, "__module__", "") or "").startswith("optax."):
    return f"optax.{qualname.split('.<locals>.')[0]}"
  return f"{getattr(fn, '__module__', '')}.{qualname}".strip(".")


def _plan(options: AliasOptions, grads: Any, state: Any, params: Any) -> Plan:
  decision = plan(options, grads, state, params)
  if isinstance(decision, Fallback):
    raise Unsupported(decision.reason)
  return decision


def _alias(options: AliasOptions, grads: Any, state: Any, params: Any, clip: Any) -> tuple:
  new_params, new_state = alias_step(_plan(options, grads, state, params), grads, params, clip)
  return jax.tree.map(Written, new_params), new_state


# ---- clipping in front: optax.clip_by_global_norm as the kernel's scalar --------------------


def _clip_scale(max_norm: Any, grads: Any) -> GradScale:
  """The clip ``optax.clip_by_global_norm(max_norm)`` applies to ``grads``."""
  norm = optax.tree.norm(grads)
  trigger = jnp.squeeze(norm < max_norm)
  return GradScale(trigger=trigger, norm=norm, max_norm=max_norm)


def materialize(grads: Any, clip: GradScale | None) -> Any:
  """``grads`` with the pending clip applied, exactly as ``clip_by_global_norm`` does."""
  if clip is None:
    return grads

  def clip_leaf(t: jax.Array) -> jax.Array:
    return jax.lax.select(clip.trigger, t, (t / clip.norm.astype(t.dtype)) * clip.max_norm)

  return jax.tree.map(clip_leaf, grads)


def _is_clip_by_global_norm(fn: Any) -> bool:
  return _optax_kind(_unwrap(fn)) == "clip_by_global_norm"


@dataclass(frozen=True)
class _ChainFront:
  """A chain's transformations before its last, applied: the gradients (and pending clip)
  the last one receives, the chain's new states before it, and whether any of them
  changed the gradients in JAX (a deferred clip does not)."""

  last: Any
  grads: Any
  clip: GradScale | None
  states: list[Any]
  transformed: bool


def _chain_front(
  closure: Mapping[str, Any], grads: Any, state: Any, params: Any, clip: Any
) -> _ChainFront:
  """What precedes a chain's last transformation runs in JAX on the gradients, as the
  chain runs it; a global-norm clip right before the last one is deferred to the kernel."""
  update_fns = list(closure["update_fns"])
  if not isinstance(state, tuple) or len(state) != len(update_fns) or not update_fns:
    raise Unsupported("opt_state is not the state this chain's init builds")
  *before, last = update_fns
  states, transformed = list(state[:-1]), False
  for index, fn in enumerate(before):
    if _is_clip_by_global_norm(fn) and index == len(before) - 1:
      grads = materialize(grads, clip)
      max_norm = inspect.getclosurevars(_unwrap(fn)).nonlocals["max_norm"]
      clip = _clip_scale(max_norm, grads)
      continue
    grads, states[index] = fn(materialize(grads, clip), state[index], params)
    clip, transformed = None, True
  return _ChainFront(last, grads, clip, states, transformed)


def _chain(closure: Mapping[str, Any], grads: Any, state: Any, params: Any, clip: Any) -> tuple:
  """``optax.chain``: the front runs in JAX (:func:`_chain_front`); the last one walks."""
  front = _chain_front(closure, grads, state, params, clip)
  outcome, last_state = _walk(front.last, front.grads, state[-1], params, front.clip)
  return outcome, (*front.states, last_state)


# ---- injected hyperparameters -------------------------------------------------------------


def _inject_hyperparams(
  closure: Mapping[str, Any], grads: Any, state: Any, params: Any, clip: Any
) -> tuple:
  """``optax.inject_hyperparams``: the hyperparameters as Optax forms them each step; the
  inner optimizer is rebuilt from them, so they reach the kernel as operands."""
  new_state, inner_update = _injected(closure, state, params)
  outcome, inner_state = _walk(inner_update, grads, state.inner_state, params, clip)
  return outcome, new_state._replace(inner_state=inner_state)


def _injected(closure: Mapping[str, Any], state: Any, params: Any) -> tuple[Any, Any]:
  """The wrapper's new state (its old inner state inside), with this step's
  hyperparameters, and the update function of the inner optimizer built from them."""
  from optax.schedules import _inject  # the same conversion the wrapper applies

  fields = ("count", "hyperparams", "hyperparams_states", "inner_state")
  if not all(hasattr(state, field) for field in fields):
    raise Unsupported("opt_state is not the state optax.inject_hyperparams builds")
  dtype = closure["hyperparam_dtype"]
  if dtype is None:
    dtype = optax.tree.dtype(params, "highest")
  sched_hps = closure["sched_hps"]
  hparams = {k: _inject._convert_floats(v, dtype) for k, v in state.hyperparams.items()}
  hparams.update(
    {
      k: _inject._convert_floats(f(state.hyperparams_states[k]), dtype)
      for k, f in sched_hps.items()
    }
  )
  new_state = type(state)(
    count=optax.safe_increment(state.count),
    hyperparams=hparams,
    hyperparams_states={k: f.update(state.hyperparams_states[k]) for k, f in sched_hps.items()},
    inner_state=state.inner_state,
  )
  inner = closure["inner_factory"](**closure["other_hps"], **hparams)
  return new_state, optax.with_extra_args_support(inner).update


# ---- masks and parameter groups --------------------------------------------------------------


def _mask_tree(mask: Any, tree: Any) -> Any:
  """``tree`` with the leaves outside ``mask`` (a prefix of booleans) taken out, as
  ``optax.masked`` takes them out."""
  from optax.transforms._masking import MaskedNode

  return jax.tree.map(lambda m, sub: sub if m else MaskedNode(), mask, tree)


def _merge(mask: Any, inner: Any, current: Any) -> Any:
  """``inner``'s outcome where ``mask`` is true, ``current`` elsewhere."""
  return jax.tree.map(lambda m, new, old: new if m else old, mask, inner, current)


def _masked_group(
  fn: Any, mask: Any, grads: Any, state: Any, params: Any, clip: Any
) -> tuple[Any, Any]:
  if isinstance(mask, jax.core.Tracer) or not all(
    isinstance(m, bool) or (hasattr(m, "dtype") and not isinstance(m, jax.core.Tracer))
    for m in jax.tree.leaves(mask)
  ):
    raise Unsupported("a mask is not made of concrete booleans")
  masked_params = None if params is None else _mask_tree(mask, params)
  return _walk(fn, _mask_tree(mask, grads), state, masked_params, clip)


def _leftovers(outcome: Any, clip: GradScale | None) -> Any:
  """Leaves no transformation took: their update is the incoming (clipped) gradient."""
  return jax.tree.map(
    lambda x: x if isinstance(x, Written | Update) else Update(materialize(x, clip)), outcome
  )


def _masked(closure: Mapping[str, Any], grads: Any, state: Any, params: Any, clip: Any) -> tuple:
  """``optax.masked``: the inner optimizer steps the masked leaves; the others pass their
  gradient through as the update, as in Optax."""
  mask = closure["mask"]
  mask = mask(grads) if callable(mask) else mask
  if not hasattr(state, "inner_state"):
    raise Unsupported("opt_state is not the state optax.masked builds")
  inner, inner_state = _masked_group(
    closure["inner"].update, mask, grads, state.inner_state, params, clip
  )
  return _leftovers(_merge(mask, inner, grads), clip), type(state)(inner_state=inner_state)


def _partition(closure: Mapping[str, Any], grads: Any, state: Any, params: Any, clip: Any) -> tuple:
  """``optax.multi_transform`` (``optax.partition``): each group steps its own leaves."""
  labels = closure["param_labels"]
  labels = labels(grads) if callable(labels) else labels
  inner_states = getattr(state, "inner_states", None)
  transforms = closure["transforms"]
  if not isinstance(inner_states, dict) or set(inner_states) != set(transforms):
    raise Unsupported("opt_state is not the state optax.multi_transform builds")
  outcome, new_states = grads, {}
  for group, tx in transforms.items():
    mask = closure["make_mask"](labels, group)
    group_state = inner_states[group]
    inner, inner_state = _masked_group(
      optax.with_extra_args_support(tx).update, mask, grads, group_state.inner_state, params, clip
    )
    outcome = _merge(mask, inner, outcome)
    new_states[group] = type(group_state)(inner_state=inner_state)
  return _leftovers(outcome, clip), type(state)(new_states)


# ---- gradient accumulation ----------------------------------------------------------------


def _multi_steps(ms: optax.MultiSteps, grads: Any, state: Any, params: Any, clip: Any) -> tuple:
  """``optax.MultiSteps``: gradients accumulate as Optax accumulates them; the kernel runs
  only on the steps that apply (``lax.cond``), and the others leave the parameters as
  they are."""
  grads = materialize(grads, clip)
  k_steps = ms._every_k_schedule(state.gradient_step)
  should_skip, skip_state = ms._should_skip_update_fn(grads, state.gradient_step, params)

  def do_update(grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
    acc_grads = jax.tree.map(
      lambda upd, acc: ms._acc_update(upd, acc, n_acc=state.mini_step), grads, state.acc_grads
    )
    emit = state.mini_step == (k_steps - 1)

    def apply(params: Any, inner_state: Any) -> tuple[Any, Any]:
      inner_grads = optax.tree.cast_like(acc_grads, grads)
      outcome, new_inner = _walk(ms._opt.update, inner_grads, inner_state, params, None)
      return _finish(params, outcome), new_inner

    def hold(params: Any, inner_state: Any) -> tuple[Any, Any]:
      return params, inner_state

    new_params, inner_state = jax.lax.cond(emit, apply, hold, params, state.inner_opt_state)
    new_state = type(state)(
      mini_step=optax.safe_increment(state.mini_step) % k_steps,
      gradient_step=emit * optax.safe_increment(state.gradient_step)
      + (1 - emit) * state.gradient_step,
      inner_opt_state=inner_state,
      acc_grads=jax.tree.map(
        lambda ga: jnp.astype((1 - emit) * ga, ms._accumulator_dtype), acc_grads
      ),
      skip_state=skip_state,
    )
    return new_params, new_state

  def skip(grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
    del grads
    return params, state._replace(skip_state=skip_state)

  new_params, new_state = jax.lax.cond(should_skip, skip, do_update, grads, state, params)
  return jax.tree.map(Written, new_params), new_state


# ---- the non-finite guard ------------------------------------------------------------------


def _skip_nonfinite(
  inner: Any, max_errors: int, grads: Any, state: Any, params: Any, clip: Any
) -> tuple:
  """:func:`~amsgrad_jax.skip_nonfinite`: the kernel first reads the step without writing
  (does it leave everything finite?), then runs it only if accepted (``lax.cond``); a
  rejected step leaves the parameters and the state exactly as they were."""
  inner_update = optax.with_extra_args_support(inner).update
  is_finite, grads_checked = _finite_step(inner_update, grads, state.inner_state, params, clip)
  if not grads_checked:  # the kernel saw gradients that JAX transformed first
    is_finite = is_finite & _guard.all_finite(grads)
  notfinite_count = jnp.where(
    is_finite, jnp.zeros([], jnp.int32), _numerics.safe_increment(state.notfinite_count)
  )
  accept = is_finite | (notfinite_count > max_errors)

  def run(params: Any, inner_state: Any) -> tuple[Any, Any]:
    outcome, new_inner = _walk(inner_update, grads, inner_state, params, clip)
    return _finish(params, outcome), new_inner

  def hold(params: Any, inner_state: Any) -> tuple[Any, Any]:
    return params, inner_state

  new_params, inner_state = jax.lax.cond(accept, run, hold, params, state.inner_state)
  new_state = type(state)(
    notfinite_count=notfinite_count,
    last_finite=is_finite,
    total_notfinite=jnp.where(
      is_finite, state.total_notfinite, _numerics.safe_increment(state.total_notfinite)
    ),
    inner_state=inner_state,
  )
  return jax.tree.map(Written, new_params), new_state


def _finite_step(fn: Any, grads: Any, state: Any, params: Any, clip: Any) -> tuple[jax.Array, bool]:
  """Whether the step of ``fn`` would leave its updates and new state finite, computed
  without taking it: the kernel reads the alias's buffers, JAX checks the rest. Also
  whether that covered the incoming gradients: the kernel checks each gradient it reads,
  and a deferred global-norm clip keeps a gradient finite exactly when it was (a
  non-finite one makes the norm non-finite too, and ``g / norm`` then NaN)."""
  fn = _unwrap(fn)
  options = getattr(fn, OPTIONS_ATTRIBUTE, None)
  if isinstance(options, AliasOptions):
    decision = _plan(options, grads, state, params)
    moment = decision.opt_state[decision.amsgrad_index].mu
    if (
      isinstance(moment, FlatMoment)
      or isinstance(decision.options.mu_dtype, Blockwise8)
      or jax.device_count() > 1  # XLA's reduction runs per shard, then one scalar all-reduce
    ):
      return _finite_by_xla(fn, grads, state, params, clip)
    return alias_check(decision, grads, params, clip), True
  kind = _optax_kind(fn)
  closure = inspect.getclosurevars(fn).nonlocals if kind is not None else {}
  if kind == "chain":
    front = _chain_front(closure, grads, state, params, clip)
    finite, checked = _finite_step(front.last, front.grads, state[-1], params, front.clip)
    return finite & _guard.all_finite(front.states), checked and not front.transformed
  if kind == "inject_hyperparams":
    # The same hyperparameters the step computes (XLA computes them once for both).
    new_state, inner_update = _injected(closure, state, params)
    finite, checked = _finite_step(inner_update, grads, state.inner_state, params, clip)
    return finite & _guard.all_finite(new_state.hyperparams), checked
  return _finite_by_xla(fn, grads, state, params, clip)


def _finite_by_xla(
  fn: Any, grads: Any, state: Any, params: Any, clip: Any
) -> tuple[jax.Array, bool]:
  """The guard's check for a step the check kernel cannot read (a flat or 8-bit state,
  accumulation, masks, groups; sharded leaves, which XLA reduces per shard and the check
  kernel would gather): the Optax path's step, reduced to one boolean exactly as
  :func:`~amsgrad_jax.skip_nonfinite` reduces it. XLA fuses the step into its reductions
  and writes nothing, so a rejected step still costs only this read."""
  grads = materialize(grads, clip)
  updates, new_state = fn(grads, state, params)
  return _guard.all_finite(grads, updates, new_state), True


_HANDLERS: dict[str, Callable[..., tuple]] = {
  "chain": _chain,
  "inject_hyperparams": _inject_hyperparams,
  "masked": _masked,
  "partition": _partition,
}


def contains_alias(tx: Any, depth: int = 8) -> bool:
  """Whether ``tx`` holds an AMSGrad alias anywhere inside (through closures, wrapper
  attributes and containers), for deciding whether a fallback deserves a warning."""
  from amsgrad_jax._aliases import amsgrad, amsgradw  # what inject_hyperparams holds

  return any(
    obj is amsgrad
    or obj is amsgradw
    or isinstance(getattr(obj, OPTIONS_ATTRIBUTE, None), AliasOptions)
    or isinstance(getattr(obj, "options", None), AliasOptions)
    for obj in reachable(tx, depth)
  )
