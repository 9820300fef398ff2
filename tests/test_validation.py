"""Bad input: hyperparameters at construction, parameter trees at init, gradients at update.

Every concrete hyperparameter is checked when the optimizer is built, with a
``ValueError`` that names the argument and what it accepts; traced hyperparameters
(``optax.inject_hyperparams`` under ``jit``) are left alone. ``init`` refuses integer
and boolean leaves with a ``TypeError`` naming the leaf, and ``update`` refuses a
gradient tree that does not match the state with an error raised by our own checks,
before any arithmetic, so the state is never touched.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amsgrad_jax
from amsgrad_jax import amsgrad, amsgradw, scale_by_amsgrad

FACTORIES: dict[str, Callable[..., optax.GradientTransformation]] = {
  "scale_by_amsgrad": scale_by_amsgrad,
  "amsgrad": lambda **kw: amsgrad(**{"learning_rate": 1e-3, **kw}),
  "amsgradw": lambda **kw: amsgradw(**{"learning_rate": 1e-3, **kw}),
  # coupled decay maps over gradients and parameters before the transform sees them
  "amsgrad-l2": lambda **kw: amsgrad(**{"learning_rate": 1e-3, "weight_decay": 1e-2, **kw}),
  # the flat state layout checks gradients against the layout it keeps
  "amsgradw-flat": lambda **kw: amsgradw(**{"learning_rate": 1e-3, "flat_state": True, **kw}),
}
ALIASES = ("amsgrad", "amsgradw")

UNIT_INTERVAL = re.escape("[0, 1)")
NON_NEGATIVE = re.escape(">= 0")

# (argument, accepted range in the message, bad values). Every one must be refused.
BAD_NUMBERS: list[tuple[str, str, list[Any]]] = [
  (
    name,
    UNIT_INTERVAL,
    [
      float("nan"),
      float("inf"),
      -float("inf"),
      -0.1,
      1.0,
      1,
      1.5,
      np.float32(1.0),
      np.float64("nan"),
      np.array(-1.0),
      np.array([0.9, 1.0]),
      jnp.array(1.0),
      jnp.asarray(1.0, jnp.bfloat16),
      "0.9",
      None,
      True,
      0.5 + 0j,
    ],
  )
  for name in ("b1", "b2")
] + [
  (
    name,
    NON_NEGATIVE,
    [
      float("nan"),
      float("inf"),
      -float("inf"),
      -1e-8,
      -1,
      np.float32(-1.0),
      np.float64("inf"),
      np.array(-1.0),
      np.array([1e-8, -1e-8]),
      jnp.array(float("nan")),
      "1e-8",
      None,
      False,
      1e-8 + 0j,
    ],
  )
  for name in ("eps", "eps_root")
]
BAD_ALIAS_NUMBERS: list[tuple[str, str, list[Any]]] = [
  (
    name,
    NON_NEGATIVE,
    [
      float("nan"),
      float("inf"),
      -1e-3,
      np.float32(-1.0),
      np.array(float("nan")),
      jnp.array(-1.0),
      "1e-3",
      None,
      True,
      1e-3 + 0j,
    ],
  )
  for name in ("learning_rate", "weight_decay")
]


def _cases(table: list[tuple[str, str, list[Any]]], factories: tuple[str, ...]) -> list[Any]:
  return [
    pytest.param(factory, name, accepted, value, id=f"{factory}-{name}={value!r}")
    for factory in factories
    for name, accepted, values in table
    for value in values
  ]


@pytest.mark.parametrize(
  ("factory", "name", "accepted", "value"),
  _cases(BAD_NUMBERS, tuple(FACTORIES)) + _cases(BAD_ALIAS_NUMBERS, ALIASES),
)
def test_bad_hyperparameter_raises_value_error_naming_it(factory, name, accepted, value):
  with pytest.raises(ValueError, match=rf"^{name} must be .*{accepted}.*got") as excinfo:
    FACTORIES[factory](**{name: value})
  assert excinfo.traceback[-1].path.name == "_validation.py"


GOOD_NUMBERS: list[tuple[str, Any]] = [
  ("b1", 0.0),
  ("b1", 0),
  ("b1", np.float32(0.5)),
  ("b1", np.array(0.9)),
  ("b1", jnp.asarray(0.9, jnp.bfloat16)),
  ("b2", np.nextafter(1.0, 0.0)),
  ("b2", np.array([0.99, 0.999])),
  ("eps", 0.0),
  ("eps", 0),
  ("eps", np.float16(1e-3)),
  ("eps_root", jnp.array(1e-12)),
]


@pytest.mark.parametrize("factory", list(FACTORIES))
@pytest.mark.parametrize(("name", "value"), GOOD_NUMBERS, ids=lambda x: repr(x))
def test_boundary_and_array_hyperparameters_are_accepted(factory, name, value):
  tx = FACTORIES[factory](**{name: value})
  params = {"w": jnp.ones(2)}
  updates, _ = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
  assert np.all(np.isfinite(updates["w"]))


@pytest.mark.parametrize("factory", ALIASES)
@pytest.mark.parametrize("name", ["learning_rate", "weight_decay"])
def test_alias_accepts_zero_and_a_schedule(factory, name):
  for value in (0.0, 0, np.float32(0.0), optax.linear_schedule(1e-3, 0.0, 10)):
    tx = FACTORIES[factory](**{name: value})
    params = {"w": jnp.ones(2)}
    updates, _ = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
    assert np.all(np.isfinite(updates["w"]))


@pytest.mark.parametrize("factory", list(FACTORIES))
@pytest.mark.parametrize("convention", ["PyTorch", "torch", "tensorflow", "", " paper", None, 0])
def test_unknown_convention_lists_the_known_names(factory, convention):
  with pytest.raises(ValueError, match=r"^convention must be one of") as excinfo:
    FACTORIES[factory](convention=convention)
  for name in amsgrad_jax.CONVENTIONS:
    assert repr(name) in str(excinfo.value)
  assert repr(convention) in str(excinfo.value)


@pytest.mark.parametrize("factory", list(FACTORIES))
@pytest.mark.parametrize("argument", ["mu_dtype", "nu_dtype"])
@pytest.mark.parametrize("dtype", [jnp.int32, "int8", bool, np.uint8, "no-such-dtype", object, 3])
def test_non_float_state_dtype_raises_value_error(factory, argument, dtype):
  with pytest.raises(
    ValueError, match=rf"^{argument} must be a floating dtype, blockwise8\(\) or None"
  ):
    FACTORIES[factory](**{argument: dtype})


@pytest.mark.parametrize("argument", ["mu_dtype", "nu_dtype"])
def test_a_state_dtype_called_as_a_schedule_by_inject_hyperparams_says_what_to_pass(argument):
  params = {"w": jnp.ones((3,))}
  injected = optax.inject_hyperparams(amsgrad)
  with pytest.raises(ValueError, match=rf"^{argument} got an array.*jnp.dtype\('bfloat16'\)"):
    injected(learning_rate=0.1, **{argument: jnp.bfloat16}).init(params)
  for tx in (
    injected(learning_rate=0.1, **{argument: jnp.dtype("bfloat16")}),
    optax.inject_hyperparams(amsgrad, static_args=(argument,))(
      learning_rate=0.1, **{argument: jnp.bfloat16}
    ),
  ):
    state = tx.init(params).inner_state[1]
    moment = state.mu if argument == "mu_dtype" else state.nu_max
    assert moment["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize("convention", amsgrad_jax.CONVENTIONS)
def test_inject_hyperparams_under_jit_is_not_validated_and_matches(convention):
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  grads = {"w": jnp.array([0.3, -0.1, 2.0])}
  injected = optax.inject_hyperparams(amsgrad)(
    learning_rate=0.1, b1=0.8, b2=0.95, eps=1e-6, convention=convention
  )
  plain = amsgrad(0.1, b1=0.8, b2=0.95, eps=1e-6, convention=convention)

  @jax.jit
  def step(state):
    return injected.update(grads, state, params)

  updates, _ = step(injected.init(params))
  expected, _ = plain.update(grads, plain.init(params), params)
  np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)


@pytest.mark.parametrize("convention", amsgrad_jax.CONVENTIONS)
def test_transform_built_inside_jit_from_traced_hyperparameters(convention):
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  grads = {"w": jnp.array([0.3, -0.1, 2.0])}

  def two_steps(b1, b2, eps, eps_root, learning_rate, weight_decay):
    tx = amsgradw(
      learning_rate, b1, b2, eps, eps_root, weight_decay=weight_decay, convention=convention
    )
    state = tx.init(params)
    for _ in range(2):
      updates, state = tx.update(grads, state, params)
    return updates

  hyper = (0.8, 0.95, 1e-6, 1e-10, 0.1, 0.01)
  traced = jax.jit(two_steps)(*(jnp.asarray(h, jnp.float32) for h in hyper))
  concrete = two_steps(*hyper)
  np.testing.assert_allclose(traced["w"], concrete["w"], rtol=1e-5)


def test_traced_out_of_range_values_are_not_checked():
  """A traced value cannot be compared without stopping the trace; it passes through."""
  built = jax.jit(lambda b1: scale_by_amsgrad(b1=b1).init(jnp.ones(2)).count)(jnp.float32(2.0))
  assert built == 0


# ---------------------------------------------------------------------------- init


@pytest.mark.parametrize(
  ("params", "path", "dtype"),
  [
    ({"w": jnp.ones(2), "step": jnp.array(3)}, "['step']", "int32"),
    (
      {"w": jnp.ones(2), "flags": {"x": [jnp.ones(2), jnp.array(True)]}},
      "['flags']['x'][1]",
      "bool",
    ),
    ({"w": jnp.ones(2), "n": 3}, "['n']", "int32"),
    ((jnp.ones(2), np.arange(3, dtype=np.uint8)), "[1]", "uint8"),
    (np.arange(3), "(root)", "int"),
  ],
)
@pytest.mark.parametrize("factory", list(FACTORIES))
def test_init_on_integer_or_boolean_leaf_names_its_path(factory, params, path, dtype):
  tx = FACTORIES[factory]()
  with pytest.raises(TypeError, match=re.escape(path) + rf" has dtype {dtype}.*optax\.masked"):
    tx.init(params)


def test_init_on_a_non_array_leaf_names_its_path():
  with pytest.raises(TypeError, match=re.escape("['w'] is 'abc' of type str")):
    amsgrad(0.1).init({"w": "abc"})


def test_python_float_and_numpy_float64_leaves_take_the_dtype_jax_gives_them():
  tx = amsgrad(0.1, convention="optax")
  params = {"scalar": 3.0, "numpy": np.ones(2)}  # float64 NumPy, x64 disabled
  state = tx.init(params)
  updates, state = tx.update({"scalar": 1.0, "numpy": np.ones(2)}, state, params)
  adam = optax.adam(0.1)
  with jax.numpy_dtype_promotion("standard"):  # optax.adam itself is not strict-clean
    expected, adam_state = adam.update({"scalar": 1.0, "numpy": np.ones(2)}, adam.init(params))
  assert jax.tree.map(jnp.result_type, updates) == jax.tree.map(jnp.result_type, expected)
  assert jax.tree.map(jnp.result_type, state[1].mu) == jax.tree.map(
    jnp.result_type, adam_state[0].mu
  )
  np.testing.assert_allclose(updates["numpy"], expected["numpy"], rtol=1e-6)


def _structure_and_dtypes(tree: Any) -> tuple[Any, list[Any]]:
  return jax.tree.structure(tree), [jnp.result_type(leaf) for leaf in jax.tree.leaves(tree)]


def test_none_leaves_behave_as_in_optax_adam():
  params = {"w": jnp.ones(2), "frozen": None, "nested": [None, jnp.ones(3)]}
  grads = {"w": jnp.ones(2), "frozen": None, "nested": [None, jnp.full(3, 0.5)]}
  ours = amsgrad(0.1, b2=0.999, eps=1e-8, convention="optax")
  theirs = optax.adam(0.1, b2=0.999, eps=1e-8)
  our_updates, (_, our_state, _) = ours.update(grads, ours.init(params), params)
  with jax.numpy_dtype_promotion("standard"):
    their_updates, (their_state, _) = theirs.update(grads, theirs.init(params), params)
  assert _structure_and_dtypes(our_updates) == _structure_and_dtypes(their_updates)
  assert _structure_and_dtypes(our_state.mu) == _structure_and_dtypes(their_state.mu)
  assert _structure_and_dtypes(our_state.nu_max) == _structure_and_dtypes(their_state.nu)
  # On the first step AMSGrad's maximum is the second moment: the same numbers as Adam.
  jax.tree.map(np.testing.assert_allclose, our_updates, their_updates)


def test_masked_mixed_tree_behaves_as_optax_adam():
  """``optax.masked`` keeps integer and boolean leaves out; they pass through untouched."""
  params = {"w": jnp.ones(2), "step": jnp.array(7), "flags": jnp.array([True, False])}
  grads = {"w": jnp.full(2, 0.5), "step": jnp.array(1), "flags": jnp.array([False, False])}
  mask = jax.tree.map(lambda leaf: jnp.issubdtype(leaf.dtype, jnp.floating), params)
  ours = optax.masked(amsgrad(0.1, convention="optax"), mask)
  theirs = optax.masked(optax.adam(0.1), mask)
  our_state = ours.init(params)
  their_state = theirs.init(params)
  our_updates, our_state = ours.update(grads, our_state, params)
  with jax.numpy_dtype_promotion("standard"):
    their_updates, their_state = theirs.update(grads, their_state, params)
  assert _structure_and_dtypes(our_updates) == _structure_and_dtypes(their_updates)
  our_mu = our_state.inner_state[1].mu
  their_mu = their_state.inner_state[0].mu
  assert jax.tree.structure(our_mu) == jax.tree.structure(their_mu)
  assert isinstance(our_mu["step"], optax.MaskedNode)
  jax.tree.map(np.testing.assert_array_equal, our_updates, their_updates)


# -------------------------------------------------------------------------- update

PARAMS = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
MISMATCHES: list[tuple[str, Any, type[Exception], str]] = [
  ("missing key", {"w": jnp.ones((2, 3))}, ValueError, r"missing from the gradients: \['b'\]"),
  (
    "extra key",
    {"w": jnp.ones((2, 3)), "b": jnp.ones(3), "c": jnp.ones(1)},
    ValueError,
    r"not in the (optimizer state|parameters): \['c'\]",
  ),
  (
    "renamed key",
    {"w": jnp.ones((2, 3)), "bias": jnp.ones(3)},
    ValueError,
    r"missing from the gradients: \['b'\]; not in the (optimizer state|parameters): \['bias'\]",
  ),
  (
    "list instead of dict",
    [jnp.ones(3), jnp.ones((2, 3))],
    ValueError,
    r"missing from the gradients: \['b'\], \['w'\]; not in the (optimizer state|parameters): \[0\], \[1\]",
  ),
  (
    "None instead of a leaf",
    {"w": None, "b": jnp.ones(3)},
    ValueError,
    r"missing from the gradients: \['w'\]",
  ),
  (
    "shape mismatch",
    {"w": jnp.ones((3, 2)), "b": jnp.ones(3)},
    ValueError,
    re.escape("The gradient at ['w'] has shape (3, 2), but the ")
    + "(optimizer state there has|parameters there have)"
    + re.escape(" shape (2, 3)"),
  ),
  (
    "broadcastable shape",
    {"w": jnp.ones((2, 3)), "b": jnp.ones((1, 3))},
    ValueError,
    re.escape("The gradient at ['b'] has shape (1, 3)"),
  ),
  (
    "integer gradient",
    {"w": jnp.ones((2, 3)), "b": jnp.ones(3, jnp.int32)},
    TypeError,
    re.escape("gradients, but the leaf at ['b'] has dtype int32"),
  ),
  (
    "boolean gradient",
    {"w": jnp.ones((2, 3), bool), "b": jnp.ones(3)},
    TypeError,
    re.escape("gradients, but the leaf at ['w'] has dtype bool"),
  ),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
  ("grads", "error", "message"),
  [pytest.param(*case[1:], id=case[0]) for case in MISMATCHES],
)
@pytest.mark.parametrize("factory", list(FACTORIES))
def test_mismatched_gradients_raise_a_clear_error_and_leave_the_state_usable(
  factory, grads, error, message, jit
):
  tx = FACTORIES[factory]()
  good_grads = jax.tree.map(lambda p: jnp.full_like(p, 0.25), PARAMS)
  state = tx.init(PARAMS)
  _, state = tx.update(good_grads, state, PARAMS)
  before = jax.tree.map(np.array, state)
  update = jax.jit(tx.update) if jit else tx.update
  with pytest.raises(error, match=message) as excinfo:
    update(grads, state, PARAMS)
  assert excinfo.traceback[-1].path.name == "_validation.py"
  jax.tree.map(np.testing.assert_array_equal, state, before)
  # The state goes on exactly as if the bad call had never been made.
  after, _ = tx.update(good_grads, state, PARAMS)
  fresh = tx.init(PARAMS)
  for _ in range(2):
    expected, fresh = tx.update(good_grads, fresh, PARAMS)
  jax.tree.map(np.testing.assert_array_equal, after, expected)


@pytest.mark.parametrize("convention", ["keras", "optax"])
@pytest.mark.parametrize("name", ["b1", "b2"])
@pytest.mark.parametrize("value", [1 - 1e-9, 1 - 2**-25, np.array([0.9, 1 - 1e-10])])
def test_beta_that_rounds_to_one_in_float32_is_refused_where_the_rule_needs_float32(
  convention, name, value
):
  """keras and optax form ``1 - b**t`` from ``b`` rounded to float32: 0 for these values,
  which made the step ``inf`` or the running maximum ``inf``."""
  with pytest.raises(ValueError, match=rf"^{name} must be in \[0, 1\) after rounding to float32"):
    scale_by_amsgrad(**{name: value}, convention=convention)


@pytest.mark.parametrize("convention", ["pytorch", "paper"])
@pytest.mark.parametrize("name", ["b1", "b2"])
def test_beta_close_to_one_is_fine_where_the_rule_uses_double_precision(convention, name):
  tx = scale_by_amsgrad(**{name: 1 - 1e-9}, convention=convention)
  updates, state = tx.update(jnp.array([0.1, -0.2]), tx.init(jnp.ones(2)))
  assert np.all(np.isfinite(updates))
  assert np.all(np.isfinite(state.nu_max))


@pytest.mark.parametrize("convention", ["keras", "optax"])
def test_largest_float32_beta_below_one_still_gives_finite_steps(convention):
  largest = float(np.nextafter(np.float32(1.0), np.float32(0.0)))
  tx = scale_by_amsgrad(b1=largest, b2=largest, convention=convention)
  updates, state = tx.update(jnp.array([0.1, -0.2]), tx.init(jnp.ones(2)))
  assert np.all(np.isfinite(updates))
  assert np.all(np.isfinite(state.nu_max))


@pytest.mark.parametrize(
  "make",
  [
    lambda: amsgrad_jax.amsgrad(1e-3),
    lambda: amsgrad_jax.amsgradw(1e-3),
    lambda: amsgrad_jax.amsgrad(1e-3, weight_decay=0.1),
    amsgrad_jax.scale_by_amsgrad,
  ],
)
def test_update_without_init_says_to_call_init(make):
  tx = make()
  params = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match=r"opt_state=None.*tx\.init\(params\)"):
    tx.update(params, None, params)
  with pytest.raises(ValueError, match=r"apply_step got opt_state=None.*tx\.init\(params\)"):
    amsgrad_jax.apply_step(tx, params, None, params)
