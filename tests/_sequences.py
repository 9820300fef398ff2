"""Generators of gradient sequences shared by the parity tests.

Sequences are drawn from a seeded NumPy generator, so every test that uses one
can be rerun bit for bit; the reference numbers come from running the peer
framework on the very same arrays.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

SHAPES: dict[str, tuple[int, ...]] = {
  "kernel": (5, 3),
  "bias": (3,),
  "scalar": (),
  "conv": (2, 3, 4),
}


def initial_params(dtype: np.dtype, seed: int = 0, shapes=SHAPES) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {name: _draw(rng, shape, dtype) for name, shape in shapes.items()}


def gradient_sequence(
  steps: int, dtype: np.dtype, seed: int = 1, shapes=SHAPES
) -> list[dict[str, np.ndarray]]:
  """``steps`` gradient trees with spikes (x1e4 on a few coordinates), all-zero
  steps and exact-zero coordinates mixed in."""
  rng = np.random.default_rng(seed)
  sequence = []
  for step in range(steps):
    tree = {}
    for name, shape in shapes.items():
      g = _draw(rng, shape, dtype)
      if step % 17 == 5:  # a spike on some coordinates
        g = g * np.where(rng.random(shape) < 0.3, 1e4, 1.0).astype(g.real.dtype)
      if step % 11 == 3:  # an exact-zero step
        g = np.zeros_like(g)
      g = np.where(rng.random(shape) < 0.1, np.zeros_like(g), g)  # exact-zero coordinates
      tree[name] = np.asarray(g, dtype)
    sequence.append(tree)
  return sequence


def _draw(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  dtype = np.dtype(dtype)
  if dtype.kind == "c":
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
  return rng.standard_normal(shape).astype(dtype)


def run_steps(
  tx: optax.GradientTransformation, params0: Any, grads: list[Any], *, jit: bool = True
) -> Iterator[tuple[Any, Any]]:
  """Yield ``(params, state)`` after every step of ``tx`` on ``grads``."""
  params = jax.tree.map(jnp.asarray, params0)
  state = tx.init(params)

  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step) if jit else step
  for tree in grads:
    params, state = step(params, state, jax.tree.map(jnp.asarray, tree))
    yield params, state
