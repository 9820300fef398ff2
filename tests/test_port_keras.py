"""A Keras 3 AMSGrad run moves to amsgrad_jax mid-flight, and back, on the same trajectory.

Keras runs as its compiled training step runs it (``optimizer.stateless_apply`` under
``jax.jit``, on the JAX backend): ``AdamW(amsgrad=True)`` with weight decay that excludes
the biases, a ``CosineDecay`` with warmup, and ``global_clipnorm`` or ``clipnorm``; or
``Adam(amsgrad=True)`` without decay. Keras runs all 500 steps; the other run switches
frameworks after step 200 and is compared with Keras' after every step. Float64 runs
set Keras' float type to float64 for the test.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _peers import require
from _sequences import gradient_sequence, initial_params
from test_parity_torch import assert_trajectories_close

import amsgrad_jax
from amsgrad_jax import _blockwise as bw
from amsgrad_jax import interop

pytestmark = pytest.mark.keras

pytestmark = pytest.mark.keras

STEPS, SPLIT = 500, 200
CLIP = 5.0
RTOL = {np.float64: 1e-9, np.float32: 1e-5}
SHAPES = {
  "hidden/kernel": (3, 4),
  "hidden/bias": (4,),
  "output/kernel": (4, 2),
  "output/bias": (2,),
}
DTYPES = pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
SETUPS = pytest.mark.parametrize(
  ("optimizer", "clipping"),
  [("AdamW", "global_clipnorm"), ("Adam", "clipnorm")],
  ids=["AdamW-global_clipnorm", "Adam-clipnorm"],
)


def convert(weights):
  """The weights converter: Keras variable paths -> a nested dict (the layouts agree)."""
  return {
    layer: {part: weights[f"{layer}/{part}"] for part in ("kernel", "bias")}
    for layer in ("hidden", "output")
  }


def convert_back(params):
  return {f"{layer}/{part}": params[layer][part] for layer in params for part in params[layer]}


@contextlib.contextmanager
def precision(dtype):
  """x64 and Keras' float type for ``dtype``; Keras mixes dtypes, so standard promotion."""
  keras = require("keras")
  assert keras.backend.backend() == "jax", "the Keras tests run Keras on its JAX backend"
  floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
  keras.config.set_floatx(np.dtype(dtype).name)
  keras.config.set_dtype_policy(np.dtype(dtype).name)  # Layers read the policy, not floatx.
  try:
    with jax.enable_x64(dtype == np.float64), jax.numpy_dtype_promotion("standard"):
      yield keras
  finally:
    keras.config.set_floatx(floatx)
    keras.config.set_dtype_policy(policy)


class KerasRun:
  """Two Dense layers' variables and a built Keras optimizer, stepped as ``fit`` steps them."""

  def __init__(self, keras, optimizer: str, clipping: str, weights, *, amsgrad: bool = True):
    self.variables = {}
    for layer, (n_in, n_out) in (("hidden", (3, 4)), ("output", (4, 2))):
      dense = keras.layers.Dense(n_out, name=layer)
      dense.build((None, n_in))
      for variable in (dense.kernel, dense.bias):
        variable.assign(weights[variable.path])
        self.variables[variable.path] = variable
    schedule = keras.optimizers.schedules.CosineDecay(
      1e-3, 450, alpha=0.1, warmup_target=1e-2, warmup_steps=50
    )
    options = {clipping: CLIP, "beta_1": 0.85, "epsilon": 1e-6, "amsgrad": amsgrad}
    if optimizer == "AdamW":
      self.optimizer = keras.optimizers.AdamW(schedule, weight_decay=0.05, **options)
      self.optimizer.exclude_from_weight_decay(var_names=["bias"])
    else:
      self.optimizer = keras.optimizers.Adam(schedule, **options)
    self.optimizer.build(list(self.variables.values()))
    self.apply = jax.jit(self.optimizer.stateless_apply)
    self.values = [v.value for v in self.variables.values()]
    self.state = [v.value for v in self.optimizer.variables]

  def step(self, grads) -> dict[str, np.ndarray]:
    ordered = [jnp.asarray(grads[name]) for name in self.variables]
    self.values, self.state = self.apply(self.state, ordered, self.values)
    return self.weights()

  def weights(self) -> dict[str, np.ndarray]:
    return {
      name: np.asarray(value) for name, value in zip(self.variables, self.values, strict=True)
    }

  def sync(self) -> None:
    """Write the values of the compiled steps back into Keras' variables."""
    for variable, value in zip(self.variables.values(), self.values, strict=True):
      variable.assign(value)
    for variable, value in zip(self.optimizer.variables, self.state, strict=True):
      variable.assign(value)

  def load(self, store) -> None:
    self.optimizer.load_own_variables(store)
    self.state = [v.value for v in self.optimizer.variables]


def sequence(dtype):
  return initial_params(dtype, shapes=SHAPES), gradient_sequence(STEPS, dtype, shapes=SHAPES)


def amsgrad_states(state) -> list[amsgrad_jax.ScaleByAmsgradState]:
  is_amsgrad = lambda node: isinstance(node, amsgrad_jax.ScaleByAmsgradState)  # noqa: E731
  return [node for node in jax.tree.leaves(state, is_leaf=is_amsgrad) if is_amsgrad(node)]


def run_jax(tx, params, state, grads):
  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  trajectory = []
  for tree in grads:
    params, state = step(params, state, jax.tree.map(jnp.asarray, convert(tree)))
    trajectory.append({n: np.asarray(w) for n, w in convert_back(params).items()})
  return trajectory, params, state


@DTYPES
@SETUPS
def test_keras_then_amsgrad_jax_follows_keras_at_every_step(optimizer, clipping, dtype):
  weights0, grads = sequence(dtype)
  with precision(dtype) as keras:
    run = KerasRun(keras, optimizer, clipping, weights0)
    reference = [run.step(tree) for tree in grads[:SPLIT]]
    run.sync()
    params = jax.tree.map(jnp.asarray, convert(run.weights()))
    tx = interop.optimizer_from_keras(run.optimizer, params, convert)
    state = interop.state_from_keras(tx, run.optimizer, params, convert)
    ours, _, _ = run_jax(tx, params, state, grads[SPLIT:])
    reference += [run.step(tree) for tree in grads[SPLIT:]]
  assert_trajectories_close(ours, reference[SPLIT:], RTOL[dtype])


@DTYPES
def test_amsgrad_jax_then_keras_follows_keras_at_every_step(dtype):
  weights0, grads = sequence(dtype)
  with precision(dtype) as keras:
    reference = KerasRun(keras, "AdamW", "global_clipnorm", weights0)
    expected = [reference.step(tree) for tree in grads][SPLIT:]
    fresh = KerasRun(keras, "AdamW", "global_clipnorm", weights0)
    params = jax.tree.map(jnp.asarray, convert(weights0))
    tx = interop.optimizer_from_keras(fresh.optimizer, params, convert)
    _, params, state = run_jax(tx, params, tx.init(params), grads[:SPLIT])
    continued = KerasRun(keras, "AdamW", "global_clipnorm", convert_back(params))
    continued.load(interop.state_to_keras(tx, state, continued.optimizer, convert_back))
    theirs = [continued.step(tree) for tree in grads[SPLIT:]]
  assert_trajectories_close(theirs, expected, RTOL[dtype])


@DTYPES
def test_state_to_keras_and_back_is_bit_identical(dtype):
  weights0, grads = sequence(dtype)
  with precision(dtype) as keras:
    run = KerasRun(keras, "AdamW", "global_clipnorm", weights0)
    params = jax.tree.map(jnp.asarray, convert(weights0))
    tx = interop.optimizer_from_keras(run.optimizer, params, convert)
    _, params, state = run_jax(tx, params, tx.init(params), grads[:7])
    run.load(interop.state_to_keras(tx, state, run.optimizer, convert_back))
    back = interop.state_from_keras(tx, run.optimizer, params, convert)
  for ours, theirs in zip(jax.tree.leaves(state), jax.tree.leaves(back), strict=True):
    assert ours.dtype == theirs.dtype
    np.testing.assert_array_equal(np.asarray(theirs), np.asarray(ours))


def test_keras_state_to_jax_and_back_is_bit_identical():
  weights0, grads = sequence(np.float32)
  with precision(np.float32) as keras:
    run = KerasRun(keras, "Adam", "clipnorm", weights0)
    for tree in grads[:7]:
      run.step(tree)
    run.sync()
    before = [np.asarray(v.value) for v in run.optimizer.variables]
    params = jax.tree.map(jnp.asarray, convert(run.weights()))
    tx = interop.optimizer_from_keras(run.optimizer, params, convert)
    state = interop.state_from_keras(tx, run.optimizer, params, convert)
    store = interop.state_to_keras(tx, state, run.optimizer, convert_back)
  assert sorted(store, key=int) == [str(i) for i in range(len(before))]
  for index, value in enumerate(before):
    assert store[str(index)].dtype == value.dtype
    np.testing.assert_array_equal(store[str(index)], value)


def built(keras, **options) -> KerasRun:
  weights0, grads = sequence(np.float32)
  run = KerasRun(keras, "AdamW", "global_clipnorm", weights0, **options)
  for tree in grads[:3]:
    run.step(tree)
  run.sync()
  return run


def test_an_optimizer_without_amsgrad_is_refused_unless_the_maximum_starts_from_velocities():
  with precision(np.float32) as keras:
    run = built(keras, amsgrad=False)
    params = jax.tree.map(jnp.asarray, convert(run.weights()))
    tx = interop.optimizer_from_keras(run.optimizer, params, convert)
    with pytest.raises(ValueError, match=r"without amsgrad=True.*max_from_velocities=True"):
      interop.state_from_keras(tx, run.optimizer, params, convert)
    state = interop.state_from_keras(tx, run.optimizer, params, convert, max_from_velocities=True)
    [amsgrad_state] = amsgrad_states(state)
    for nu, nu_max in zip(
      *map(jax.tree.leaves, (amsgrad_state.nu, amsgrad_state.nu_max)), strict=True
    ):
      np.testing.assert_array_equal(nu, nu_max)
    with pytest.raises(ValueError, match="nowhere to keep nu_max"):
      interop.state_to_keras(tx, state, run.optimizer, convert_back)


def test_an_optimizer_not_yet_built_is_refused():
  with precision(np.float32) as keras:
    optimizer = keras.optimizers.Adam(1e-3, amsgrad=True)
    tx = amsgrad_jax.amsgrad(1e-3, eps=1e-7, convention="keras")
    params = convert({name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()})
    with pytest.raises(ValueError, match="not built yet"):
      interop.state_from_keras(tx, optimizer, params, convert)


def test_a_variable_missing_or_of_another_shape_after_convert_is_refused():
  with precision(np.float32) as keras:
    run = built(keras)
    params = jax.tree.map(jnp.asarray, convert(run.weights()))
    tx = interop.optimizer_from_keras(run.optimizer, params, convert)

    def convert_missing(weights):
      tree = convert(weights)
      del tree["hidden"]["bias"]
      return tree

    def convert_transposed(weights):
      tree = convert(weights)
      tree["hidden"]["kernel"] = weights["hidden/kernel"].T
      return tree

    with pytest.raises(ValueError, match=r"missing \['hidden/bias'\]"):
      interop.state_from_keras(tx, run.optimizer, params, convert_missing)
    with pytest.raises(ValueError, match=r"hidden/kernel has shape \(4, 3\) after convert"):
      interop.state_from_keras(tx, run.optimizer, params, convert_transposed)
    state = interop.state_from_keras(tx, run.optimizer, params, convert)
    before = [np.asarray(v.value) for v in run.optimizer.variables]
    with pytest.raises(ValueError, match=r"missing from convert_back: \['output/bias'\]"):
      interop.state_to_keras(
        tx,
        state,
        run.optimizer,
        lambda p: {k: v for k, v in convert_back(p).items() if k != "output/bias"},
      )
    for variable, value in zip(run.optimizer.variables, before, strict=True):
      np.testing.assert_array_equal(np.asarray(variable.value), value)


def test_hyperparameters_that_differ_from_the_keras_optimizers_are_refused():
  with precision(np.float32) as keras:
    run = built(keras)
    params = jax.tree.map(jnp.asarray, convert(run.weights()))
    tx = amsgrad_jax.amsgradw(1e-2, eps=1e-7, weight_decay=0.05, convention="keras")
    with pytest.raises(ValueError, match=r"b1: 0.9 in tx, 0.85.*eps: 1e-07 in tx, 1e-06"):
      interop.state_from_keras(tx, run.optimizer, params, convert)
    pytorch_rule = amsgradw_like_keras(run, convention="pytorch")
    with pytest.raises(ValueError, match="convention: 'pytorch' in tx"):
      interop.state_from_keras(pytorch_rule, run.optimizer, params, convert)


def amsgradw_like_keras(run: KerasRun, **changes) -> optax.GradientTransformation:
  options = {"b1": 0.85, "eps": 1e-6, "weight_decay": 0.05, "convention": "keras", **changes}
  return amsgrad_jax.amsgradw(run.optimizer.learning_rate.item(), **options)


def test_keras_computes_the_cosine_of_its_cosine_decay_in_float32_even_in_float64():
  """Why keras_cosine_decay computes its cosine in float32: Keras' own does, so a float64
  Keras run trains with those rates, and the continuation above matches them."""
  with precision(np.float64) as keras:
    assert keras.ops.cos(jnp.asarray(1.0, jnp.float64)).dtype == jnp.float32


def test_keras_state_into_blockwise8_and_back():
  """Keras' float moments encoded into 8-bit state keep ``nu_max`` at or above Keras' (and
  within one code step); written back to Keras they are the values the 8-bit state holds."""
  weights0, grads = sequence(np.float32)
  fmt = amsgrad_jax.blockwise8(4)
  with precision(np.float32) as keras:
    run = KerasRun(keras, "AdamW", "global_clipnorm", weights0)
    for tree in grads[:7]:
      run.step(tree)
    run.sync()
    params = jax.tree.map(jnp.asarray, convert(run.weights()))
    float_tx = interop.optimizer_from_keras(run.optimizer, params, convert)
    tx = interop.optimizer_from_keras(run.optimizer, params, convert, mu_dtype=fmt, nu_dtype=fmt)
    exact = amsgrad_states(interop.state_from_keras(float_tx, run.optimizer, params, convert))[0]
    state = interop.state_from_keras(tx, run.optimizer, params, convert)
    stored = amsgrad_states(state)[0]
    run.load(interop.state_to_keras(tx, state, run.optimizer, convert_back))
    back = amsgrad_states(interop.state_from_keras(float_tx, run.optimizer, params, convert))[0]
  assert int(stored.count) == int(exact.count) == 7
  for true_max, kept in zip(
    jax.tree.leaves(exact.nu_max), bw.moment_leaves(stored.nu_max), strict=True
  ):
    value, true_max = np.asarray(bw.dequantize(kept)), np.asarray(true_max)
    assert np.all(value >= true_max)
    assert np.all(value <= np.maximum(true_max * (1 + 2.0**-4), 2.0**-100))
  for field in ("mu", "nu_max"):
    for written, kept in zip(
      jax.tree.leaves(getattr(back, field)), bw.moment_leaves(getattr(stored, field)), strict=True
    ):
      np.testing.assert_array_equal(np.asarray(written), np.asarray(bw.dequantize(kept)))
