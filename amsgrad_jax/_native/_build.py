"""Compile ``amsgrad_step.cc`` with the system C++ compiler, once, into a private cache.

The shared library is cached under ``$AMSGRAD_JAX_CACHE_DIR`` (default
``$XDG_CACHE_HOME/amsgrad_jax`` or ``~/.cache/amsgrad_jax``), in a file named by a hash
of everything that changes the binary: the source, the generated interface header, the
compiler and its flags, the jaxlib version (its FFI headers) and the CPU (the build uses
``-march=native``).

A cached library is code that gets loaded, so it is used only from a directory owned by
the current user that nobody else can write to, and only when the file itself is owned by
the user and not writable by others. When the configured directory fails that test, or
cannot be created (an unwritable home, a read-only container), the kernel is built into a
private directory under the system's temporary folder instead, and :func:`library_path`
says why.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

import jax

from amsgrad_jax._native import _interface

SOURCE = Path(__file__).with_name("amsgrad_step.cc")
HEADER_NAME = "amsgrad_interface.h"

# -ffp-contract=off: only the fused multiply-adds the source writes out (as XLA forms them).
# -fno-math-errno: sqrt without errno, so it vectorises. -fno-trapping-math lets the
# compiler turn the NaN-propagating maximum into a blend (no value changes).
FLAGS = (
  "-std=c++17",
  "-O3",
  "-march=native",
  "-mprefer-vector-width=512",
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


def configured_cache_dir() -> Path:
  """Where compiled kernels are kept unless that place is unsafe or unwritable."""
  if "AMSGRAD_JAX_CACHE_DIR" in os.environ:
    return Path(os.environ["AMSGRAD_JAX_CACHE_DIR"])
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "amsgrad_jax"


def unsafe_because(path: Path, *, directory: bool) -> str | None:
  """Why ``path`` must not be trusted to hold code we load, or ``None`` when it may.

  Trusted: owned by the current user, not writable by group or others, and of the
  expected kind (a real directory, or a regular file), not a symbolic link.
  """
  try:
    info = path.lstat()
  except OSError as error:
    return f"{path} cannot be read ({error.strerror})"
  kind_ok = stat.S_ISDIR(info.st_mode) if directory else stat.S_ISREG(info.st_mode)
  if not kind_ok:
    return f"{path} is not a {'directory' if directory else 'regular file'}"
  if hasattr(os, "getuid") and info.st_uid != os.getuid():
    return f"{path} belongs to another user (uid {info.st_uid})"
  if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
    return f"{path} is writable by other users (mode {stat.S_IMODE(info.st_mode):o})"
  return None


def _private_dir(path: Path) -> str | None:
  """Create ``path`` (mode 700) if needed; return why it is unusable, or ``None``."""
  try:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
  except OSError as error:
    return f"{path} cannot be created ({error.strerror})"
  return unsafe_because(path, directory=True)


def cache_dir() -> tuple[Path, str | None]:
  """The directory to build into and load from, and why it is not the configured one.

  Falls back to ``<tmp>/amsgrad_jax-<uid>``, private to the user; raises
  :class:`BuildError` when neither is safe.
  """
  configured = configured_cache_dir()
  problem = _private_dir(configured)
  if problem is None:
    return configured, None
  user = os.getuid() if hasattr(os, "getuid") else os.getlogin()
  fallback = Path(tempfile.gettempdir()) / f"amsgrad_jax-{user}"
  fallback_problem = _private_dir(fallback)
  if fallback_problem is not None:
    raise BuildError(f"no safe cache directory: {problem}; {fallback_problem}")
  return fallback, f"the kernel cache {configured} is not used: {problem}"


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
  """A hash of the source, interface, compiler, flags, jaxlib version and CPU."""
  digest = hashlib.sha256()
  for part in (
    SOURCE.read_bytes(),
    _interface.header().encode(),
    _compiler_version(cxx).encode(),
    " ".join(FLAGS).encode(),
    metadata.version("jaxlib").encode(),
    _cpu_description().encode(),
  ):
    digest.update(part)
    digest.update(b"\0")
  return digest.hexdigest()[:20]


def library_path() -> tuple[Path, str | None]:
  """The compiled kernel, built first when it is not cached yet, and a note when the
  cache is not the configured one.

  Raises:
    BuildError: when there is no C++ compiler, no safe cache, or the compilation fails.
  """
  cxx = compiler()
  if cxx is None:
    raise BuildError("no C++ compiler found (set CXX, or install g++)")
  directory, note = cache_dir()
  target = directory / f"amsgrad_step-{build_key(cxx)}.so"
  if target.exists():
    problem = unsafe_because(target, directory=False)
    if problem is None:
      return target, note
    target.unlink()  # our own directory: an unsafe file there is replaced, never loaded
  # Build beside the target and rename: concurrent processes never load a partial file.
  with tempfile.TemporaryDirectory(dir=directory) as scratch:
    (Path(scratch) / HEADER_NAME).write_text(_interface.header())
    built = Path(scratch) / target.name
    command = [
      cxx,
      *FLAGS,
      f"-I{scratch}",
      f"-I{jax.ffi.include_dir()}",
      str(SOURCE),
      "-o",
      str(built),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      raise BuildError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    built.chmod(0o755)
    os.replace(built, target)
  return target, note
