"""The contenders: every optimizer step the benchmarks race, in the order their processes run.

A contender is plain data, so the driver lists them without importing PyTorch, and each
worker looks its own up by name. Adding one is one entry in :data:`CONTENDERS`:

* a JAX contender gives ``learning_rate -> optax transformation`` and how the step applies
  it: ``tx.update`` then ``optax.apply_updates`` (what every Optax user writes), or
  ``amsgrad_jax.apply_step`` (``native=True``);
* a PyTorch contender names a ``torch.optim`` class and its keyword arguments (always
  with ``amsgrad=True``), and ``clip``, a maximal gradient norm applied with
  ``torch.nn.utils.clip_grad_norm_`` before each step.

``bytes_per_param`` is what one pass over memory must move per parameter, the yardstick
of :mod:`benchmarks.limit`: 36 for float32 AMSGrad, 28 for Adam (no ``nu_max``), 24 with
the moments stored in bfloat16, 18 with them in 8 bits (:func:`amsgrad_jax.blockwise8`: a byte
per element and moment, and the block exponents rounded away), and 4 more where the global
norm reads the gradient first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax.numpy as jnp
import optax

import amsgrad_jax

CLIP_NORM = 1.0
TORCH_FUSED = "torch fused"


@dataclass(frozen=True)
class Contender:
  """One implementation to time; see the module's docstring for the fields."""

  name: str
  make_tx: Callable[[float], optax.GradientTransformation] | None = None
  native: bool = False
  torch_optimizer: str = ""
  torch_options: dict[str, Any] = field(default_factory=dict)
  clip: float | None = None
  bytes_per_param: int = 36

  @property
  def framework(self) -> str:
    return "torch" if self.torch_optimizer else "jax"


def _torch(
  name: str,
  optimizer: str = "Adam",
  clip: float | None = None,
  bytes_per_param: int = 36,
  **options: Any,
) -> Contender:
  return Contender(
    name,
    torch_optimizer=optimizer,
    torch_options=options,
    clip=clip,
    bytes_per_param=bytes_per_param,
  )


def _clipped_amsgradw(learning_rate: float) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(CLIP_NORM), amsgrad_jax.amsgradw(learning_rate))


def _bf16_state(learning_rate: float) -> optax.GradientTransformation:
  return amsgrad_jax.amsgrad(learning_rate, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)


def _bf16_state_stochastic(learning_rate: float) -> optax.GradientTransformation:
  return amsgrad_jax.amsgrad(
    learning_rate, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16, state_rounding="stochastic"
  )


def _blockwise8_state(learning_rate: float) -> optax.GradientTransformation:
  fmt = amsgrad_jax.blockwise8()
  return amsgrad_jax.amsgrad(learning_rate, mu_dtype=fmt, nu_dtype=fmt)


def _blockwise8_flat_state(learning_rate: float) -> optax.GradientTransformation:
  fmt = amsgrad_jax.blockwise8()
  return amsgrad_jax.amsgrad(learning_rate, mu_dtype=fmt, nu_dtype=fmt, flat_state=True)


def _flat_state(learning_rate: float) -> optax.GradientTransformation:
  return amsgrad_jax.amsgrad(learning_rate, flat_state=True)


# Pairs that matter most run next to each other, so that a change in the machine's load
# between their processes is least likely.
CONTENDERS = [
  Contender("amsgrad_jax", amsgrad_jax.amsgrad),
  Contender("optax.amsgrad", optax.amsgrad),
  Contender("apply_step", amsgrad_jax.amsgrad, native=True),
  _torch(TORCH_FUSED, fused=True),
  Contender("apply_step, flat state", _flat_state, native=True),
  Contender("apply_step, bf16 state", _bf16_state, native=True, bytes_per_param=24),
  Contender(
    "apply_step, bf16 state, stochastic", _bf16_state_stochastic, native=True, bytes_per_param=24
  ),
  Contender("apply_step, 8-bit state", _blockwise8_state, native=True, bytes_per_param=18),
  Contender(
    "apply_step, 8-bit flat state", _blockwise8_flat_state, native=True, bytes_per_param=18
  ),
  Contender("amsgrad_jax, bf16 state", _bf16_state, bytes_per_param=24),
  Contender("amsgrad_jax, 8-bit state", _blockwise8_state, bytes_per_param=18),
  Contender("optax.adam", optax.adam, bytes_per_param=28),
  _torch("torch foreach", foreach=True),
  Contender("clip + apply_step (amsgradw)", _clipped_amsgradw, native=True, bytes_per_param=40),
  _torch("clip + torch fused AdamW", "AdamW", CLIP_NORM, bytes_per_param=40, fused=True),
]


def by_name(name: str) -> Contender:
  """The contender called ``name``."""
  for contender in CONTENDERS:
    if contender.name == name:
      return contender
  raise KeyError(f"no contender {name!r}; known: {[c.name for c in CONTENDERS]}")
