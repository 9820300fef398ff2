"""The options record: one source for every constructor's signature, checks and docs."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import jax.numpy as jnp
import optax
import pytest

import amsgrad_jax
from amsgrad_jax._options import (
  AmsgradOptions,
  AmsgradwOptions,
  TransformOptions,
  built_from,
  option,
)

CONSTRUCTORS = [
  (amsgrad_jax.scale_by_amsgrad, TransformOptions),
  (amsgrad_jax.amsgrad, AmsgradOptions),
  (amsgrad_jax.amsgradw, AmsgradwOptions),
]


@pytest.mark.parametrize(("constructor", "record"), CONSTRUCTORS)
def test_signature_and_args_doc_come_from_the_record(constructor, record):
  parameters = inspect.signature(constructor).parameters
  assert list(parameters) == list(inspect.signature(record).parameters)
  fields = {field.name: field for field in dataclasses.fields(record)}
  assert set(parameters) == set(fields)
  doc = constructor.__doc__
  args = doc[doc.index("Args:") : doc.index("Returns:")]
  for name, parameter in parameters.items():
    missing = fields[name].default is dataclasses.MISSING
    assert parameter.default == (inspect.Parameter.empty if missing else fields[name].default)
    assert args.count(f"    {name}: ") == 1, name  # each option documented once
  assert "{args}" not in doc


def test_positions_follow_optax():
  """``amsgradw``'s positional order is ``optax.adamw``'s up to the weight decay."""
  ours = list(inspect.signature(amsgrad_jax.amsgradw).parameters)
  assert ours[:7] == [
    "learning_rate",
    "b1",
    "b2",
    "eps",
    "eps_root",
    "weight_decay",
    "mask",
  ]
  assert inspect.signature(amsgrad_jax.amsgrad).parameters["weight_decay"].kind is (
    inspect.Parameter.KEYWORD_ONLY
  )
  tx = amsgrad_jax.amsgradw(0.1, 0.8, 0.9, 1e-6, 0.0, 0.25)
  assert (tx.options.b1, tx.options.b2, tx.options.weight_decay) == (0.8, 0.9, 0.25)


def test_unknown_option_names_the_constructor():
  with pytest.raises(TypeError, match=r"amsgrad\(\): .*'lr'"):
    amsgrad_jax.amsgrad(learning_rate=0.1, lr=0.1)
  with pytest.raises(TypeError, match=r"scale_by_amsgrad\(\): "):
    amsgrad_jax.scale_by_amsgrad(0.9, 0.99, 1e-8, 0.0, 1.0)


def test_the_record_is_checked_and_frozen():
  tx = amsgrad_jax.amsgrad(1e-3, mu_dtype="bfloat16")
  assert tx.options.mu_dtype == jnp.bfloat16  # stored canonical
  with pytest.raises(dataclasses.FrozenInstanceError):
    tx.options.b1 = 0.5
  with pytest.raises(ValueError, match="b2 must be in"):
    AmsgradwOptions(1e-3, b2=1.0)


def test_inject_hyperparams_sees_every_option_by_name():
  tx = optax.inject_hyperparams(amsgrad_jax.amsgradw)(learning_rate=1e-2, weight_decay=0.1)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  assert set(state.hyperparams) >= {"learning_rate", "b1", "b2", "eps", "weight_decay"}
  updates, _ = tx.update({"w": jnp.ones(3)}, state, params)
  reference, _ = amsgrad_jax.amsgradw(1e-2, weight_decay=0.1).update(
    {"w": jnp.ones(3)}, amsgrad_jax.amsgradw(1e-2, weight_decay=0.1).init(params), params
  )
  assert jnp.allclose(updates["w"], reference["w"], rtol=1e-6, atol=0)  # float32 hyperparams


def test_a_new_option_is_one_field():
  """A field added to a record reaches the constructor's signature, checks and docs."""

  @dataclass(frozen=True)
  class Extended(AmsgradOptions):
    rounding: str = option("nearest", doc="how the parameter write rounds.")

    def __post_init__(self) -> None:
      if self.rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {self.rounding!r}.")
      super().__post_init__()

  @built_from(Extended)
  def extended(options: Extended) -> Extended:
    """An optimizer.

    Args:
      {args}

    Returns:
      Its options.
    """
    return options

  assert extended(0.1, rounding="stochastic").rounding == "stochastic"
  assert "rounding" in inspect.signature(extended).parameters
  assert "rounding: how the parameter write rounds." in extended.__doc__
  with pytest.raises(ValueError, match="rounding must be"):
    extended(0.1, rounding="up")
