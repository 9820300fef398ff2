"""The online counterexample of Reddi et al. (2018), Section 5.

f_t(x) = 1010 x if t mod 101 == 1 else -10 x, on [-1, 1] (projected after every
step), b1 = 0.9, b2 = 0.99, step size alpha / sqrt(t). The optimum is x = -1.
Adam is pushed to the worst point x = +1; AMSGrad, under every rule, goes to -1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

import amsgrad_jax

PERIOD, SPIKE, SLOPE = 101, 1010.0, -10.0
STEPS = PERIOD * 2000
ALPHA = 0.5


def online_run(direction: optax.GradientTransformation, steps: int = STEPS) -> jax.Array:
  """The iterates x_1..x_T of projected online descent with step ALPHA / sqrt(t)."""
  tx = optax.chain(
    direction,
    optax.scale_by_schedule(lambda count: -ALPHA / jnp.sqrt((count + 1).astype(jnp.float32))),
  )

  def step(carry, t):
    x, state = carry
    g = jnp.where(t % PERIOD == 1, SPIKE, SLOPE)
    update, state = tx.update(g, state, x)
    x = jnp.clip(x + update, -1.0, 1.0)
    return (x, state), x

  x0 = jnp.float32(0.0)
  _, xs = jax.lax.scan(step, (x0, tx.init(x0)), jnp.arange(1, steps + 1))
  return xs


def average_regret(xs: jax.Array) -> jax.Array:
  """R_T / T, the average regret against the best fixed point x* = -1."""
  t = jnp.arange(1, xs.shape[0] + 1)
  slope = jnp.where(t % PERIOD == 1, SPIKE, SLOPE)
  return jnp.mean(slope * xs - slope * -1.0)


@jax.jit
def _adam_iterates():
  with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes int and float
    return online_run(optax.scale_by_adam(b1=0.9, b2=0.99))


def test_adam_goes_to_the_wrong_end():
  xs = _adam_iterates()
  assert float(xs[-1]) > 0.99
  # At x = +1 every period of 101 steps costs 1010 * 2 - 100 * 10 * 2 = 20 in regret.
  assert float(average_regret(xs)) > 0.8 * 20 / PERIOD


@pytest.mark.parametrize("convention", amsgrad_jax.CONVENTIONS)
def test_amsgrad_goes_to_the_optimum(convention):
  tx = amsgrad_jax.scale_by_amsgrad(b1=0.9, b2=0.99, convention=convention)
  xs = jax.jit(lambda: online_run(tx))()
  assert float(xs[-1]) < -0.95
  assert float(jnp.mean(xs[-PERIOD * 100 :])) < -0.9
  assert float(average_regret(xs)) < 0.5 * float(average_regret(_adam_iterates()))
