"""The memory-bandwidth limit, measured in the process that times the step.

A step of ``n`` float32 parameters that reads and writes each of its buffers once moves
36 bytes per parameter: it reads the parameter, its gradient, ``mu``, ``nu`` and
``nu_max`` and writes the four updated ones back. No step can beat a loop that does
exactly that and nothing else, so that loop's time is the limit. :data:`SOURCE` is that
loop in C: it reads ``g`` and adds ``0 * g`` in place to four other buffers, so it has
the traffic of the step and almost no arithmetic, split over one plain thread per core
(plain threads, not OpenMP, whose idle threads keep spinning and would slow the step
timed next in the process). It is compiled at run time with ``cc -O3 -march=native``
and called through :mod:`ctypes` on five fresh buffers of ``n`` float32 each.

The worker runs it right after a case's timed steps, in the same process and as many
times: on this kind of machine one process may get memory half again as fast as the
next, so a limit measured in another process would not compare like with like. Before
the passes it sleeps :data:`SETTLE_S`, long enough for the threads of PyTorch's OpenMP
runtime to stop spinning after the last step (4 to 35 ms were seen on 2 cores). A
contender whose one pass moves other bytes (Adam: 28, bfloat16 state: 24) is set
against the loop's time scaled by its bytes over 36. On buffers that fit in the
last-level cache (1M parameters: 20 MB) the loop measures the cache, not the memory.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

BYTES_PER_PARAM = 36
SETTLE_S = 0.05
SOURCE = r"""
#include <pthread.h>
#include <time.h>
typedef struct { float *b[5]; long begin, end; float s; } part_t;
static void *pass(void *arg) {
  const part_t *t = arg;
  const float *restrict g = t->b[0], s = t->s;
  float *restrict p = t->b[1], *restrict m = t->b[2], *restrict v = t->b[3], *restrict w = t->b[4];
  for (long i = t->begin; i < t->end; ++i) {
    const float x = g[i] * s;
    p[i] += x; m[i] += x; v[i] += x; w[i] += x;
  }
  return 0;
}
double one_pass(float **b, long n, float s, int threads) {
  part_t parts[64]; pthread_t ids[64]; struct timespec t0, t1;
  if (threads > 64) threads = 64;
  const long chunk = ((n + threads - 1) / threads + 15) / 16 * 16; /* whole cache lines */
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int k = 0; k < threads; ++k) {
    long begin = k * chunk < n ? k * chunk : n, end = begin + chunk < n ? begin + chunk : n;
    parts[k] = (part_t){{b[0], b[1], b[2], b[3], b[4]}, begin, end, s};
    if (k > 0) pthread_create(&ids[k], 0, pass, &parts[k]);
  }
  pass(&parts[0]);
  for (int k = 1; k < threads; ++k) pthread_join(ids[k], 0);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  return (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
}
"""


@functools.cache
def _library() -> ctypes.CDLL:
  """:data:`SOURCE`, compiled into a temporary folder and loaded."""
  compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
  if compiler is None:
    raise RuntimeError("the bandwidth limit needs a C compiler (cc, gcc or clang)")
  folder = Path(tempfile.mkdtemp(prefix="amsgrad-limit-"))
  (folder / "limit.c").write_text(SOURCE)
  command = [compiler, "-O3", "-march=native", "-shared", "-fPIC", "-pthread"]
  subprocess.run([*command, "limit.c", "-o", "limit.so"], cwd=folder, check=True)
  library = ctypes.CDLL(str(folder / "limit.so"))
  shutil.rmtree(folder)
  library.one_pass.restype = ctypes.c_double
  library.one_pass.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int]
  return library


def one_pass(buffers: list[np.ndarray], scale: float = 0.0) -> float:
  """Seconds of one pass ``x += scale * g`` over ``buffers``: ``g``, then the four it
  updates in place, contiguous float32 of one length; with ``scale`` 0 nothing changes."""
  pointers = (ctypes.c_void_p * 5)(*(b.ctypes.data for b in buffers))
  threads = os.cpu_count() or 1
  return _library().one_pass(pointers, buffers[0].size, scale, threads)


def pass_times(parameters: int, count: int) -> list[float]:
  """Times of ``count`` passes over five buffers of ``parameters`` float32, after one
  untimed pass; the buffers hold different values, page after page."""
  buffers = [np.arange(parameters, dtype=np.float32) + k for k in range(5)]
  time.sleep(SETTLE_S)
  one_pass(buffers)
  return [one_pass(buffers) for _ in range(count)]
