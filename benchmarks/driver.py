"""Run the contenders in alternating processes, round after round, and collect the times.

Each round starts one fresh process per contender in a fixed order (A B C ... A B C ...),
each timing its contender on every case. Nothing is shared between processes: a PyTorch
step leaves OpenMP threads spinning that would slow whatever ran next in its process, and
every contender pays its own start-up. Rounds after the first load the first one's
compiled steps from a compilation cache (compilation is never timed anyway).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.cases import Plan
from benchmarks.contenders import by_name

ROOT = Path(__file__).resolve().parents[1]
WORKER_TIMEOUT_S = 240


def worker_environment(cache: str) -> dict[str, str]:
  """This environment, without a forced host-device count (the test suite's 8 virtual
  devices would split XLA's thread pool), with a compilation cache in ``cache``."""
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "").split()
  env["XLA_FLAGS"] = " ".join(f for f in flags if "host_platform_device_count" not in f)
  env["JAX_COMPILATION_CACHE_DIR"] = cache
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  return env


def machine() -> dict[str, Any]:
  """Where and when the run happened."""
  cpuinfo = Path("/proc/cpuinfo")
  lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
  models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
  return {
    "cpu": models[0] if models else platform.machine(),
    "cores": os.cpu_count(),
    "python": platform.python_version(),
    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    "load_average_at_start": os.getloadavg()[0],
  }


def run_process(names: list[str], plan: Plan, env: dict[str, str]) -> dict[str, Any]:
  """One worker process timing ``names``; an error stands for each result it did not give."""
  request = {"contenders": names, "cases": [dataclasses.asdict(case) for case in plan.cases]}
  command = [sys.executable, "-m", "benchmarks.worker"]
  try:
    done = subprocess.run(
      command,
      input=json.dumps(request),
      capture_output=True,
      text=True,
      cwd=ROOT,
      env=env,
      timeout=WORKER_TIMEOUT_S,
    )
  except subprocess.TimeoutExpired:
    return {name: {"error": f"stopped after {WORKER_TIMEOUT_S} s"} for name in names}
  if done.returncode != 0:
    return {name: {"error": done.stderr[-3000:]} for name in names}
  return json.loads(done.stdout.splitlines()[-1])


def run(plan: Plan, names: list[str], log: Callable[[str], None] = print) -> dict[str, Any]:
  """All rounds of ``plan`` for the contenders called ``names``: the machine, the wall
  time, and for each contender one result per round."""
  start = time.perf_counter()
  about = machine()
  if plan.own_process:
    groups = [[name] for name in names]
  else:
    frameworks = {by_name(name).framework for name in names}
    groups = [[n for n in names if by_name(n).framework == f] for f in sorted(frameworks)]
  rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
  with tempfile.TemporaryDirectory(prefix="amsgrad-bench-") as cache:
    env = worker_environment(cache)
    for index in range(plan.rounds):
      for group in groups:
        results = run_process(group, plan, env)
        for name in group:
          rounds[name].append(results[name])
          status = "FAILED" if "error" in results[name] else "done"
          elapsed = time.perf_counter() - start
          log(f"round {index + 1}/{plan.rounds}  {name:<30} {status}  ({elapsed:.0f} s so far)")
  about["load_average_at_end"] = os.getloadavg()[0]
  return {"machine": about, "wall_s": time.perf_counter() - start, "rounds": rounds}
