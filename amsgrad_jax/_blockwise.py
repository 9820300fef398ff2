r"""8-bit block-wise storage of the moments, with a running maximum that never drops.

A moment stored with :func:`blockwise8` keeps, for every parameter element, one 8-bit
*code*, and for every block of ``block_size`` consecutive elements along the last axis,
one power-of-two *scale* :math:`2^{e}` (``e`` an ``int8``). The stored value is

.. math::

  x = \operatorname{decode}(c) \cdot 2^{e},

where the code is a small floating-point number with ``M = 3`` mantissa bits and
gradual underflow: ``sign + 4`` exponent bits for the first moment (``mu`` can be
negative), ``5`` exponent bits for the second moment and its running maximum (never
negative). The largest code is :math:`1.875`; the smallest nonzero one is
:math:`2^{-17}` for ``mu`` and :math:`2^{-33}` for ``nu``. A block's exponent puts its
largest element, rounded up, in the code's top binade, :math:`[1, 2)`.

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

``mu`` and ``nu`` are rounded *stochastically*, to the code above or below with
probabilities that make the stored value right in expectation. Rounded to nearest, their
moving averages would stall: with 3 mantissa bits, ``0.9 * 0.75 + 0.1 * 1`` rounds back
to ``0.75``, and with ``b2 = 0.999`` every step of ``nu`` is below half a code step. The
random bits are a hash of ``rounding_seed``, the step count, the leaf and the element
(:mod:`amsgrad_jax._rounding`): no random state, and a resumed run repeats them. Every
operation of the encoding is exact integer or power-of-two arithmetic, so the native
kernel reproduces it bit for bit.

Memory: one byte per element plus one per block, so :math:`3 (1 + 1/b)` bytes per
parameter for the three buffers, with :math:`b` the block size (the last axis's length
when that is shorter): 3.01 for ``block_size=256``, against 12 for float32 state.
"""

from __future__ import annotations

import math
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


HIGHEST_SCALE = 126  # the largest block exponent: 2**e and 1.875 * 2**e stay finite
MOMENT_CODE = Code(signed=True, exponent_bits=4)  # mu: sign, 4 exponent, 3 mantissa bits
SQUARE_CODE = Code(signed=False, exponent_bits=5)  # nu and nu_max: 5 exponent, 3 mantissa


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Blockwise8Array:
  """One moment of one parameter leaf in :func:`blockwise8` storage.

  Attributes:
    codes: ``uint8``, shaped like the parameter.
    exponents: ``int8``, one per block: the parameter's shape with its last axis
      replaced by the number of blocks along it (``(1,)`` for a scalar parameter).
    block_size: the format's block size (static).
    signed: whether the code has a sign bit (``mu``) or not (``nu``, ``nu_max``) (static).
  """

  codes: jax.Array
  exponents: jax.Array
  block_size: int = field(metadata={"static": True})
  signed: bool = field(metadata={"static": True})

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.codes.shape)

  @property
  def code(self) -> Code:
    return MOMENT_CODE if self.signed else SQUARE_CODE

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


def zeros_like_param(param: Any, block_size: int, signed: bool) -> Blockwise8Array:
  """A stored zero moment for ``param`` (every exponent the lowest, as encoding zeros
  gives), placed like ``param``: the codes share its sharding, and the exponents are split
  the same way, which keeps every block inside one shard.

  Raises:
    ValueError: when ``param`` is split along its last axis into pieces that are not a
      whole number of blocks.
  """
  shape = tuple(np.shape(param))
  code = MOMENT_CODE if signed else SQUARE_CODE
  codes = _numerics.zeros_like_param(param, np.dtype(np.uint8))
  placement = _exponents_sharding(param, block_size)
  exponents = jnp.full(exponents_shape(shape, block_size), code.lowest_scale, jnp.int8)
  if placement is not None:
    exponents = jax.device_put(exponents, placement)
  return Blockwise8Array(codes, exponents, block_size, signed)


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

  Stochastically, ``|x|`` between the codes ``l < |x| < h`` takes ``h`` when
  ``u (h - l) < |x| - l`` with ``u = bits / 2**16``: both sides are exact (``h - l`` is a
  power of two, ``|x| - l`` exact by Sterbenz's lemma), so the probability is exactly
  ``(|x| - l) / (h - l)`` to 16 bits, with no division.
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
  low_bits = np.uint32((1 << (23 - m)) - 1)
  normal = ((_bits(scaled) & ~low_bits) >> (23 - m)).astype(jnp.int32) - (
    (127 + code.emin - 1) << m
  )
  tiny = jnp.minimum(scaled * np.float32(2.0 ** (m - code.emin)), np.float32(256.0))
  subnormal = jnp.floor(tiny).astype(jnp.int32)
  below = jnp.where(scaled < np.float32(2.0**code.emin), subnormal, normal)
  below = jnp.clip(below, 0, code.largest)
  low = _magnitude_value(below, code)
  spacing = _magnitude_value(jnp.minimum(below + 1, code.largest), code) - low
  uniform = (bits & np.uint32(0xFFFF)).astype(jnp.float32) * np.float32(2.0**-16)
  magnitude = below + (uniform * spacing < scaled - low).astype(jnp.int32)
  return _signed(x, jnp.minimum(magnitude, code.largest), code)


def _signed(x: jax.Array, magnitude: jax.Array, code: Code) -> jax.Array:
  if code.signed:
    magnitude = magnitude | jnp.where((x < 0) & (magnitude > 0), 0x80, 0)
  return magnitude.astype(jnp.uint8)


def _magnitude_value(magnitude: jax.Array, code: Code) -> jax.Array:
  """The value of a magnitude field (no sign, no block scale), float32."""
  m = code.mantissa_bits
  biased = magnitude >> m
  mantissa = magnitude & ((1 << m) - 1)
  normal = _float(((biased - 1 + code.emin + 127) << 23) | (mantissa << (23 - m)))
  subnormal = mantissa.astype(jnp.float32) * np.float32(2.0 ** (code.emin - m))
  return jnp.where(biased == 0, subnormal, normal)


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
  """The float32 values a stored moment holds."""
  block = block_length(q.shape, q.block_size)
  values = decode(_blocked(q.codes, block), q.exponents[..., None], q.code)
  return _unblocked(values, q.shape)


def quantize(
  x: jax.Array,
  block_size: int,
  signed: bool,
  upward: bool = False,
  bits: jax.Array | None = None,
) -> Blockwise8Array:
  """Store float32 ``x``: to nearest, toward +infinity (``upward``, for the running
  maximum), or stochastically with the random ``bits`` (``uint32``, shaped like ``x``).

  A block's exponent fits its largest element rounded up when the rounding can go up
  (upward or stochastically), else rounded to nearest."""
  code = MOMENT_CODE if signed else SQUARE_CODE
  shape = tuple(x.shape)
  block = block_length(shape, block_size)
  blocked = _blocked(x, block)
  exponent = blocks_exponents(blocked, code, upward or bits is not None)
  blocked_bits = None if bits is None else _blocked(bits, block)
  codes = encode(blocked, exponent[..., None], code, upward, blocked_bits)
  return Blockwise8Array(_unblocked(codes, shape), exponent.astype(jnp.int8), block_size, signed)


def is_blockwise(x: Any) -> bool:
  return isinstance(x, Blockwise8Array)


def moment_leaves(moment: Any) -> list[Any]:
  """A moment tree's leaves, a :class:`Blockwise8Array` counting as one leaf."""
  return jax.tree.leaves(moment, is_leaf=is_blockwise)


def shapes_of(moment: Any) -> Any:
  """``moment`` with each :class:`Blockwise8Array` standing as a float32 array of its
  shape: a tree shaped like the parameters, for checking the gradients against."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32) if is_blockwise(x) else x,
    moment,
    is_leaf=is_blockwise,
  )
