"""convention="keras" reproduces keras.optimizers.Adam(amsgrad=True) (Keras 3, JAX backend).

Keras runs here on the same parameters and gradients (float32, 120 steps, spikes
and zeros), and its variables are compared with ours after every step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _peers import require
from _sequences import gradient_sequence, initial_params
from test_parity_torch import assert_trajectories_close, run_ours

import amsgrad_jax

pytestmark = pytest.mark.keras

STEPS = 120


def run_keras(params0, grads, *, lr, b1, b2, eps):
  keras = require("keras")
  assert keras.backend.backend() == "jax", "the parity test runs Keras on its JAX backend"
  # Keras mixes dtypes internally (its int64 iteration counter with float32 variables).
  with jax.numpy_dtype_promotion("standard"):
    variables = {name: keras.Variable(value, dtype="float32") for name, value in params0.items()}
    opt = keras.optimizers.Adam(learning_rate=lr, beta_1=b1, beta_2=b2, epsilon=eps, amsgrad=True)
    trajectory = []
    for tree in grads:
      pairs = [(jnp.asarray(tree[name]), variable) for name, variable in variables.items()]
      opt.apply_gradients(pairs)
      trajectory.append({name: np.asarray(v.value) for name, v in variables.items()})
  return trajectory


@pytest.mark.parametrize(
  "hyper",
  [
    dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-7),
    dict(lr=1e-2, b1=0.0, b2=0.99, eps=1e-4),
    dict(lr=3e-2, b1=0.5, b2=0.9, eps=1e-3),
  ],
  ids=["keras-defaults", "b1=0", "large-eps"],
)
def test_matches_keras_every_step(hyper):
  params0, grads = initial_params(np.float32), gradient_sequence(STEPS, np.float32)
  tx = amsgrad_jax.amsgrad(
    hyper["lr"], b1=hyper["b1"], b2=hyper["b2"], eps=hyper["eps"], convention="keras"
  )
  ours = run_ours(tx, params0, grads)
  theirs = run_keras(params0, grads, **hyper)
  assert_trajectories_close(ours, theirs, rtol=1e-5)


def test_keras_and_pytorch_conventions_differ_where_eps_sits():
  """With a large eps the two rules give measurably different steps (the test above
  therefore pins down the Keras rule, not just Adam in general)."""
  params0, grads = initial_params(np.float32), gradient_sequence(20, np.float32)
  rules = {
    c: run_ours(amsgrad_jax.amsgrad(3e-2, b1=0.5, b2=0.9, eps=1e-3, convention=c), params0, grads)
    for c in ("keras", "pytorch")
  }
  gap = max(float(np.max(np.abs(rules["keras"][-1][n] - rules["pytorch"][-1][n]))) for n in params0)
  assert gap > 1e-4
