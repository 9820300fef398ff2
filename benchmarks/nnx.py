"""The native guide's Flax NNX recipe against ``nnx.Optimizer.update``, model size by size.

``python -m benchmarks.nnx [--quick] [--rounds N] [--out DIR]`` times one training step of a
three-layer NNX MLP (a batch of 64, so that the update is a visible part of the step at
every size) under ``nnx.jit``, written three ways:

* ``optimizer.update``: ``optimizer.update(model, grads)`` under plain ``nnx.jit``, as
  Flax's examples write it;
* ``optimizer.update, donated``: the same under ``nnx.jit(donate_argnums=(0, 1))``;
* ``apply_step recipe``: the native guide's ``nnx_apply_step`` under
  ``nnx.jit(donate_argnums=(0, 1))``.

Each size and way runs in its own process, ``rounds`` times, alternating; a process takes
the median of its timed steps and the table gives, per size, the median over processes
and the recipe's ratio to ``optimizer.update``. It writes ``nnx_results.json`` and
``nnx_table.md`` into ``DIR`` (default ``docs/_static``, where the benchmarks page shows
the table): about 4 minutes on 2 idle CPU cores; ``--quick`` (two small sizes, one
round) about 20 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WAYS = ("optimizer.update", "optimizer.update, donated", "apply_step recipe")
WIDTHS = (100, 500, 1_700, 4_000)  # about 15k, 270k, 3M and 16M parameters
BATCH, INPUTS = 64, 32


ROOT = Path(__file__).resolve().parents[1]


def _time_one(way: str, width: int, budget_s: float) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import amsgrad_jax

  def nnx_apply_step(optimizer: nnx.Optimizer, model: nnx.Module, grads: Any) -> None:
    """The native guide's recipe: ``optimizer.update(model, grads)`` via apply_step."""
    params = nnx.as_pure(nnx.state(model, optimizer.wrt))
    grads = nnx.as_pure(nnx.state(grads, optimizer.wrt))
    opt_state = nnx.as_pure(optimizer.opt_state)
    params, opt_state = amsgrad_jax.apply_step(optimizer.tx, grads, opt_state, params)
    nnx.update(model, params)
    nnx.update(optimizer.opt_state, nnx.state(opt_state))
    optimizer.step[...] += 1

  class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
      self.hidden = nnx.Linear(INPUTS, width, rngs=rngs)
      self.middle = nnx.Linear(width, width, rngs=rngs)
      self.output = nnx.Linear(width, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
      return self.output(jnp.tanh(self.middle(jnp.tanh(self.hidden(x)))))

  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, amsgrad_jax.amsgradw(1e-3, weight_decay=1e-4), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (BATCH, INPUTS))
  y = jnp.sin(x[:, :1])
  jit = nnx.jit if way == "optimizer.update" else nnx.jit(donate_argnums=(0, 1))

  @jit
  def train_step(model: MLP, optimizer: nnx.Optimizer) -> jax.Array:
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    if way == "apply_step recipe":
      nnx_apply_step(optimizer, model, grads)
    else:
      optimizer.update(model, grads)
    return loss

  for _ in range(3):
    train_step(model, optimizer).block_until_ready()
  times: list[float] = []
  while len(times) < 10 or (sum(times) < budget_s and len(times) < 2_000):
    start = time.perf_counter()
    train_step(model, optimizer).block_until_ready()
    times.append(time.perf_counter() - start)
  parameters = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  return {"parameters": int(parameters), "median_s": statistics.median(times)}


def run(rounds: int, widths: tuple[int, ...], quick: bool = False) -> list[dict[str, Any]]:
  """Every size and way, each in its own process, ``rounds`` times."""
  rows = []
  for width in widths:
    medians: dict[str, list[float]] = {way: [] for way in WAYS}
    parameters = 0
    for _ in range(rounds):
      for way in WAYS:
        command = [sys.executable, "-m", "benchmarks.nnx", "--worker", way, str(width)]
        command += ["--quick"] if quick else []
        result = json.loads(subprocess.run(command, capture_output=True, check=True).stdout)
        medians[way].append(result["median_s"])
        parameters = result["parameters"]
    rows.append({"parameters": parameters, "medians_s": medians})
  return rows


def table(rows: list[dict[str, Any]]) -> str:
  """Markdown: per size, each way's median step (µs) and the recipe's ratio."""
  lines = [
    "| parameters | " + " | ".join(WAYS) + " | recipe / optimizer.update |",
    "|---:|" + "---:|" * (len(WAYS) + 1),
  ]
  for row in rows:
    median = {way: statistics.median(times) for way, times in row["medians_s"].items()}
    cells = [f"{median[way] * 1e6:,.0f} µs" for way in WAYS]
    ratio = median["apply_step recipe"] / median["optimizer.update"]
    lines.append(f"| {row['parameters']:,} | " + " | ".join(cells) + f" | {ratio:.2f} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--quick", action="store_true", help="the two smallest sizes, one round")
  parser.add_argument("--out", type=Path, default=ROOT / "docs" / "_static")
  parser.add_argument("--worker", nargs=2, metavar=("WAY", "WIDTH"), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    way, width = args.worker
    print(json.dumps(_time_one(way, int(width), budget_s=0.2 if args.quick else 1.0)))
    return
  rows = run(1, WIDTHS[:2], quick=True) if args.quick else run(args.rounds, WIDTHS)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "nnx_results.json").write_text(json.dumps(rows, indent=1) + "\n")
  (args.out / "nnx_table.md").write_text(table(rows) + "\n")
  print(table(rows))


if __name__ == "__main__":
  main()
