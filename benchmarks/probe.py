"""The in-process bandwidth limit: one pass of AMSGrad's memory traffic on the step's own buffers.

The stream.c limit (:mod:`benchmarks.bandwidth`) is measured in a process of its own, and
on this kind of machine the memory speed a process gets varies from one process to the
next (a whole process may stream at 120 GB/s and the next at 72 GB/s). Comparing a step's
median with the best round of another process does not compare like with like. So the
worker also runs ``probe.c`` in its own process, on the very buffers of the step it
times, right after the timed steps and as many times, back to back like them: both see
the same process and pages, within a second of each other, and the steps are timed
exactly as without it. It does so on single-leaf cases for the
``amsgrad_jax.apply_step`` contenders (:mod:`benchmarks.jax_worker`) and for PyTorch's
fused step (:mod:`benchmarks.torch_worker`, which first lets PyTorch's spinning OpenMP
threads go to sleep). This module imports neither JAX nor PyTorch, so either worker can
use it.

``probe.c`` is compiled at run time into a shared library
(``cc -O3 -march=native -shared -fPIC -pthread``, the compiler found as for ``stream.c``)
and called through :mod:`ctypes`. One call reads the gradient and adds ``s * g`` in place
to the parameter, ``mu``, ``nu`` and ``nu_max``, with ``s = 0`` so that nothing changes:
:data:`BYTES_PER_ELEMENT` = 36 bytes per element, the traffic of one AMSGrad pass, with
almost no arithmetic, on every core (plain threads, one contiguous part each).

If a step of ``n`` parameters takes ``T_step`` and the probe's pass over the same buffers
takes ``T_probe`` (medians over one process), both move ``36 n`` bytes, so the step runs
at ``T_probe / T_step`` of the rate the probe reached there: the step's fraction of the
in-process limit (:mod:`benchmarks.report` takes the median of that fraction over rounds).
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import bandwidth

SOURCE = Path(__file__).with_name("probe.c")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-pthread")
# Read p, g, mu, nu, nu_max and write p, mu, nu, nu_max: 9 float32 per element.
BYTES_PER_ELEMENT = 36
# The driver builds the library once and names it here for the workers ("" when no
# compiler could build it); a process without it builds its own.
LIBRARY_ENV = "AMSGRAD_BENCH_PROBE_LIBRARY"
NOT_BUILT = "no C compiler could build benchmarks/probe.c"
METHOD = f"probe.c (cc {' '.join(FLAGS)}) on the step's own buffers"


def build(directory: Path) -> Path | None:
  """Compile ``probe.c`` into a shared library in ``directory``; ``None`` when no compiler
  can build it."""
  return bandwidth.compile_c(SOURCE, directory / "libamsgrad_probe.so", FLAGS)


def threads() -> int:
  """The cores this process may run on: the probe's thread count."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


class Probe:
  """The loaded library: :meth:`time_pass` times one pass over five raw float32 buffers."""

  def __init__(self, library: Path, thread_count: int | None = None) -> None:
    self._library = ctypes.CDLL(str(library))
    self._pass = self._library.amsgrad_traffic
    self._pass.restype = ctypes.c_double
    self._pass.argtypes = [
      *[ctypes.c_void_p] * 5,
      ctypes.c_long,
      ctypes.c_float,
      ctypes.c_int,
    ]
    self.threads = thread_count or threads()

  def time_pass(self, pointers: Sequence[int], elements: int, scale: float = 0.0) -> float:
    """Seconds of one pass ``x += scale * g`` over the buffers at ``pointers`` (``g``, then
    the four updated in place: parameter, ``mu``, ``nu``, ``nu_max``), each holding
    ``elements`` float32. With the default ``scale`` of 0 no value changes (but -0.0,
    which may become +0.0). The buffers must be distinct and must not overlap."""
    if len(pointers) != 5 or len(set(pointers)) != 5 or not all(pointers):
      raise ValueError(f"need five distinct non-null buffers, got {list(pointers)}")
    seconds = self._pass(*pointers, elements, scale, self.threads)
    if seconds < 0:
      raise ValueError(f"amsgrad_traffic rejected {elements} elements on {self.threads} threads")
    return seconds


@functools.cache
def from_environment() -> tuple[Probe | None, str | None]:
  """This process's probe and, when there is none, why: the library the driver built
  (named by :data:`LIBRARY_ENV`), or one built now into a temporary folder."""
  named = os.environ.get(LIBRARY_ENV)
  if named == "":
    return None, NOT_BUILT
  if named is None:
    directory = Path(tempfile.mkdtemp(prefix="amsgrad-probe-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    library = build(directory)
    if library is None:
      return None, NOT_BUILT
    named = str(library)
  try:
    return Probe(Path(named)), None
  except (OSError, AttributeError) as error:
    return None, f"could not load {named}: {error}"


def prepared(find_pointers: Callable[[], Sequence[int]]) -> tuple[Probe | None, dict[str, Any]]:
  """This process's probe for the buffers ``find_pointers`` finds, with the facts to record
  about it; ``(None, {"probe_error": why})`` when ``find_pointers`` raises ``ValueError``
  (the buffers are not one AMSGrad pass's) or there is no probe library."""
  try:
    find_pointers()
  except ValueError as error:
    return None, {"probe_error": str(error)}
  in_process_probe, reason = from_environment()
  if in_process_probe is None:
    return None, {"probe_error": reason}
  return in_process_probe, {
    "probe_threads": in_process_probe.threads,
    "probe_bytes_per_param": BYTES_PER_ELEMENT,
  }
