"""``skip_nonfinite``: reject a step whose gradients, updates *or new state* are not finite.

AMSGrad's running maximum never forgets: once ``nu_max`` holds ``inf`` or ``NaN`` it
holds it for the rest of training. :func:`optax.apply_if_finite` looks at the incoming
gradients only, which misses the case where finite gradients overflow inside the
optimizer: :math:`(1-\\beta_2) g^2` above the largest float16 (65504) when the state is
stored in float16, or :math:`g^2` above 3.4e38 in float32. The update of that step is
finite (a finite numerator over an infinite root is zero), so nothing looks wrong, but
the coordinate's step is zero from then on. This guard checks the new state as well.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from amsgrad_jax import _numerics


def all_finite(*trees: Any) -> jax.Array:
  """Whether every floating or complex leaf of ``trees`` is finite (``True`` when none)."""
  checks = [
    jnp.all(jnp.isfinite(leaf))
    for tree in trees
    for leaf in jax.tree.leaves(tree)
    if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
  ]
  return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def _check_max_consecutive_errors(value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"max_consecutive_errors must be an int >= 0, got {value!r}.")
  return value


def skip_nonfinite(
  inner: optax.GradientTransformation, max_consecutive_errors: int
) -> optax.GradientTransformationExtraArgs:
  r"""Wrap ``inner`` so that a step with a non-finite result leaves everything unchanged.

  A drop-in replacement for :func:`optax.apply_if_finite` (same arguments, same
  state, :class:`optax.ApplyIfFiniteState`) that checks more: a step is rejected when
  the gradients, the updates ``inner`` returns, or any floating leaf of the new inner
  state is ``inf`` or ``NaN``. A rejected step returns zero updates and keeps the
  previous inner state, so the run equals one in which the step never happened. After
  more than ``max_consecutive_errors`` rejections in a row the step is accepted, as in
  Optax; for AMSGrad that makes the running maximum non-finite for good, so choose it
  large unless you want a run that cannot recover to be visible.

  The extra check reads the whole state once per step (about three times the size of
  the parameters for :func:`amsgrad`), a reduction XLA fuses with the update.

  Args:
    inner: the transformation to guard, e.g. :func:`amsgrad`.
    max_consecutive_errors: how many non-finite steps in a row are rejected before one
      is accepted, an ``int >= 0``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is an
    :class:`optax.ApplyIfFiniteState`.

  Raises:
    ValueError: if ``max_consecutive_errors`` is not an ``int >= 0``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from amsgrad_jax import amsgrad, skip_nonfinite
    >>> tx = skip_nonfinite(amsgrad(learning_rate=0.1), max_consecutive_errors=100)
    >>> params = jnp.array([1.0, 2.0], jnp.float16)
    >>> state = tx.init(params)
    >>> grads = jnp.array([1.0, 3e4], jnp.float16)  # (1 - b2) g^2 overflows float16
    >>> updates, state = tx.update(grads, state, params)
    >>> updates, int(state.total_notfinite)
    (Array([0., 0.], dtype=float16), 1)
  """
  max_consecutive_errors = _check_max_consecutive_errors(max_consecutive_errors)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params: optax.Params) -> optax.ApplyIfFiniteState:
    return optax.ApplyIfFiniteState(
      notfinite_count=jnp.zeros([], jnp.int32),
      last_finite=jnp.array(True),
      total_notfinite=jnp.zeros([], jnp.int32),
      inner_state=inner.init(params),
    )

  def update_fn(
    updates: optax.Updates,
    state: optax.ApplyIfFiniteState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.ApplyIfFiniteState]:
    new_updates, new_inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    is_finite = all_finite(updates, new_updates, new_inner_state)
    notfinite_count = jnp.where(
      is_finite, jnp.zeros([], jnp.int32), _numerics.safe_increment(state.notfinite_count)
    )
    accept = is_finite | (notfinite_count > max_consecutive_errors)

    def select(new: Any, old: Any) -> Any:
      return jax.tree.map(lambda a, b: jnp.where(accept, a, b), new, old)

    return select(new_updates, jax.tree.map(jnp.zeros_like, new_updates)), (
      optax.ApplyIfFiniteState(
        notfinite_count=notfinite_count,
        last_finite=is_finite,
        total_notfinite=jnp.where(
          is_finite, state.total_notfinite, _numerics.safe_increment(state.total_notfinite)
        ),
        inner_state=select(new_inner_state, state.inner_state),
      )
    )

  # What apply_step reads to run the guarded step natively.
  update_fn.amsgrad_jax_guard = (inner, max_consecutive_errors)  # type: ignore[attr-defined]
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
