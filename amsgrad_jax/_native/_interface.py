"""The kernel's interface, defined once: targets, operand layout, scalars and decay codes.

``amsgrad_step.cc`` includes a header generated from this module (:func:`header`), so the
C++ names every operand, scalar and code through the constants written here. The built
kernel also reports the interface it was compiled with (``AmsgradJaxInterface``), and
:func:`check` compares that with :func:`description` when the library is loaded: a kernel
built from another version is refused with the difference named, never called with
operands in an order it does not expect.

The FFI targets, one per state storage, and the guard's check:

* ``amsgrad_jax_step`` (state as one array per leaf): operands ``scalars``, then
  :data:`TREE_OPERANDS` for every leaf; results :data:`TREE_RESULTS` for every leaf, each
  aliased to the operand of the same name.
* ``amsgrad_jax_step_flat`` (``flat_state=True``): operands ``scalars``, the group's
  :data:`FLAT_STATE` buffers, then :data:`FLAT_LEAF_OPERANDS` for every leaf; results the
  :data:`FLAT_STATE` buffers, then :data:`FLAT_LEAF_RESULTS` for every leaf.
* ``amsgrad_jax_step_blockwise`` (:func:`~amsgrad_jax.blockwise8` state): operands
  ``scalars``, then :data:`BLOCKWISE_OPERANDS` for every leaf; results
  :data:`BLOCKWISE_RESULTS`, aliased as the tree target's.
* ``amsgrad_jax_step_flat_blockwise`` (:func:`~amsgrad_jax.blockwise8` state with
  ``flat_state=True``): operands ``scalars``, the group's :data:`FLAT_BLOCKWISE_STATE`
  buffers, then :data:`FLAT_LEAF_OPERANDS` for every leaf; results as the flat target's.
* ``amsgrad_jax_check`` (the guard of :func:`~amsgrad_jax.skip_nonfinite`): the tree
  target's operands, nothing written; one ``int32`` result, 1 when the step would leave the
  gradient, the update and the stored state finite.

All take the attribute ``decay`` (a :class:`Decay`); the steps also ``rounding`` and
``state_rounding`` (:class:`Rounding` of the parameters and of ``mu`` and ``nu``; for
float state only bfloat16 is affected) and ``leaf_ids`` (each leaf's position in the
tree, which seeds its random bits); the flat ones also ``offsets``, each leaf's first
element in the state buffers; the blockwise ones also ``block_size``, and the flat
blockwise one ``block_offsets``, each leaf's first block exponent.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from amsgrad_jax import _blockwise, _rounding

TREE_TARGET = "amsgrad_jax_step"
FLAT_TARGET = "amsgrad_jax_step_flat"
BLOCKWISE_TARGET = "amsgrad_jax_step_blockwise"
FLAT_BLOCKWISE_TARGET = "amsgrad_jax_step_flat_blockwise"
CHECK_TARGET = "amsgrad_jax_check"
# The exported symbol of each target's handler.
HANDLERS = {
  TREE_TARGET: "AmsgradJaxStep",
  FLAT_TARGET: "AmsgradJaxStepFlat",
  BLOCKWISE_TARGET: "AmsgradJaxStepBlockwise",
  FLAT_BLOCKWISE_TARGET: "AmsgradJaxStepFlatBlockwise",
  CHECK_TARGET: "AmsgradJaxCheck",
}
DESCRIBE_SYMBOL = "AmsgradJaxInterface"

# The step's scalars, in order, in the compute dtype (see the kernel's header comment).
SCALARS = (
  "b1",
  "b2",
  "one_minus_b1",
  "one_minus_b2",
  "eps",
  "eps_root",
  "nu_scale",  # the rule's a
  "mu_scale",  # the rule's b
  "root_scale",  # the rule's d
  "nu_unscale_before",  # 1 / a of the step before: a blockwise8 nu is (1 - code) * nu_max / a
  "neg_lr",  # -learning rate, rounded to the parameter dtype
  "weight_decay",  # rounded to the parameter dtype
  # A global-norm clip in front: g -> (g / divisor) * multiplier, each rounded to the
  # parameter dtype as optax.clip_by_global_norm rounds them; 1 and 1 when not clipping.
  "grad_divisor",
  "grad_multiplier",
  # The stochastic rounding's key of the step (_rounding.step_key), as two 16-bit halves,
  # each exact in any compute dtype.
  "round_key_high",
  "round_key_low",
)

TREE_OPERANDS = ("params", "grads", "mu", "nu", "nu_max")
TREE_RESULTS = ("params", "mu", "nu", "nu_max")
FLAT_STATE: tuple[str, ...] = ("mu", "nu", "nu_max")
FLAT_LEAF_OPERANDS = ("params", "grads")
FLAT_LEAF_RESULTS = ("params",)
BLOCKWISE_OPERANDS = (
  "params",
  "grads",
  "mu",
  "mu_exponents",
  "nu",
  "nu_exponents",
  "nu_max",
  "nu_max_exponents",
)
BLOCKWISE_RESULTS = BLOCKWISE_OPERANDS[:1] + BLOCKWISE_OPERANDS[2:]
FLAT_BLOCKWISE_STATE = BLOCKWISE_OPERANDS[2:]


class Decay(enum.IntEnum):
  """How weight decay enters the step of a leaf."""

  NONE = 0
  COUPLED = 1  # g + wd * p, before the moments (amsgrad)
  DECOUPLED = 2  # u + wd * p, after the step (amsgradw)


class Rounding(enum.IntEnum):
  """How a bfloat16 parameter takes its step (``param_rounding``)."""

  NEAREST = 0
  STOCHASTIC = 1


def _constants() -> dict[str, int]:
  """The numbers the kernel shares with the Optax path: the codes, the hash."""
  return {
    **{
      f"{kind}_code_{name}": getattr(code, name)
      for kind, code in _blockwise.CODES.items()
      for name in ("mantissa_bits", "emin", "largest", "lowest_scale")
    },
    "code_highest_scale": _blockwise.HIGHEST_SCALE,
    "round_leaf_multiplier": int(_rounding.LEAF_MULTIPLIER),
    "round_golden": int(_rounding.GOLDEN),
    "round_state_salt": _rounding.STATE_SALT,
  }


def description() -> str:
  """The interface as one line of text; the kernel reports the same line."""
  parts = {
    "scalars": SCALARS,
    "tree_operands": TREE_OPERANDS,
    "tree_results": TREE_RESULTS,
    "flat_state": FLAT_STATE,
    "flat_leaf_operands": FLAT_LEAF_OPERANDS,
    "flat_leaf_results": FLAT_LEAF_RESULTS,
    "blockwise_operands": BLOCKWISE_OPERANDS,
    "blockwise_results": BLOCKWISE_RESULTS,
    "flat_blockwise_state": FLAT_BLOCKWISE_STATE,
    "check_results": ("finite",),
    "decay": tuple(f"{code.name.lower()}={code.value}" for code in Decay),
    "rounding": tuple(f"{code.name.lower()}={code.value}" for code in Rounding),
    "constants": tuple(f"{name}={value}" for name, value in _constants().items()),
  }
  return ";".join(f"{key}={','.join(values)}" for key, values in parts.items())


def header() -> str:
  """The C++ header ``amsgrad_step.cc`` is compiled with."""

  def indices(prefix: str, names: Sequence[str], count: str) -> list[str]:
    pairs = [f"  k{prefix}{_camel(name)} = {i}," for i, name in enumerate(names)]
    return [f"enum {prefix}Index : int {{", *pairs, f"  {count} = {len(names)},", "};"]

  lines = [
    "// Generated from amsgrad_jax/_native/_interface.py at build time: do not edit.",
    "#pragma once",
    "#include <cstdint>",
    *indices("Scalar", SCALARS, "kNumScalars"),
    *indices("TreeOperand", TREE_OPERANDS, "kTreeOperandsPerLeaf"),
    *indices("TreeResult", TREE_RESULTS, "kTreeResultsPerLeaf"),
    *indices("FlatState", FLAT_STATE, "kFlatStateBuffers"),
    *indices("FlatLeafOperand", FLAT_LEAF_OPERANDS, "kFlatOperandsPerLeaf"),
    *indices("FlatLeafResult", FLAT_LEAF_RESULTS, "kFlatResultsPerLeaf"),
    *indices("BlockwiseOperand", BLOCKWISE_OPERANDS, "kBlockwiseOperandsPerLeaf"),
    *indices("BlockwiseResult", BLOCKWISE_RESULTS, "kBlockwiseResultsPerLeaf"),
    *indices("FlatBlockwiseState", FLAT_BLOCKWISE_STATE, "kFlatBlockwiseStateBuffers"),
    "enum Decay : int64_t {",
    *(f"  kDecay{_camel(code.name.lower())} = {code.value}," for code in Decay),
    "};",
    "enum Rounding : int64_t {",
    *(f"  kRounding{_camel(code.name.lower())} = {code.value}," for code in Rounding),
    "};",
    *(
      f"inline constexpr {'uint32_t' if value >= 2**31 else 'int'} k{_camel(name)} = "
      f"{value}{'u' if value >= 2**31 else ''};"
      for name, value in _constants().items()
    ),
    f'inline constexpr char kInterface[] = "{description()}";',
  ]
  return "\n".join(lines) + "\n"


def _camel(name: str) -> str:
  return "".join(part.capitalize() for part in name.split("_"))


class InterfaceMismatch(RuntimeError):
  """The built kernel was compiled against another interface."""


def check(reported: str) -> None:
  """Raise :class:`InterfaceMismatch` naming each part where ``reported`` differs."""
  expected = description()
  if reported == expected:
    return
  ours = dict(part.split("=", 1) for part in expected.split(";"))
  theirs = dict(part.split("=", 1) for part in reported.split(";") if "=" in part)
  differences = [
    f"{key}: kernel has {theirs.get(key, '(nothing)')!r}, Python expects {ours.get(key)!r}"
    for key in sorted(set(ours) | set(theirs))
    if ours.get(key) != theirs.get(key)
  ]
  raise InterfaceMismatch("the kernel's interface differs: " + "; ".join(differences))


# ---- the two calls, as JAX sees them ------------------------------------------------------


def tree_call(
  scalars: jax.Array,
  leaves: list[tuple[jax.Array, ...]],
  decay: Decay,
  *,
  rounding: Rounding = Rounding.NEAREST,
  state_rounding: Rounding = Rounding.NEAREST,
  leaf_ids: Sequence[int] = (),
) -> list[tuple]:
  """One call over ``leaves``, each its :data:`TREE_OPERANDS`; returns each leaf's
  :data:`TREE_RESULTS`, aliased to the operands of the same names. ``leaf_ids``: each
  leaf's position in the parameter tree (the stochastic rounding's leaf number)."""
  return _per_leaf_call(
    TREE_TARGET,
    TREE_OPERANDS,
    TREE_RESULTS,
    scalars,
    leaves,
    leaf_ids=list(leaf_ids) or list(range(len(leaves))),
    decay=decay,
    rounding=rounding,
    state_rounding=state_rounding,
  )


def blockwise_call(
  scalars: jax.Array,
  leaves: Sequence[tuple[jax.Array, ...]],
  decay: Decay,
  *,
  block_size: int,
  rounding: Rounding,
  state_rounding: Rounding,
  leaf_ids: Sequence[int],
) -> list[tuple]:
  """One call over leaves in :func:`~amsgrad_jax.blockwise8` storage, each its
  :data:`BLOCKWISE_OPERANDS`; returns each leaf's :data:`BLOCKWISE_RESULTS`, aliased."""
  return _per_leaf_call(
    BLOCKWISE_TARGET,
    BLOCKWISE_OPERANDS,
    BLOCKWISE_RESULTS,
    scalars,
    leaves,
    leaf_ids=leaf_ids,
    decay=decay,
    rounding=rounding,
    state_rounding=state_rounding,
    block_size=block_size,
  )


def _per_leaf_call(
  target: str,
  operand_names: Sequence[str],
  result_names: Sequence[str],
  scalars: jax.Array,
  leaves: Sequence[tuple[jax.Array, ...]],
  *,
  leaf_ids: Sequence[int],
  **attributes: int,
) -> list[tuple]:
  """``target`` over ``leaves`` (each its ``operand_names``) after the scalars: each leaf's
  ``result_names``, each aliased to the operand of the same name."""
  per_in, per_out = len(operand_names), len(result_names)
  at = {name: operand_names.index(name) for name in result_names}
  result_shapes = [
    jax.ShapeDtypeStruct(leaf[at[name]].shape, leaf[at[name]].dtype)
    for leaf in leaves
    for name in result_names
  ]
  aliases = {
    1 + per_in * i + at[name]: per_out * i + k
    for i in range(len(leaves))
    for k, name in enumerate(result_names)
  }
  call = jax.ffi.ffi_call(
    target, result_shapes, input_output_aliases=aliases, vmap_method="sequential"
  )
  flat = call(
    scalars,
    *(x for leaf in leaves for x in leaf),
    **{name: np.int64(value) for name, value in attributes.items()},
    leaf_ids=np.asarray(leaf_ids, np.int64),
  )
  return [tuple(flat[per_out * i : per_out * (i + 1)]) for i in range(len(leaves))]


def flat_call(
  scalars: jax.Array,
  state: tuple[jax.Array, ...],
  leaves: Sequence[tuple[jax.Array, ...]],
  offsets: list[int],
  decay: Decay,
  *,
  rounding: Rounding = Rounding.NEAREST,
  state_rounding: Rounding = Rounding.NEAREST,
  leaf_ids: Sequence[int] = (),
  block_size: int | None = None,
  block_offsets: Sequence[int] = (),
) -> tuple[tuple[jax.Array, ...], list[jax.Array]]:
  """One call over some leaves of a dtype group in the flat layout: ``state`` holds the
  group's :data:`FLAT_STATE` buffers (given ``block_size``, its
  :data:`FLAT_BLOCKWISE_STATE` buffers, with each leaf's first exponent in
  ``block_offsets``), each leaf its :data:`FLAT_LEAF_OPERANDS`. Returns the new state
  buffers and each leaf's new parameters, all aliased to their operands."""
  target, names = FLAT_TARGET, FLAT_STATE
  blocks: dict[str, Any] = {}
  if block_size is not None:
    target, names = FLAT_BLOCKWISE_TARGET, FLAT_BLOCKWISE_STATE
    blocks = {
      "block_size": np.int64(block_size),
      "block_offsets": np.asarray(block_offsets, np.int64),
    }
  num_state, per_in = len(names), len(FLAT_LEAF_OPERANDS)
  if len(state) != num_state:
    raise ValueError(f"{target} takes {num_state} state buffers, got {len(state)}")
  params_at = FLAT_LEAF_OPERANDS.index("params")
  operands = [*state, *(x for leaf in leaves for x in leaf)]
  result_shapes: list[Any] = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in state]
  result_shapes += [
    jax.ShapeDtypeStruct(leaf[params_at].shape, leaf[params_at].dtype) for leaf in leaves
  ]
  aliases = {1 + k: k for k in range(num_state)}
  aliases |= {1 + num_state + per_in * i + params_at: num_state + i for i in range(len(leaves))}
  call = jax.ffi.ffi_call(
    target, result_shapes, input_output_aliases=aliases, vmap_method="sequential"
  )
  flat = call(
    scalars,
    *operands,
    decay=np.int64(decay),
    rounding=np.int64(rounding),
    state_rounding=np.int64(state_rounding),
    leaf_ids=np.asarray(list(leaf_ids) or list(range(len(leaves))), np.int64),
    offsets=np.asarray(offsets, np.int64),
    **blocks,
  )
  return tuple(flat[:num_state]), list(flat[num_state:])


def check_call(
  scalars: jax.Array, leaves: Sequence[tuple[jax.Array, ...]], decay: Decay
) -> jax.Array:
  """Whether the step of ``leaves`` (each its :data:`TREE_OPERANDS`) would leave every value
  the guard looks at finite: an ``int32`` scalar, 1 or 0."""
  call = jax.ffi.ffi_call(
    CHECK_TARGET, jax.ShapeDtypeStruct((), np.int32), vmap_method="sequential"
  )
  return call(scalars, *(x for leaf in leaves for x in leaf), decay=np.int64(decay))
