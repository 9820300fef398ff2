"""One worker process: time one contender on every case, write the results as JSON.

Run by the driver as ``python -m benchmarks.worker CONTENDER CONFIG_JSON RESULT_JSON``;
only the framework the contender needs is imported, so PyTorch's OpenMP threads never
share a process with a JAX step. The results file is rewritten after every case, so a
process stopped for taking too long still reports the cases it finished.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from benchmarks.config import Config
from benchmarks.contenders import by_name


def main(argv: list[str]) -> None:
  name, config_path, result_path = argv
  contender = by_name(name)
  config = Config.from_json(Path(config_path).read_text())
  start = time.perf_counter()
  if contender.framework == "torch":
    from benchmarks import torch_worker as worker
  else:
    from benchmarks import jax_worker as worker
  result = {"contender": name, **worker.environment(), "cases": {}}
  for case in config.cases:
    if case.group == "scaling" and not contender.scaling:
      continue
    result["cases"][case.id] = worker.measure(contender, case, config)
    result["wall_s"] = time.perf_counter() - start
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
  main(sys.argv[1:])
