"""Test-process setup: 8 CPU devices, strict JAX, Keras on the JAX backend.

The environment must be set before jax is imported anywhere in the process.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


def require(module_name: str):
  """Import a peer framework; skip outside CI when missing, fail under CI=true."""
  try:
    return __import__(module_name)
  except ImportError as error:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
      raise AssertionError(f"{module_name} must be installed in CI: {error}") from error
    pytest.skip(f"{module_name} is not installed ({error}); `make test` installs it")
