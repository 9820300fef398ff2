"""Run the kernel on each shard of the operands: never gather, never reduce."""

from __future__ import annotations

from collections.abc import Callable

import jax


def per_shard(
  kernel: Callable[..., list[tuple[jax.Array, ...]]],
  scalars: jax.Array,
  leaves: list[tuple[jax.Array, ...]],
  decay: int,
) -> list[tuple[jax.Array, ...]]:
  """``kernel(scalars, leaves, decay)``, elementwise over every leaf's shards."""
  return kernel(scalars, leaves, decay)
