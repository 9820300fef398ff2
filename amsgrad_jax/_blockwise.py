r"""8-bit block-wise storage of the moments, with a running maximum that never drops.

A moment stored with :func:`blockwise8` keeps, for every parameter element, one 8-bit
*code*, and for every block of ``block_size`` consecutive elements along the last axis,
one power-of-two *scale* :math:`2^{e}` (``e`` an ``int8``). The stored value is

.. math::

  x = \operatorname{decode}(c) \cdot 2^{e},

where the code is a small floating-point number with gradual underflow: for the first
moment ``mu`` a sign, 4 exponent and 3 mantissa bits (largest :math:`1.875`, smallest
nonzero :math:`2^{-17}`); for the running maximum ``nu_max`` 4 exponent and 4 mantissa
bits, no sign (largest :math:`1.9375`, smallest nonzero :math:`2^{-18}`). A block's
exponent puts its largest element, rounded up, in the code's top binade, :math:`[1, 2)`.

Why a floating code and power-of-two scales: the values representable with exponent
:math:`e' > e` are, below the largest value of exponent :math:`e`, a subset of those
with exponent :math:`e`. So when a block's scale grows, every element is re-encoded
*exactly* (or rounded once, where it falls below the finer end of the code). The
running maximum :math:`\hat v` is rounded toward :math:`+\infty` every step, and its
block's exponent can only grow (it is chosen from the block's maximum, which never
falls). Rounding up onto a grid and then up onto a coarser grid nested in it is the
same as rounding up onto the coarser grid once, so the stored maximum is always the
true running maximum rounded up once onto the current grid: never below it (the
algorithm's guarantee, and no division by zero) and at most one code step above it,
however often the scales change. With a linear code and arbitrary scales, every change
of scale would round every element up again, and the maximum would creep upward.

The second moment ``nu`` is stored *relative to the running maximum*: the code holds

.. math::

  s = 1 - \frac{a\,v}{\hat v} \in [0, 1],

with :math:`a v` the second moment as the rule scales it for the maximum (:math:`a = 1`
except for the Optax rule, whose maximum is of the bias-corrected :math:`v`) and
:math:`\hat v` the new stored maximum, in the same 4-exponent, 4-mantissa code with
exponent 0 (its block exponents are kept, all 0, so every moment has one layout). Where
``nu`` is close to the maximum, the only place where it can raise it, :math:`s` is small
and resolved to :math:`2^{-18}` of the maximum; far below it, the error cannot reach the
step, which divides by the maximum. Stored on its own block scale with 3 mantissa bits,
``nu``'s rounding noise (about 3% per step) is kept by the maximum at its peaks: the
maximum of noisy gradients ended 22% above float32's at the median, and 2.4% stored
relatively (``tests/test_blockwise.py``).

``mu`` and ``nu`` are rounded *stochastically*, to the code above or below with
probabilities that make the stored value right in expectation. Rounded to nearest, their
moving averages would stall: with 3 mantissa bits, ``0.9 * 0.75 + 0.1 * 1`` rounds back
to ``0.75``, and with ``b2 = 0.999`` every step of ``nu`` is below half a code step. The
random bits are a hash of ``rounding_seed``, the step count, the leaf and the element
(:mod:`amsgrad_jax._rounding`): no random state, and a resumed run repeats them. Every
operation of the encoding is exact integer or power-of-two arithmetic, and the ratio is
one correctly rounded float32 division, so the native kernel reproduces it bit for bit.

Memory: one byte per element plus one per block, so :math:`3 (1 + 1/b)` bytes per
parameter for the three buffers, with :math:`b` the block size (the last axis's length
when that is shorter): 3.01 for ``block_size=256``, against 12 for float32 state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from amsgrad_jax import _numerics


@dataclass(frozen=True)
class Blockwise8:
  """The 8-bit block-wise storage format: pass it as ``mu_dtype`` and/or ``nu_dtype``.

  Attributes:
    block_size: elements per block along each parameter's last axis (a leaf whose last
      axis is shorter has one block per row).
  """

  block_size: int = 256

  def __post_init__(self) -> None:
    size = self.block_size
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or not 1 <= size <= 65536:
      raise ValueError(f"blockwise8: block_size must be an integer in [1, 65536], got {size!r}.")
    object.__setattr__(self, "block_size", int(size))

  @property
  def name(self) -> str:
    return f"blockwise8(block_size={self.block_size})"

  def __repr__(self) -> str:
    return self.name


def blockwise8(block_size: int = 256) -> Blockwise8:
  """8-bit block-wise state, for ``mu_dtype`` and ``nu_dtype`` of every optimizer here.

  ``amsgrad(lr, mu_dtype=blockwise8(), nu_dtype=blockwise8())`` stores the three moments
  in about 3 bytes per parameter instead of 12, with the running maximum rounded up so
  that it never falls below the true one and never creeps above it (see the memory and
  precision guide). Parameters must be real
  (float32, bfloat16, float16 or float64); arithmetic is float32.

  Args:
    block_size: elements that share one power-of-two scale, along the last axis.

  Returns:
    A :class:`Blockwise8` format.

  Examples:
    >>> import jax.numpy as jnp
    >>> from amsgrad_jax import amsgrad, blockwise8
    >>> tx = amsgrad(1e-3, mu_dtype=blockwise8(), nu_dtype=blockwise8())
    >>> state = tx.init({"w": jnp.zeros((4, 512))})
    >>> state[1].nu_max["w"].codes.dtype, state[1].nu_max["w"].exponents.shape
    (dtype('uint8'), (4, 2))
  """
  return Blockwise8(block_size)


@dataclass(frozen=True)
class Code:
  """An 8-bit floating-point code with gradual underflow and top binade ``[1, 2)``."""

  signed: bool
  exponent_bits: int
  mantissa_bits: int = 3

  @property
  def emin(self) -> int:
    """The exponent of the smallest normal code."""
    return -(2**self.exponent_bits - 2)

  @property
  def largest(self) -> int:
    """The largest magnitude field, ``0b1...1``."""
    return 2 ** (self.exponent_bits + self.mantissa_bits) - 1

  @property
  def lowest_scale(self) -> int:
    """The smallest block exponent: every nonzero decoded value is a normal float32 (XLA
    on the CPU flushes subnormal floats to zero), so decoding and re-encoding are exact."""
    return -126 - self.emin + self.mantissa_bits


HIGHEST_SCALE = 126  # the largest block exponent: 2**e and 1.9375 * 2**e stay finite
MOMENT_CODE = Code(signed=True, exponent_bits=4)  # mu: sign, 4 exponent, 3 mantissa bits
MAXIMUM_CODE = Code(signed=False, exponent_bits=4, mantissa_bits=4)  # nu_max
RATIO_CODE = Code(signed=False, exponent_bits=4, mantissa_bits=4)  # nu: 1 - nu / nu_max
CODES = {"mu": MOMENT_CODE, "nu": RATIO_CODE, "nu_max": MAXIMUM_CODE}
KINDS = tuple(CODES)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Blockwise8Array:
  """One moment of one parameter leaf in :func:`blockwise8` storage.

  Attributes:
    codes: ``uint8``, shaped like the parameter.
    exponents: ``int8``, one per block: the parameter's shape with its last axis
      replaced by the number of blocks along it (``(1,)`` for a scalar parameter).
    block_size: the format's block size (static).
    kind: which moment, ``"mu"``, ``"nu"`` or ``"nu_max"`` (static): it picks the code,
      and ``"nu"`` stores ``1 - a v / nu_max`` with every exponent 0 (see above).
  """

  codes: jax.Array
  exponents: jax.Array
  block_size: int = field(metadata={"static": True})
  kind: str = field(metadata={"static": True})

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.codes.shape)

  @property
  def code(self) -> Code:
    return CODES[self.kind]

  @property
  def nbytes(self) -> int:
    return int(self.codes.nbytes + self.exponents.nbytes)


def block_length(shape: tuple[int, ...], block_size: int) -> int:
  """Elements per block for a leaf of ``shape``: ``block_size``, or the last axis if shorter."""
  last = shape[-1] if shape else 1
  return max(1, min(block_size, last))


def exponents_shape(shape: tuple[int, ...], block_size: int) -> tuple[int, ...]:
  """The shape of a leaf's block exponents."""
  if not shape:
    return (1,)
  return (*shape[:-1], math.ceil(shape[-1] / block_length(shape, block_size)))


def zeros_like_param(param: Any, block_size: int, kind: str) -> Blockwise8Array:
  """A stored zero moment ``kind`` for ``param``, placed like ``param``: the codes share
  its sharding, and the exponents are split the same way, which keeps every block inside
  one shard. Every exponent is the lowest, as encoding zeros gives (0 for ``nu``, whose
  zero codes with a zero maximum decode to 0).

  Raises:
    ValueError: when ``param`` is split along its last axis into pieces that are not a
      whole number of blocks.
  """
  shape = tuple(np.shape(param))
  lowest = 0 if kind == "nu" else CODES[kind].lowest_scale
  codes = _numerics.zeros_like_param(param, np.dtype(np.uint8))
  placement = _exponents_sharding(param, block_size)
  exponents = jnp.full(exponents_shape(shape, block_size), lowest, jnp.int8)
  if placement is not None:
    exponents = jax.device_put(exponents, placement)
  return Blockwise8Array(codes, exponents, block_size, kind)


def _exponents_sharding(param: Any, block_size: int) -> Any:
  """The sharding of a parameter's block exponents, or ``None`` to let JAX place them."""
  sharding = getattr(param, "sharding", None)
  if isinstance(param, jax.core.Tracer) or not isinstance(sharding, jax.sharding.NamedSharding):
    return None  # placed as JAX places new arrays, like the codes (not committed)
  shape = tuple(np.shape(param))
  if not shape:
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
  pieces = shape[-1] // sharding.shard_shape(shape)[-1]
  if pieces > 1:
    block = block_length(shape, block_size)
    piece = shape[-1] // pieces
    if piece % block:
      raise ValueError(
        f"blockwise8(block_size={block_size}): a parameter of shape {shape} is split into "
        f"{pieces} pieces of {piece} along its last axis, which is not a whole number of "
        f"blocks of {block}; a block would straddle two devices. Choose a block_size that "
        f"divides {piece}, or shard that parameter along another axis."
      )
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


# ---- encoding and decoding ----------------------------------------------------------------


def _bits(x: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _float(bits: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(bits.astype(jnp.uint32), jnp.float32)


def _power_of_two(exponent: jax.Array) -> jax.Array:
  """``2.0 ** exponent`` in float32, exactly, for exponents in ``[-126, 127]``."""
  return _float((exponent.astype(jnp.int32) + 127) << 23)


def _round_mantissa(bits: jax.Array, mantissa_bits: int, upward: bool) -> jax.Array:
  """The float32 bits of a non-negative number rounded to ``mantissa_bits`` bits: toward
  +infinity, or to nearest with ties to even (a carry moves into the exponent)."""
  shift = 23 - mantissa_bits
  low = np.uint32((1 << shift) - 1)
  if upward:
    return (bits + low) & ~low
  half = np.uint32((1 << (shift - 1)) - 1)
  return (bits + half + ((bits >> shift) & np.uint32(1))) & ~low


def _exponent(x: jax.Array) -> jax.Array:
  """``floor(log2(x))`` for a normal non-negative float32 ``x``; -127 for zero."""
  return ((_bits(x) >> 23) & np.uint32(0xFF)).astype(jnp.int32) - 127


def _biased_exponent(x: jax.Array, code: Code, upward: bool) -> jax.Array:
  """The biased float32 exponent of ``|x|`` rounded to the code's precision, ``int32``
  (255 for a NaN or an infinity)."""
  rounded = _round_mantissa(_bits(x) & np.uint32(0x7FFFFFFF), code.mantissa_bits, upward)
  return ((rounded >> 23) & np.uint32(0xFF)).astype(jnp.int32)


def blocks_exponents(blocked: jax.Array, code: Code, upward: bool) -> jax.Array:
  """Each block's exponent, for ``blocked`` shaped ``(..., blocks, block)``: the one that
  puts the block's largest magnitude, rounded to the code's precision (up, when rounding
  can go up), in the code's top binade ``[1, 2)``.

  Rounding and taking the exponent are monotone, so the exponent of the rounded maximum
  is the maximum of the elements' exponents: XLA reduces one byte per element (which it
  first writes out) instead of four."""
  per_element = _biased_exponent(blocked, code, upward).astype(jnp.uint8)
  top = jnp.max(per_element, axis=-1).astype(jnp.int32)
  return jnp.clip(top - 127, code.lowest_scale, HIGHEST_SCALE)


def encode(
  x: jax.Array, exponent: jax.Array, code: Code, upward: bool, bits: jax.Array | None = None
) -> jax.Array:
  """The ``uint8`` codes of float32 ``x`` with block exponents ``exponent`` (broadcast):
  rounded to nearest (ties to even), toward +infinity (``upward``) or, given random
  ``bits`` (``uint32``, 16 of them used), stochastically.

  Stochastically, ``|x|`` between the codes ``l < |x| < h`` takes ``h`` with probability
  ``(|x| - l) / (h - l)`` to 16 bits: a code is float32's sign, exponent and top ``m``
  mantissa bits, so adding 16 random bits just below the cut to ``|x|``'s bits and
  cutting carries into the code above with exactly that probability (below the smallest
  normal code, ``|x| + 2**emin`` puts the units of the code's gradual underflow at the
  cut). Integer additions and shifts, as in the native kernel.
  """
  m = code.mantissa_bits
  scaled = jnp.abs(x) * _power_of_two(-exponent)  # exact: a power of two
  if bits is not None:
    return _encode_stochastic(x, scaled, code, bits)
  rounded = _round_mantissa(_bits(scaled), m, upward)
  normal = (rounded >> (23 - m)).astype(jnp.int32) - ((127 + code.emin - 1) << m)
  tiny = scaled * np.float32(2.0 ** (m - code.emin))  # in units of the smallest code
  subnormal = (jnp.ceil(tiny) if upward else jnp.round(tiny)).astype(jnp.int32)
  magnitude = jnp.where(scaled < np.float32(2.0**code.emin), subnormal, normal)
  if upward:  # a positive value below float32's reach after scaling still rounds up
    magnitude = jnp.maximum(magnitude, (x > 0).astype(jnp.int32))
  return _signed(x, jnp.clip(magnitude, 0, code.largest), code)


def _encode_stochastic(x: jax.Array, scaled: jax.Array, code: Code, bits: jax.Array) -> jax.Array:
  m = code.mantissa_bits
  smallest_normal = np.float32(2.0**code.emin)
  subnormal = scaled < smallest_normal
  # Below the smallest normal code the codes are whole units of 2**(emin - m), the spacing
  # of float32's mantissa field cut to m bits in the binade [2**emin, 2**(emin + 1)).
  shifted = jnp.where(subnormal, scaled + smallest_normal, scaled)
  uniform = (bits & np.uint32(0xFFFF)) << np.uint32(7 - m)  # 16 bits under the cut
  field = ((_bits(shifted) + uniform) >> (23 - m)).astype(jnp.int32)
  magnitude = field - ((127 + code.emin - 1) << m) - jnp.where(subnormal, 1 << m, 0)
  return _signed(x, jnp.minimum(magnitude, code.largest), code)


def _signed(x: jax.Array, magnitude: jax.Array, code: Code) -> jax.Array:
  if code.signed:
    magnitude = magnitude | jnp.where((x < 0) & (magnitude > 0), 0x80, 0)
  return magnitude.astype(jnp.uint8)


def _magnitude_value(magnitude: jax.Array, code: Code) -> jax.Array:
  """The value of a magnitude field (no sign, no block scale), float32."""
  m = code.mantissa_bits
  # A normal field is float32's exponent and top mantissa bits with the bias moved.
  normal = _float((magnitude << (23 - m)) + ((code.emin - 1 + 127) << 23))
  subnormal = magnitude.astype(jnp.float32) * np.float32(2.0 ** (code.emin - m))
  return jnp.where(magnitude < (1 << m), subnormal, normal)


def decode(codes: jax.Array, exponent: jax.Array, code: Code) -> jax.Array:
  """The float32 values of ``codes`` with block exponents ``exponent`` (broadcast)."""
  field_ = codes.astype(jnp.int32)
  value = _magnitude_value(field_ & code.largest, code) * _power_of_two(exponent)
  if code.signed:
    value = jnp.where(field_ >= 0x80, -value, value)
  return value


# ---- whole leaves ---------------------------------------------------------------------------


def _blocked(x: jax.Array, block: int) -> jax.Array:
  """``x`` as ``(..., blocks, block)`` along its last axis, zero-padded at the end."""
  x = x.reshape(x.shape or (1,))
  n = x.shape[-1]
  blocks = math.ceil(n / block)
  if blocks * block != n:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, blocks * block - n)])
  return x.reshape(*x.shape[:-1], blocks, block)


def _unblocked(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """The inverse of :func:`_blocked` for a leaf of ``shape``."""
  n = shape[-1] if shape else 1
  x = x.reshape(*x.shape[:-2], -1)[..., :n]
  return x.reshape(shape)


def dequantize(q: Blockwise8Array) -> jax.Array:
  """The float32 values a stored ``mu`` or ``nu_max`` holds (``nu``: :func:`dequantize_nu`)."""
  if q.kind == "nu":
    raise ValueError("a blockwise8 nu is stored relative to nu_max: use dequantize_nu")
  block = block_length(q.shape, q.block_size)
  values = decode(_blocked(q.codes, block), q.exponents[..., None], q.code)
  return _unblocked(values, q.shape)


def dequantize_nu(nu: Blockwise8Array, nu_max: jax.Array, nu_scale_before: Any) -> jax.Array:
  """The float32 second moment ``v = (1 - s) * nu_max / a``: ``s`` the stored code,
  ``nu_max`` the decoded running maximum it was stored against and ``1 / a``
  (``nu_scale_before``) the inverse of the rule's scale at the step that stored it.
  ``1 - s`` is exact (``s`` has 5 significant bits and is at least ``2**-18``)."""
  ratio = np.float32(1.0) - decode(nu.codes, jnp.zeros((), jnp.int32), RATIO_CODE)
  return ratio * nu_max * nu_scale_before


def quantize_nu(
  scaled_nu: jax.Array, nu_max: jax.Array, block_size: int, bits: jax.Array | None = None
) -> Blockwise8Array:
  """Store the second moment relative to the new running maximum: ``s = 1 - r`` with
  ``r = a v / nu_max`` (``scaled_nu`` is ``a v``, ``nu_max`` the decoded stored maximum,
  so ``0 <= r <= 1``; ``r = 0`` where the maximum is 0), rounded stochastically with
  ``bits`` or else to nearest. Near ``r = 1``, where ``nu`` can raise the maximum, the code
  resolves ``r`` to within ``2**-18``; far below, its error does not reach the step."""
  ratio = jnp.where(nu_max > 0, scaled_nu / jnp.where(nu_max > 0, nu_max, 1), 0)
  complement = np.float32(1.0) - ratio.astype(jnp.float32)
  codes = encode(complement, jnp.zeros((), jnp.int32), RATIO_CODE, False, bits)
  shape = tuple(scaled_nu.shape)
  exponents = jnp.zeros(exponents_shape(shape, block_size), jnp.int8)
  return Blockwise8Array(codes, exponents, block_size, "nu")


def quantize(
  x: jax.Array,
  block_size: int,
  kind: str,
  upward: bool = False,
  bits: jax.Array | None = None,
) -> Blockwise8Array:
  """Store float32 ``x`` as the moment ``kind`` (``"mu"`` or ``"nu_max"``): to nearest,
  toward +infinity (``upward``, for the running maximum), or stochastically with the
  random ``bits`` (``uint32``, shaped like ``x``).

  A block's exponent fits its largest element rounded up when the rounding can go up
  (upward or stochastically), else rounded to nearest."""
  code = CODES[kind]
  shape = tuple(x.shape)
  block = block_length(shape, block_size)
  blocked = _blocked(x, block)
  exponent = blocks_exponents(blocked, code, upward or bits is not None)
  blocked_bits = None if bits is None else _blocked(bits, block)
  codes = encode(blocked, exponent[..., None], code, upward, blocked_bits)
  return Blockwise8Array(_unblocked(codes, shape), exponent.astype(jnp.int8), block_size, kind)


def is_blockwise(x: Any) -> bool:
  return isinstance(x, Blockwise8Array)


def moment_leaves(moment: Any) -> list[Any]:
  """A moment tree's leaves, a :class:`Blockwise8Array` counting as one leaf."""
  return jax.tree.leaves(moment, is_leaf=is_blockwise)


def is_unwrapped(x: Any) -> bool:
  """A mapping of exactly ``codes`` (``uint8``) and ``exponents`` (``int8``) arrays: a
  :class:`Blockwise8Array` whose static fields were dropped on the way (see
  :func:`rewrapped`). A parameter subtree whose two leaves happen to be called so holds
  moments, not such arrays, and is left alone."""
  if not (isinstance(x, Mapping) and set(x.keys()) == {"codes", "exponents"}):
    return False
  codes, exponents = (getattr(x[name], "dtype", None) for name in ("codes", "exponents"))
  return codes == np.uint8 and exponents == np.int8


def rewrapped(moment: Any, fmt: Any, kind: str) -> Any:
  """``moment`` with every ``{"codes": ..., "exponents": ...}`` mapping in it made a
  :class:`Blockwise8Array` again, of ``fmt``'s block size and the moment ``kind``.

  Frameworks that keep the optimizer state in their own containers can hand it back
  that way: Flax's ``nnx.Optimizer`` stores the new state with ``nnx.update(opt_state,
  nnx.state(new_state))``, which turns each :class:`Blockwise8Array` (a pytree node) into
  a mapping of its two arrays and drops its static fields. The format the optimizer was
  built with restores them. ``moment`` is returned unchanged when ``fmt`` is not a
  :class:`Blockwise8` or nothing needs restoring."""
  if not isinstance(fmt, Blockwise8) or not any(
    is_unwrapped(x) for x in jax.tree.leaves(moment, is_leaf=is_unwrapped)
  ):
    return moment

  def restore(x: Any) -> Any:
    if not is_unwrapped(x):
      return x
    return Blockwise8Array(x["codes"], x["exponents"], fmt.block_size, kind)

  return jax.tree.map(restore, moment, is_leaf=is_unwrapped)


def shapes_of(moment: Any) -> Any:
  """``moment`` with each :class:`Blockwise8Array` standing as a float32 array of its
  shape: a tree shaped like the parameters, for checking the gradients against."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32) if is_blockwise(x) else x,
    moment,
    is_leaf=is_blockwise,
  )
