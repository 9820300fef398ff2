"""``apply_step``: a whole training step, natively on CPU when it can be, else through Optax.

The native step reads ``params``, ``grads``, ``mu``, ``nu`` and ``nu_max`` once and writes
``params``, ``mu``, ``nu`` and ``nu_max`` once (36 bytes a float32 parameter, where the
Optax chain compiled by XLA:CPU moves 52), in place under ``jit`` with donation. Every
scalar of the step (bias corrections, the rule's coefficients, the scheduled learning
rate) is computed here, in JAX, by the same functions the transformation uses.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import optax

from amsgrad_jax import _validation
from amsgrad_jax._native import _compose, _loader
from amsgrad_jax._native._loader import NativeStatus
from amsgrad_jax._native._plan import machine_status


def native_status(tx: Any = None, opt_state: Any = None, params: Any = None) -> NativeStatus:
  """Say whether :func:`apply_step` takes the native path, and why not when it does not.

  Without arguments it answers for this machine: is the kernel built and loaded, and is
  JAX's default backend the CPU. Given an optimizer, its state and the parameters, it
  answers for that step, exactly as :func:`apply_step` decides (the gradients are taken
  to be shaped and typed like ``params``); see the native guide for the compositions
  that run natively.

  The first call builds the kernel with the system C++ compiler (a few seconds) unless a
  cached build exists; set ``AMSGRAD_JAX_DISABLE_NATIVE=1`` to never build or use it.

  Args:
    tx: an optimizer, or ``None`` to ask about the machine only.
    opt_state: ``tx``'s state (``tx.init(params)``).
    params: the parameters.

  Returns:
    A :class:`NativeStatus`; it is truthy when the native step is active.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from amsgrad_jax import amsgrad, native_status
    >>> isinstance(native_status().reason, str)
    True
    >>> params = {"w": jnp.zeros(3)}
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0), amsgrad(1e-3))
    >>> bool(native_status(tx, tx.init(params), params)) == bool(native_status())
    True
    >>> tx = optax.chain(amsgrad(1e-3), optax.scale(0.5))  # nothing may follow the alias
    >>> native_status(tx, tx.init(params), params).active
    False
  """
  status = machine_status()
  if tx is None or not status.active:
    return status
  _validation.check_initialised(opt_state, "native_status")
  reason = _compose.fallback_reason(tx, params, opt_state, params)
  if reason is not None:
    return NativeStatus(False, reason, status.library)
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

  for any Optax transformation. When ``tx`` holds an optimizer built by
  :func:`amsgrad_jax.amsgrad` or :func:`amsgrad_jax.amsgradw` (any rule, weight decay,
  mask, learning-rate schedule), alone or inside ``optax.chain`` (anything in front of
  it), ``optax.clip_by_global_norm``, ``optax.inject_hyperparams``, ``optax.masked``,
  ``optax.multi_transform``, ``optax.MultiSteps`` or :func:`amsgrad_jax.skip_nonfinite`,
  and the step runs on CPU with the native kernel available, the AMSGrad part of the step
  is one pass over memory per dtype group of leaves: each parameter, its gradient and its
  three state values are read once and written once,

  .. math::

    \begin{aligned}
    m &\leftarrow \beta_1 m + (1-\beta_1) g, &
    v &\leftarrow \beta_2 v + (1-\beta_2) g^2, \\
    \hat v &\leftarrow \max(\hat v, a v), &
    \theta &\leftarrow \theta - \eta \frac{b\, m}{d \sqrt{\hat v + \epsilon_{root}} + \epsilon},
    \end{aligned}

  with the rule's coefficients :math:`a, b, d` (see :func:`amsgrad_jax.scale_by_amsgrad`),
  and every intermediate rounded as the jitted Optax chain rounds it. Parameters and state
  are updated in place when a jitted step donates them and returns them in the order it
  takes them, as ``train_step(params, opt_state, batch) -> (params, opt_state, ...)`` with
  ``donate_argnums=(0, 1)`` does (``jit`` pairs donated inputs with outputs in order).
  Under a mesh the kernel runs on each shard; under ``pmap`` on each device. On trees of
  many small leaves, build ``tx`` with ``flat_state=True``: the state is then three buffers
  per dtype instead of three arrays per leaf, which cuts the per-array cost of the jitted
  call (bit-identical results; see :func:`amsgrad_jax.scale_by_amsgrad`).

  A global-norm clip right in front of the alias is applied by the kernel as it reads each
  gradient, so it costs only the read that computing the norm needs. Whatever else runs
  in front runs in JAX. :func:`native_status` with the optimizer says whether a step runs
  natively and why not; when an optimizer with an alias inside takes the Optax path,
  :class:`~amsgrad_jax.NativeFallbackWarning` says why, once per reason. Under
  ``jax.grad``, ``jax.jvp`` or ``jax.linearize`` the step has the Optax path's derivatives,
  and under ``jax.vmap`` it is the Optax path.

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
  status = machine_status()
  reason = (
    status.reason if not status.active else _compose.fallback_reason(tx, grads, opt_state, params)
  )
  if reason is not None:
    result = pure_step(tx, grads, opt_state, params)  # raises first on mismatched trees
    if not _loader.disabled() and _compose.contains_alias(tx):
      _warn_once(reason)
    return result
  return _native_with_optax_derivatives(tx)(grads, opt_state, params)


class NativeFallbackWarning(UserWarning):
  """:func:`~amsgrad_jax.apply_step` met an optimizer with an AMSGrad alias in it that it
  cannot run natively, and takes the Optax path (same numbers, more passes over memory).

  Shown once per reason; silence it with
  ``warnings.filterwarnings("ignore", category=amsgrad_jax.NativeFallbackWarning)``.
  """


_WARNED: set[str] = set()


def _warn_once(reason: str) -> None:
  if jax.default_backend() != "cpu" or reason in _WARNED:
    return
  _WARNED.add(reason)
  warnings.warn(f"apply_step takes the Optax path: {reason}", NativeFallbackWarning, stacklevel=3)


def _native_with_optax_derivatives(tx: Any) -> Any:
  """The native step, with the Optax path's derivatives and batching rule.

  The kernel has neither a derivative nor a batching rule: under ``jax.jvp`` (and so
  ``jax.grad``, ``jax.linearize``) the step is the Optax path's, primal and tangent;
  under ``jax.vmap`` it is the Optax path vmapped.
  """

  @jax.custom_jvp
  def step(grads: Any, opt_state: Any, params: Any) -> tuple[Any, Any]:
    return _native_unless_vmapped(tx)(grads, opt_state, params)

  @step.defjvp
  def step_jvp(primals: tuple, tangents: tuple) -> tuple[Any, Any]:
    return jax.jvp(functools.partial(pure_step, tx), primals, tangents)

  return step


def _native_unless_vmapped(tx: Any) -> Any:
  @jax.custom_batching.custom_vmap
  def native(grads: Any, opt_state: Any, params: Any) -> tuple[Any, Any]:
    return _compose.native_step(tx, grads, opt_state, params)

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
