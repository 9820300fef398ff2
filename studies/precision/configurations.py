"""The JAX optimizer configurations of the study, each an ``amsgrad_jax.amsgrad`` call.

Every configuration uses the task's learning rate and AMSGrad's defaults otherwise; they
differ only in how the parameters and the optimizer state are stored. A configuration
whose API this version of amsgrad_jax lacks raises :class:`Unavailable` when built, and
the study records it as not available instead of failing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import optax

import amsgrad_jax

REFERENCE = "f32"


class Unavailable(Exception):
  """This version of amsgrad_jax does not offer what a configuration needs."""


@dataclass(frozen=True)
class Configuration:
  """One way of storing parameters and AMSGrad's state."""

  name: str
  description: str
  bf16_params: bool
  options: Callable[[int], dict[str, Any]]  # seed -> keyword arguments of amsgrad()

  def optimizer(self, learning_rate: float, seed: int) -> optax.GradientTransformation:
    """``amsgrad_jax.amsgrad(learning_rate, **options)``; :class:`Unavailable` if refused."""
    options = self.options(seed)
    try:
      return amsgrad_jax.amsgrad(learning_rate, **options)
    except TypeError as error:
      raise Unavailable(f"amsgrad() refuses {sorted(options)}: {error}") from error


def _float32_state(seed: int) -> dict[str, Any]:
  return {}


def _bfloat16_state(seed: int) -> dict[str, Any]:
  return {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16}


def _bfloat16_state_stochastic(seed: int) -> dict[str, Any]:
  return {**_bfloat16_state(seed), "state_rounding": "stochastic", "rounding_seed": seed}


def _blockwise8_state(seed: int) -> dict[str, Any]:
  if not hasattr(amsgrad_jax, "blockwise8"):
    raise Unavailable(f"amsgrad_jax {amsgrad_jax.__version__} has no blockwise8")
  state_format = amsgrad_jax.blockwise8()
  return {"mu_dtype": state_format, "nu_dtype": state_format, "rounding_seed": seed}


def _float32_state_of_bf16_params(seed: int) -> dict[str, Any]:
  return {"mu_dtype": jnp.float32, "nu_dtype": jnp.float32}


def _stochastic_rounding(seed: int) -> dict[str, Any]:
  options = {**_float32_state_of_bf16_params(seed), "param_rounding": "stochastic"}
  if "rounding_seed" in inspect.signature(amsgrad_jax.amsgrad).parameters:
    options["rounding_seed"] = seed
  return options


CONFIGURATIONS = (
  Configuration(REFERENCE, "float32 params, float32 state (default)", False, _float32_state),
  Configuration(
    "bf16_state", "float32 params, bfloat16 mu and nu, to nearest", False, _bfloat16_state
  ),
  Configuration(
    "bf16_state_sr",
    'as bf16_state, with state_rounding="stochastic" (rounding_seed = seed)',
    False,
    _bfloat16_state_stochastic,
  ),
  Configuration(
    "8bit_state", "float32 params, blockwise8() mu and nu (block 256)", False, _blockwise8_state
  ),
  Configuration(
    "bf16_params_nearest",
    "bfloat16 params and gradients, float32 state, round to nearest",
    True,
    _float32_state_of_bf16_params,
  ),
  Configuration(
    "bf16_params_stochastic",
    'as bf16_params_nearest, with param_rounding="stochastic" (rounding_seed = seed)',
    True,
    _stochastic_rounding,
  ),
)
