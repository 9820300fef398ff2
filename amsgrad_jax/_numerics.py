"""Dtype handling shared by the XLA path and the native step.

* Arithmetic happens in :func:`compute_dtype`: at least float32, and at least as
  wide as the gradient and every state buffer of the leaf.
* State is stored in the dtype chosen at ``init`` (the parameter's by default).
  The running maximum is rounded *up* when stored narrower than it was computed,
  so the stored maximum never falls below the true one and a step never grows
  because of storage.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.shard_alike import shard_alike

INT32_MAX = np.iinfo(np.int32).max


def concrete_float(value: Any) -> float | None:
  """``value`` as a Python float, or ``None`` when it is traced or not a scalar."""
  if isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, bool):
    return float(value)
  if isinstance(value, (int, float, np.number)):
    return float(value)
  if isinstance(value, (np.ndarray, jax.Array)) and np.shape(value) == ():
    try:
      return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
      return None
  return None


def compute_dtype(*dtypes: Any) -> np.dtype:
  """The dtype arithmetic happens in: at least float32, as wide as the widest given.

  Complex when any of ``dtypes`` is complex. (Written out rather than through
  ``jnp.promote_types``, which refuses float32 with float64 under strict promotion.)
  """
  bits = max([32, *(jnp.finfo(dtype).bits for dtype in dtypes)])
  is_complex = any(jnp.issubdtype(dtype, jnp.complexfloating) for dtype in dtypes)
  if is_complex:
    return np.dtype(np.complex64 if bits <= 32 else np.complex128)
  return np.dtype(np.float32 if bits <= 32 else np.float64)


def real_dtype(dtype: Any) -> np.dtype:
  """``float32`` for ``complex64``, ``float64`` for ``complex128``, else ``dtype``."""
  return np.dtype(jnp.finfo(dtype).dtype)


def state_dtype(param_dtype: Any, requested: Any) -> Any:
  """The storage dtype of one state buffer for a parameter of ``param_dtype``.

  ``requested`` (``mu_dtype`` / ``nu_dtype``) names the precision; a complex
  parameter keeps complex state of that precision. A block-wise format (an object with a
  ``block_size``) is returned as it is, for real parameters.
  """
  param_dtype = np.dtype(param_dtype)
  if requested is None:
    return param_dtype
  if hasattr(requested, "block_size"):
    if jnp.issubdtype(param_dtype, jnp.complexfloating):
      raise ValueError(
        f"{requested!r} state is for real parameters; a parameter is {param_dtype} "
        "(store complex parameters' state in complex64 or complex128)."
      )
    return requested
  param_is_complex = jnp.issubdtype(param_dtype, jnp.complexfloating)
  requested_is_complex = jnp.issubdtype(requested, jnp.complexfloating)
  if param_is_complex and not requested_is_complex:
    counterpart = {np.dtype(np.float32): np.complex64, np.dtype(np.float64): np.complex128}
    if requested not in counterpart:
      raise ValueError(
        f"complex parameters need complex state; there is no complex dtype of {requested} "
        "precision (use float32 or float64)."
      )
    return np.dtype(counterpart[requested])
  if requested_is_complex and not param_is_complex:
    raise ValueError(f"real parameters need real state, got state dtype {requested}.")
  return np.dtype(requested)


def leaf_dtype(leaf: Any) -> np.dtype:
  """The dtype JAX gives ``leaf``: float32 for a Python float, and for a NumPy float64
  array unless x64 is enabled (asking for float64 there would only warn and truncate)."""
  dtype = getattr(leaf, "dtype", None)
  if dtype is None:
    dtype = jnp.result_type(leaf)
  return np.dtype(jax.dtypes.canonicalize_dtype(dtype))


def zeros_like_param(param: Any, dtype: np.dtype) -> jax.Array:
  """Zeros shaped and sharded like ``param``, eagerly, under ``jit`` and abstractly.

  Under ``jit`` in an ``Auto`` mesh a plain ``zeros_like`` carries no sharding,
  and XLA would place it on one device; ``shard_alike`` ties it to ``param``.
  """
  if isinstance(param, jax.ShapeDtypeStruct):
    return jnp.zeros(param.shape, dtype, device=param.sharding)
  zeros = jnp.zeros_like(param, dtype=dtype)
  if isinstance(param, jax.core.Tracer) and np.ndim(param) > 0:
    _, zeros = shard_alike(param, zeros)
  return zeros


def safe_increment(count: jax.Array) -> jax.Array:
  """``count + 1``, saturating at the int32 maximum instead of wrapping."""
  return jnp.where(count < INT32_MAX, count + 1, count).astype(jnp.int32)


def one_minus(b: Any, dtype: Any) -> jax.Array:
  """``1 - b`` in ``dtype``; for a concrete ``b`` computed in double precision first,
  as PyTorch, Keras and Optax do (``1 - float32(0.999)`` is off by 1.3e-5)."""
  number = concrete_float(b)
  if number is not None:
    return jnp.asarray(1.0 - number, dtype)
  return 1.0 - jnp.asarray(b, dtype)


def bias_corrections(
  b1: Any, b2: Any, count: jax.Array, dtype: Any, *, from_double: bool
) -> tuple[jax.Array, jax.Array]:
  """``(1 - b1**t, 1 - b2**t)`` in ``dtype``, with ``t = count`` (after increment).

  With ``from_double`` and a concrete ``b``, the result is accurate to the last bit
  of ``dtype``, as PyTorch's (it forms ``b**t`` in Python doubles): ``log(b)`` is
  taken in double precision and ``1 - b**t = -expm1(t log b)``. Otherwise ``b`` is
  first rounded to ``dtype`` and raised to ``t`` there, as Keras and Optax do; in
  float32, ``1 - float32(0.999)`` alone is 1.3e-5 away from ``0.001``.
  """
  t = count.astype(dtype)
  return (_one_minus_power(b1, t, dtype, from_double), _one_minus_power(b2, t, dtype, from_double))


def _one_minus_power(b: Any, t: jax.Array, dtype: Any, from_double: bool) -> jax.Array:
  number = concrete_float(b)
  if not from_double or number is None:
    return 1.0 - jnp.power(jnp.asarray(b, dtype), t)
  if number == 0.0:  # 0**t = 0 for every t >= 1
    return jnp.ones_like(t)
  return -jnp.expm1(t * jnp.asarray(math.log(number), dtype))


def cast_rounding_up(x: jax.Array, dtype: Any) -> jax.Array:
  """Cast ``x`` to ``dtype``; where that loses precision, round toward +infinity."""
  dtype = np.dtype(dtype)
  if dtype == x.dtype or jnp.finfo(dtype).bits >= jnp.finfo(x.dtype).bits:
    return x.astype(dtype)
  if jnp.iscomplexobj(x):
    part_dtype = real_dtype(dtype)
    return jax.lax.complex(
      cast_rounding_up(x.real, part_dtype), cast_rounding_up(x.imag, part_dtype)
    )
  if dtype == np.dtype(jnp.bfloat16) and x.dtype == np.dtype(np.float32):
    return _bfloat16_rounding_up(x)
  nearest = x.astype(dtype)
  too_low = nearest.astype(x.dtype) < x
  return jnp.where(too_low, jnp.nextafter(nearest, jnp.asarray(jnp.inf, dtype)), nearest)


def _bfloat16_rounding_up(x: jax.Array) -> jax.Array:
  """Float32 ``x`` rounded toward +infinity to bfloat16, float32's top 16 bits: a positive
  ``x`` carries a nonzero low half into them, a negative one drops it; a NaN becomes a
  quiet NaN. Integer operations on the bits only (no comparison that flushes a subnormal
  ``x`` to zero): the native kernel's arithmetic, bit for bit."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  toward_zero = bits >> 16
  away = (bits + np.uint32(0xFFFF)) >> 16
  rounded = jnp.where(bits >> 31 == 1, toward_zero, away)
  rounded = jnp.where(jnp.isnan(x), toward_zero | np.uint32(0x40), rounded)
  return jax.lax.bitcast_convert_type(rounded.astype(jnp.uint16), jnp.bfloat16)
