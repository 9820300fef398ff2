"""Test-process setup: 8 CPU devices, strict JAX, Keras on the JAX backend.

The environment must be set before jax is imported anywhere in the process.
"""

import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# Appended to whatever XLA_FLAGS the caller set; a device count given there is respected.
_flags = os.environ.get("XLA_FLAGS", "")
if DEVICE_COUNT_FLAG not in _flags:
  os.environ["XLA_FLAGS"] = f"{_flags} {DEVICE_COUNT_FLAG}=8".strip()
os.environ.setdefault("KERAS_BACKEND", "jax")
# The CPU, unless the caller chose (the GPU check runs the suite with JAX_PLATFORMS=cuda).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the environment above)

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
