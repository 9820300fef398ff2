"""Flax integrations: ``nnx.Optimizer(model, amsgrad(...), wrt=nnx.Param)`` and a linen
``TrainState`` both train a small model.

The problem: a 2-16-1 MLP fits ``y = sin(x0) + x1 / 2`` on 128 fixed points, 150
full-batch steps; both runs must cut the loss at least fiftyfold (measured: from 0.29
and 0.26 to 0.0006-0.0021, depending on the rule).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _peers import require

import amsgrad_jax

STEPS = 150


def dataset():
  rng = np.random.default_rng(0)
  inputs = rng.uniform(-2.0, 2.0, (128, 2)).astype(np.float32)
  targets = (np.sin(inputs[:, :1]) + 0.5 * inputs[:, 1:]).astype(np.float32)
  return jnp.asarray(inputs), jnp.asarray(targets)


def mean_squared_error(predictions, targets):
  return jnp.mean(jnp.square(predictions - targets))


# The integration does not depend on the rule: each rule runs under one of the two.
@pytest.mark.parametrize("convention", ["pytorch", "keras"])
def test_nnx_optimizer_trains_a_model(convention):
  nnx = require("flax.nnx")
  inputs, targets = dataset()

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(2, 16, rngs=rngs)
      self.out = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
      return self.out(jnp.tanh(self.hidden(x)))

  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(
    model, amsgrad_jax.amsgrad(0.05, convention=convention, weight_decay=1e-4), wrt=nnx.Param
  )

  def loss_fn(model):
    return mean_squared_error(model(inputs), targets)

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  initial = float(loss_fn(model))
  for _ in range(STEPS):
    train_step(model, optimizer)
  final = float(loss_fn(model))
  print(f"loss {initial:.4f} -> {final:.4f}")
  assert final < 0.02 * initial, (initial, final)
  assert int(optimizer.step[...]) == STEPS


@pytest.mark.parametrize("convention", ["optax", "paper"])
def test_linen_train_state_trains_a_model(convention):
  linen = require("flax.linen")
  train_state = require("flax.training.train_state")
  inputs, targets = dataset()

  class MLP(linen.Module):
    @linen.compact
    def __call__(self, x):
      return linen.Dense(1)(jnp.tanh(linen.Dense(16)(x)))

  model = MLP()
  state = train_state.TrainState.create(
    apply_fn=model.apply,
    params=model.init(jax.random.key(0), inputs)["params"],
    tx=amsgrad_jax.amsgradw(0.05, convention=convention, weight_decay=1e-4),
  )

  def loss_fn(params):
    return mean_squared_error(model.apply({"params": params}, inputs), targets)

  @jax.jit
  def train_step(state):
    return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))

  initial = float(loss_fn(state.params))
  for _ in range(STEPS):
    state = train_step(state)
  final = float(loss_fn(state.params))
  print(f"loss {initial:.4f} -> {final:.4f}")
  assert final < 0.02 * initial, (initial, final)
  assert int(state.step) == STEPS
