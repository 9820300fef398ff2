"""One finite gradient spike freezes a coordinate under AMSGrad; Adam recovers; clipping helps.

Run ``python docs/figures/spike_freeze.py [OUT.png]`` (default
``docs/_static/spike_freeze.png``); it takes about two seconds on a CPU. The tests
(``tests/test_spikes.py``) import this file, check the claims below on the very
trajectories it plots, and draw the figure into a temporary folder.

The problem: two coordinates start at 0 and descend a pseudo-Huber loss
:math:`\\sum_i \\sqrt{1 + (x_i - 5)^2}` (gradients of size about 1 far from the target),
with ``b2 = 0.99``. At step 100 the gradient of coordinate 1 gets a single spike of
``+1000``. AMSGrad keeps :math:`(1-\\beta_2) \\cdot 1000^2 = 10^4` in ``nu_max`` for
good, so that coordinate's steps shrink a hundredfold for the rest of the run; Adam's
second moment forgets the spike at the rate :math:`\\beta_2^t` and the coordinate
recovers after a few hundred steps. Clipping the gradient before the optimizer,
per coordinate (:func:`optax.clip`) or by global norm
(:func:`optax.clip_by_global_norm`), keeps the spike out of ``nu_max``.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import optax

from amsgrad_jax import amsgrad

if TYPE_CHECKING:
  from matplotlib.figure import Figure

TARGET = 5.0
STEPS = 2000
SPIKE_STEP = 100
SPIKE = 1e3
SPIKED = 1  # the coordinate that gets the spike
LEARNING_RATE = 1e-2
B2 = 0.99
CLIP = 10.0
FIGSIZE = (10, 3.6)  # inches
DPI = 110  # 1100 x 396 pixels
UNSPIKED_LABEL = "AMSGrad, coordinate without spike"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "_static" / "spike_freeze.png"


def gradient(x: jax.Array, step: jax.Array) -> jax.Array:
  """Gradient of the pseudo-Huber loss, plus the spike on one coordinate at one step."""
  distance = x - TARGET
  spike = jnp.zeros_like(x).at[SPIKED].set(SPIKE)
  return distance / jnp.sqrt(1.0 + distance * distance) + jnp.where(
    step == SPIKE_STEP, spike, jnp.zeros_like(x)
  )


@functools.partial(jax.jit, static_argnums=0)
def run(tx: optax.GradientTransformation) -> tuple[jax.Array, jax.Array]:
  """``STEPS`` steps from ``x = (0, 0)``; returns the positions and updates, ``(STEPS, 2)``."""

  def step(carry, t):
    x, state = carry
    updates, state = tx.update(gradient(x, t), state, x)
    x = optax.apply_updates(x, updates)
    return (x, state), (x, updates)

  x0 = jnp.zeros(2)
  _, (positions, updates) = jax.lax.scan(step, (x0, tx.init(x0)), jnp.arange(STEPS))
  return positions, updates


def optimizers(convention: str = "pytorch") -> dict[str, optax.GradientTransformation]:
  """The four optimizers of the figure, by label."""
  return {
    "AMSGrad": amsgrad(LEARNING_RATE, b2=B2, convention=convention),
    "Adam (optax.adam)": optax.adam(LEARNING_RATE, b2=B2),
    f"optax.clip({CLIP:g}) + AMSGrad": optax.chain(
      optax.clip(CLIP), amsgrad(LEARNING_RATE, b2=B2, convention=convention)
    ),
    f"optax.clip_by_global_norm({CLIP:g}) + AMSGrad": optax.chain(
      optax.clip_by_global_norm(CLIP), amsgrad(LEARNING_RATE, b2=B2, convention=convention)
    ),
  }


def trajectories(convention: str = "pytorch") -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Positions and updates of every optimizer of :func:`optimizers`, as NumPy arrays."""
  results = {}
  for label, tx in optimizers(convention).items():
    # optax.adam forms its bias corrections with Python floats and int32 counts, which
    # JAX's strict dtype promotion (used by the test suite) refuses.
    with jax.numpy_dtype_promotion("standard"):
      positions, updates = run(tx)
    results[label] = (np.asarray(positions), np.asarray(updates))
  return results


def draw(results: dict[str, tuple[np.ndarray, np.ndarray]]) -> Figure:
  """The figure: the spiked coordinate's position (left) and step size (right) per run."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  steps = np.arange(1, STEPS + 1)
  figure, (left, right) = plt.subplots(1, 2, figsize=FIGSIZE, constrained_layout=True)
  # The two clipped runs nearly coincide; dashes keep both visible.
  styles = ["-", "-", "-", (0, (4, 3))]
  for (label, (positions, updates)), style in zip(results.items(), styles, strict=True):
    left.plot(steps, positions[:, SPIKED], linestyle=style, label=label)
    right.semilogy(steps, np.abs(updates[:, SPIKED]) + 1e-12, linestyle=style, label=label)
  positions, _ = results["AMSGrad"]
  left.plot(steps, positions[:, 1 - SPIKED], "k:", label=UNSPIKED_LABEL)
  left.axhline(TARGET, color="grey", linewidth=0.8)
  for axis in (left, right):
    axis.axvline(SPIKE_STEP, color="red", linewidth=0.8, linestyle="--")
    axis.set_xlabel("step")
  left.set_ylabel("position of the spiked coordinate")
  left.set_title(f"one gradient of {SPIKE:g} at step {SPIKE_STEP} (target {TARGET:g})")
  right.set_ylabel("|update| of the spiked coordinate")
  right.set_title("AMSGrad's running maximum never forgets the spike")
  left.legend(fontsize=7, loc="lower right")
  return figure


def plot(results: dict[str, tuple[np.ndarray, np.ndarray]], out: Path) -> None:
  """Draw the figure of ``results`` and save it as PNG to ``out``."""
  import matplotlib.pyplot as plt

  figure = draw(results)
  out.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(out, dpi=DPI)
  plt.close(figure)


def main(out: Path = DEFAULT_OUT) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  results = trajectories()
  plot(results, Path(out))
  return results


if __name__ == "__main__":
  main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
