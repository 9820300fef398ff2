"""One huge finite gradient spike: AMSGrad freezes the coordinate, Adam recovers, clipping helps.

The trajectories are those of the docs figure: ``docs/figures/spike_freeze.py`` is
imported here, its claims are checked for every rule, and it draws the figure into a
temporary folder, so the figure cannot drift from what the tests check.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _peers import require

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


def png_size(png: bytes) -> tuple[int, int]:
  """Width and height in pixels, from the PNG header."""
  assert png[:8] == b"\x89PNG\r\n\x1a\n"
  assert png[12:16] == b"IHDR"
  return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def test_the_figure_plots_the_trajectories_the_tests_check():
  require("matplotlib")
  fig = figure_script()
  results = trajectories("pytorch")
  figure = fig.draw(results)
  left, right = figure.axes
  positions_drawn = {line.get_label(): line.get_ydata() for line in left.get_lines()}
  steps_drawn = {line.get_label(): line.get_ydata() for line in right.get_lines()}
  for label, (positions, updates) in results.items():
    np.testing.assert_array_equal(positions_drawn[label], positions[:, fig.SPIKED])
    np.testing.assert_array_equal(steps_drawn[label], np.abs(updates[:, fig.SPIKED]) + 1e-12)
  unspiked = results["AMSGrad"][0][:, 1 - fig.SPIKED]
  np.testing.assert_array_equal(positions_drawn[fig.UNSPIKED_LABEL], unspiked)
  legend = [text.get_text() for text in left.get_legend().get_texts()]
  assert legend == [*fig.optimizers(), fig.UNSPIKED_LABEL]


def test_the_figure_script_saves_that_figure(tmp_path):
  require("matplotlib")
  out = tmp_path / "spike_freeze.png"
  results = figure_script().main(out)
  assert set(results) == set(figure_script().optimizers())
  for label, (positions, updates) in results.items():
    np.testing.assert_array_equal(positions, trajectories("pytorch")[label][0])
    np.testing.assert_array_equal(updates, trajectories("pytorch")[label][1])
  width, height = figure_script().FIGSIZE
  dpi = figure_script().DPI
  assert png_size(out.read_bytes()) == (round(width * dpi), round(height * dpi))


def test_the_docs_show_the_figure_the_script_draws():
  """The committed image is the script's figure, at the script's size."""
  fig = figure_script()
  committed = fig.DEFAULT_OUT.read_bytes()
  width, height = fig.FIGSIZE
  assert png_size(committed) == (round(width * fig.DPI), round(height * fig.DPI))
