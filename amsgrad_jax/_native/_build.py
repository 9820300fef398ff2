"""Compile ``amsgrad_step.cc`` with the system C++ compiler, once, into a cache directory.

The shared library is cached under ``$AMSGRAD_JAX_CACHE_DIR`` (default
``$XDG_CACHE_HOME/amsgrad_jax`` or ``~/.cache/amsgrad_jax``), in a file named by a hash
of everything that changes the binary: the source, the compiler and its flags, the
jaxlib version (its FFI headers) and the CPU (the build uses ``-march=native``).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

import jax

SOURCE = Path(__file__).with_name("amsgrad_step.cc")

# -ffp-contract=off: only the fused multiply-adds the source writes out (as XLA forms them).
# -fno-math-errno: sqrt without errno, so it vectorises. -fno-trapping-math lets the
# compiler turn the NaN-propagating maximum into a blend (no value changes).
FLAGS = (
  "-std=c++17",
  "-O3",
  "-march=native",
  "-ffp-contract=off",
  "-fno-math-errno",
  "-fno-trapping-math",
  "-fPIC",
  "-shared",
)


class BuildError(RuntimeError):
  """The native kernel could not be compiled."""


def compiler() -> str | None:
  """The C++ compiler to use: ``$CXX``, else ``g++`` or ``c++`` on the ``PATH``."""
  for candidate in (os.environ.get("CXX"), "g++", "c++", "clang++"):
    if candidate and shutil.which(candidate):
      return candidate
  return None


def cache_dir() -> Path:
  """Where compiled kernels are kept."""
  if "AMSGRAD_JAX_CACHE_DIR" in os.environ:
    return Path(os.environ["AMSGRAD_JAX_CACHE_DIR"])
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "amsgrad_jax"


def _cpu_description() -> str:
  try:
    text = Path("/proc/cpuinfo").read_text()
  except OSError:
    return platform.processor()
  wanted = ("model name", "flags")
  lines = {line.split(":")[0].strip(): line for line in text.splitlines() if ":" in line}
  return platform.machine() + "".join(lines.get(key, "") for key in wanted)


def _compiler_version(cxx: str) -> str:
  result = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False)
  return result.stdout


def build_key(cxx: str) -> str:
  """A hash of the source, compiler, flags, jaxlib version and CPU."""
  digest = hashlib.sha256()
  for part in (
    SOURCE.read_bytes(),
    _compiler_version(cxx).encode(),
    " ".join(FLAGS).encode(),
    metadata.version("jaxlib").encode(),
    _cpu_description().encode(),
  ):
    digest.update(part)
    digest.update(b"\0")
  return digest.hexdigest()[:20]


def library_path() -> Path:
  """The compiled kernel, building it first when it is not cached yet.

  Raises:
    BuildError: when there is no C++ compiler or the compilation fails.
  """
  cxx = compiler()
  if cxx is None:
    raise BuildError("no C++ compiler found (set CXX, or install g++)")
  target = cache_dir() / f"amsgrad_step-{build_key(cxx)}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  # Build beside the target and rename: concurrent processes never load a partial file.
  with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
    built = Path(scratch) / target.name
    command = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(built)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      raise BuildError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    os.replace(built, target)
  return target
