"""convert_state: a run's state re-stored as another storage (float32, bfloat16, 8-bit,
flat or not), the running maximum never below the run's, the rest of the state kept."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amsgrad_jax
from amsgrad_jax import _blockwise as bw
from amsgrad_jax import blockwise8, convert_state

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 4 * 300).reshape(4, 300), "b": jnp.zeros((7,))}


def eight_bit(alias=amsgrad_jax.amsgrad, block_size=256, **kwargs):
  fmt = blockwise8(block_size)
  return alias(1e-2, mu_dtype=fmt, nu_dtype=fmt, **kwargs)


def grads_at(t, params=PARAMS):
  return jax.tree.map(lambda p: jnp.sin(3.0 * p + t) * (1.0 + t) ** 0.5, params)


def trained(tx, steps=6, params=PARAMS):
  """``tx``'s state after ``steps`` updates with gradients of growing size (so that
  every block's scale moves), and the parameters."""
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(steps):
    updates, state = update(grads_at(t, params), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def amsgrad_state(state):
  (found,) = all_amsgrad_states(state)
  return found


@pytest.mark.parametrize("convention", ["pytorch", "keras", "paper"])
@pytest.mark.parametrize("alias", [amsgrad_jax.amsgrad, amsgrad_jax.amsgradw])
def test_float32_state_into_8_bits_rounds_the_maximum_up_once(alias, convention):
  params, state = trained(alias(1e-2, convention=convention))
  tx = eight_bit(alias, convention=convention)
  converted = convert_state(tx, params, state)
  assert jax.tree.structure(converted) == jax.tree.structure(tx.init(params))
  old, new = amsgrad_state(state), amsgrad_state(converted)
  assert int(new.count) == int(old.count) == 6
  for name in PARAMS:
    stored = new.nu_max[name]
    value = np.asarray(bw.dequantize(stored))
    true = np.asarray(old.nu_max[name])
    assert np.all(value >= true)  # the algorithm's guarantee
    # ... and the smallest value of the block's grid that is: one code lower is below.
    lower = bw.dequantize(bw.Blockwise8Array(stored.codes - 1, stored.exponents, 256, "nu_max"))
    nonzero = np.asarray(stored.codes) > 0
    assert np.all(np.asarray(lower)[nonzero] < true[nonzero])
    mu = np.asarray(bw.dequantize(new.mu[name]))
    scale = np.max(np.abs(np.asarray(old.mu[name])))
    assert np.max(np.abs(mu - np.asarray(old.mu[name]))) <= scale / 16
    nu = np.asarray(bw.dequantize_nu(new.nu[name], jnp.asarray(value), 1.0))
    assert np.all(nu <= value)
    assert np.max(np.abs(nu - np.asarray(old.nu[name]))) <= np.max(value) / 16


def test_8_bit_state_into_float32_keeps_its_values_and_converts_back_exactly():
  params, state = trained(eight_bit())
  wide = amsgrad_jax.amsgrad(1e-2)
  back = convert_state(wide, params, state)
  old, new = amsgrad_state(state), amsgrad_state(back)
  for name in PARAMS:
    maximum = bw.dequantize(old.nu_max[name])
    np.testing.assert_array_equal(new.nu_max[name], maximum)
    np.testing.assert_array_equal(new.mu[name], bw.dequantize(old.mu[name]))
    np.testing.assert_array_equal(new.nu[name], bw.dequantize_nu(old.nu[name], maximum, 1.0))
    assert new.mu[name].dtype == jnp.float32
  again = amsgrad_state(convert_state(eight_bit(), params, back))
  for name in PARAMS:
    for field in ("mu", "nu_max"):
      np.testing.assert_array_equal(
        bw.dequantize(getattr(again, field)[name]), bw.dequantize(getattr(old, field)[name])
      )
    np.testing.assert_array_equal(again.nu[name].codes, old.nu[name].codes)


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "8-bit"])
@pytest.mark.parametrize("flat", [False, True], ids=["tree", "flat"])
def test_a_state_converted_to_its_own_storage_keeps_its_values(storage, flat):
  if storage == "8-bit":
    tx = eight_bit(flat_state=flat)
  else:
    dtype = jnp.dtype(storage)
    tx = amsgrad_jax.amsgrad(1e-2, mu_dtype=dtype, nu_dtype=dtype, flat_state=flat)
  params, state = trained(tx)
  converted = convert_state(tx, params, state)
  old, new = amsgrad_state(state), amsgrad_state(converted)
  for field in ("mu", "nu_max"):
    a, b = getattr(old, field), getattr(new, field)
    values = (lambda m: m) if storage != "8-bit" else bw.dequantize
    for x, y in zip(leaves(a), leaves(b), strict=True):
      np.testing.assert_array_equal(values(x), values(y))
  for x, y in zip(nu_values(old), nu_values(new), strict=True):
    np.testing.assert_array_equal(x, y)


def test_a_fresh_8_bit_state_converts_to_itself():
  tx = eight_bit()
  state = tx.init(PARAMS)
  old, new = amsgrad_state(state), amsgrad_state(convert_state(tx, PARAMS, state))
  for field in ("mu", "nu_max"):
    for x, y in zip(leaves(getattr(old, field)), leaves(getattr(new, field)), strict=True):
      np.testing.assert_array_equal(bw.dequantize(x), bw.dequantize(y))
  for x, y in zip(nu_values(old), nu_values(new), strict=True):
    np.testing.assert_array_equal(x, y)  # 0 where the maximum is 0, whatever the code


def leaves(moment):
  if isinstance(moment, amsgrad_jax.FlatMoment):
    moment = moment.leaves()
  return jax.tree.leaves(moment, is_leaf=bw.is_blockwise)


def nu_values(state):
  """The second moment each leaf of ``state`` holds (decoded against its maximum)."""
  values = []
  for nu, nu_max in zip(leaves(state.nu), leaves(state.nu_max), strict=True):
    if bw.is_blockwise(nu):
      nu = bw.dequantize_nu(nu, bw.dequantize(nu_max), 1.0)
    values.append(np.asarray(nu))
  return values


@pytest.mark.native_cpu
@pytest.mark.parametrize("direction", ["to flat", "from flat"])
@pytest.mark.parametrize("storage", ["float32", "8-bit"])
def test_the_run_continues_bit_identically_in_the_other_layout(direction, storage):
  def make(flat):
    if storage == "8-bit":
      return eight_bit(amsgrad_jax.amsgradw, flat_state=flat)
    return amsgrad_jax.amsgradw(1e-2, flat_state=flat)

  old_tx, new_tx = (
    (make(False), make(True)) if direction == "to flat" else (make(True), make(False))
  )
  params, state = trained(old_tx)
  converted = convert_state(new_tx, params, state)

  def run(tx, params, state):
    step = jax.jit(lambda g, s, p: amsgrad_jax.apply_step(tx, g, s, p))
    for t in range(6, 12):
      params, state = step(grads_at(t, params), state, params)
    return params

  expected, got = run(old_tx, params, state), run(new_tx, params, converted)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
    np.testing.assert_array_equal(a, b)


def test_bfloat16_state_rounds_the_maximum_up_and_the_moments_to_nearest():
  params, state = trained(amsgrad_jax.amsgrad(1e-2))
  tx = amsgrad_jax.amsgrad(1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
  old, new = amsgrad_state(state), amsgrad_state(convert_state(tx, params, state))
  for name in PARAMS:
    assert new.nu_max[name].dtype == jnp.bfloat16
    true = np.asarray(old.nu_max[name])
    assert np.all(np.asarray(new.nu_max[name], np.float32) >= true)
    assert np.any(np.asarray(new.nu_max[name], np.float32) > true)  # some rounded up
    np.testing.assert_array_equal(new.mu[name], old.mu[name].astype(jnp.bfloat16))
    np.testing.assert_array_equal(new.nu[name], old.nu[name].astype(jnp.bfloat16))


@jax.numpy_dtype_promotion("standard")  # MultiSteps itself mixes int and float
def test_everything_else_in_the_state_is_carried_over():
  def build(nu_dtype):
    injected = optax.inject_hyperparams(amsgrad_jax.amsgrad)  # a dtype, not a scalar type:
    inner = injected(learning_rate=0.1, nu_dtype=nu_dtype)  # jnp.bfloat16 would be called
    masked = optax.masked(inner, {"w": True, "b": False})
    return optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0), masked), 3)

  old_tx, new_tx = build(None), build(jnp.dtype("bfloat16"))
  params, state = trained(old_tx, steps=4)
  hyperparams = state.inner_opt_state[1].inner_state.hyperparams
  hyperparams["learning_rate"] = jnp.asarray(0.05, jnp.float32)  # as a schedule would
  converted = convert_state(new_tx, params, state)
  assert jax.tree.structure(converted) == jax.tree.structure(new_tx.init(params))
  assert int(converted.mini_step) == int(state.mini_step) == 1
  np.testing.assert_array_equal(converted.acc_grads["w"], state.acc_grads["w"])
  inner = converted.inner_opt_state[1].inner_state
  assert inner.hyperparams["learning_rate"] == np.float32(0.05)
  moments = amsgrad_state(inner.inner_state)
  assert moments.nu["w"].dtype == jnp.bfloat16
  assert isinstance(moments.nu["b"], optax.MaskedNode)
  assert int(moments.count) == 1  # one whole MultiSteps step of 3 has been taken
  new_params = optax.apply_updates(params, jax.jit(new_tx.update)(params, converted, params)[0])
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new_params))
  expected = np.asarray(state.acc_grads["w"])
  for leaf in jax.tree.leaves(state):  # as donating the old state to a step would
    leaf.delete()
  np.testing.assert_array_equal(converted.acc_grads["w"], expected)  # a copy, intact


def eight_bit_inside(wrapper):
  """An 8-bit optimizer and its float32 twin, built into one of Optax's wrappers."""
  fmt = blockwise8()

  def build(**storage):
    if wrapper == "inject_hyperparams":
      injected = optax.inject_hyperparams(amsgrad_jax.amsgradw)
      return injected(learning_rate=1e-2, convention="keras", **storage)
    alias = amsgrad_jax.amsgrad(1e-2, **storage)
    if wrapper == "chain":
      return optax.chain(optax.clip_by_global_norm(1.0), alias)
    if wrapper == "masked":
      return optax.masked(alias, {"w": True, "b": False})
    if wrapper == "partition":
      other = amsgrad_jax.amsgradw(1e-3, convention="paper", **storage)
      return optax.partition({"a": alias, "b": other}, {"w": "a", "b": "b"})
    if wrapper == "skip_nonfinite":
      return amsgrad_jax.skip_nonfinite(alias, max_consecutive_errors=3)
    return optax.MultiSteps(alias, 2)

  return build(), build(mu_dtype=fmt, nu_dtype=fmt)


@pytest.mark.parametrize(
  "wrapper",
  ["chain", "masked", "partition", "skip_nonfinite", "MultiSteps", "inject_hyperparams"],
)
@jax.numpy_dtype_promotion("standard")  # MultiSteps itself mixes int and float
def test_8_bit_conversions_find_the_rule_inside_optax_wrappers(wrapper):
  wide, small = eight_bit_inside(wrapper)
  params, state = trained(wide, steps=4)
  converted = convert_state(small, params, state)
  assert jax.tree.structure(converted) == jax.tree.structure(small.init(params))
  pairs = zip(all_amsgrad_states(state), all_amsgrad_states(converted), strict=True)
  checked = 0
  for old, new in pairs:
    for x, y in zip(leaves(old.nu_max), leaves(new.nu_max), strict=True):
      if isinstance(y, optax.MaskedNode):
        continue
      assert np.all(np.asarray(bw.dequantize(y)) >= np.asarray(x))
      checked += 1
  assert checked >= 1
  back = convert_state(wide, params, converted)
  for old, new in zip(all_amsgrad_states(converted), all_amsgrad_states(back), strict=True):
    assert int(old.count) == int(new.count)
  jax.jit(small.update)(grads_at(0, params), converted, params)


def all_amsgrad_states(state):
  found = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, amsgrad_jax.ScaleByAmsgradState))
  return [x for x in found if isinstance(x, amsgrad_jax.ScaleByAmsgradState)]


@pytest.mark.host_devices
def test_converted_state_is_placed_like_the_new_optimizers():
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((4, 2), ("data", "model"))
  sharding = NamedSharding(mesh, P("data", "model"))
  params = {"w": jax.device_put(jnp.ones((16, 1024)), sharding)}
  params, state = trained(amsgrad_jax.amsgrad(1e-2), params=params)
  converted = amsgrad_state(convert_state(eight_bit(), params, state))
  for moment in (converted.mu, converted.nu, converted.nu_max):
    assert moment["w"].codes.sharding.spec == P("data", "model")
    assert moment["w"].exponents.sharding.spec == P("data", "model")
  flat_tx = eight_bit(flat_state=True)
  flat = amsgrad_state(convert_state(flat_tx, params, state))
  fresh = amsgrad_state(flat_tx.init(params))
  for moment, like in zip((flat.mu, flat.nu_max), (fresh.mu, fresh.nu_max), strict=True):
    for x, y in zip(jax.tree.leaves(moment.buffers), jax.tree.leaves(like.buffers), strict=True):
      assert x.sharding == y.sharding


def test_what_cannot_be_converted_is_refused_by_name():
  params, state = trained(amsgrad_jax.amsgrad(1e-2))
  clipped = optax.chain(optax.clip(1.0), amsgrad_jax.amsgrad(1e-2))
  with pytest.raises(ValueError, match="not a state of tx's chain"):
    convert_state(clipped, params, state)
  with pytest.raises(ValueError, match="holds no ScaleByAmsgradState"):
    convert_state(optax.adam(1e-2), params, state)
  other = {"w": jnp.zeros((4, 200)), "b": jnp.zeros((7,))}
  with pytest.raises(ValueError, match=r"\['w'\] in opt_state have shape \(4, 300\).*\(4, 200\)"):
    convert_state(amsgrad_jax.amsgrad(1e-2), other, state)
  with pytest.raises(ValueError, match='convention="optax"'):
    convert_state(eight_bit(convention="optax"), params, state)
  injected = optax.inject_hyperparams(amsgrad_jax.amsgrad)
  fmt = blockwise8()
  optax_rule = injected(learning_rate=1e-2, convention="optax", mu_dtype=fmt, nu_dtype=fmt)
  with pytest.raises(ValueError, match='convention="optax"'):
    convert_state(optax_rule, params, trained(injected(learning_rate=1e-2))[1])

  class Hidden:  # a wrapper whose functions say nothing of what they wrap
    def __init__(self, method):
      self.method = method

    def __call__(self, *args):
      return self.method(*args)

  small = eight_bit()
  hidden = optax.GradientTransformation(Hidden(small.init), Hidden(small.update))
  with pytest.raises(ValueError, match="reads the update rule from tx, and none was found"):
    convert_state(hidden, params, state)
  eight = eight_bit()
  params8, state8 = trained(eight)
  as_nnx_leaves_them = jax.tree.map(
    lambda x: {"codes": x.codes, "exponents": x.exponents} if bw.is_blockwise(x) else x,
    state8,
    is_leaf=bw.is_blockwise,
  )
  with pytest.raises(ValueError, match="mapping of its codes and exponents"):
    convert_state(amsgrad_jax.amsgrad(1e-2), params8, as_nnx_leaves_them)
  masks = [{"w": True, "b": True}, {"w": True, "b": False}]
  one, two = (optax.masked(amsgrad_jax.amsgrad(1e-2), mask) for mask in masks)
  with pytest.raises(ValueError, match=r"parameter \['b'\] is masked in tx only"):
    convert_state(two, params, trained(one)[1])
