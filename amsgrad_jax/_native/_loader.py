"""Load the compiled kernel and register it with XLA's FFI for the CPU platform."""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass

import jax

from amsgrad_jax._native import _build

TARGET_NAME = "amsgrad_jax_step"
FLAT_TARGET_NAME = "amsgrad_jax_step_flat"
DISABLE_VARIABLE = "AMSGRAD_JAX_DISABLE_NATIVE"


@dataclass(frozen=True)
class Loaded:
  """Whether the kernel is registered, and why not when it is not."""

  ok: bool
  reason: str
  library: str | None = None


@functools.cache
def load() -> Loaded:
  """Build (at first use), load and register the kernel; never raises."""
  if os.environ.get(DISABLE_VARIABLE, "") not in ("", "0"):
    return Loaded(False, f"disabled by {DISABLE_VARIABLE}={os.environ[DISABLE_VARIABLE]}")
  try:
    path = _build.library_path()
    library = ctypes.cdll.LoadLibrary(str(path))
    for name, handler in (
      (TARGET_NAME, "AmsgradJaxStep"),
      (FLAT_TARGET_NAME, "AmsgradJaxStepFlat"),
    ):
      jax.ffi.register_ffi_target(
        name, jax.ffi.pycapsule(getattr(library, handler)), platform="cpu"
      )
  except (_build.BuildError, OSError, AttributeError, ValueError) as error:
    return Loaded(False, f"the native kernel could not be built or loaded: {error}")
  return Loaded(True, "the native kernel is built and registered", str(path))
