"""Non-finite gradients: AMSGrad's running maximum never forgets, so guard the step.

Without a guard, one ``inf`` or ``NaN`` gradient makes ``nu_max`` non-finite for the
rest of the run, under every rule. :func:`optax.apply_if_finite` and
:func:`amsgrad_jax.skip_nonfinite` reject such a step: the guarded run equals, bit for
bit, the run in which the bad steps were never taken. Only ``skip_nonfinite`` also
catches a finite gradient that overflows inside the optimizer (``g**2`` beyond the
range of the state's dtype), which leaves the update finite and the coordinate frozen.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _sequences import gradient_sequence, initial_params

import amsgrad_jax
from amsgrad_jax import amsgrad, skip_nonfinite

STEPS = 16
BAD_STEPS = (3, 9, 10)  # one alone, then two in a row
BAD_LEAF, BAD_INDEX = "kernel", (1, 2)
GUARDS: dict[str, Callable[[optax.GradientTransformation, int], Any]] = {
  "optax.apply_if_finite": optax.apply_if_finite,
  "skip_nonfinite": skip_nonfinite,
}


@functools.cache
def jitted_step(tx: optax.GradientTransformation) -> Callable[..., Any]:
  """One compiled step per optimizer, shared by the runs that use it."""

  @jax.jit
  def step(params, state, grad):
    updates, state = tx.update(grad, state, params)
    return optax.apply_updates(params, updates), state

  return step


def run(
  tx: optax.GradientTransformation, params: Any, grads: list[Any]
) -> tuple[list[Any], list[Any]]:
  """Jitted steps; returns the parameters and the state after every step."""
  step = jitted_step(tx)
  state = tx.init(params)
  params_trace, state_trace = [], []
  for grad in grads:
    params, state = step(params, state, grad)
    params_trace.append(params)
    state_trace.append(state)
  return params_trace, state_trace


def poisoned(*values: float) -> list[dict[str, np.ndarray]]:
  """The shared gradient sequence with ``values`` (cycled) at ``BAD_STEPS``."""
  grads = gradient_sequence(STEPS, np.float32)
  for step, value in zip(BAD_STEPS, itertools.cycle(values)):
    grads[step][BAD_LEAF] = grads[step][BAD_LEAF].copy()
    grads[step][BAD_LEAF][BAD_INDEX] = value
  return grads


def amsgrad_state(state: Any) -> amsgrad_jax.ScaleByAmsgradState:
  """The :class:`ScaleByAmsgradState` inside a (possibly guarded) ``amsgrad`` state."""
  if isinstance(state, optax.ApplyIfFiniteState):
    state = state.inner_state
  (found,) = [s for s in state if isinstance(s, amsgrad_jax.ScaleByAmsgradState)]
  return found


def assert_all_finite(tree: Any) -> None:
  for leaf in jax.tree.leaves(tree):
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      assert np.all(np.isfinite(leaf))


BAD_VALUES = pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan], ids=["inf", "-inf", "nan"])


@BAD_VALUES
@pytest.mark.parametrize("convention", amsgrad_jax.CONVENTIONS)
def test_one_bad_gradient_poisons_nu_max_forever_without_a_guard(convention, value):
  tx = amsgrad(1e-2, convention=convention)
  params_trace, state_trace = run(tx, initial_params(np.float32), poisoned(value))
  first_bad = BAD_STEPS[0]
  for step in range(STEPS):
    nu_max = amsgrad_state(state_trace[step]).nu_max[BAD_LEAF]
    param = params_trace[step][BAD_LEAF]
    if step < first_bad:
      assert np.all(np.isfinite(nu_max))
      continue
    # Every later step: the maximum stays non-finite and so does the parameter.
    assert not np.isfinite(nu_max[BAD_INDEX])
    assert not np.isfinite(param[BAD_INDEX])
    # Only that coordinate: the others (and the other leaves) go on normally.
    assert np.isfinite(nu_max).sum() == nu_max.size - 1
    assert_all_finite(amsgrad_state(state_trace[step]).nu_max["bias"])


@pytest.mark.parametrize("guard", list(GUARDS))
@pytest.mark.parametrize("convention", amsgrad_jax.CONVENTIONS)
def test_guarded_run_equals_the_run_without_the_bad_steps(convention, guard):
  """Bit for bit against the same guarded optimizer fed only the good steps (one compiled
  program), and to rounding against plain ``amsgrad``: XLA compiles the guarded step as
  a different program, whose fusions may round the last bit differently."""
  params = initial_params(np.float32)
  guarded = GUARDS[guard](amsgrad(1e-2, convention=convention), 2)
  grads = poisoned(np.inf, np.nan, -np.inf)
  guarded_params, guarded_states = run(guarded, params, grads)
  clean_grads = [g for step, g in enumerate(grads) if step not in BAD_STEPS]
  clean_params, clean_states = run(guarded, params, clean_grads)
  plain_params, plain_states = run(amsgrad(1e-2, convention=convention), params, clean_grads)

  for state in guarded_states:
    assert_all_finite(state)
  jax.tree.map(np.testing.assert_array_equal, guarded_params[-1], clean_params[-1])
  jax.tree.map(
    np.testing.assert_array_equal, guarded_states[-1].inner_state, clean_states[-1].inner_state
  )
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7)
  jax.tree.map(close, guarded_params[-1], plain_params[-1])
  jax.tree.map(close, guarded_states[-1].inner_state, plain_states[-1])
  assert amsgrad_state(guarded_states[-1]).count == STEPS - len(BAD_STEPS)
  assert guarded_states[-1].total_notfinite == len(BAD_STEPS)
  assert [bool(s.last_finite) for s in guarded_states] == [
    step not in BAD_STEPS for step in range(STEPS)
  ]
  # A rejected step leaves the parameters and the state exactly where they were.
  for step in BAD_STEPS:
    jax.tree.map(np.testing.assert_array_equal, guarded_params[step], guarded_params[step - 1])
    jax.tree.map(
      np.testing.assert_array_equal,
      guarded_states[step].inner_state,
      guarded_states[step - 1].inner_state,
    )


@pytest.mark.parametrize("guard", list(GUARDS))
def test_more_bad_steps_in_a_row_than_allowed_are_accepted_and_poison(guard):
  """Both guards give up after ``max_consecutive_errors`` rejections in a row, as Optax
  documents; for AMSGrad that poisons the maximum for good, so pick it large."""
  tx = GUARDS[guard](amsgrad(1e-2), 1)  # the two bad steps in a row at 9, 10: 10 goes in
  _, states = run(tx, initial_params(np.float32), poisoned(np.nan))
  assert_all_finite(states[9])
  for state in states[10:]:
    assert np.isnan(amsgrad_state(state).nu_max[BAD_LEAF][BAD_INDEX])


OVERFLOWS = [
  pytest.param(jnp.float16, 3e4, id="float16-state"),  # (1 - b2) g^2 = 9e5 > 65504
  pytest.param(jnp.bfloat16, 2e19, id="bfloat16-g-squared"),  # g^2 = 4e38 > 3.4e38
  pytest.param(jnp.float32, 2e19, id="float32-g-squared"),
]


def overflow_run(dtype: Any, spike: float) -> tuple[dict[str, jax.Array], list[dict[str, Any]]]:
  params = {"w": jnp.ones(3, dtype)}
  grads = [{"w": jnp.full(3, 0.1, dtype)} for _ in range(8)]
  grads[2] = {"w": jnp.array([0.1, spike, 0.1], dtype)}
  return params, grads


@pytest.mark.parametrize(("dtype", "spike"), OVERFLOWS)
def test_apply_if_finite_misses_an_overflow_inside_the_state(dtype, spike):
  """The gradient is finite, so Optax's guard lets the step through; ``nu_max`` becomes
  ``inf`` and the coordinate's update is zero from then on, with no error counted."""
  params, grads = overflow_run(dtype, spike)
  params_trace, states = run(optax.apply_if_finite(amsgrad(1e-2), 100), params, grads)
  assert all(state.total_notfinite == 0 for state in states)
  for step in range(2, len(grads)):
    assert np.isposinf(amsgrad_state(states[step]).nu_max["w"][1])
  assert params_trace[-1]["w"][1] == params_trace[2]["w"][1]  # frozen after the spike
  others = np.array([0, 2])
  assert np.all(params_trace[-1]["w"][others] < params_trace[2]["w"][others])  # the others move


@pytest.mark.parametrize(("dtype", "spike"), OVERFLOWS)
def test_skip_nonfinite_rejects_an_overflow_inside_the_state(dtype, spike):
  params, grads = overflow_run(dtype, spike)
  guarded = skip_nonfinite(amsgrad(1e-2), 100)
  params_trace, states = run(guarded, params, grads)
  clean_params, clean_states = run(guarded, params, grads[:2] + grads[3:])
  assert [int(state.total_notfinite) for state in states] == [0, 0] + [1] * 6
  for state in states:
    assert_all_finite(state)
  jax.tree.map(np.testing.assert_array_equal, params_trace[-1], clean_params[-1])
  jax.tree.map(np.testing.assert_array_equal, states[-1].inner_state, clean_states[-1].inner_state)


def test_skip_nonfinite_matches_apply_if_finite_state_and_extra_args():
  """Same state type and fields as Optax's guard, and extra arguments reach the inner one."""
  params = initial_params(np.float32)
  ours = skip_nonfinite(amsgrad(1e-2), 3)
  theirs = optax.apply_if_finite(amsgrad(1e-2), 3)
  our_state, their_state = ours.init(params), theirs.init(params)
  assert type(our_state) is type(their_state)
  assert jax.tree.structure(our_state) == jax.tree.structure(their_state)
  grads = gradient_sequence(1, np.float32)[0]
  updates, _ = jax.jit(lambda g, s, p: ours.update(g, s, p, unused_extra_arg=1.0))(
    grads, our_state, params
  )
  expected, _ = jax.jit(theirs.update)(grads, their_state, params)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6), updates, expected)


@pytest.mark.parametrize("bad", [-1, 1.5, True, None, "3"])
def test_skip_nonfinite_validates_max_consecutive_errors(bad):
  with pytest.raises(ValueError, match=r"^max_consecutive_errors must be an int >= 0"):
    skip_nonfinite(amsgrad(1e-2), bad)
