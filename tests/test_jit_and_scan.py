"""The optimizer state is a fixed pytree of fixed avals: a jitted step compiles once,
and the state can be the carry of ``lax.scan``.

``lax.scan`` refuses a body whose carry changes shape, dtype or weak type, so a
scan of 100 steps is itself the check that nothing drifts; it is run for every
parameter dtype the library supports and every convention.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amsgrad_jax

SCAN_STEPS = 100
DTYPES = ["float32", "bfloat16", "float16", "float64", "complex64"]


def avals(tree):
  """Shape, dtype and weak type of every leaf: what a recompilation would key on."""
  return jax.tree.map(jax.typeof, tree)


def quadratic_problem(dtype, seed: int = 0):
  """Parameters and a target; the gradient of ``|p - target|^2`` is ``2 (p - target)``."""
  rng = np.random.default_rng(seed)
  shapes = {"kernel": (4, 3), "bias": (3,), "scalar": ()}

  def draw(shape):
    x = rng.standard_normal(shape)
    if np.dtype(dtype).kind == "c":
      x = x + 1j * rng.standard_normal(shape)
    return jnp.asarray(x, dtype)

  params = {name: draw(shape) for name, shape in shapes.items()}
  target = {name: draw(shape) for name, shape in shapes.items()}
  return params, target


def gradient(params, target):
  return jax.tree.map(lambda p, t: (p - t) * jnp.asarray(2, p.dtype), params, target)


def distance(params, target) -> float:
  return sum(
    float(np.sum(np.abs(np.asarray(p, np.complex128) - np.asarray(t, np.complex128)) ** 2))
    for p, t in zip(jax.tree.leaves(params), jax.tree.leaves(target), strict=True)
  )


def x64_if(dtype):
  return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


@pytest.mark.parametrize("convention", amsgrad_jax.CONVENTIONS)
def test_jitted_step_traces_and_compiles_once_for_many_steps(convention):
  def schedule(count):  # a traced step count must not cause a retrace either
    return 1e-2 * jnp.power(jnp.float32(0.95), count.astype(jnp.float32))

  tx = amsgrad_jax.amsgrad(schedule, convention=convention, weight_decay=1e-3)
  params, target = quadratic_problem(np.float32)
  traces = []

  @jax.jit
  def step(params, state, target):
    traces.append(None)  # runs only while tracing
    updates, state = tx.update(gradient(params, target), state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  before = (avals(params), avals(state))
  for _ in range(25):
    params, state = step(params, state, target)
  assert len(traces) == 1
  assert step._cache_size() == 1  # one executable: no recompilation on a changed aval
  assert (avals(params), avals(state)) == before
  assert int(state[1].count) == 25


def test_init_state_avals_do_not_depend_on_jit():
  """An eager init and a jitted one give the same avals, so either can feed a jitted step."""
  tx = amsgrad_jax.amsgrad(1e-2)
  params, _ = quadratic_problem(np.float32)
  assert avals(tx.init(params)) == avals(jax.jit(tx.init)(params))


@pytest.mark.parametrize("convention", amsgrad_jax.CONVENTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_state_is_a_scan_carry_for_100_steps(dtype, convention):
  with x64_if(dtype):
    tx = amsgrad_jax.amsgrad(1e-2, convention=convention)
    params, target = quadratic_problem(jnp.dtype(dtype))
    state = tx.init(params)
    initial_avals = (avals(params), avals(state))

    def body(carry, _):
      params, state = carry
      updates, state = tx.update(gradient(params, target), state, params)
      return (optax.apply_updates(params, updates), state), None

    (final_params, final_state), _ = jax.jit(
      lambda carry: jax.lax.scan(body, carry, length=SCAN_STEPS)
    )((params, state))

    assert (avals(final_params), avals(final_state)) == initial_avals
    assert int(final_state[1].count) == SCAN_STEPS  # chain: (decay, amsgrad, learning rate)
    for leaf in jax.tree.leaves(final_params):
      assert bool(jnp.all(jnp.isfinite(leaf)))
    # 100 steps of at most ~lr each: the parameters move toward the target.
    assert distance(final_params, target) < 0.9 * distance(params, target)
