r"""Stochastic rounding of the parameter write, for bfloat16 and float16 parameters.

A bfloat16 parameter :math:`p` updated by a small :math:`\Delta` stays where it is when
:math:`|\Delta|` is below half its spacing: rounded to nearest, a long run of small steps
is lost. Rounded stochastically, :math:`p + \Delta` (formed in float32) becomes the
representable neighbour above, :math:`h`, with probability
:math:`(x - l) / (h - l)`, else the one below, :math:`l`: in expectation, the float32
result.

The random numbers are a counter-based hash (MurmurHash3's 32-bit finaliser) of the
seed, the step count, the leaf's position in the tree and the element's index in the
leaf: the same seed and step give the same bits, on the Optax path and in the native
kernel, and a resumed run repeats them, with no random state to keep.

So that ``optax.apply_updates`` (and ``nnx.Optimizer``) land exactly on the rounded value,
the update emitted is :math:`q - p`, which bfloat16 holds exactly whenever :math:`q`
and :math:`p` are within a factor of two of each other (Sterbenz's lemma); where it is
not exact and the rounded difference would miss :math:`q`, it is moved by one step. (When
:math:`p` has bits finer than :math:`q`'s spacing, as a tiny :math:`p` whose update
crosses zero, no update lands exactly; the sum is then within one spacing of :math:`q`.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROUNDING_MODES = ("nearest", "stochastic")
NARROW_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(np.float16))

GOLDEN = np.uint32(0x9E3779B9)
LEAF_MULTIPLIER = np.uint32(0x85EBCA6B)
# Added to a leaf's key for the random bits of its moments' stochastic rounding, so that
# they are independent of the parameter's.
STATE_SALT = 0x68E31DA4


def mix(x: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection of ``uint32`` with full avalanche."""
  x = x ^ (x >> 16)
  x = x * np.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * np.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def step_key(seed: Any, count: jax.Array) -> jax.Array:
  """The ``uint32`` key of one step: the seed and the step count, hashed."""
  if isinstance(seed, int | np.integer):
    seed = np.uint32(int(seed))
  start = jnp.asarray(seed).astype(jnp.uint32) + GOLDEN  # an array under inject_hyperparams
  return mix(mix(start) ^ count.astype(jnp.uint32))


def _leaf_key(key: jax.Array, leaf: int, salt: int) -> jax.Array:
  return mix(key + np.uint32((leaf * int(LEAF_MULTIPLIER) + salt) & 0xFFFFFFFF))


def _indices(shape: tuple[int, ...]) -> jax.Array:
  return jax.lax.broadcasted_iota(jnp.uint32, (int(np.prod(shape)),), 0).reshape(shape)


def leaf_bits(key: jax.Array, leaf: int, shape: tuple[int, ...]) -> jax.Array:
  """32 random bits per element of the parameter leaf number ``leaf`` (in tree order),
  from ``key``: two hashes per element."""
  return mix(mix(_indices(shape) + _leaf_key(key, leaf, 0)) ^ key)


def moment_bits(key: jax.Array, leaf: int, shape: tuple[int, ...]) -> jax.Array:
  """32 random bits per element for the stochastic rounding of leaf number ``leaf``'s
  moments (``mu`` takes the low 16, ``nu`` the high 16; a float16 ``nu`` hashes them once
  more): one hash per element, as SplitMix32 draws, ``mix(index * golden + leaf_key)``
  with the leaf's key salted by :data:`STATE_SALT`. One hash, not two, is what the
  narrow-state step can afford; every element of every step still gets its own
  well-mixed bits."""
  return mix(_indices(shape) * GOLDEN + _leaf_key(key, leaf, STATE_SALT))


def _next(x: jax.Array, upward: jax.Array) -> jax.Array:
  """The neighbour of narrow floats ``x`` toward +infinity (``upward``) or -infinity,
  on their 16-bit sign-magnitude patterns."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.int32)
  negative = bits >= 0x8000
  magnitude_grows = upward != negative
  step = jnp.where(magnitude_grows, 1, -1)
  zero = (bits & 0x7FFF) == 0
  out = jnp.where(zero, jnp.where(upward, 1, 0x8001), bits + step)
  return jax.lax.bitcast_convert_type(out.astype(jnp.uint16), x.dtype)


def widen(x: jax.Array) -> jax.Array:
  """A narrow float array as float32, exactly (for bfloat16 through its bits, so that XLA
  cannot skip the rounding that produced ``x``)."""
  if x.dtype == jnp.bfloat16:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32) << 16
    return jax.lax.bitcast_convert_type(bits, jnp.float32)
  return x.astype(jnp.float32)


def stochastic_round(x: jax.Array, dtype: Any, bits: jax.Array) -> jax.Array:
  """Float32 ``x`` rounded to the narrow ``dtype``: up with probability equal to its
  distance from the neighbour below over the spacing, decided by ``bits`` (``uint32``).

  bfloat16 is float32's top 16 bits: adding 16 random bits (the low half of ``bits``) to
  ``x``'s bits and dropping the low 16 carries into the kept half with probability equal
  to the dropped fraction of a spacing, to 16 bits (away from zero in magnitude, so
  toward the far neighbour whatever the sign). A finite ``x`` that would carry into
  infinity is truncated instead, and a NaN stays a NaN. Integer additions and shifts
  only: no division, and the native kernel's arithmetic, bit for bit."""
  if np.dtype(dtype) == np.dtype(jnp.bfloat16):
    pattern = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    up = (pattern + (bits & np.uint32(0xFFFF))) >> 16
    down = pattern >> 16
    infinity = np.uint32(0x7F80)
    overflow = ((up & np.uint32(0x7FFF)) == infinity) & ((down & infinity) != infinity)
    rounded = jax.lax.bitcast_convert_type(
      jnp.where(overflow, down, up).astype(jnp.uint16), jnp.bfloat16
    )
    return jnp.where(jnp.isnan(x), x.astype(jnp.bfloat16), rounded)
  nearest = x.astype(dtype)
  back = widen(nearest)
  below = back < x
  other = _next(nearest, below)
  low, high = jnp.where(below, nearest, other), jnp.where(below, other, nearest)
  low32 = widen(low)
  fraction = (x - low32) / (widen(high) - low32)
  uniform = (bits >> 8).astype(jnp.float32) * np.float32(2.0**-24)
  return jnp.where(back == x, nearest, jnp.where(uniform < fraction, high, low))


def rounded_updates(params: Any, updates: Any, seed: Any, count: jax.Array) -> Any:
  """Updates that move each bfloat16 or float16 parameter to ``p + u`` rounded
  stochastically (other leaves unchanged): ``q - p``, with ``q`` the rounded value."""
  key = step_key(seed, count)
  leaves, treedef = jax.tree.flatten(params)
  update_leaves = treedef.flatten_up_to(updates)  # type: ignore[attr-defined]
  out = []
  for index, (p, u) in enumerate(zip(leaves, update_leaves, strict=True)):
    p, u = jnp.asarray(p), jnp.asarray(u)
    if np.dtype(p.dtype) not in NARROW_DTYPES or u.dtype != p.dtype:
      out.append(u)
      continue
    p32 = widen(p)
    q = stochastic_round(p32 + widen(u), p.dtype, leaf_bits(key, index, p.shape))
    out.append(landing_update(p32, widen(q), p.dtype))
  return jax.tree.unflatten(treedef, out)


def landing_update(p32: jax.Array, q32: jax.Array, dtype: Any) -> jax.Array:
  """The update ``e`` in ``dtype`` with ``p + e`` (rounded to ``dtype``, as
  ``optax.apply_updates`` adds) equal to ``q``: ``q - p`` rounded, moved by one step
  where that rounding made the sum miss ``q`` (when ``p`` and ``q`` are more than a
  factor of two apart, or of opposite signs)."""
  update = (q32 - p32).astype(dtype)
  landed = widen((p32 + widen(update)).astype(dtype))
  nudged = _next(update, landed < q32)
  return jnp.where(landed == q32, update, nudged)
