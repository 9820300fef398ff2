"""amsgrad_jax against optax.amsgrad in one process, their steps alternating.

Separate processes keep PyTorch's threads away from JAX, but each process also has its
own memory placement and thread timing, which shifts its times by a few percent. Two JAX
steps can share a process without disturbing each other, so for cases (a) and (b) this
module times both in one process, alternating A B B A, and reports the ratio of their
median steps. Run by the driver once per round as
``python -m benchmarks.paired CONFIG_JSON RESULT_JSON``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from benchmarks import jax_worker
from benchmarks.config import STEP_LEARNING_RATE, Case, Config
from benchmarks.contenders import DEFAULT, OPTAX, by_name

PAIR = (DEFAULT, OPTAX)


def _prepare(name: str, case: Case, config: Config) -> list[Any]:
  """``[compiled_step, params, opt_state, grads]`` of contender ``name`` on ``case``."""
  contender = by_name(name)
  rng = np.random.default_rng(0)
  abstract = jax_worker.parameters(case, config)
  params = jax_worker.random_like(abstract, rng, 1.0)
  grads = jax_worker.random_like(abstract, rng, 1e-2)
  tx = contender.make_tx(STEP_LEARNING_RATE)
  opt_state = tx.init(params)
  compiled = jax_worker.step_function(contender, tx).lower(params, opt_state, grads).compile()
  return [compiled, params, opt_state, grads]


def measure(case: Case, config: Config) -> dict[str, list[float]]:
  """Step times of both contenders on ``case``, taken alternately."""
  runs = {name: _prepare(name, case, config) for name in PAIR}
  times: dict[str, list[float]] = {name: [] for name in PAIR}
  for index in range(case.warmup + case.repetitions):
    order = PAIR if index % 2 == 0 else PAIR[::-1]
    for name in order:
      compiled, params, opt_state, grads = runs[name]
      start = time.perf_counter()
      params, opt_state = compiled(params, opt_state, grads)
      jax.block_until_ready((params, opt_state))
      if index >= case.warmup:
        times[name].append(time.perf_counter() - start)
      runs[name][1:3] = [params, opt_state]
  return times


def main(argv: list[str]) -> None:
  config_path, result_path = argv
  config = Config.from_json(Path(config_path).read_text())
  results = {case.id: measure(case, config) for case in config.cases if case.group in ("a", "b")}
  Path(result_path).write_text(json.dumps(results))


if __name__ == "__main__":
  main(sys.argv[1:])
