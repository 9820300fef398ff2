"""The contenders: every optimizer implementation the benchmarks race.

A contender is plain data, so the driver can list them without importing PyTorch (whose
OpenMP threads must never share a process with a JAX step) and each worker process can
look its own up by name. Adding one is one entry in :func:`contenders`.

* JAX contenders give an Optax transformation and how the step applies it: ``"optax"``
  (``tx.update`` then ``optax.apply_updates``, what every Optax user writes) or
  ``"apply_step"`` (``amsgrad_jax.apply_step``, the native one-pass step, measured
  whenever the installed package has it, and again with ``flat_state=True``, the moments
  kept as one buffer per dtype rather than one array per leaf, when ``amsgrad`` takes it).
* PyTorch contenders give the keyword arguments of ``torch.optim.Adam(amsgrad=True)``
  that pick its implementation: ``fused``, ``foreach`` or the single-tensor loop.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optax

import amsgrad_jax

# Bytes per float32 parameter that one pass over memory must move:
#   AMSGrad reads p, g, mu, nu, nu_max and writes p, mu, nu, nu_max: 9 x 4 = 36;
#   Adam reads p, g, mu, nu and writes p, mu, nu: 7 x 4 = 28.
ONE_PASS_BYTES_PER_PARAM = {"amsgrad": 36, "adam": 28}

DEFAULT = "amsgrad_jax"
OPTAX = "optax.amsgrad"
TORCH_FUSED = "torch fused"
APPLY_STEP = "amsgrad_jax.apply_step"
APPLY_STEP_FLAT = "amsgrad_jax.apply_step (flat state)"


@dataclass(frozen=True)
class Contender:
  """One implementation to time.

  Attributes:
    name: how tables and plots call it.
    framework: ``"jax"`` or ``"torch"``.
    algorithm: ``"amsgrad"`` or ``"adam"``, for the bytes one pass must move.
    description: the call it stands for.
    make_tx: ``learning_rate -> optax transformation`` (JAX only).
    apply: ``"optax"`` or ``"apply_step"``: how a JAX step applies ``make_tx`` (JAX only).
    torch_options: keyword arguments of ``torch.optim.Adam`` (PyTorch only).
    scaling: whether it also runs the extra points of the scaling plots (the other
      rules of amsgrad_jax compile to the same loops as the default one, and the
      single-tensor loop is the slowest by far: they run the headline cases only).
  """

  name: str
  framework: str
  algorithm: str
  description: str
  make_tx: Callable[[float], optax.GradientTransformation] | None = None
  apply: str = "optax"
  torch_options: dict[str, Any] = field(default_factory=dict)
  scaling: bool = True

  @property
  def one_pass_bytes_per_param(self) -> int:
    return ONE_PASS_BYTES_PER_PARAM[self.algorithm]


def _ours(convention: str) -> Callable[[float], optax.GradientTransformation]:
  return lambda learning_rate: amsgrad_jax.amsgrad(learning_rate, convention=convention)


def has_flat_state() -> bool:
  """Whether the installed ``amsgrad_jax.amsgrad`` takes ``flat_state``."""
  return "flat_state" in inspect.signature(amsgrad_jax.amsgrad).parameters


def contenders() -> list[Contender]:
  """Every contender available in this installation, in the order they race."""
  ours = [
    Contender(
      name=DEFAULT if convention == "pytorch" else f"amsgrad_jax ({convention})",
      framework="jax",
      algorithm="amsgrad",
      description=f'amsgrad_jax.amsgrad(lr, convention="{convention}")',
      make_tx=_ours(convention),
      scaling=convention == "pytorch",
    )
    for convention in amsgrad_jax.CONVENTIONS
  ]
  if hasattr(amsgrad_jax, "apply_step"):
    ours.append(
      Contender(
        name=APPLY_STEP,
        framework="jax",
        algorithm="amsgrad",
        description="amsgrad_jax.apply_step(amsgrad_jax.amsgrad(lr), grads, state, params)",
        make_tx=_ours("pytorch"),
        apply="apply_step",
      )
    )
    if has_flat_state():
      ours.append(
        Contender(
          name=APPLY_STEP_FLAT,
          framework="jax",
          algorithm="amsgrad",
          description="amsgrad_jax.apply_step(amsgrad_jax.amsgrad(lr, flat_state=True), "
          "grads, state, params)",
          make_tx=lambda lr: amsgrad_jax.amsgrad(lr, flat_state=True),
          apply="apply_step",
        )
      )
  optax_contenders = [
    Contender(OPTAX, "jax", "amsgrad", "optax.amsgrad(lr)", make_tx=optax.amsgrad),
    Contender("optax.adam", "jax", "adam", "optax.adam(lr)", make_tx=optax.adam),
  ]
  torch_contenders = [
    Contender(
      name=f"torch {form}",
      framework="torch",
      algorithm="amsgrad",
      description="torch.optim.Adam(params, lr, amsgrad=True, "
      + ", ".join(f"{key}={value}" for key, value in options.items())
      + ")",
      torch_options=options,
      scaling=form != "single-tensor",
    )
    for form, options in (
      ("fused", {"fused": True}),
      ("foreach", {"foreach": True}),
      ("single-tensor", {"foreach": False}),
    )
  ]
  # The comparisons that matter most race next to each other in every round, so that a
  # change in the machine's load between their processes is least likely.
  default, *other_rules = [c for c in ours if c.apply == "optax"]
  native = [c for c in ours if c.apply == "apply_step"]
  fused, *other_torch = torch_contenders
  optax_amsgrad, optax_adam = optax_contenders
  return [default, optax_amsgrad, *native, fused, optax_adam, *other_rules, *other_torch]


def by_name(name: str) -> Contender:
  """The contender called ``name``."""
  for contender in contenders():
    if contender.name == name:
      return contender
  raise KeyError(f"no contender {name!r}; known: {[c.name for c in contenders()]}")
