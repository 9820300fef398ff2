"""Load the compiled kernel, check its interface and register it with XLA's FFI on CPU."""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass

import jax

from amsgrad_jax._native import _build, _interface

DISABLE_VARIABLE = "AMSGRAD_JAX_DISABLE_NATIVE"


@dataclass(frozen=True)
class NativeStatus:
  """Whether :func:`~amsgrad_jax.apply_step` runs natively, and why not when it does not.

  Attributes:
    active: ``True`` when the step will run natively: the kernel is built and registered,
      JAX's default backend is the CPU and, when an optimizer was given, the optimizer
      and its state are ones the kernel steps.
    reason: a sentence saying why (or why not).
    library: the compiled kernel's path, when it is loaded.
  """

  active: bool
  reason: str
  library: str | None = None

  def __bool__(self) -> bool:
    return self.active


def disabled() -> bool:
  """Whether the user turned the native step off (``AMSGRAD_JAX_DISABLE_NATIVE=1``)."""
  return os.environ.get(DISABLE_VARIABLE, "") not in ("", "0")


@functools.cache
def load() -> NativeStatus:
  """Build (at first use), load, check and register the kernel; never raises."""
  if disabled():
    return NativeStatus(False, f"disabled by {DISABLE_VARIABLE}={os.environ[DISABLE_VARIABLE]}")
  try:
    path, note = _build.library_path()
    library = ctypes.cdll.LoadLibrary(str(path))
    describe = getattr(library, _interface.DESCRIBE_SYMBOL)
    describe.restype = ctypes.c_char_p
    _interface.check(describe().decode())
    for target, handler in _interface.HANDLERS.items():
      capsule = jax.ffi.pycapsule(getattr(library, handler))
      jax.ffi.register_ffi_target(target, capsule, platform="cpu")
  except (_build.BuildError, _interface.InterfaceMismatch) as error:
    return NativeStatus(False, f"the native kernel is not used: {error}")
  except (OSError, AttributeError, ValueError) as error:
    return NativeStatus(False, f"the native kernel could not be loaded: {error}")
  reason = "the native kernel is built and registered" + (f" ({note})" if note else "")
  return NativeStatus(True, reason, str(path))
