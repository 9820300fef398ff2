"""What a run times: the cases, their sizes, how often, and how many rounds.

Step cases time one optimizer update over float32 leaves of the given shapes; the loop
case times the whole training loop of ``examples/mlp_flax.py`` (the listing's MLP, in
PyTorch for the PyTorch contenders). Each process runs ``warmup`` untimed steps (or
loops), then times them one by one: at least ``min_reps``, and no more once they add up
to ``budget_s`` or ``max_reps`` have run. Everything here is plain data, sent to each
worker as JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
  """One thing to time; ``steps`` > 0 makes it the training loop of that many steps."""

  id: str
  label: str
  shapes: list[list[int]]
  steps: int = 0
  learning_rate: float = 1e-3
  warmup: int = 2
  min_reps: int = 5
  max_reps: int = 20
  budget_s: float = 0.5

  @property
  def parameters(self) -> int:
    return sum(math.prod(shape) for shape in self.shapes)


@dataclass(frozen=True)
class Plan:
  """A whole run: the cases, the rounds, and whether a process runs one contender
  (``False`` only for ``--quick``, where timings do not matter)."""

  cases: list[Case]
  rounds: int
  own_process: bool = True


TRANSFORMER = {"vocab": 4096, "width": 512, "depth": 6, "heads": 8, "mlp_ratio": 4}
TINY_TRANSFORMER = {"vocab": 64, "width": 16, "depth": 1, "heads": 2, "mlp_ratio": 2}


def full() -> Plan:
  """``make bench``: three rounds, about 11 minutes on 2 idle CPU cores."""
  from benchmarks import models  # Flax, only where the plan is made.

  return Plan(
    cases=[
      Case("1M", "1 leaf of 1M", [[1_000_000]]),
      Case("16M", "1 leaf of 16M", [[16_000_000]]),
      Case("400x10k", "400 leaves of 10k", [[10_000]] * 400),
      Case("transformer", "Flax transformer", models.transformer_shapes(TRANSFORMER)),
      Case("mlp", "MLP loop, 500 steps", [], 500, 1e-4, warmup=1, min_reps=3, max_reps=3),
    ],
    rounds=3,
  )


def quick() -> Plan:
  """``--quick``: tiny sizes, one round, one step each; checks the code, not the speed."""
  from benchmarks import models

  once = {"warmup": 1, "min_reps": 1, "max_reps": 1}
  return Plan(
    cases=[
      Case("1k", "1 leaf of 1k", [[1_000]], **once),
      Case("transformer", "Flax transformer", models.transformer_shapes(TINY_TRANSFORMER), **once),
      Case("mlp", "MLP loop, 3 steps", [], 3, 1e-4, **once),
    ],
    rounds=1,
    own_process=False,
  )
