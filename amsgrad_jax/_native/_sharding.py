"""Run the kernel on each shard of its operands: never gather, never reduce.

The step is elementwise, so a shard of each parameter, its gradient and its three state
buffers is all one device needs. ``custom_partitioning`` tells XLA's partitioner so:
every leaf's operands and results take the parameter's sharding, the step's scalars are
replicated, and each device runs the kernel on its own shards. On one device
(and per device under ``pmap``) ``custom_partitioning`` simply calls the kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.experimental.custom_partitioning import (
  ArrayMapping,
  SdyShardingRule,
  custom_partitioning,
)
from jax.sharding import NamedSharding, PartitionSpec

from amsgrad_jax._native._interface import TREE_OPERANDS, TREE_RESULTS, Decay

Kernel = Callable[[jax.Array, list[tuple[jax.Array, ...]], Decay], list[tuple[jax.Array, ...]]]
OPERANDS_PER_LEAF = len(TREE_OPERANDS)
RESULTS_PER_LEAF = len(TREE_RESULTS)
PARAMS = TREE_OPERANDS.index("params")


def per_shard(
  kernel: Kernel, scalars: jax.Array, leaves: list[tuple[jax.Array, ...]], decay: Decay
) -> list[tuple[jax.Array, ...]]:
  """``kernel(scalars, leaves, decay)``, run on every shard of every leaf."""
  if jax.device_count() == 1:
    return kernel(scalars, leaves, decay)
  ranks = [leaf[0].ndim for leaf in leaves]
  sharded = _sharded_kernel(kernel, ranks, decay)
  flat = sharded(scalars, *(x for leaf in leaves for x in leaf))
  return [
    tuple(flat[RESULTS_PER_LEAF * i : RESULTS_PER_LEAF * (i + 1)]) for i in range(len(leaves))
  ]


def _regroup(flat: Sequence[Any]) -> list[tuple[Any, ...]]:
  return [
    tuple(flat[OPERANDS_PER_LEAF * i : OPERANDS_PER_LEAF * (i + 1)])
    for i in range(len(flat) // OPERANDS_PER_LEAF)
  ]


def _sharding_rule(ranks: list[int]) -> SdyShardingRule:
  """Each leaf's dimensions are factors shared by its operands and results only."""
  leaf_mappings = [
    ArrayMapping(*(f"leaf{i}_dim{d}" for d in range(rank))) for i, rank in enumerate(ranks)
  ]
  operands = (
    ArrayMapping("scalars"),
    *(m for m in leaf_mappings for _ in range(OPERANDS_PER_LEAF)),
  )
  results = tuple(m for m in leaf_mappings for _ in range(RESULTS_PER_LEAF))
  return SdyShardingRule(operands, results, need_replication_factors=("scalars",))


def _sharded_kernel(kernel: Kernel, ranks: list[int], decay: Decay) -> Any:
  def run(scalars: jax.Array, *flat: jax.Array) -> tuple[jax.Array, ...]:
    return tuple(x for leaf in kernel(scalars, _regroup(flat), decay) for x in leaf)

  sharded = custom_partitioning(run)

  def param_shardings(mesh: Any, arg_shapes: Sequence[Any]) -> list[Any]:
    shardings = []
    for leaf in range(len(ranks)):
      sharding = arg_shapes[1 + OPERANDS_PER_LEAF * leaf + PARAMS].sharding
      if not isinstance(sharding, NamedSharding):
        sharding = NamedSharding(mesh, PartitionSpec())
      shardings.append(sharding)
    return shardings

  def infer_sharding_from_operands(
    mesh: Any, arg_shapes: Any, result_shape: Any
  ) -> tuple[Any, ...]:
    del result_shape
    return tuple(s for s in param_shardings(mesh, arg_shapes) for _ in range(RESULTS_PER_LEAF))

  def partition(mesh: Any, arg_shapes: Any, result_shape: Any) -> tuple[Any, ...]:
    del result_shape
    leaf_shardings = param_shardings(mesh, arg_shapes)
    replicated = NamedSharding(mesh, PartitionSpec())
    arg_shardings = (replicated, *(s for s in leaf_shardings for _ in range(OPERANDS_PER_LEAF)))
    result_shardings = tuple(s for s in leaf_shardings for _ in range(RESULTS_PER_LEAF))
    return mesh, run, result_shardings, arg_shardings

  sharded.def_partition(
    partition=partition,
    infer_sharding_from_operands=infer_sharding_from_operands,
    sharding_rule=_sharding_rule(ranks),
  )
  return sharded
