"""Exact resume: Orbax checkpoints of the parameters and the optimizer state.

Params and state saved mid-run with :class:`orbax.checkpoint.StandardCheckpointer` and
restored into an abstract target from :func:`jax.eval_shape` come back as the same
NamedTuple types, with the same dtypes (and shardings), and the run continues bit for
bit as if it had never stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _peers import require
from _sequences import gradient_sequence, initial_params
from jax.sharding import NamedSharding, PartitionSpec

import amsgrad_jax
from amsgrad_jax import amsgrad, amsgradw, skip_nonfinite

STEPS, SAVE_AT = 12, 5

OPTIMIZERS: dict[str, Callable[[str], optax.GradientTransformation]] = {
  "amsgrad": lambda convention: amsgrad(1e-2, convention=convention),
  "amsgrad-l2": lambda convention: amsgrad(1e-2, convention=convention, weight_decay=1e-3),
  "amsgradw-bf16-moments": lambda convention: amsgradw(
    1e-2, convention=convention, mu_dtype=jnp.bfloat16
  ),
  "guarded-schedule": lambda convention: skip_nonfinite(
    amsgrad(optax.exponential_decay(1e-2, 4, 0.5), convention=convention), 3
  ),
  "amsgradw-flat-state": lambda convention: amsgradw(1e-2, convention=convention, flat_state=True),
  "injected": lambda convention: optax.inject_hyperparams(amsgrad)(
    learning_rate=1e-2, b1=0.8, convention=convention
  ),
}


def make_step(tx: optax.GradientTransformation) -> Callable[..., Any]:
  @jax.jit
  def step(params, state, grad):
    updates, state = tx.update(grad, state, params)
    return optax.apply_updates(params, updates), state

  return step


def run(step: Callable[..., Any], params: Any, state: Any, grads: list[Any]) -> tuple[Any, Any]:
  for grad in grads:
    params, state = step(params, state, grad)
  return params, state


def assert_identical(restored: Any, expected: Any) -> None:
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for ours, theirs in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
    assert ours.dtype == theirs.dtype
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def resume_matches_uninterrupted(
  tx: optax.GradientTransformation,
  params: Any,
  grads: list[Any],
  directory: Any,
  place: Callable[[jax.ShapeDtypeStruct], jax.ShapeDtypeStruct] = lambda leaf: leaf,
) -> tuple[Any, Any]:
  """Save after ``SAVE_AT`` steps, restore into ``jax.eval_shape``'s abstract tree (with
  ``place`` giving each leaf its sharding), continue, compare with the run that never
  stopped."""
  ocp = require("orbax.checkpoint")
  step = make_step(tx)
  expected_params, expected_state = run(step, params, tx.init(params), grads)

  params_mid, state_mid = run(step, params, tx.init(params), grads[:SAVE_AT])
  checkpointer = ocp.StandardCheckpointer()
  path = directory / "checkpoint"
  checkpointer.save(path, {"params": params_mid, "opt_state": state_mid})
  checkpointer.wait_until_finished()
  abstract = jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params)})
  abstract = jax.tree.map(place, abstract)
  restored = checkpointer.restore(path, abstract)
  checkpointer.close()

  assert_identical(restored, {"params": params_mid, "opt_state": state_mid})
  final_params, final_state = run(step, restored["params"], restored["opt_state"], grads[SAVE_AT:])
  assert_identical(final_params, expected_params)
  assert_identical(final_state, expected_state)
  return restored, final_state


def find_amsgrad_state(state: Any) -> amsgrad_jax.ScaleByAmsgradState:
  found = [
    node
    for node in jax.tree.leaves(
      state, is_leaf=lambda node: isinstance(node, amsgrad_jax.ScaleByAmsgradState)
    )
    if isinstance(node, amsgrad_jax.ScaleByAmsgradState)
  ]
  assert len(found) == 1
  return found[0]


# Every rule with the plain optimizer; the other layouts once (the rule does not change them).
CASES = [("amsgrad", convention) for convention in amsgrad_jax.CONVENTIONS] + [
  (optimizer, "keras") for optimizer in OPTIMIZERS if optimizer != "amsgrad"
]


@pytest.mark.parametrize(("optimizer", "convention"), CASES)
def test_restored_state_continues_bit_identically(optimizer, convention, tmp_path):
  tx = OPTIMIZERS[optimizer](convention)
  params = jax.tree.map(jnp.asarray, initial_params(np.float32))
  grads = gradient_sequence(STEPS, np.float32)
  restored, final_state = resume_matches_uninterrupted(tx, params, grads, tmp_path)
  # the same NamedTuple types all the way down, not tuples or dicts
  assert type(restored["opt_state"]) is type(final_state)
  assert isinstance(find_amsgrad_state(restored["opt_state"]), amsgrad_jax.ScaleByAmsgradState)
  assert int(find_amsgrad_state(restored["opt_state"]).count) == SAVE_AT


def test_restored_mixed_precision_state_keeps_its_dtypes(tmp_path):
  tx = amsgrad(1e-2, nu_dtype=jnp.float32)
  params = {"w": jnp.ones((3, 4), jnp.bfloat16), "b": jnp.zeros(4, jnp.float16)}
  grads = [jax.tree.map(lambda p, g: jnp.asarray(g, p.dtype), params, g) for g in _small_grads()]
  restored, _ = resume_matches_uninterrupted(tx, params, grads, tmp_path)
  state = find_amsgrad_state(restored["opt_state"])
  assert state.mu["w"].dtype == jnp.bfloat16
  assert state.nu_max["b"].dtype == jnp.float32


@pytest.mark.host_devices
def test_restored_sharded_state_keeps_its_sharding(tmp_path):
  mesh = jax.make_mesh((8,), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  params = {"w": jax.device_put(jnp.linspace(-1.0, 1.0, 16), sharding)}
  grads = [
    {"w": jax.device_put(jnp.asarray(g, jnp.float32), sharding)}
    for g in np.random.default_rng(0).standard_normal((STEPS, 16))
  ]

  def place(leaf: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    # eval_shape leaves an abstract mesh, which Orbax cannot place data on.
    spec = PartitionSpec("data") if leaf.ndim else PartitionSpec()
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec))

  restored, _ = resume_matches_uninterrupted(amsgrad(1e-2), params, grads, tmp_path, place)
  state = find_amsgrad_state(restored["opt_state"])
  assert restored["params"]["w"].sharding.is_equivalent_to(sharding, 1)
  assert state.nu_max["w"].sharding.is_equivalent_to(sharding, 1)


def _small_grads() -> list[dict[str, np.ndarray]]:
  rng = np.random.default_rng(3)
  return [{"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)} for _ in range(STEPS)]
