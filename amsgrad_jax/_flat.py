"""The flat state layout: each moment of every leaf in one 1-D buffer per parameter dtype.

With ``flat_state=True`` the moments ``mu``, ``nu`` and ``nu_max`` are each a
:class:`FlatMoment` instead of a tree shaped like the parameters: leaf :math:`i` of dtype
:math:`d` occupies elements ``[offset_i, offset_i + size_i)`` of the buffer of group
:math:`d`, in the order of ``jax.tree.leaves(params)``.

The arithmetic is the tree layout's: through :func:`~amsgrad_jax.apply_step` the results
are bit for bit the same, and through ``tx.update`` under ``jit`` they agree to within
XLA's choice of fused multiply-adds. What changes is how many arrays the state has. A
jitted step pays a microsecond or two for every array it takes and returns, so on a model
of hundreds of small leaves the tree layout's three arrays per leaf cost more than the
arithmetic; the flat layout has three per dtype.

The layout (tree structure, shapes, offsets) is static: it is part of the state's tree
structure, so ``jit`` specialises on it and a gradient tree that does not match it is
rejected by name, as with the tree layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from amsgrad_jax._blockwise import Blockwise8, Blockwise8Array, exponents_shape
from amsgrad_jax._blockwise import zeros_like_param as _blockwise_zeros_like


@dataclass(frozen=True)
class FlatLayout:
  """Where every parameter leaf lives in the flat buffers.

  Attributes:
    treedef: the parameters' tree structure.
    shapes: each leaf's shape, in ``jax.tree.leaves`` order.
    groups: each leaf's group, the name of its parameter dtype (``"float32"``, ...).
    offsets: each leaf's first element in its group's buffer.
  """

  treedef: Any
  shapes: tuple[tuple[int, ...], ...]
  groups: tuple[str, ...]
  offsets: tuple[int, ...]

  @staticmethod
  def of(leaves: list[Any], treedef: Any, dtypes: list[np.dtype]) -> FlatLayout:
    """The layout of ``leaves`` (of ``treedef``) whose parameter dtypes are ``dtypes``."""
    shapes = tuple(tuple(np.shape(leaf)) for leaf in leaves)
    groups = tuple(np.dtype(dtype).name for dtype in dtypes)
    offsets, _ = _packed(groups, [math.prod(shape) for shape in shapes])
    return FlatLayout(treedef, shapes, groups, offsets)

  def sizes(self) -> dict[str, int]:
    """Elements in each group's buffer."""
    return _packed(self.groups, [math.prod(shape) for shape in self.shapes])[1]

  def block_offsets(self, block_size: int) -> tuple[int, ...]:
    """Each leaf's first block exponent in its group's :func:`~amsgrad_jax.blockwise8`
    exponents buffer (a leaf has ``exponents_shape(shape, block_size)`` of them)."""
    return self._blocks(block_size)[0]

  def block_counts(self, block_size: int) -> dict[str, int]:
    """Block exponents in each group's :func:`~amsgrad_jax.blockwise8` buffer."""
    return self._blocks(block_size)[1]

  def _blocks(self, block_size: int) -> tuple[tuple[int, ...], dict[str, int]]:
    counts = [math.prod(exponents_shape(shape, block_size)) for shape in self.shapes]
    return _packed(self.groups, counts)

  def template(self) -> Any:
    """The parameter tree as shapes, for checking a gradient tree against the layout."""
    return self.treedef.unflatten(
      [jax.ShapeDtypeStruct(shape, jnp.dtype(group)) for shape, group in self.leaf_specs()]
    )

  def leaf_specs(self) -> list[tuple[tuple[int, ...], str]]:
    """Each leaf's ``(shape, group)``, in tree order."""
    return list(zip(self.shapes, self.groups, strict=True))

  def covers(self, tree: Any) -> bool:
    """Whether ``tree``'s leaves stand one for one for the layout's, with the same shapes.

    ``tree`` has the layout's structure, or a coarser one each of whose leaves sits where
    the layout has a node holding exactly one leaf: a Flax NNX optimizer builds its state
    from ``Variable`` nodes and later passes their bare values.
    """
    leaves, treedef = jax.tree.flatten(tree)
    treedef = _opaque(treedef)
    if len(leaves) != len(self.shapes):
      return False
    if treedef != self.treedef:
      try:
        subtrees = treedef.flatten_up_to(self.template())
      except (ValueError, TypeError):
        return False
      if any(len(jax.tree.leaves(subtree)) != 1 for subtree in subtrees):
        return False
    return all(np.shape(leaf) == shape for leaf, shape in zip(leaves, self.shapes, strict=True))


def _packed(groups: tuple[str, ...], counts: list[int]) -> tuple[tuple[int, ...], dict[str, int]]:
  """Where each of ``counts`` items, one run per leaf, starts in its group's buffer (runs
  in tree order), and how many items each group's buffer holds."""
  filled: dict[str, int] = {}
  offsets = []
  for group, count in zip(groups, counts, strict=True):
    offsets.append(filled.get(group, 0))
    filled[group] = offsets[-1] + count
  return tuple(offsets), filled


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class FlatMoment:
  """One moment of every parameter leaf: a 1-D buffer per parameter dtype.

  Attributes:
    buffers: ``{dtype name: 1-D array}``; the buffer of group ``"float32"`` holds the
      moment of every float32 parameter, concatenated in tree order, stored in the
      moment's dtype (``mu_dtype`` / ``nu_dtype``, else the parameter's).
    layout: where each leaf lives (static).
  """

  buffers: dict[str, jax.Array]
  layout: FlatLayout = field(metadata={"static": True})

  def leaves(self) -> list[Any]:
    """Each leaf's moment, shaped like its parameter (slices of the buffers)."""
    leaves: list[Any] = []
    starts: dict[int, tuple[int, ...]] = {}
    specs = zip(self.layout.leaf_specs(), self.layout.offsets, strict=True)
    for index, ((shape, group), offset) in enumerate(specs):
      buffer = self.buffers[group]
      if not isinstance(buffer, Blockwise8Array):
        leaves.append(_slice(buffer, offset, shape))
        continue
      if buffer.block_size not in starts:
        starts[buffer.block_size] = self.layout.block_offsets(buffer.block_size)
      blocks = exponents_shape(shape, buffer.block_size)
      leaves.append(
        Blockwise8Array(
          _slice(buffer.codes, offset, shape),
          _slice(buffer.exponents, starts[buffer.block_size][index], blocks),
          buffer.block_size,
          buffer.kind,
        )
      )
    return leaves

  @staticmethod
  def pack(layout: FlatLayout, leaves: list[Any]) -> FlatMoment:
    """The moment whose leaf ``i`` is ``leaves[i]`` (the inverse of :meth:`leaves`)."""
    members: dict[str, list[Any]] = {}
    for leaf, group in zip(leaves, layout.groups, strict=True):
      members.setdefault(group, []).append(leaf)
    buffers: dict[str, Any] = {}
    for group, parts in members.items():
      if isinstance(parts[0], Blockwise8Array):
        buffers[group] = Blockwise8Array(
          _concatenate([part.codes for part in parts]),
          _concatenate([part.exponents for part in parts]),
          parts[0].block_size,
          parts[0].kind,
        )
      else:
        buffers[group] = _concatenate(parts)
    return FlatMoment(buffers, layout)


def _slice(buffer: jax.Array, start: int, shape: tuple[int, ...]) -> jax.Array:
  return jax.lax.slice(buffer, (start,), (start + math.prod(shape),)).reshape(shape)


def _concatenate(parts: list[jax.Array]) -> jax.Array:
  raveled = [jnp.ravel(part) for part in parts]
  return raveled[0] if len(raveled) == 1 else jnp.concatenate(raveled)


def flat_zeros(layout: FlatLayout, dtype_of: dict[str, Any], kind: str) -> FlatMoment:
  """Zeros of the moment ``kind`` in every group, group ``g`` stored in ``dtype_of[g]``
  (a dtype, or a :class:`~amsgrad_jax.Blockwise8` format)."""
  buffers: dict[str, Any] = {}
  for group, size in layout.sizes().items():
    stored = dtype_of[group]
    if not isinstance(stored, Blockwise8):
      buffers[group] = jnp.zeros((size,), stored)
      continue
    parts = [
      _blockwise_zeros_like(jax.ShapeDtypeStruct(shape, np.float32), stored.block_size, kind)
      for shape, leaf_group in layout.leaf_specs()
      if leaf_group == group
    ]
    buffers[group] = Blockwise8Array(
      _concatenate([part.codes for part in parts]),
      _concatenate([part.exponents for part in parts]),
      stored.block_size,
      kind,
    )
  return FlatMoment(buffers, layout)


def _opaque(treedef: Any) -> Any:
  """A tree definition, typed as ``Any``: jaxlib ships ``PyTreeDef`` without stubs."""
  return treedef
