"""scale_by_amsgrad composes with the rest of Optax as any Optax transform does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _sequences import gradient_sequence, initial_params, run_steps

import amsgrad_jax

STEPS = 30


def trajectory(tx, params0=None, grads=None, jit=True):
  params0 = initial_params(np.float32) if params0 is None else params0
  grads = gradient_sequence(STEPS, np.float32) if grads is None else grads
  return [params for params, _ in run_steps(tx, params0, grads, jit=jit)]


def assert_same(a, b, rtol=0.0):
  """Equal, or within ``rtol`` relative to each leaf's magnitude."""
  for x, y in zip(a, b, strict=True):
    for name in y:
      scale = float(np.max(np.abs(y[name]), initial=0.0))
      np.testing.assert_allclose(x[name], y[name], rtol=rtol, atol=rtol * scale, err_msg=name)


@pytest.mark.parametrize("convention", amsgrad_jax.CONVENTIONS)
def test_chain_with_scale_equals_the_alias(convention):
  chained = optax.chain(amsgrad_jax.scale_by_amsgrad(convention=convention), optax.scale(-1e-2))
  assert_same(trajectory(chained), trajectory(amsgrad_jax.amsgrad(1e-2, convention=convention)))


def test_coupled_weight_decay_is_added_to_the_gradient():
  wd = 0.3
  chained = optax.chain(
    optax.add_decayed_weights(wd), amsgrad_jax.scale_by_amsgrad(), optax.scale(-1e-2)
  )
  assert_same(trajectory(chained), trajectory(amsgrad_jax.amsgrad(1e-2, weight_decay=wd)))


def test_decoupled_weight_decay_with_mask():
  mask = {"kernel": True, "bias": False, "scalar": False, "conv": True}
  chained = optax.chain(
    amsgrad_jax.scale_by_amsgrad(), optax.add_decayed_weights(0.1, mask), optax.scale(-1e-2)
  )
  ours = trajectory(amsgrad_jax.amsgradw(1e-2, weight_decay=0.1, mask=mask))
  assert_same(chained and trajectory(chained), ours)
  undecayed = trajectory(amsgrad_jax.amsgrad(1e-2))
  np.testing.assert_array_equal(ours[-1]["bias"], undecayed[-1]["bias"])
  assert not np.array_equal(ours[-1]["kernel"], undecayed[-1]["kernel"])


def test_clip_by_global_norm_before_the_transform():
  grads = gradient_sequence(STEPS, np.float32)
  clipped = [optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())[0] for g in grads]
  tx = optax.chain(optax.clip_by_global_norm(1.0), amsgrad_jax.amsgrad(1e-2))
  reference = trajectory(amsgrad_jax.amsgrad(1e-2), grads=clipped)  # clipped eagerly: 1-ulp apart
  assert_same(trajectory(tx, grads=grads), reference, rtol=1e-6)


def test_masked_updates_only_the_selected_leaves():
  mask = {"kernel": True, "bias": True, "scalar": False, "conv": False}
  tx = optax.chain(optax.masked(amsgrad_jax.scale_by_amsgrad(), mask), optax.scale(-1e-2))
  params0 = initial_params(np.float32)
  final = trajectory(tx)[-1]
  reference = trajectory(amsgrad_jax.amsgrad(1e-2))[-1]
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(final[name], reference[name])
  # Unselected leaves receive the raw gradient, scaled: plain SGD.
  sgd = trajectory(optax.sgd(1e-2))[-1]
  for name in ("scalar", "conv"):
    np.testing.assert_allclose(final[name], sgd[name], rtol=1e-6)
    assert not np.allclose(final[name], params0[name])


def test_multisteps_accumulates_then_steps():
  k = 3
  grads = gradient_sequence(STEPS, np.float32)
  means = [jax.tree.map(lambda *g: sum(g) / k, *grads[i : i + k]) for i in range(0, STEPS, k)]
  with jax.numpy_dtype_promotion("standard"):  # MultiSteps itself mixes int and float
    every_k = trajectory(
      optax.MultiSteps(amsgrad_jax.amsgrad(1e-2), every_k_schedule=k), grads=grads
    )
  once = trajectory(amsgrad_jax.amsgrad(1e-2), grads=means)
  for i, params in enumerate(once):
    for expected, got in zip(
      jax.tree.leaves(every_k[k * i + k - 1]), jax.tree.leaves(params), strict=True
    ):
      np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_learning_rate_schedule():
  schedule = optax.exponential_decay(1e-2, transition_steps=5, decay_rate=0.5)
  chained = optax.chain(
    amsgrad_jax.scale_by_amsgrad(), optax.scale_by_schedule(lambda c: -schedule(c))
  )
  assert_same(trajectory(chained), trajectory(amsgrad_jax.amsgrad(schedule)), rtol=1e-7)
  constant = trajectory(amsgrad_jax.amsgrad(1e-2))
  assert not np.allclose(
    trajectory(amsgrad_jax.amsgrad(schedule))[-1]["kernel"], constant[-1]["kernel"]
  )


@pytest.mark.parametrize("convention", amsgrad_jax.CONVENTIONS)
def test_inject_hyperparams_traced_under_jit(convention):
  hyper = dict(learning_rate=1e-2, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.01)
  injected = optax.inject_hyperparams(amsgrad_jax.amsgrad)(**hyper, convention=convention)
  # Injected hyperparameters are float32 arrays, so 1 - b is formed in float32 rather
  # than in double precision as for Python floats: a few ulps apart after 30 steps.
  assert_same(
    trajectory(injected), trajectory(amsgrad_jax.amsgrad(**hyper, convention=convention)), 1e-5
  )


def test_inject_hyperparams_changes_take_effect_without_recompiling():
  injected = optax.inject_hyperparams(amsgrad_jax.amsgrad)(learning_rate=1e-2)
  params = jnp.ones(3)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(None)
    updates, state = injected.update(jnp.ones(3), state, params)
    return optax.apply_updates(params, updates), state

  state = injected.init(params)
  p1, _ = step(params, state)
  state.hyperparams["learning_rate"] = jnp.asarray(1e-1, jnp.float32)
  p2, _ = step(params, state)
  np.testing.assert_allclose(1.0 - p1, 1e-2, rtol=1e-5)
  np.testing.assert_allclose(1.0 - p2, 1e-1, rtol=1e-5)
  assert len(traces) == 1


def test_works_unjitted_too():
  assert_same(
    trajectory(amsgrad_jax.amsgrad(1e-2), jit=False), trajectory(amsgrad_jax.amsgrad(1e-2)), 1e-6
  )
