"""Run the contenders in alternating processes, round after round, and collect the times.

Every round starts with the stream.c bandwidth probe, then starts one fresh process per
contender in a fixed order (A B C ... A B C ...), each timing its contender on every case,
and ends with one process timing amsgrad_jax and optax.amsgrad side by side
(:mod:`benchmarks.paired`). Nothing is shared between processes: a PyTorch step leaves
OpenMP threads spinning that would slow whatever ran next in the same process, and every
contender pays its own start-up. The in-process probe (:mod:`benchmarks.probe`) is built
once here and named to the workers in their environment.
"""

from __future__ import annotations

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

from benchmarks import bandwidth, config, models, probe
from benchmarks.contenders import DEFAULT as PAIR_DEFAULT
from benchmarks.contenders import OPTAX as PAIR_OPTAX
from benchmarks.contenders import Contender, contenders

ROOT = Path(__file__).resolve().parents[1]


def worker_environment(cache_dir: Path | None) -> dict[str, str]:
  """The environment of a worker: this one, without a forced host-device count (the test
  suite's 8 virtual CPU devices would split the thread pool), and with a compilation cache
  in ``cache_dir`` (when given) shared by the rounds so that only the first one compiles."""
  env = dict(os.environ)
  flags = [
    flag
    for flag in env.get("XLA_FLAGS", "").split()
    if not flag.startswith("--xla_force_host_platform_device_count")
  ]
  env["XLA_FLAGS"] = " ".join(flags)
  if cache_dir is not None:
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  return env


def machine() -> dict[str, Any]:
  """Where the run happened."""
  model = platform.processor() or platform.machine()
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return {
    "cpu": model,
    "cores": os.cpu_count(),
    "system": f"{platform.system()} {platform.release()}",
    "python": platform.python_version(),
    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
  }


def _load_average() -> float | None:
  """The 1-minute load average: above 0 or so, other work shared the cores."""
  try:
    return os.getloadavg()[0]
  except OSError:
    return None


def run_worker(
  contender: Contender,
  config_path: Path,
  result_path: Path,
  env: dict[str, str],
  timeout_s: float,
) -> dict[str, Any]:
  """One process timing ``contender`` on every case of the config at ``config_path``.

  Returns its results; ``"error"`` holds what it died of, and ``"timed_out"`` is set when
  it was stopped after ``timeout_s`` (its finished cases are kept).
  """
  result_path.unlink(missing_ok=True)
  command = [sys.executable, "-m", "benchmarks.worker", contender.name]
  command += [str(config_path), str(result_path)]
  timed_out = False
  try:
    completed = subprocess.run(
      command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
    )
  except subprocess.TimeoutExpired:
    timed_out = True
  else:
    if completed.returncode != 0:
      return {"contender": contender.name, "error": completed.stderr[-4000:]}
  result = (
    json.loads(result_path.read_text())
    if result_path.exists()
    else {"contender": contender.name, "cases": {}}
  )
  if timed_out:
    result["timed_out"] = True
    result["wall_s"] = timeout_s
  return result


def run_paired(scratch_dir: Path, run_config: config.Config, env: dict[str, str]) -> dict[str, Any]:
  """One process timing amsgrad_jax and optax.amsgrad alternately (:mod:`benchmarks.paired`)."""
  config_path = scratch_dir / "config-paired.json"
  config_path.write_text(run_config.to_json())
  result_path = scratch_dir / "paired.json"
  result_path.unlink(missing_ok=True)
  command = [sys.executable, "-m", "benchmarks.paired", str(config_path), str(result_path)]
  try:
    completed = subprocess.run(
      command,
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=run_config.worker_timeout_s,
    )
  except subprocess.TimeoutExpired:
    return {"error": f"stopped after {run_config.worker_timeout_s} s"}
  if completed.returncode != 0:
    return {"error": completed.stderr[-4000:]}
  return json.loads(result_path.read_text())


def run(
  run_config: config.Config,
  only: list[str] | None = None,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """All rounds of ``run_config`` for every contender (or those named in ``only``);
  returns the raw results (see :mod:`benchmarks.report`).

  A case that a contender's process did not reach within the config's time limit is
  skipped for that contender in later rounds and listed under ``"timed_out"``.
  """
  load_at_start = _load_average()
  racing = contenders()
  if only is not None:
    unknown = set(only) - {contender.name for contender in racing}
    if unknown:
      raise ValueError(f"unknown contenders {sorted(unknown)}; known: {[c.name for c in racing]}")
    racing = [contender for contender in racing if contender.name in only]
  start = time.perf_counter()
  models_needed = {case.model for case in run_config.cases if case.model}
  shapes = {}
  if "transformer" in models_needed:
    shapes["transformer"] = models.transformer_shapes(run_config.transformer)
  run_config = config.with_shapes(run_config, shapes)
  bandwidth_rounds: list[dict[str, Any]] = []
  rounds: dict[str, list[dict[str, Any]]] = {contender.name: [] for contender in racing}
  timed_out: dict[str, set[str]] = {contender.name: set() for contender in racing}
  paired_rounds: list[dict[str, Any]] = []
  with tempfile.TemporaryDirectory(prefix="amsgrad-bench-") as scratch:
    scratch_dir = Path(scratch)
    binary = bandwidth.build(scratch_dir)
    library = probe.build(scratch_dir)
    env = worker_environment(scratch_dir / "jax-cache" if run_config.compilation_cache else None)
    env[probe.LIBRARY_ENV] = "" if library is None else str(library)
    for round_index in range(run_config.rounds):
      bandwidth_rounds.append(
        bandwidth.measure(binary, run_config.bandwidth_elements, run_config.bandwidth_repetitions)
      )
      for position, contender in enumerate(racing):
        contender_config = config.without(run_config, timed_out[contender.name])
        config_path = scratch_dir / f"config-{position}.json"
        config_path.write_text(contender_config.to_json())
        result = run_worker(
          contender,
          config_path,
          scratch_dir / "result.json",
          env,
          run_config.worker_timeout_s,
        )
        rounds[contender.name].append(result)
        if result.get("timed_out"):
          expected = {
            case.id
            for case in contender_config.cases
            if case.group != "scaling" or contender.scaling
          }
          timed_out[contender.name] |= expected - set(result["cases"])
        status = "FAILED" if "error" in result else f"{result['wall_s']:.1f} s"
        if result.get("timed_out"):
          status += f", stopped: skips {sorted(timed_out[contender.name])} from now on"
        log(
          f"round {round_index + 1}/{run_config.rounds}  {contender.name:<36} {status}"
          f"  ({time.perf_counter() - start:.0f} s so far)"
        )
      if {PAIR_DEFAULT, PAIR_OPTAX} <= {contender.name for contender in racing}:
        paired_rounds.append(run_paired(scratch_dir, run_config, env))
        log(
          f"round {round_index + 1}/{run_config.rounds}  {'paired in one process':<36} "
          f"{'FAILED' if 'error' in paired_rounds[-1] else 'done'}"
          f"  ({time.perf_counter() - start:.0f} s so far)"
        )
  return {
    "config": run_config,
    "contenders": racing,
    "machine": {**machine(), "load_average": [load_at_start, _load_average()]},
    "bandwidth_rounds": bandwidth_rounds,
    "probe": {
      "method": probe.METHOD,
      "built": library is not None,
      "error": None if library is not None else probe.NOT_BUILT,
    },
    "rounds": rounds,
    "timed_out": {name: sorted(ids) for name, ids in timed_out.items() if ids},
    "paired_rounds": paired_rounds,
    "wall_s": time.perf_counter() - start,
  }
