"""Stochastic rounding of bfloat16 and float16 parameter writes (``param_rounding``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amsgrad_jax
from amsgrad_jax import _rounding

NARROW = [jnp.bfloat16, jnp.float16]


@pytest.mark.parametrize("dtype", NARROW)
@pytest.mark.parametrize("value", [1.0 + 2.0**-10, -3.3e-5, 1234.567, 2.0**-20])
def test_rounding_is_unbiased_and_lands_on_a_neighbour(dtype, value):
  x = jnp.full((100_000,), value, jnp.float32)
  bits = _rounding.leaf_bits(_rounding.step_key(7, jnp.int32(3)), 0, x.shape)
  rounded = _rounding.stochastic_round(x, dtype, bits)
  neighbours = np.unique(np.asarray(rounded.astype(jnp.float32)))
  assert len(neighbours) <= 2
  assert neighbours.min() <= value <= neighbours.max()
  spacing = float(neighbours.max() - neighbours.min()) or abs(value)
  mean = float(jnp.mean(rounded.astype(jnp.float32)))
  assert abs(mean - value) < 0.02 * spacing  # ~6 standard errors of 100k draws


@pytest.mark.parametrize("dtype", NARROW)
def test_exact_and_special_values_are_kept(dtype):
  x = jnp.asarray([0.0, -0.0, 1.0, -2.5, jnp.inf, -jnp.inf, jnp.nan], jnp.float32)
  bits = _rounding.leaf_bits(_rounding.step_key(0, jnp.int32(1)), 0, x.shape)
  rounded = np.asarray(_rounding.stochastic_round(x, dtype, bits).astype(jnp.float32))
  np.testing.assert_array_equal(rounded[:6], np.asarray(x[:6]))
  assert np.isnan(rounded[6])


def test_bfloat16_rounding_never_carries_a_finite_value_into_infinity():
  """Above bfloat16's largest finite value (but finite in float32) the random carry would
  reach infinity: the value is truncated to the largest finite bfloat16 instead."""
  largest = float(jnp.finfo(jnp.bfloat16).max)
  x = jnp.full((10_000,), largest, jnp.float32) * np.float32(1.0 + 2.0**-10)
  x = jnp.concatenate([x, -x])
  bits = _rounding.leaf_bits(_rounding.step_key(3, jnp.int32(2)), 0, x.shape)
  rounded = np.asarray(_rounding.stochastic_round(x, jnp.bfloat16, bits).astype(jnp.float32))
  assert np.all(np.isfinite(rounded))
  np.testing.assert_array_equal(np.abs(rounded), largest)


def test_bfloat16_rounding_is_symmetric_in_sign():
  """The carry goes into the magnitude: -x rounds to exactly -(x's rounding)."""
  x = jax.random.normal(jax.random.key(0), (4096,)) * 3.0
  bits = _rounding.leaf_bits(_rounding.step_key(5, jnp.int32(9)), 2, x.shape)
  up = _rounding.stochastic_round(x, jnp.bfloat16, bits)
  down = _rounding.stochastic_round(-x, jnp.bfloat16, bits)
  np.testing.assert_array_equal(np.asarray(-up.astype(jnp.float32)), np.asarray(down, np.float32))


def train(mode, dtype=jnp.bfloat16, steps=200, seed=0, lr=1e-4, start=None, state=None):
  """Constant gradients and a learning rate far below bfloat16's spacing at 1."""
  params = {"w": jnp.ones((4096,), dtype)} if start is None else start
  tx = amsgrad_jax.amsgrad(lr, param_rounding=mode, rounding_seed=seed, mu_dtype=jnp.float32)
  state = tx.init(params) if state is None else state

  @jax.jit
  def step(p, s):
    updates, s = tx.update(jax.tree.map(jnp.ones_like, p), s, p)
    return optax.apply_updates(p, updates), s

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


@pytest.mark.parametrize("dtype", NARROW)
def test_small_steps_are_kept_in_expectation(dtype):
  nearest, _ = train("nearest", dtype)
  stochastic, _ = train("stochastic", dtype)
  expected = 1.0 - 200 * 1e-4
  if dtype == jnp.bfloat16:  # 1e-4 is under half of bfloat16's spacing at 1 (2**-8)
    assert bool(jnp.all(nearest["w"] == 1))
  assert abs(float(jnp.mean(stochastic["w"].astype(jnp.float32))) - expected) < 1e-3


def test_the_bits_are_fixed_by_the_seed_and_the_step_and_repeat_on_resume():
  first, _ = train("stochastic", steps=20, seed=1)
  again, _ = train("stochastic", steps=20, seed=1)
  other, _ = train("stochastic", steps=20, seed=2)
  assert bool(jnp.all(first["w"] == again["w"]))
  assert not bool(jnp.all(first["w"] == other["w"]))
  half, state = train("stochastic", steps=10, seed=1)
  resumed, _ = train("stochastic", steps=10, seed=1, start=half, state=state)
  assert bool(jnp.all(resumed["w"] == first["w"]))


@pytest.mark.parametrize("dtype", NARROW)
def test_updates_land_apply_updates_on_the_rounded_value(dtype):
  """Exactly where the parameter and its rounded new value are within a factor of two (a
  training step), and within one spacing anywhere (a tiny parameter crossing zero)."""
  rng = np.random.default_rng(0)
  n = 100_000
  p = jnp.asarray(rng.standard_normal(n) * np.exp(rng.uniform(-8, 2, n)), dtype)
  u = jnp.asarray(rng.standard_normal(n) * 1e-2, dtype)
  key = _rounding.step_key(0, jnp.int32(5))
  emitted = _rounding.rounded_updates({"p": p}, {"p": u}, 0, jnp.int32(5))["p"]
  wide = p.astype(jnp.float32) + u.astype(jnp.float32)
  target = _rounding.stochastic_round(wide, dtype, _rounding.leaf_bits(key, 0, p.shape))
  landed = jax.jit(optax.apply_updates)({"p": p}, {"p": emitted})["p"]
  p32, q32, got = (np.asarray(x.astype(jnp.float32)) for x in (p, target, landed))
  close = (
    (np.sign(p32) == np.sign(q32))
    & (np.abs(q32) <= 2 * np.abs(p32))
    & (np.abs(p32) <= 2 * np.abs(q32))
  )
  assert close.mean() > 0.5
  np.testing.assert_array_equal(got[close], q32[close])
  spacing = np.maximum(
    *(
      np.abs(np.asarray(_rounding._next(target, up).astype(jnp.float32)) - q32)
      for up in (True, False)
    )
  )
  assert np.all(np.abs(got - q32) <= spacing)
  assert np.mean(got == q32) > 0.97


def test_wider_parameters_are_unaffected():
  nearest, _ = train("nearest", jnp.float32, steps=20, lr=1e-2)
  stochastic, _ = train("stochastic", jnp.float32, steps=20, lr=1e-2)
  assert bool(jnp.all(nearest["w"] == stochastic["w"]))


def test_works_through_nnx_optimizer():
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(64, 64, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
  tx = amsgrad_jax.amsgrad(1e-4, param_rounding="stochastic")
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  before = np.asarray(model.kernel[...].astype(jnp.float32))

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 64), jnp.bfloat16)).astype(jnp.float32)))(
      model
    )
    optimizer.update(model, grads)

  for _ in range(50):
    step(model, optimizer)
  moved = np.asarray(model.kernel[...].astype(jnp.float32)) - before
  # every kernel element has gradient 1: it moves by 50 * 1e-4 on average, not by 0
  assert abs(float(np.mean(moved)) + 50 * 1e-4) < 1e-3


def test_stochastic_rounding_needs_params_and_checks_its_options():
  tx = amsgrad_jax.amsgrad(1e-3, param_rounding="stochastic")
  state = tx.init({"w": jnp.ones(3, jnp.bfloat16)})
  with pytest.raises(ValueError, match=r"needs them: call tx\.update"):
    tx.update({"w": jnp.ones(3, jnp.bfloat16)}, state)
  with pytest.raises(ValueError, match='param_rounding must be "nearest" or "stochastic"'):
    amsgrad_jax.amsgradw(1e-3, param_rounding="up")
  for seed in (-1, 2**32, 1.5, "0"):
    with pytest.raises(ValueError, match="rounding_seed must be an integer"):
      amsgrad_jax.amsgrad(1e-3, rounding_seed=seed)


def test_stochastic_bfloat16_state_keeps_the_moving_average_of_nu():
  """Rounded to nearest, a bfloat16 ``nu`` stalls once a step's change is under half its
  spacing (from 0.1 toward 1 with unit gradients, at 0.25: 0.999 * 0.25 + 0.001 rounds
  back to 0.25); stochastically it follows float32's."""
  params = {"w": jnp.zeros((4096,))}
  results = {}
  for rounding in ("nearest", "stochastic", None):
    dtype = None if rounding is None else jnp.bfloat16
    tx = amsgrad_jax.scale_by_amsgrad(mu_dtype=dtype, nu_dtype=dtype, state_rounding=rounding)
    state = tx.init(params)
    update = jax.jit(tx.update)
    _, state = update({"w": jnp.full((4096,), 10.0)}, state)
    for _ in range(1000):
      _, state = update({"w": jnp.ones((4096,))}, state)
    results[rounding] = float(jnp.mean(state.nu["w"].astype(jnp.float32)))
  assert abs(results["stochastic"] - results[None]) < 0.01 * results[None]
  assert abs(results["nearest"] - results[None]) > 0.3 * results[None]


def test_the_moments_random_bits_are_uniform_and_independent():
  """One hash per element: both 16-bit halves uniform, uncorrelated with each other, with
  the neighbouring element's, with the same element's at the next step and in the next
  leaf (the draws of stochastic rounding must not repeat a pattern)."""
  shape = (256, 256)

  def halves(count, leaf):
    bits = np.asarray(_rounding.moment_bits(_rounding.step_key(7, jnp.int32(count)), leaf, shape))
    return (bits & 0xFFFF) / 2.0**16, (bits >> 16) / 2.0**16

  low, high = halves(1, 0)
  next_step, _ = halves(2, 0)
  next_leaf, _ = halves(1, 1)
  n = low.size
  for u in (low, high):
    assert abs(u.mean() - 0.5) < 4 / np.sqrt(12 * n)
    counts = np.histogram(u, bins=16, range=(0, 1))[0]
    assert counts.min() > 0.9 * n / 16
    assert counts.max() < 1.1 * n / 16

  def correlation(a, b):
    return abs(np.corrcoef(a.ravel(), b.ravel())[0, 1])

  for other in (high, next_step, next_leaf, np.roll(low, 1)):
    assert correlation(low, other) < 4 / np.sqrt(n)
