"""``init`` works on abstract parameters: under ``jax.eval_shape`` and called directly on
``jax.ShapeDtypeStruct`` leaves, where it carries the struct's sharding to the state.

This is how a large model's optimizer state is planned (shapes, dtypes, shardings for a
checkpoint restore) without allocating the parameters first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import amsgrad_jax

SHAPES = {"kernel": (8, 4), "bias": (4,), "scalar": ()}
SPECS = {"kernel": P("data", "model"), "bias": P("model"), "scalar": P()}


def abstract_params(dtype, sharding_for=None):
  return {
    name: jax.ShapeDtypeStruct(
      shape, dtype, sharding=None if sharding_for is None else sharding_for(name)
    )
    for name, shape in SHAPES.items()
  }


def concrete_params(dtype):
  return {name: jnp.ones(shape, dtype) for name, shape in SHAPES.items()}


def shapes_and_dtypes(tree):
  return jax.tree.map(lambda x: (tuple(x.shape), np.dtype(x.dtype)), tree)


OPTIMIZERS = {
  "amsgrad": lambda c: amsgrad_jax.amsgrad(1e-3, convention=c),
  "amsgrad_l2": lambda c: amsgrad_jax.amsgrad(1e-3, convention=c, weight_decay=1e-2),
  "amsgradw_masked": lambda c: amsgrad_jax.amsgradw(
    1e-3, convention=c, mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  ),
  "wide_state": lambda c: amsgrad_jax.amsgrad(
    1e-3, convention=c, mu_dtype=jnp.float32, nu_dtype=jnp.float32
  ),
  "scale_by_amsgrad": lambda c: amsgrad_jax.scale_by_amsgrad(convention=c, nu_dtype=jnp.bfloat16),
}


# Complex parameters need float32 or float64 state precision: no bfloat16 nu_dtype there.
CASES = [
  (dtype, name)
  for dtype in ["float32", "bfloat16", "complex64"]
  for name in OPTIMIZERS
  if not (dtype == "complex64" and name == "scale_by_amsgrad")
]


@pytest.mark.parametrize("convention", amsgrad_jax.CONVENTIONS)
@pytest.mark.parametrize(("dtype", "name"), CASES)
def test_eval_shape_of_init_matches_the_concrete_state(dtype, name, convention):
  tx = OPTIMIZERS[name](convention)
  abstract_state = jax.eval_shape(tx.init, abstract_params(dtype))
  concrete_state = tx.init(concrete_params(dtype))
  assert jax.tree.structure(abstract_state) == jax.tree.structure(concrete_state)
  assert shapes_and_dtypes(abstract_state) == shapes_and_dtypes(concrete_state)
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(abstract_state))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_init_on_shape_dtype_structs_gives_the_zero_state(name):
  tx = OPTIMIZERS[name]("pytorch")
  state = tx.init(abstract_params(jnp.float32))
  concrete_state = tx.init(concrete_params(jnp.float32))
  assert jax.tree.structure(state) == jax.tree.structure(concrete_state)
  for leaf, expected in zip(jax.tree.leaves(state), jax.tree.leaves(concrete_state), strict=True):
    assert isinstance(leaf, jax.Array)
    assert jax.typeof(leaf) == jax.typeof(expected)
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected))


def test_state_from_abstract_init_feeds_a_jitted_step():
  tx = amsgrad_jax.amsgrad(1e-2)
  params = concrete_params(jnp.float32)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  from_abstract = step(params, tx.init(abstract_params(jnp.float32)))
  from_concrete = step(params, tx.init(params))
  for got, want in zip(jax.tree.leaves(from_abstract), jax.tree.leaves(from_concrete), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert step._cache_size() == 1


@pytest.mark.host_devices
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=lambda t: t.name)
def test_init_on_sharded_structs_places_the_state_like_the_parameters(axis_type):
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type, axis_type))
  params = abstract_params(jnp.float32, lambda name: NamedSharding(mesh, SPECS[name]))
  tx = amsgrad_jax.amsgradw(1e-3, nu_dtype=jnp.float32)
  with jax.set_mesh(mesh):
    state = tx.init(params)
  amsgrad_state = state[0]
  for buffer in (amsgrad_state.mu, amsgrad_state.nu, amsgrad_state.nu_max):
    for name, leaf in buffer.items():
      assert leaf.sharding == params[name].sharding, (name, leaf.sharding)


@pytest.mark.host_devices
def test_init_on_sharded_structs_needs_no_mesh_context():
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  params = abstract_params(jnp.bfloat16, lambda name: NamedSharding(mesh, SPECS[name]))
  state = amsgrad_jax.scale_by_amsgrad().init(params)
  for buffer in (state.mu, state.nu, state.nu_max):
    for name, leaf in buffer.items():
      assert leaf.sharding == params[name].sharding
      assert leaf.dtype == jnp.bfloat16


@pytest.mark.host_devices
def test_eval_shape_under_an_explicit_mesh_carries_the_shardings():
  """In an Explicit mesh shardings are part of the type, so eval_shape reports them."""
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  params = abstract_params(jnp.float32, lambda name: NamedSharding(mesh, SPECS[name]))
  with jax.set_mesh(mesh):
    state = jax.eval_shape(amsgrad_jax.scale_by_amsgrad().init, params)
  for buffer in (state.mu, state.nu, state.nu_max):
    for name, leaf in buffer.items():
      assert leaf.sharding.spec == SPECS[name]
