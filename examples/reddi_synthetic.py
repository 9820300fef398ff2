"""Reproduce Figure 1 of Reddi et al. (2018): Adam fails on a one-dimensional convex problem.

Shows: the online and the stochastic counterexamples of "On the Convergence of Adam and
Beyond", where Adam (``optax.scale_by_adam``) is driven to the worst point x = +1 while
AMSGrad, under each of the four rules of ``amsgrad_jax``, goes to the optimum x = -1.
Every optimizer runs inside one ``lax.scan``. Takes about 4 s on 2 CPU cores with the
default 5,000,000 steps per setting.

The problems, on the feasible set [-1, 1] (each step is projected back onto it):

* online: f_t(x) = 1010 x if t mod 101 == 1, else -10 x;
* stochastic: f_t(x) = 1010 x with probability 0.01, else -10 x.

Over a period of 101 steps the online gradients sum to 1010 - 100 * 10 = 10 > 0, and in the
stochastic problem E[f_t(x)] = (10.1 - 9.9) x = 0.2 x, so x* = -1 in both. Adam, with
b1 = 0.9 and b2 = 0.99, forgets the rare large gradient within a few dozen steps and takes
the many small steps towards +1 at nearly full size; AMSGrad keeps the largest second
moment it has seen, which shrinks those steps and lets the large gradient win. Every
optimizer uses b1 = 0.9, b2 = 0.99 and the step alpha / sqrt(t), as in the paper.

The default is the paper's horizon of 5e6 iterations per setting. The regret plotted for
the stochastic problem is the expected one, sum_t 0.2 (x_t - x*).

Usage::

    python examples/reddi_synthetic.py                 # writes reddi_synthetic.png here
    python examples/reddi_synthetic.py --steps 5000000 --out figures/
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import amsgrad_jax

PERIOD = 101  # The online problem's large gradient comes every PERIOD steps.
LARGE, SMALL = 1010.0, -10.0  # The two slopes of f_t.
SPIKE_PROBABILITY = 0.01  # The stochastic problem's chance of the large slope.
EXPECTED_SLOPE = SPIKE_PROBABILITY * LARGE + (1 - SPIKE_PROBABILITY) * SMALL  # 0.2
B1, B2 = 0.9, 0.99
OPTIMUM = -1.0
SETTINGS = ("online", "stochastic")


def directions() -> dict[str, optax.GradientTransformation]:
  """Adam and AMSGrad under each rule, all with b1 = 0.9 and b2 = 0.99 (no learning rate)."""
  optimizers = {"Adam": optax.scale_by_adam(b1=B1, b2=B2)}
  for convention in amsgrad_jax.CONVENTIONS:
    optimizers[f"AMSGrad ({convention})"] = amsgrad_jax.scale_by_amsgrad(
      b1=B1, b2=B2, convention=convention
    )
  return optimizers


def slopes(setting: str, steps: int, key: jax.Array) -> jax.Array:
  """The slope c_t of f_t(x) = c_t x for t = 1..steps."""
  if setting == "online":
    t = jnp.arange(1, steps + 1)
    return jnp.where(t % PERIOD == 1, LARGE, SMALL)
  return jnp.where(jax.random.bernoulli(key, SPIKE_PROBABILITY, (steps,)), LARGE, SMALL)


class Trace(NamedTuple):
  """What a run records every ``stride`` steps, one column per optimizer."""

  x: jax.Array  # x_t at the start of each chunk, shape (samples, optimizers)
  regret: jax.Array  # sum over the chunk of the regret at each step, shape (samples, optimizers)
  final_x: jax.Array  # x after the last step, shape (optimizers,)


def run(
  optimizers: dict[str, optax.GradientTransformation],
  slope: jax.Array,
  regret_slope: jax.Array | None,
  alpha: float,
  stride: int,
) -> Trace:
  """Projected online descent x_{t+1} = clip(x_t - alpha / sqrt(t) * u_t, -1, 1) for every
  optimizer at once, from x_1 = 0, on the same slopes.

  The regret of step t is ``r (x_t - x*)`` with ``r`` the slope itself (online) or
  ``regret_slope``, the slope of the expected loss (stochastic), so that R_t / t measures
  the distance from the optimum rather than the luck of the draw.

  An outer ``lax.scan`` over chunks of ``stride`` steps wraps an inner one over the steps,
  so only one sample per chunk is kept in memory.
  """
  txs = [
    optax.chain(tx, optax.scale_by_schedule(lambda count: -alpha * jax.lax.rsqrt(count + 1.0)))
    for tx in optimizers.values()
  ]
  x0 = jnp.zeros(len(txs))

  def step(carry, c_t):
    xs, states = carry
    new_xs, new_states = [], []
    for i, tx in enumerate(txs):
      update, state = tx.update(c_t, states[i], xs[i])  # The gradient of c_t x is c_t.
      new_xs.append(jnp.clip(xs[i] + update, -1.0, 1.0))
      new_states.append(state)
    regret = (c_t if regret_slope is None else regret_slope) * (xs - OPTIMUM)
    return (jnp.stack(new_xs), tuple(new_states)), regret

  def chunk(carry, chunk_slopes):
    xs = carry[0]
    carry, regrets = jax.lax.scan(step, carry, chunk_slopes)
    return carry, (xs, regrets.sum(axis=0))

  states = tuple(tx.init(x0[i]) for i, tx in enumerate(txs))
  (final_x, _), (x, regret) = jax.lax.scan(chunk, (x0, states), slope.reshape(-1, stride))
  return Trace(x=x, regret=regret, final_x=final_x)


def average_regret(trace: Trace, stride: int) -> np.ndarray:
  """R_t / t at the end of every chunk, summed in float64 on the host."""
  cumulative = np.cumsum(np.asarray(trace.regret, np.float64), axis=0)
  t = stride * np.arange(1, cumulative.shape[0] + 1)
  return cumulative / t[:, None]


def plot(results: dict[str, tuple[Trace, np.ndarray]], names: list[str], stride: int, path: Path):
  """Average regret (left) and x_t (right) for the online (top) and stochastic (bottom) runs."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
  styles = ["-", "--", "-.", ":", (0, (5, 1))]
  for row, (setting, (trace, regret)) in enumerate(results.items()):
    t = stride * np.arange(regret.shape[0])
    x = np.asarray(trace.x)
    for i, name in enumerate(names):
      color = "tab:red" if name == "Adam" else ["tab:blue", "tab:green", "tab:purple", "k"][i - 1]
      axes[row, 0].plot(t + stride, regret[:, i], linestyle=styles[i], color=color, label=name)
      axes[row, 1].plot(t, x[:, i], linestyle=styles[i], color=color, label=name)
    expected = "" if setting == "online" else "expected "
    axes[row, 0].set_ylabel(f"{setting}: {expected}average regret $R_t / t$")
    axes[row, 1].set_ylabel(f"{setting}: $x_t$")
    axes[row, 1].set_ylim(-1.1, 1.1)
    axes[row, 0].set_yscale("log")
  for ax in axes[1]:
    ax.set_xlabel("iteration t")
  axes[0, 1].legend(loc="center right")
  fig.suptitle(
    "Reddi et al. (2018), Figure 1: $f_t(x) = 1010x$ (rarely) or $-10x$ on $[-1, 1]$, "
    r"$\beta_1 = 0.9$, $\beta_2 = 0.99$, step $\alpha/\sqrt{t}$"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=5_000_000, help="steps per setting (5e6)")
  parser.add_argument("--alpha", type=float, default=0.5, help="step size alpha (0.5)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the stochastic problem")
  parser.add_argument("--points", type=int, default=2000, help="points kept per curve (2000)")
  parser.add_argument("--out", type=Path, default=Path(), help="folder for the PNG (default .)")
  args = parser.parse_args()
  stride = max(1, args.steps // args.points)
  steps = stride * (args.steps // stride)

  optimizers = directions()
  names = list(optimizers)
  results = {}
  for setting in SETTINGS:
    start = time.perf_counter()
    regret_slope = None if setting == "online" else jnp.float32(EXPECTED_SLOPE)
    simulate = jax.jit(lambda slope, r=regret_slope: run(optimizers, slope, r, args.alpha, stride))
    trace = jax.block_until_ready(simulate(slopes(setting, steps, jax.random.key(args.seed))))
    results[setting] = (trace, average_regret(trace, stride))
    print(f"{setting}: {steps} steps in {time.perf_counter() - start:.1f} s")
    for i, name in enumerate(names):
      final_x = float(trace.final_x[i])
      print(f"  {name:20s} final x = {final_x:+.4f}   R_t/t = {results[setting][1][-1, i]:.4f}")

  args.out.mkdir(parents=True, exist_ok=True)
  path = args.out / "reddi_synthetic.png"
  plot(results, names, stride, path)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
