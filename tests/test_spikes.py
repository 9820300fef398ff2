"""One huge finite gradient spike: AMSGrad freezes the coordinate, Adam recovers, clipping helps.

The trajectories are those of the docs figure: ``docs/figures/spike_freeze.py`` is
imported here, its claims are checked for every rule, and it draws the figure into a
temporary folder, so the figure cannot drift from what the tests check.
"""

from __future__ import annotations

import functools
import importlib.util
import time
from pathlib import Path
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import amsgrad_jax

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "figures" / "spike_freeze.py"


@functools.cache
def figure_script() -> ModuleType:
  spec = importlib.util.spec_from_file_location("spike_freeze", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@functools.cache
def trajectories(convention: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  return figure_script().trajectories(convention)


def final_distance(positions: np.ndarray) -> np.ndarray:
  return np.abs(positions[-1] - figure_script().TARGET)


@pytest.mark.parametrize("convention", amsgrad_jax.CONVENTIONS)
def test_one_spike_freezes_the_coordinate_under_amsgrad(convention):
  fig = figure_script()
  positions, updates = trajectories(convention)["AMSGrad"]
  distance = final_distance(positions)
  assert distance[1 - fig.SPIKED] < 1e-2  # the other coordinate gets there
  # The spiked one covers less than a tenth of what was left at the spike.
  left_at_spike = fig.TARGET - positions[fig.SPIKE_STEP, fig.SPIKED]
  progress_after_spike = positions[-1, fig.SPIKED] - positions[fig.SPIKE_STEP, fig.SPIKED]
  assert progress_after_spike < 0.1 * left_at_spike
  # From shortly after the spike to the end, every step is under 2% of the ones before.
  before = np.abs(updates[fig.SPIKE_STEP - 10 : fig.SPIKE_STEP, fig.SPIKED]).min()
  after = np.abs(updates[fig.SPIKE_STEP + 50 :, fig.SPIKED]).max()
  assert after < 0.02 * before


@pytest.mark.parametrize("convention", amsgrad_jax.CONVENTIONS)
def test_adam_recovers_from_the_same_spike(convention):
  positions, _ = trajectories(convention)["Adam (optax.adam)"]
  assert np.all(final_distance(positions) < 1e-2)


@pytest.mark.parametrize("convention", amsgrad_jax.CONVENTIONS)
@pytest.mark.parametrize("clipping", ["optax.clip", "optax.clip_by_global_norm"])
def test_clipping_before_amsgrad_restores_progress(convention, clipping):
  (label,) = [name for name in trajectories(convention) if name.startswith(clipping + "(")]
  positions, _ = trajectories(convention)[label]
  assert np.all(final_distance(positions) < 1e-2)
  # and no more than twice as slowly as the coordinate that had no spike
  fig = figure_script()
  frozen, _ = trajectories(convention)["AMSGrad"]
  reached = np.argmax(np.abs(positions - fig.TARGET) < 1e-1, axis=0)
  reached_without_spike = np.argmax(np.abs(frozen[:, 1 - fig.SPIKED] - fig.TARGET) < 1e-1)
  assert reached[fig.SPIKED] < 2.0 * reached_without_spike


@pytest.mark.parametrize("convention", ["pytorch", "keras", "paper"])
def test_nu_max_holds_the_spike_exactly_for_the_rest_of_the_run(convention):
  """For the rules whose maximum covers the raw ``v``: ``nu_max`` of the spiked
  coordinate is set at the spike and never changes again (``v`` only decays)."""
  fig = figure_script()
  tx = amsgrad_jax.scale_by_amsgrad(b2=fig.B2, convention=convention)

  @jax.jit
  def nu_max_trace():
    def step(carry, t):
      x, state = carry
      updates, state = tx.update(fig.gradient(x, t), state)
      return (x - fig.LEARNING_RATE * updates, state), state.nu_max[fig.SPIKED]

    x0 = jnp.zeros(2)
    return jax.lax.scan(step, (x0, tx.init(x0)), jnp.arange(fig.STEPS))[1]

  trace = np.asarray(nu_max_trace())
  at_spike = trace[fig.SPIKE_STEP]
  np.testing.assert_allclose(at_spike, (1 - fig.B2) * fig.SPIKE**2, rtol=1e-2)
  assert np.all(trace[fig.SPIKE_STEP :] == at_spike)


def test_figure_script_draws_the_figure(tmp_path):
  out = tmp_path / "spike_freeze.png"
  start = time.perf_counter()
  results = figure_script().main(out)
  elapsed = time.perf_counter() - start
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert out.stat().st_size > 10_000
  assert set(results) == set(figure_script().optimizers())
  assert elapsed < 30.0, f"the figure script took {elapsed:.1f} s; keep it under 10 s"


def test_committed_figure_exists():
  assert (SCRIPT.parents[1] / "_static" / "spike_freeze.png").stat().st_size > 10_000
