"""Gradient clipping as PyTorch and Keras compute it, as Optax transformations.

The frameworks' clippings differ from Optax's in ways that move a trajectory: PyTorch's
``clip_grad_norm_`` scales by ``max_norm / (norm + 1e-6)`` clamped to 1, where
:func:`optax.clip_by_global_norm` scales by ``max_norm / norm`` above the threshold;
Keras' ``clipnorm`` clips each variable by its own norm. Each transformation here does the
framework's operations in its order; none has a state (``optax.EmptyState()``).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from amsgrad_jax import _numerics

# PyTorch's clip_grad_norm_ adds this to the norm before dividing, in the gradients' dtype.
_TORCH_NORM_OFFSET = 1e-6


def _stateless(
  update: Any,
) -> optax.GradientTransformation:
  def init_fn(params: optax.Params) -> optax.EmptyState:
    del params
    return optax.EmptyState()

  def update_fn(
    updates: optax.Updates, state: optax.EmptyState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, optax.EmptyState]:
    del params
    return update(updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def _common(scalars: list[jax.Array]) -> list[jax.Array]:
  """``scalars`` in one dtype to stack them: theirs when they share it, else the widest
  (at least float32), as the frameworks' stacks promote."""
  dtypes = {x.dtype for x in scalars}
  dtype = dtypes.pop() if len(dtypes) == 1 else _numerics.compute_dtype(*(x.dtype for x in scalars))
  return [x.astype(dtype) for x in scalars]


def _vector_norm(x: jax.Array, norm_type: float) -> jax.Array:
  """``torch.linalg.vector_norm(x, norm_type)`` of a flattened ``x``."""
  magnitude = jnp.abs(x)
  if norm_type == math.inf:
    return jnp.max(magnitude, initial=0.0)
  if norm_type == 2.0:
    return jnp.sqrt(jnp.sum(magnitude * magnitude))
  if norm_type == 1.0:
    return jnp.sum(magnitude)
  return jnp.sum(magnitude**norm_type) ** (1.0 / norm_type)


def torch_clip_grad_norm(max_norm: float, norm_type: float = 2.0) -> optax.GradientTransformation:
  r"""``torch.nn.utils.clip_grad_norm_``, as a transformation of the gradients.

  With :math:`N` the norm of the per-parameter norms (the global norm for
  ``norm_type=2``),

  .. math::

    g \leftarrow g \cdot \min\!\left(1, \frac{c}{N + 10^{-6}}\right):

  unlike :func:`optax.clip_by_global_norm`, a clipped step keeps a norm a little under
  ``max_norm``, and clipping starts at :math:`N = c - 10^{-6}`. The norms are computed in
  the gradients' dtype, as PyTorch does, and the gradients keep their dtypes.

  Args:
    max_norm: :math:`c`, PyTorch's ``max_norm``, ``> 0``.
    norm_type: the order of the norms, ``> 0`` or ``math.inf``.

  Returns:
    An :class:`optax.GradientTransformation` with an empty state.

  Examples:
    >>> import jax.numpy as jnp
    >>> from amsgrad_jax import interop
    >>> clip = interop.torch_clip_grad_norm(1.0)
    >>> clipped, _ = clip.update({"w": jnp.array([3.0, 4.0])}, clip.init(None))
    >>> clipped["w"]  # scaled by 1 / (5 + 1e-6), not 1 / 5
    Array([0.5999999 , 0.79999983], dtype=float32)
  """
  if not max_norm > 0:
    raise ValueError(f"max_norm must be > 0, got {max_norm!r}.")
  if not norm_type > 0:
    raise ValueError(f"norm_type must be > 0 or math.inf, got {norm_type!r}.")

  def clip(updates: optax.Updates) -> optax.Updates:
    leaves = jax.tree.leaves(updates)
    if not leaves:
      return updates
    norms = [_vector_norm(jnp.ravel(g), norm_type) for g in leaves]
    total = _vector_norm(jnp.stack(_common(norms)), norm_type)
    coefficient = jnp.minimum(max_norm / (total + _TORCH_NORM_OFFSET), 1.0)
    return jax.tree.map(lambda g: g * coefficient.astype(g.dtype), updates)

  return _stateless(clip)


def keras_clipnorm(clipnorm: float) -> optax.GradientTransformation:
  r"""Keras' ``clipnorm``: each gradient clipped by its own norm.

  .. math::

    g \leftarrow \frac{g\,c}{\max(\lVert g \rVert_2, c)}

  for every leaf separately, as ``keras.optimizers.Adam(clipnorm=c)`` does for every
  variable (a leaf of zeros stays zero).

  Args:
    clipnorm: :math:`c`, ``> 0``.

  Returns:
    An :class:`optax.GradientTransformation` with an empty state.

  Examples:
    >>> import jax.numpy as jnp
    >>> from amsgrad_jax import interop
    >>> clip = interop.keras_clipnorm(1.0)
    >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}
    >>> clipped, _ = clip.update(grads, clip.init(None))
    >>> clipped["a"], clipped["b"]
    (Array([0.6, 0.8], dtype=float32), Array([0.5], dtype=float32))
  """
  if not clipnorm > 0:
    raise ValueError(f"clipnorm must be > 0, got {clipnorm!r}.")

  def clip_leaf(g: jax.Array) -> jax.Array:
    l2sum = jnp.sum(jnp.square(g), keepdims=True)
    positive = l2sum > 0
    # Keras' two-sided where, so that a zero gradient gives a zero, not a NaN, derivative.
    l2norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, l2sum, jnp.ones_like(l2sum))), l2sum)
    return g * clipnorm / jnp.maximum(l2norm, clipnorm)

  return _stateless(lambda updates: jax.tree.map(clip_leaf, updates))


def keras_global_clipnorm(global_clipnorm: float) -> optax.GradientTransformation:
  r"""Keras' ``global_clipnorm``: all gradients clipped by their global norm.

  .. math::

    g \leftarrow g \cdot c \min\!\left(\frac{1}{N}, \frac{1}{c}\right)

  with :math:`N` the global norm: the same as :func:`optax.clip_by_global_norm` up to
  rounding, written as Keras writes it, with Keras' NaN for a non-finite norm.

  Args:
    global_clipnorm: :math:`c`, ``> 0``.

  Returns:
    An :class:`optax.GradientTransformation` with an empty state.

  Examples:
    >>> import jax.numpy as jnp
    >>> from amsgrad_jax import interop
    >>> clip = interop.keras_global_clipnorm(1.0)
    >>> grads = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
    >>> clipped, _ = clip.update(grads, clip.init(None))
    >>> clipped["a"], clipped["b"]
    (Array([0.6], dtype=float32), Array([0.8], dtype=float32))
  """
  if not global_clipnorm > 0:
    raise ValueError(f"global_clipnorm must be > 0, got {global_clipnorm!r}.")

  def clip(updates: optax.Updates) -> optax.Updates:
    leaves = jax.tree.leaves(updates)
    if not leaves:
      return updates
    squares = [jnp.sum(jnp.square(g)) for g in leaves]
    norm = jnp.sqrt(jnp.sum(jnp.stack(_common(squares))))
    scale = global_clipnorm * jnp.minimum(1.0 / norm, 1.0 / global_clipnorm)
    scale = scale + (norm - norm)  # NaN for a non-finite norm, as in Keras
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates)

  return _stateless(clip)
