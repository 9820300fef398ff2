"""What XLA makes of a jitted, donated step: the facts the benchmarks' numbers rest on.

On one float32 leaf, the Optax path of ``amsgrad_jax.amsgrad`` compiles to as many fused
loops as ``optax.amsgrad`` and moves no more bytes per parameter ("bytes accessed" of the
compiled step's cost analysis). On the native path, ``apply_step`` makes one call of the
kernel per dtype group of leaves, whatever the number of leaves in the group.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax
import pytest
from _peers import in_ci

import amsgrad_jax

SIZE = 1_000_000
KERNEL = "amsgrad_jax_step"


def _compiled_optax_step(tx: optax.GradientTransformation) -> Any:
  def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = [jnp.ones((SIZE,), jnp.float32)]
  with jax.numpy_dtype_promotion("standard"):  # optax.amsgrad mixes Python floats and int32
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params)
  return lowered.compile()


def _bytes_per_param(compiled: Any) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost["bytes accessed"] / SIZE


def _fusions(compiled: Any) -> int:
  return len(re.findall(r"= \S+ fusion\(", compiled.as_text()))


def test_optax_path_compiles_to_the_loops_and_bytes_of_optax_amsgrad() -> None:
  ours = _compiled_optax_step(amsgrad_jax.amsgrad(1e-3))
  theirs = _compiled_optax_step(optax.amsgrad(1e-3))
  assert _fusions(ours) == _fusions(theirs)
  # One pass would move 36 bytes a parameter; XLA:CPU's loops move more, and ours no
  # more than optax.amsgrad's.
  assert 36 <= _bytes_per_param(ours) <= _bytes_per_param(theirs) + 0.01


@pytest.mark.native_cpu
def test_native_step_calls_the_kernel_once_per_dtype_group() -> None:
  status = amsgrad_jax.native_status()
  if not status.active:
    if in_ci():
      pytest.fail(f"the native kernel must be active in CI: {status.reason}")
    pytest.skip(f"the native kernel is not active here: {status.reason}")
  params = {
    "a": jnp.ones((10,), jnp.float32),
    "b": jnp.ones((3, 4), jnp.float32),
    "c": jnp.ones((5,), jnp.bfloat16),
    "d": jnp.ones((2, 7), jnp.bfloat16),
    "e": jnp.ones((3,), jnp.bfloat16),
  }
  tx = amsgrad_jax.amsgrad(1e-3)

  def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
    return amsgrad_jax.apply_step(tx, grads, state, params)

  text = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).as_text()
  calls = [line for line in text.splitlines() if "custom_call" in line and KERNEL in line]
  assert len(calls) == 2, calls
