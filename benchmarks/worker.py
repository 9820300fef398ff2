"""One worker process: time contenders on every case and print the results as JSON.

Run by the driver as ``python -m benchmarks.worker`` with ``{"contenders": [names],
"cases": [cases]}`` as JSON on stdin; prints ``{name: {"cases": {case id: result}}}`` as
the last line of stdout. Only the framework of the contenders is imported for timing,
so PyTorch's OpenMP threads never share a process with a JAX step. After each step
case's timed steps, the same process measures the memory-bandwidth limit for as many
passes over buffers of the case's size (:mod:`benchmarks.limit`).
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Callable

from benchmarks import limit
from benchmarks.cases import Case
from benchmarks.contenders import by_name


def repeat(run: Callable[[], None], case: Case) -> list[float]:
  """Seconds of each timed call of ``run``, after ``case.warmup`` untimed ones."""
  for _ in range(case.warmup):
    run()
  times: list[float] = []
  while len(times) < case.min_reps or (len(times) < case.max_reps and sum(times) < case.budget_s):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return times


def main() -> None:
  request = json.loads(sys.stdin.read())
  cases = [Case(**case) for case in request["cases"]]
  results = {}
  for name in request["contenders"]:
    contender = by_name(name)
    framework = importlib.import_module(f"benchmarks.{contender.framework}_worker")
    results[name] = {"versions": framework.setup(), "cases": {}}
    for case in cases:
      result = framework.measure(contender, case, repeat)
      if not case.steps:
        result["limit_s"] = limit.pass_times(case.parameters, len(result["times_s"]))
      results[name]["cases"][case.id] = result
  print(json.dumps(results))


if __name__ == "__main__":
  main()
