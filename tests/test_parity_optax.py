"""convention="optax" reproduces optax.amsgrad; convention="paper" reproduces
optax.amsgrad with both bias corrections off (Reddi et al., Algorithm 2).

Parameters *and* the whole state (count, mu, nu, nu_max) are compared after every
step, in float64 (to 1e-12) and float32 (to 2e-6, a few ulps of rounding order).
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from _sequences import gradient_sequence, initial_params, run_steps

import amsgrad_jax

STEPS = 120
RTOL = {np.float64: 1e-12, np.float32: 2e-6, np.complex64: 2e-6}


def reference_for(convention: str, **hyper) -> optax.GradientTransformation:
  if convention == "optax":
    return optax.amsgrad(**hyper)
  return optax.amsgrad(**hyper, bias_correction_mu=False, bias_correction_nu=False)


def amsgrad_state(state):
  """The ScaleByAmsgradState inside optax.chain's state (ours or optax's)."""
  return next(s for s in state if hasattr(s, "nu_max"))


def assert_close(a, b, rtol):
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol * float(np.max(np.abs(y), initial=1e-30))
    ),
    a,
    b,
  )


@pytest.mark.parametrize("convention", ["optax", "paper"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.complex64], ids=str)
@pytest.mark.parametrize(
  "hyper",
  [
    dict(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0),
    dict(learning_rate=1e-2, b1=0.0, b2=0.99, eps=1e-6, eps_root=1e-10),
    dict(learning_rate=3e-2, b1=0.5, b2=0.9, eps=0.0, eps_root=1e-4),
  ],
  ids=["default", "b1=0-eps_root", "eps=0"],
)
def test_matches_optax_every_step(hyper, dtype, convention):
  params0, grads = initial_params(dtype), gradient_sequence(STEPS, dtype)
  with jax.enable_x64(dtype == np.float64):
    ours = run_steps(amsgrad_jax.amsgrad(**hyper, convention=convention), params0, grads)
    with jax.numpy_dtype_promotion("standard"):  # optax computes b**count with an int count
      theirs = list(run_steps(reference_for(convention, **hyper), params0, grads))
    for (p_ours, s_ours), (p_ref, s_ref) in zip(ours, theirs, strict=True):
      assert_close(p_ours, p_ref, RTOL[dtype])
      a, b = amsgrad_state(s_ours), amsgrad_state(s_ref)
      assert int(a.count) == int(b.count)
      for name in ("mu", "nu", "nu_max"):
        assert_close(getattr(a, name), getattr(b, name), RTOL[dtype])


def test_optax_convention_is_not_pytorch():
  """On spiky gradients the two rules end far apart; this is why conventions exist."""
  params0, grads = initial_params(np.float64), gradient_sequence(STEPS, np.float64)
  with jax.enable_x64(True):
    final = {
      c: list(run_steps(amsgrad_jax.amsgrad(1e-2, convention=c), params0, grads))[-1][0]
      for c in ("optax", "pytorch")
    }
  gap = max(float(np.max(np.abs(final["optax"][n] - final["pytorch"][n]))) for n in params0)
  assert gap > 1e-3
