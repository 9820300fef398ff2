"""The flat state layout (``flat_state=True``): same numbers, three arrays per dtype.

The layout changes where the moments are stored, never the arithmetic: the native step
gives bit-identical parameters and moments in either layout, and the Optax path agrees to
within XLA's choice of fused multiply-adds. What it buys is fewer arrays: a jitted step on
a tree of many small leaves passes three state buffers per dtype instead of three per leaf.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _sequences import gradient_sequence, initial_params
from test_apply_step import DTYPES, SHAPES, STEPS, ULPS, make_tx, native_kernel, worst_ulps

import amsgrad_jax
from amsgrad_jax import FlatMoment, ScaleByAmsgradState
from amsgrad_jax._native._alias_step import LEAVES_PER_CALL
from amsgrad_jax._native._step import pure_step

pytestmark = pytest.mark.native_cpu

__all__ = ["native_kernel"]  # the fixture that requires the native step, used here too

FLAT_TARGET = "amsgrad_jax_step_flat"


def amsgrad_state(opt_state) -> ScaleByAmsgradState:
  """The ScaleByAmsgradState inside an alias's chain state."""
  (found,) = [s for s in opt_state if isinstance(s, ScaleByAmsgradState)]
  return found


def mixed_tree() -> dict:
  """Leaves of three dtypes, nested, with a scalar, an empty array and a Python float."""
  rng = np.random.default_rng(0)
  return {
    "dense": {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32), "b": jnp.zeros(3)},
    "norm": jnp.asarray(rng.standard_normal(5), jnp.bfloat16),
    "scale": jnp.asarray(2.0, jnp.float32),
    "empty": jnp.zeros((0, 7), jnp.float32),
    "list": [jnp.asarray(rng.standard_normal(2), jnp.bfloat16), 1.5],
    "complex": jnp.asarray(rng.standard_normal(3) + 1j, jnp.complex64),
  }


def test_init_keeps_one_buffer_per_parameter_dtype_and_moment():
  params = mixed_tree()
  state = amsgrad_jax.scale_by_amsgrad(flat_state=True, nu_dtype=jnp.float32).init(params)
  for moment in (state.mu, state.nu, state.nu_max):
    assert isinstance(moment, FlatMoment)
    assert set(moment.buffers) == {"float32", "bfloat16", "complex64"}
    # float32: 12 + 3 + 1 (scalar) + 0 (empty) + 1 (Python float); bfloat16: 5 + 2
    assert {k: v.shape for k, v in moment.buffers.items()} == {
      "float32": (17,),
      "bfloat16": (7,),
      "complex64": (3,),
    }
  assert state.mu.buffers["bfloat16"].dtype == jnp.bfloat16
  assert state.nu.buffers["bfloat16"].dtype == jnp.float32
  assert state.nu_max.buffers["complex64"].dtype == jnp.complex64
  assert len(jax.tree.leaves(state)) == 1 + 3 * 3
  # each leaf's view comes back shaped like its parameter, all zeros
  views = state.mu.leaves()
  assert [v.shape for v in views] == [np.shape(p) for p in jax.tree.leaves(params)]
  assert all(not np.any(np.asarray(v)) for v in views)
  # abstract init, as checkpoint restoring does it
  abstract = jax.eval_shape(amsgrad_jax.scale_by_amsgrad(flat_state=True).init, params)
  assert jax.tree.structure(abstract) == jax.tree.structure(
    amsgrad_jax.scale_by_amsgrad(flat_state=True).init(params)
  )


def test_flat_state_needs_a_bool():
  with pytest.raises(TypeError, match=re.escape("flat_state must be True or False, got 'yes'")):
    amsgrad_jax.amsgrad(1e-3, flat_state="yes")
  with pytest.raises(TypeError, match="flat_state must be True or False"):
    amsgrad_jax.scale_by_amsgrad(flat_state=1)


@pytest.mark.parametrize("convention", amsgrad_jax.CONVENTIONS)
@pytest.mark.parametrize("alias", ["amsgrad-l2", "amsgradw-masked"])
def test_optax_path_matches_the_tree_layout_every_step(alias, convention):
  """From the same state at each step (the tree layout's, packed), the flat layout's
  ``update`` gives the same updates and moments to within 2 ulps, under ``jit``."""
  if alias == "amsgrad-l2":
    make = lambda **kw: amsgrad_jax.amsgrad(1e-2, weight_decay=0.1, convention=convention, **kw)  # noqa: E731
  else:
    mask = {name: name != "bias" for name in SHAPES}
    make = lambda **kw: amsgrad_jax.amsgradw(1e-2, mask=mask, convention=convention, **kw)  # noqa: E731
  tree_tx, flat_tx = make(), make(flat_state=True)
  params = jax.tree.map(jnp.asarray, initial_params(np.float32, shapes=SHAPES))
  layout = amsgrad_state(flat_tx.init(params)).mu.layout

  def to_flat(opt_state):
    def pack(s):
      if not isinstance(s, ScaleByAmsgradState):
        return s
      moments = (FlatMoment.pack(layout, jax.tree.leaves(m)) for m in (s.mu, s.nu, s.nu_max))
      return ScaleByAmsgradState(s.count, *moments)

    return tuple(pack(s) for s in opt_state)

  @jax.jit
  def both(params, state, grads):
    tree = pure_step(tree_tx, grads, state, params)
    flat = pure_step(flat_tx, grads, to_flat(state), params)
    return tree, worst_ulps(flat, (tree[0], to_flat(tree[1])))

  state = tree_tx.init(params)
  for grads in gradient_sequence(40, np.float32, shapes=SHAPES):
    (params, state), worst = both(params, state, jax.tree.map(jnp.asarray, grads))
    assert float(worst) <= ULPS


def test_optax_path_is_bit_identical_without_jit():
  """Eagerly every operation runs alone, so the two layouts do exactly the same sums."""
  tree_tx = amsgrad_jax.amsgradw(1e-2, nu_dtype=jnp.float32)
  flat_tx = amsgrad_jax.amsgradw(1e-2, nu_dtype=jnp.float32, flat_state=True)
  params = mixed_tree()
  tree_state, flat_state = tree_tx.init(params), flat_tx.init(params)
  tree_params = flat_params = params
  rng = np.random.default_rng(1)
  for _ in range(3):
    grads = jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(np.shape(p)), jnp.result_type(p)), params
    )
    tree_params, tree_state = pure_step(tree_tx, grads, tree_state, tree_params)
    flat_params, flat_state = pure_step(flat_tx, grads, flat_state, flat_params)
  jax.tree.map(np.testing.assert_array_equal, flat_params, tree_params)
  tree_moments, flat_moments = amsgrad_state(tree_state), amsgrad_state(flat_state)
  for name in ("mu", "nu", "nu_max"):
    for ours, theirs in zip(
      getattr(flat_moments, name).leaves(),
      jax.tree.leaves(getattr(tree_moments, name)),
      strict=True,
    ):
      np.testing.assert_array_equal(ours, theirs)


MODES = ("coupled", "decoupled", "no-decay")
CASES = [
  (convention, dtype, MODES[(i + j) % len(MODES)])
  for i, convention in enumerate(amsgrad_jax.CONVENTIONS)
  for j, dtype in enumerate(DTYPES)
]


def flat_tx_like(mode: str, convention: str) -> optax.GradientTransformation:
  """``make_tx(mode, convention)`` with the flat layout (same hyperparameters)."""
  options = make_tx(mode, convention).options
  build = amsgrad_jax.amsgradw if options.decoupled else amsgrad_jax.amsgrad
  fields = {field.name: getattr(options, field.name) for field in dataclasses.fields(options)}
  return build(**{**fields, "flat_state": True})


@pytest.mark.parametrize(("convention", "dtype", "mode"), CASES)
def test_native_flat_step_is_bit_identical_to_the_tree_layout(convention, dtype, mode):
  """100 steps with spikes and zeros: parameters and every moment, bit for bit, against
  the tree layout's Optax path (which the native tree step matches to 0 ulps)."""
  np_dtype = DTYPES[dtype]
  tree_tx, flat_tx = make_tx(mode, convention), flat_tx_like(mode, convention)
  with jax.enable_x64(dtype == "float64"):
    params = jax.tree.map(jnp.asarray, initial_params(np_dtype, shapes=SHAPES))
    sequence = gradient_sequence(STEPS, np_dtype, shapes=SHAPES)
    stacked = {name: jnp.asarray(np.stack([g[name] for g in sequence])) for name in SHAPES}

    def run(params, stacked):
      def body(carry, grads):
        (tree_params, tree_state), (flat_params, flat_state) = carry
        tree = pure_step(tree_tx, grads, tree_state, tree_params)
        flat = amsgrad_jax.apply_step(flat_tx, grads, flat_state, flat_params)
        return (tree, flat), None

      init = ((params, tree_tx.init(params)), (params, flat_tx.init(params)))
      return jax.lax.scan(body, init, stacked)[0]

    lowered = jax.jit(run).lower(params, stacked)
    (tree_params, tree_state), (flat_params, flat_state) = lowered.compile()(params, stacked)
  assert FLAT_TARGET in lowered.as_text()
  jax.tree.map(np.testing.assert_array_equal, flat_params, tree_params)
  for name in ("mu", "nu", "nu_max"):
    flat_leaves = getattr(amsgrad_state(flat_state), name).leaves()
    for ours, theirs in zip(
      flat_leaves, jax.tree.leaves(getattr(amsgrad_state(tree_state), name)), strict=True
    ):
      np.testing.assert_array_equal(ours, theirs)
  assert int(amsgrad_state(flat_state).count) == STEPS


@pytest.mark.parametrize(
  ("mu_dtype", "nu_dtype"), [(jnp.bfloat16, None), (None, jnp.float32), (jnp.float32, jnp.bfloat16)]
)
def test_native_flat_step_with_state_dtypes_and_mixed_parameters(mu_dtype, nu_dtype):
  params = {k: v for k, v in mixed_tree().items() if k != "complex"}
  params["list"][1] = jnp.asarray(params["list"][1])
  mask = jax.tree.map(lambda p: np.ndim(p) > 1, params)
  tree_tx = amsgrad_jax.amsgradw(1e-2, mask=mask, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
  flat_tx = amsgrad_jax.amsgradw(
    1e-2, mask=mask, mu_dtype=mu_dtype, nu_dtype=nu_dtype, flat_state=True
  )
  tree_state, flat_state = tree_tx.init(params), flat_tx.init(params)
  pure_state = tree_state
  pure = jax.jit(lambda g, s, p: pure_step(tree_tx, g, s, p))
  tree_step = jax.jit(lambda g, s, p: amsgrad_jax.apply_step(tree_tx, g, s, p))
  flat_step = jax.jit(lambda g, s, p: amsgrad_jax.apply_step(flat_tx, g, s, p))
  assert FLAT_TARGET in flat_step.lower(params, flat_state, params).as_text()
  rng = np.random.default_rng(2)
  tree_params = flat_params = params
  for step in range(20):
    scale = 1e3 if step == 4 else 0.0 if step == 9 else 1.0
    grads = jax.tree.map(
      lambda p, scale=scale: jnp.asarray(scale * rng.standard_normal(p.shape), p.dtype),
      params,
    )
    expected = pure(grads, pure_state, tree_params)
    tree_params, tree_state = tree_step(grads, tree_state, tree_params)
    flat_params, flat_state = flat_step(grads, flat_state, flat_params)
    assert float(worst_ulps(flat_params, tree_params)) == 0.0  # the same kernel arithmetic
    assert float(worst_ulps(flat_params, expected[0])) <= ULPS
    pure_state = tree_state
  for name in ("mu", "nu", "nu_max"):
    flat_leaves = getattr(amsgrad_state(flat_state), name).leaves()
    for ours, theirs in zip(
      flat_leaves, jax.tree.leaves(getattr(amsgrad_state(tree_state), name)), strict=True
    ):
      np.testing.assert_array_equal(ours, theirs)


def test_groups_larger_than_one_call_chain_their_buffers_through_calls():
  """Leaves beyond LEAVES_PER_CALL take further calls on the same (aliased) buffers."""
  n = 2 * LEAVES_PER_CALL + 3
  params = [jnp.full((5,), float(i)) for i in range(n)]
  grads = [jnp.full((5,), (-1.0) ** i) for i in range(n)]
  tx = amsgrad_jax.amsgrad(0.1, flat_state=True)
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: amsgrad_jax.apply_step(tx, g, s, p), donate_argnums=(1, 2))
  text = step.lower(grads, state, params).as_text()
  assert text.count(FLAT_TARGET) == 3
  expected = jax.jit(lambda g, s, p: pure_step(tx, g, s, p))(grads, state, params)
  new_params, new_state = step(grads, state, params)
  jax.tree.map(np.testing.assert_array_equal, (new_params, new_state), expected)
  # every leaf moved by the learning rate against its gradient's sign
  np.testing.assert_allclose(
    np.stack(new_params)[:, 0], np.arange(n) - 0.1 * (-1.0) ** np.arange(n), rtol=1e-6
  )


def test_donated_flat_step_updates_in_place_with_few_arrays():
  """Nothing beyond the aliased buffers, the same addresses after the step, and a state
  of four arrays however many leaves there are."""
  tx = amsgrad_jax.amsgrad(1e-2, flat_state=True)
  params = [jnp.ones((64, 32)) for _ in range(40)] + [jnp.ones((32,))]
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  assert len(jax.tree.leaves(state)) == 4  # count, mu, nu, nu_max (schedule-free)

  def train_step(params, opt_state, grads):
    return amsgrad_jax.apply_step(tx, grads, opt_state, params)

  compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
  memory = compiled.memory_analysis()
  model_bytes = sum(x.nbytes for x in jax.tree.leaves((params, state)))
  assert memory.alias_size_in_bytes == model_bytes
  assert memory.output_size_in_bytes - model_bytes < 1024
  assert memory.temp_size_in_bytes < 1024, memory
  pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves((params, state))]
  new_params, new_state = compiled(params, state, grads)
  assert [x.unsafe_buffer_pointer() for x in jax.tree.leaves((new_params, new_state))] == pointers


def test_mismatched_gradients_through_apply_step_raise_and_keep_the_state():
  tx = amsgrad_jax.amsgrad(1e-2, flat_state=True)
  params = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
  state = tx.init(params)
  before = jax.tree.map(np.array, state)
  with pytest.raises(ValueError, match=re.escape("missing from the gradients: ['b']")):
    amsgrad_jax.apply_step(tx, {"w": jnp.ones((2, 3))}, state, params)
  with pytest.raises(ValueError, match=re.escape("The gradient at ['w'] has shape (3, 2)")):
    jax.jit(amsgrad_jax.apply_step, static_argnums=0)(
      tx, {"w": jnp.ones((3, 2)), "b": jnp.ones(3)}, state, params
    )
  jax.tree.map(np.testing.assert_array_equal, state, before)


def test_inject_hyperparams_keeps_the_layout_static():
  """``optax.inject_hyperparams`` treats the bool as static: the layout survives ``jit``."""
  tx = optax.inject_hyperparams(amsgrad_jax.amsgrad)(learning_rate=1e-2, flat_state=True)
  reference = optax.inject_hyperparams(amsgrad_jax.amsgrad)(learning_rate=1e-2)
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  state, ref_state = tx.init(params), reference.init(params)
  assert isinstance(amsgrad_state(state.inner_state).mu, FlatMoment)
  update, reference_update = jax.jit(tx.update), jax.jit(reference.update)
  for step in range(3):
    grads = jax.tree.map(lambda p, step=step: jnp.cos(p + step), params)
    updates, state = update(grads, state, params)
    ref_updates, ref_state = reference_update(grads, ref_state, params)
    assert isinstance(amsgrad_state(state.inner_state).mu, FlatMoment)
    # the layouts may differ by XLA's fused multiply-adds, a few ulps after cancellation
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-12), updates, ref_updates
    )


def test_vmapped_flat_step_takes_the_optax_path():
  tx = amsgrad_jax.amsgrad(1e-2, flat_state=True)
  params = jnp.stack([jnp.arange(3.0), jnp.ones(3)])
  state = jax.vmap(tx.init)(params)
  grads = jnp.stack([jnp.ones(3), -jnp.ones(3)])
  step = jax.vmap(lambda g, s, p: amsgrad_jax.apply_step(tx, g, s, p))
  new_params, _ = step(grads, state, params)
  expected = jax.vmap(lambda g, s, p: pure_step(tx, g, s, p))(grads, state, params)[0]
  np.testing.assert_array_equal(new_params, expected)


@pytest.mark.host_devices
@pytest.mark.parametrize(
  "state", ["", ", mu_dtype=amsgrad_jax.blockwise8(4), nu_dtype=amsgrad_jax.blockwise8(4)"]
)
def test_flat_state_under_a_mesh_and_pmap(state):
  """Under a mesh the flat step is replicated (correct, but it gathers: sharded models keep
  the tree layout); under pmap it runs per device. Float and 8-bit state alike."""
  script = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import amsgrad_jax
    from amsgrad_jax._native._step import pure_step

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(6,)), jnp.float32)}
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    tx = amsgrad_jax.amsgrad(1e-2, flat_state=True STATE)
    expected = jax.jit(lambda g, s, p: pure_step(tx, g, s, p))(grads, tx.init(params), params)

    mesh = jax.make_mesh((4, 2), ("data", "model"))
    specs = {"w": P("data", "model"), "b": P("model")}
    put = lambda tree: jax.tree.map(
      lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)
    step = jax.jit(lambda g, s, p: amsgrad_jax.apply_step(tx, g, s, p), donate_argnums=(1, 2))
    sharded_params = put(params)
    state = jax.jit(tx.init)(sharded_params)
    assert "amsgrad_jax_step_flat" in step.lower(put(grads), state, sharded_params).as_text()
    got = step(put(grads), state, sharded_params)
    jax.tree.map(np.testing.assert_array_equal, got, expected)

    n = jax.device_count()
    replicate = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * n), tree)
    pstep = jax.pmap(lambda g, s, p: amsgrad_jax.apply_step(tx, g, s, p))
    got = pstep(replicate(grads), replicate(tx.init(params)), replicate(params))
    for device in range(n):
      jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[device], b), got, expected)
    print("ok", n)
    """
  ).replace(" STATE", state)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  result = subprocess.run(
    [sys.executable, "-c", script],
    capture_output=True,
    text=True,
    env=env,
    cwd=Path(__file__).parent,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ["ok", "8"]


@pytest.mark.parametrize("stored", [None, amsgrad_jax.blockwise8(2)], ids=["float", "8-bit"])
def test_nnx_optimizer_with_flat_state_follows_the_tree_layout(stored):
  """nnx.Optimizer builds the state from Variables and updates with their bare values: the
  layout accepts that coarser tree (each leaf where the layout holds one Variable)."""
  nnx = pytest.importorskip("flax.nnx")

  def train(flat_state: bool) -> object:
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    tx = amsgrad_jax.amsgrad(1e-2, flat_state=flat_state, mu_dtype=stored, nu_dtype=stored)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)

    @nnx.jit
    def step(model, optimizer):
      grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
      optimizer.update(model, grads)

    for _ in range(5):
      step(model, optimizer)
    return nnx.state(model, nnx.Param), optimizer

  flat_params, flat_optimizer = train(True)
  tree_params, _ = train(False)
  assert isinstance(amsgrad_state(nnx.as_pure(flat_optimizer.opt_state)).mu, FlatMoment)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-9), flat_params, tree_params
  )


def test_a_coarser_tree_must_still_cover_one_leaf_per_position():
  """A leaf where the layout has a node of two leaves is refused, not silently reshaped."""
  tx = amsgrad_jax.amsgrad(1e-2, flat_state=True)
  state = tx.init({"pair": (jnp.ones(3), jnp.ones(3)), "b": jnp.ones(3)})
  with pytest.raises(ValueError, match="does not match"):
    tx.update({"pair": jnp.ones(3), "b": jnp.ones(3)}, state)


def test_masked_flat_state_skips_masked_out_leaves():
  """Under optax.masked the layout covers only the leaves the mask lets through (an integer
  step counter here stays out of the buffers), and the updates equal the tree layout's."""
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2), "step": jnp.zeros((), jnp.int32)}
  mask = {"w": True, "b": True, "step": False}
  grads = {"w": jnp.full((3, 2), 0.5), "b": jnp.ones(2), "step": jnp.zeros((), jnp.int32)}
  results = []
  for flat_state in (False, True):
    tx = optax.masked(amsgrad_jax.amsgrad(1e-2, flat_state=flat_state), mask)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(3):
      updates, state = update(grads, state, params)
    results.append(updates)
  flat_moments = amsgrad_state(state.inner_state).mu
  assert {k: v.shape for k, v in flat_moments.buffers.items()} == {"float32": (8,)}
  jax.tree.map(np.testing.assert_array_equal, results[1], results[0])
