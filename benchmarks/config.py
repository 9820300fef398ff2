"""What a benchmark run measures: the cases, their sizes and how often each is timed.

Two configurations: :func:`full` (``make bench``, about 8 minutes on 2 CPU cores) and
:func:`quick` (tiny sizes, one round, one repetition: a smoke run of every code path in a
few seconds per contender). Everything here is plain data, written to JSON and read back
by each worker process.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

# Learning rates: a typical one for the update-step cases, the MLP listing's for its loop.
STEP_LEARNING_RATE = 1e-3
MLP_LEARNING_RATE = 1e-4
# Timed steps per case and process, at the least (unless a case asks for fewer).
MIN_REPETITIONS = 3


@dataclass(frozen=True)
class Case:
  """One thing to time.

  Attributes:
    id: short unique name, used as a key in the JSON results.
    group: ``"a"`` (one leaf), ``"b"`` (many leaves), ``"c"`` (a Flax model's tree),
      ``"d"`` (the MLP training loop), or ``"scaling"`` (extra points for the plots only).
    label: what a reader sees in the tables.
    kind: ``"step"`` (one optimizer update over ``shapes``) or ``"loop"`` (training loop).
    shapes: the parameter shapes of a ``"step"`` case, one per leaf.
    model: ``"transformer"`` when the tree is a Flax model's, built by the JAX worker.
    steps: training steps of a ``"loop"`` case.
    repetitions: at most this many timed steps (or loops) per process, after ``warmup``
      untimed ones.
    time_budget_s: stop timing once the timed steps add up to this many seconds and
      :data:`MIN_REPETITIONS` have run, so a slow contender cannot stall the run.
  """

  id: str
  group: str
  label: str
  kind: str
  shapes: tuple[tuple[int, ...], ...] = ()
  model: str | None = None
  steps: int = 0
  repetitions: int = 1
  warmup: int = 1
  time_budget_s: float = 1.0

  def done(self, times: list[float]) -> bool:
    """Whether ``times`` (the timed steps so far) are enough."""
    if len(times) >= self.repetitions:
      return True
    return len(times) >= MIN_REPETITIONS and sum(times) >= self.time_budget_s

  @property
  def parameter_count(self) -> int:
    return sum(_product(shape) for shape in self.shapes)

  @property
  def leaf_count(self) -> int:
    return len(self.shapes)


@dataclass(frozen=True)
class Config:
  """A whole run: cases, rounds of alternating processes, the bandwidth probe's size, and
  how long one worker process may take (cases it has not reached by then are skipped in
  later rounds and reported as timed out), and whether the rounds after the first reuse
  the first one's compiled steps (compilation time is never timed)."""

  name: str
  cases: tuple[Case, ...]
  rounds: int
  bandwidth_elements: int
  bandwidth_repetitions: int
  worker_timeout_s: float
  compilation_cache: bool = True
  transformer: dict[str, int] = field(default_factory=dict)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self))

  @staticmethod
  def from_json(text: str) -> Config:
    raw = json.loads(text)
    cases = tuple(
      Case(**{**case, "shapes": tuple(tuple(shape) for shape in case["shapes"])})
      for case in raw.pop("cases")
    )
    return Config(cases=cases, **raw)


def _product(shape: tuple[int, ...]) -> int:
  count = 1
  for size in shape:
    count *= size
  return count


def _repetitions(parameter_count: int, budget: float, low: int, high: int) -> int:
  """Timed steps so that one process spends roughly the same time on every case."""
  return max(low, min(high, int(budget / max(parameter_count, 1))))


def _step_cases(
  single_sizes: tuple[int, ...],
  leaf_total: int,
  leaf_counts: tuple[int, ...],
  many_leaves: tuple[int, int],
  budget: float,
  low: int,
  high: int,
) -> list[Case]:
  """Cases (a), (b) and the scaling points: one leaf of each size, and ``leaf_total``
  parameters split into each of ``leaf_counts`` equal leaves."""
  headline = {single_sizes[0], single_sizes[-1], *single_sizes[2:3]}
  cases = []
  for size in single_sizes:
    cases.append(
      Case(
        id=f"leaf-{size}",
        group="a" if size in headline else "scaling",
        label=f"1 leaf of {_human(size)}",
        kind="step",
        shapes=((size,),),
        repetitions=_repetitions(size, budget, low, high),
        warmup=2 if high > 1 else 1,
      )
    )
  for count in leaf_counts:
    size = leaf_total // count
    is_b = (count, size) == many_leaves
    cases.append(
      Case(
        id=f"leaves-{count}x{size}",
        group="b" if is_b else "scaling",
        label=f"{count} leaves of {_human(size)}",
        kind="step",
        shapes=((size,),) * count,
        repetitions=_repetitions(leaf_total, budget, low, high),
        warmup=2 if high > 1 else 1,
      )
    )
  return cases


def _slowest_last(cases: list[Case]) -> tuple[Case, ...]:
  """The scaling points of many leaves last: they compile longest, so a worker that runs
  out of time loses the fewest headline cases."""
  return tuple(sorted(cases, key=lambda case: case.group == "scaling" and case.leaf_count > 1))


def _human(count: int) -> str:
  for unit, scale in (("M", 1_000_000), ("k", 1_000)):
    if count >= scale and count % (scale // 10) == 0:
      return f"{count / scale:g}{unit}"
  return str(count)


def full() -> Config:
  """``make bench``: the sizes of the issue, three rounds, about 8 minutes on 2 cores."""
  cases = _step_cases(
    single_sizes=(1_000_000, 4_000_000, 16_000_000, 64_000_000),
    leaf_total=4_000_000,
    leaf_counts=(10, 100, 400, 1000),
    many_leaves=(400, 10_000),
    budget=1.6e8,
    low=4,
    high=40,
  )
  transformer = {"vocab": 4096, "width": 512, "depth": 6, "heads": 8, "mlp_ratio": 4}
  cases.append(
    Case(
      id="transformer",
      group="c",
      label="Flax transformer",
      kind="step",
      model="transformer",
      repetitions=12,
      warmup=2,
    )
  )
  cases.append(Case(id="mlp-loop", group="d", label="MLP loop, 500 steps", kind="loop", steps=500))
  return Config(
    name="full",
    cases=_slowest_last(cases),
    rounds=3,
    bandwidth_elements=64_000_000,
    bandwidth_repetitions=20,
    worker_timeout_s=60,
    transformer=transformer,
  )


def quick() -> Config:
  """``--quick``: tiny sizes, one round, one repetition; checks the code, not the speed."""
  cases = _step_cases(
    single_sizes=(1_000, 16_000),
    leaf_total=4_000,
    leaf_counts=(10,),
    many_leaves=(10, 400),
    budget=0.0,
    low=1,
    high=1,
  )
  transformer = {"vocab": 64, "width": 16, "depth": 1, "heads": 2, "mlp_ratio": 2}
  cases.append(
    Case(id="transformer", group="c", label="Flax transformer", kind="step", model="transformer")
  )
  cases.append(Case(id="mlp-loop", group="d", label="MLP loop, 3 steps", kind="loop", steps=3))
  return Config(
    name="quick",
    cases=_slowest_last(cases),
    rounds=1,
    bandwidth_elements=1_000_000,
    bandwidth_repetitions=2,
    worker_timeout_s=240,
    compilation_cache=False,
    transformer=transformer,
  )


def with_shapes(config: Config, shapes: dict[str, tuple[tuple[int, ...], ...]]) -> Config:
  """``config`` with the shapes of model cases filled in (computed once by the driver)."""
  cases = tuple(
    dataclasses.replace(case, shapes=shapes[case.model]) if case.model in shapes else case
    for case in config.cases
  )
  return dataclasses.replace(config, cases=cases)


def without(config: Config, skipped: set[str]) -> Config:
  """``config`` without the cases whose ids are in ``skipped``."""
  return dataclasses.replace(
    config, cases=tuple(case for case in config.cases if case.id not in skipped)
  )


def describe(config: Config) -> list[dict[str, Any]]:
  """One line per case for the results file."""
  return [
    {
      "id": case.id,
      "group": case.group,
      "label": case.label,
      "kind": case.kind,
      "parameters": case.parameter_count,
      "leaves": case.leaf_count,
      "steps": case.steps,
      "repetitions": case.repetitions,
    }
    for case in config.cases
  ]
