"""The stream.c memory-bandwidth limit of this machine, measured with all cores.

``stream.c`` (STREAM's copy and triad, an in-place update ``c = c + s*b``, and a kernel
with the memory traffic of one AMSGrad pass, in float32, with OpenMP over every core) is
compiled at run time with ``cc -O3 -march=native -fopenmp``; each round of the benchmark
runs it once, in its own process, between the contenders. Its arrays are far larger than
the last-level cache. Bytes are counted as STREAM counts them (what each loop reads and
writes), the way the optimizer steps are counted. The stream.c limit is the best rate any
kernel reached in the run. It is measured in other processes than the steps, and the
memory speed a process gets varies from one process to the next, so a step's share of it
is context; :mod:`benchmarks.probe` measures the like-for-like limit inside the step's
own process. Without a C compiler, a NumPy copy and triad on one thread stand in, and the
results say so: a lower bound on the limit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

SOURCE = Path(__file__).with_name("stream.c")
FLAGS = ("-O3", "-march=native", "-fopenmp")
# Keeps the copy a vectorised loop: GCC would otherwise call memcpy, which switches to
# non-temporal stores for large copies and then measures something else.
GCC_ONLY_FLAGS = ("-fno-tree-loop-distribute-patterns",)
KERNELS = ("copy", "triad", "update", "step")


def compiler() -> str | None:
  """The C compiler: ``$CC``, else ``cc``, else ``gcc`` on the path; ``None`` if none."""
  return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def compile_c(source: Path, output: Path, flags: tuple[str, ...]) -> Path | None:
  """Compile ``source`` into ``output`` with ``flags`` (and, first, the GCC-only flags that
  keep loops vectorised); ``None`` when no compiler can build it."""
  compiler_path = compiler()
  if compiler_path is None:
    return None
  for attempt in ((*flags, *GCC_ONLY_FLAGS), flags):
    try:
      subprocess.run(
        [compiler_path, *attempt, str(source), "-o", str(output)],
        check=True,
        capture_output=True,
        timeout=120,
      )
    except (OSError, subprocess.SubprocessError):
      continue
    return output
  return None


def build(directory: Path) -> Path | None:
  """Compile ``stream.c`` into ``directory``; ``None`` when no compiler can build it."""
  return compile_c(SOURCE, directory / "stream", FLAGS)


def measure(binary: Path | None, elements: int, repetitions: int) -> dict[str, Any]:
  """Best and median rate of each kernel in GB/s, and how they were measured."""
  if binary is not None:
    threads = os.cpu_count() or 1
    completed = subprocess.run(
      [str(binary), str(elements), str(repetitions)],
      check=True,
      capture_output=True,
      text=True,
      env={**os.environ, "OMP_NUM_THREADS": str(threads)},
      timeout=300,
    )
    result = json.loads(completed.stdout)
    result["method"] = f"stream.c (cc {' '.join(FLAGS)}), {result['threads']} threads"
    return result
  return _numpy_fallback(elements, repetitions)


def _numpy_fallback(elements: int, repetitions: int) -> dict[str, Any]:
  a = np.ones(elements, np.float32)
  b = np.full(elements, 2.0, np.float32)
  c = np.full(elements, 0.5, np.float32)
  copy_s, triad_s = [], []
  for _ in range(repetitions):
    start = time.perf_counter()
    np.copyto(a, b)
    copy_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    np.multiply(c, np.float32(3.0), out=a)
    np.add(a, b, out=a)  # Two passes in NumPy; counted as one triad, so a lower bound.
    triad_s.append(time.perf_counter() - start)
  copy_s.sort()
  triad_s.sort()
  return {
    "threads": 1,
    "elements": elements,
    "repetitions": repetitions,
    "copy_best_gbs": 8 * elements / copy_s[0] * 1e-9,
    "copy_median_gbs": 8 * elements / copy_s[len(copy_s) // 2] * 1e-9,
    "triad_best_gbs": 12 * elements / triad_s[0] * 1e-9,
    "triad_median_gbs": 12 * elements / triad_s[len(triad_s) // 2] * 1e-9,
    "update_best_gbs": None,
    "update_median_gbs": None,
    "step_best_gbs": None,
    "step_median_gbs": None,
    "method": "NumPy on one thread (no C compiler found): a lower bound on the limit",
  }


def limit(rounds: list[dict[str, Any]]) -> dict[str, Any]:
  """The limit of a run: per kernel, the best and the median of the rounds' medians;
  the limit itself is the best rate of any kernel in any round."""
  summary: dict[str, Any] = {"method": rounds[0]["method"], "threads": rounds[0]["threads"]}
  for kernel in KERNELS:
    best = [r[f"{kernel}_best_gbs"] for r in rounds if r.get(f"{kernel}_best_gbs") is not None]
    median = [
      r[f"{kernel}_median_gbs"] for r in rounds if r.get(f"{kernel}_median_gbs") is not None
    ]
    summary[f"{kernel}_best_gbs"] = max(best) if best else None
    summary[f"{kernel}_median_gbs"] = float(np.median(median)) if median else None
  summary["limit_gbs"] = max(
    summary[f"{kernel}_best_gbs"] for kernel in KERNELS if summary[f"{kernel}_best_gbs"]
  )
  return summary
