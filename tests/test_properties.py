r"""Property-based invariants of every rule, over random finite gradients and hyperparameters.

For every rule and every step ``t``: ``nu_max`` never decreases; it bounds the second
moment it covers (:math:`v_t` for pytorch, keras and paper; :math:`v_t / c_2` for
optax); updates and state stay finite; and :math:`|u_t|` obeys the bound derived below.

**The bound on the update.** With :math:`m_0 = v_0 = 0`,

.. math::

  m_t = (1-\beta_1)\sum_{i=1}^t \beta_1^{t-i} g_i, \qquad
  v_t = (1-\beta_2)\sum_{i=1}^t \beta_2^{t-i} g_i^2 .

*(a) Cauchy-Schwarz.* Write :math:`\beta_1^{t-i} g_i = (\beta_1/\sqrt{\beta_2})^{t-i}
\cdot \sqrt{\beta_2}^{\,t-i} g_i`; then, with :math:`\gamma = \beta_1^2/\beta_2`,

.. math::

  |m_t| \le (1-\beta_1)\sqrt{S_t}\,\sqrt{v_t/(1-\beta_2)}, \qquad
  S_t = \sum_{k=0}^{t-1} \gamma^k ,

for any :math:`\beta_1, \beta_2 \in [0, 1)` (:math:`S_t = \infty` for :math:`t \ge 2`
when :math:`\beta_2 = 0`). It is attained by :math:`g_i \propto (\beta_1/\beta_2)^{t-i}`
(tested below). When :math:`\beta_1^2 < \beta_2`, :math:`S_t < 1/(1-\gamma)`; the classic
bound :math:`\frac{1-\beta_1}{\sqrt{1-\beta_2}}\frac{1}{1-\beta_1/\sqrt{\beta_2}}` comes
from the triangle inequality instead and is looser, since
:math:`1/(1-\sqrt\gamma) \ge 1/\sqrt{1-\gamma}` (4.4 times looser at 0.9, 0.999).

*(b) The running maximum.* AMSGrad remembers every :math:`v_i`, and
:math:`v_i \ge (1-\beta_2) g_i^2`, so :math:`|g_i| \le \sqrt{V_t/(1-\beta_2)}` with
:math:`V_t = \max_{i \le t} v_i`, and :math:`|m_t| \le c_1 \sqrt{V_t/(1-\beta_2)}`
(:math:`c_1 = 1 - \beta_1^t`, :math:`c_2 = 1-\beta_2^t`). This needs no condition on
:math:`\gamma`, and is attained when :math:`\beta_2 = 0` and the gradients are equal.

Both (a) and (b) bound :math:`|m_t|/\sqrt{V_t}` by
:math:`R_t = \min\big((1-\beta_1)\sqrt{S_t},\ c_1\big)/\sqrt{1-\beta_2}`.

*Per rule*, since ``eps >= 0`` and ``eps_root >= 0`` only enlarge the denominator:

* paper, :math:`u = m/(\sqrt{\hat v}+\epsilon)` with :math:`\hat v_t \ge V_t`:
  :math:`|u_t| \le R_t`.
* pytorch, :math:`u = (m/c_1)/(\sqrt{\hat v/c_2}+\epsilon)`, and keras,
  :math:`u = \frac{\sqrt{c_2}}{c_1} m/(\sqrt{\hat v}+\epsilon)`, with :math:`\hat v_t \ge V_t`:
  :math:`|u_t| \le \frac{\sqrt{c_2}}{c_1} R_t`.
* optax, :math:`u = (m/c_1)/(\sqrt{\hat v}+\epsilon)` with
  :math:`\hat v_t = \max_i v_i / c_{2,i} \ge \max_i v_i / c_{2,t}` (:math:`c_2` grows with
  :math:`t`) :math:`= V_t / c_{2,t}`: the same :math:`\frac{\sqrt{c_2}}{c_1} R_t`.

At :math:`t = 1` every bias-corrected rule gives :math:`|u_1| \le 1`, the paper's
:math:`\le (1-\beta_1)/\sqrt{1-\beta_2}`. Finiteness needs :math:`\epsilon > 0` or
:math:`\epsilon_{root} > 0`: with both 0, a coordinate whose gradients have all been 0
gives :math:`0/0`, as in every framework.

The runs are jitted once per rule with the hyperparameters as traced arguments (the
way ``optax.inject_hyperparams`` passes them), and hypothesis draws ``b1`` and ``b2``
as float32 numbers, so the bound is computed from the very values the arithmetic uses.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import amsgrad_jax
from amsgrad_jax import scale_by_amsgrad

STEPS, WIDTH = 16, 4
RTOL = 1e-4  # float32 arithmetic against bounds computed in float64

PROPERTY_SETTINGS = settings(
  max_examples=100,
  deadline=None,
  derandomize=True,
  database=None,
  suppress_health_check=[HealthCheck.too_slow],
)


@functools.cache
def runner(convention: str) -> Any:
  """A jitted run of ``STEPS`` steps returning ``(updates, nu, nu_max)`` at every step."""

  @jax.jit
  def run(grads, b1, b2, eps, eps_root):
    tx = scale_by_amsgrad(b1, b2, eps, eps_root, convention=convention)

    def step(state, grad):
      updates, state = tx.update(grad, state)
      return state, (updates, state.mu, state.nu, state.nu_max)

    return jax.lax.scan(step, tx.init(grads[0]), grads)[1]

  return run


def run(convention: str, grads: np.ndarray, b1, b2, eps, eps_root) -> list[np.ndarray]:
  args = [jnp.asarray(x, jnp.float32) for x in (b1, b2, eps, eps_root)]
  return [np.asarray(x, np.float64) for x in runner(convention)(jnp.asarray(grads), *args)]


def ratio_bound(t: int, b1: float, b2: float) -> float:
  """:math:`R_t`: the bound on :math:`|m_t| / \\sqrt{\\max_{i \\le t} v_i}` (module docs)."""
  if b2 == 0.0:
    cauchy_schwarz_sum = 1.0 if t == 1 else math.inf
  else:
    gamma = b1 * b1 / b2
    try:
      cauchy_schwarz_sum = float(t) if gamma == 1.0 else (1 - gamma**t) / (1 - gamma)
    except OverflowError:  # b2 so small that gamma**t leaves float64: this term bounds nothing
      cauchy_schwarz_sum = math.inf
  return min((1 - b1) * math.sqrt(cauchy_schwarz_sum), 1 - b1**t) / math.sqrt(1 - b2)


def update_bound(convention: str, t: int, b1: float, b2: float) -> float:
  """The bound on :math:`|u_t|` of each rule (module docs)."""
  if convention == "paper":
    return ratio_bound(t, b1, b2)
  return math.sqrt(1 - b2**t) / (1 - b1**t) * ratio_bound(t, b1, b2)


def float32s(low: float, high: float) -> st.SearchStrategy[float]:
  """Finite float32 numbers in ``[low, high]`` (bounds rounded to float32)."""
  return st.floats(float(np.float32(low)), float(np.float32(high)), width=32)


betas = st.tuples(
  st.one_of(st.just(0.0), float32s(0.0, 0.999)),
  st.one_of(st.just(0.0), float32s(0.0, 0.9999), st.just(float(np.float32(0.999)))),
)
gradient_sequences = hnp.arrays(
  np.float32,
  (STEPS, WIDTH),
  elements=st.one_of(float32s(-1e3, 1e3), float32s(-1e15, 1e15), st.just(0.0)),
)
epsilons = st.tuples(float32s(1e-10, 1e-2), st.one_of(st.just(0.0), float32s(1e-12, 1e-6)))


@pytest.mark.parametrize("convention", amsgrad_jax.CONVENTIONS)
@PROPERTY_SETTINGS
@given(grads=gradient_sequences, beta=betas, epsilon=epsilons)
# b2 at float32's smallest normal: b1**2 / b2 raised to t leaves float64 in the bound itself
@example(
  grads=np.zeros((STEPS, WIDTH), np.float32),
  beta=(0.5, float(np.finfo(np.float32).tiny)),
  epsilon=(0.0078125, 0.0),
)
def test_invariants_over_random_gradients_and_hyperparameters(convention, grads, beta, epsilon):
  (b1, b2), (eps, eps_root) = beta, epsilon
  updates, mu, nu, nu_max = run(convention, grads, b1, b2, eps, eps_root)

  for x in (updates, mu, nu, nu_max):
    assert np.all(np.isfinite(x))
  # nu_max never decreases
  assert np.all(np.diff(nu_max, axis=0) >= 0)
  # it bounds the second moment it covers: v_t, or v_t / c2 for the optax rule
  t = np.arange(1, STEPS + 1)[:, None]
  covered = nu / (1 - np.float64(b2) ** t) if convention == "optax" else nu
  assert np.all(nu_max >= covered * (1 - RTOL))
  # and the per-rule bound on the update size
  for step in range(STEPS):
    bound = update_bound(convention, step + 1, b1, b2)
    assert np.all(np.abs(updates[step]) <= bound * (1 + RTOL)), (step, bound)


@pytest.mark.parametrize("convention", ["pytorch", "keras", "paper"])
def test_the_cauchy_schwarz_bound_is_attained(convention):
  """:math:`g_i \\propto (\\beta_1/\\beta_2)^{t-i}` grows, so :math:`\\hat v_t = v_t` and
  :math:`|m_t| / \\sqrt{v_t}` meets bound (a) at step ``t`` (up to ``eps``)."""
  b1, b2 = float(np.float32(0.9)), float(np.float32(0.999))
  ramp = (b1 / b2) ** (STEPS - np.arange(1, STEPS + 1))
  grads = np.repeat(ramp[:, None], WIDTH, axis=1).astype(np.float32)
  updates, *_ = run(convention, grads, b1, b2, 1e-12, 0.0)
  bound = update_bound(convention, STEPS, b1, b2)
  np.testing.assert_allclose(np.abs(updates[-1]), bound, rtol=RTOL)
  classic = (1 - b1) / math.sqrt(1 - b2) / (1 - b1 / math.sqrt(b2))
  assert ratio_bound(STEPS, b1, b2) < classic / 4  # the triangle-inequality bound is loose


@pytest.mark.parametrize("convention", amsgrad_jax.CONVENTIONS)
def test_the_running_maximum_bound_is_attained_without_second_moment_memory(convention):
  """With ``b2 = 0`` and equal gradients, bound (b) is met at every step."""
  b1 = float(np.float32(0.9))
  grads = np.full((STEPS, WIDTH), 0.5, np.float32)
  updates, *_ = run(convention, grads, b1, 0.0, 1e-12, 0.0)
  for step in range(STEPS):
    np.testing.assert_allclose(
      np.abs(updates[step]), update_bound(convention, step + 1, b1, 0.0), rtol=RTOL
    )


@pytest.mark.parametrize("convention", amsgrad_jax.CONVENTIONS)
def test_zero_eps_and_zero_gradients_give_zero_over_zero(convention):
  """The one case the finiteness property excludes, as documented: 0/0 is NaN."""
  grads = np.zeros((STEPS, WIDTH), np.float32)
  updates, *_ = run(convention, grads, 0.9, 0.999, 0.0, 0.0)
  assert np.all(np.isnan(updates))
