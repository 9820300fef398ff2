"""The step counter saturates at the int32 maximum; bias corrections stay finite there.

At ``t = 2**31 - 1`` every ``b**t`` with ``b < 1`` underflows to 0, so both bias
corrections are exactly 1: the pytorch and keras rules then take the same step as the
paper's rule, which has none. A counter that wrapped to ``-2**31`` would instead make
``b**t`` overflow and the step vanish or turn into ``NaN``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import amsgrad_jax
from amsgrad_jax import _numerics, scale_by_amsgrad, skip_nonfinite

INT32_MAX = np.iinfo(np.int32).max
GRAD = {"w": jnp.array([0.1, -0.2, 0.3]), "b": jnp.array(-1.5)}


def state_near_saturation(tx, steps_left: int):
  """A state after a few real steps, with its counter moved to ``INT32_MAX - steps_left``."""
  state = tx.init(jax.tree.map(jnp.ones_like, GRAD))
  for _ in range(3):
    _, state = tx.update(GRAD, state)
  return state._replace(count=jnp.asarray(INT32_MAX - steps_left, jnp.int32))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("convention", amsgrad_jax.CONVENTIONS)
def test_count_saturates_at_int32_max_and_never_wraps(convention, jit):
  tx = scale_by_amsgrad(convention=convention)
  update = jax.jit(tx.update) if jit else tx.update
  state = state_near_saturation(tx, steps_left=2)
  counts = []
  for _ in range(5):
    updates, state = update(GRAD, state)
    counts.append(int(state.count))
    assert state.count.dtype == jnp.int32
    for tree in (updates, state.mu, state.nu, state.nu_max):
      assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(tree))
  assert counts == [INT32_MAX - 1, INT32_MAX, INT32_MAX, INT32_MAX, INT32_MAX]


def test_at_saturation_the_bias_corrections_are_one():
  """pytorch and keras take the paper's step there, to the last bit or to rounding."""
  updates = {}
  for convention in ("pytorch", "keras", "paper"):
    tx = scale_by_amsgrad(convention=convention)
    updates[convention], _ = tx.update(GRAD, state_near_saturation(tx, steps_left=0))
  for convention in ("pytorch", "keras"):
    jax.tree.map(
      lambda ours, paper: np.testing.assert_allclose(ours, paper, rtol=1e-6),
      updates[convention],
      updates["paper"],
    )


@pytest.mark.parametrize("from_double", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("b", [0.0, 0.5, 0.9, 0.999, 0.999999, float(np.float32(1 - 2**-24))])
def test_bias_corrections_are_finite_up_to_the_saturated_count(b, dtype, from_double):
  with jax.enable_x64(dtype == jnp.float64):
    counts = jnp.asarray([1, 2, 1000, 2**24 + 1, INT32_MAX - 1, INT32_MAX], jnp.int32)
    c1, c2 = _numerics.bias_corrections(b, b, counts, dtype, from_double=from_double)
    for correction in (c1, c2):
      assert correction.dtype == dtype
      assert np.all(np.isfinite(correction))
      assert np.all((correction > 0) & (correction <= 1))
      assert np.all(np.diff(np.asarray(correction)) >= 0)  # never decreases with t
    if b < 0.999:  # b**t has underflowed long before the end
      assert correction[-1] == 1.0


def test_guard_counters_saturate_too():
  tx = skip_nonfinite(scale_by_amsgrad(), max_consecutive_errors=INT32_MAX)
  state = tx.init(jax.tree.map(jnp.ones_like, GRAD))
  state = state._replace(
    notfinite_count=jnp.asarray(INT32_MAX - 1, jnp.int32),
    total_notfinite=jnp.asarray(INT32_MAX - 1, jnp.int32),
  )
  bad = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), GRAD)
  for _ in range(3):
    _, state = tx.update(bad, state)
  assert int(state.notfinite_count) == INT32_MAX
  assert int(state.total_notfinite) == INT32_MAX
