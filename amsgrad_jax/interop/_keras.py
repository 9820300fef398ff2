"""Keras 3's ``Adam(amsgrad=True)`` and ``AdamW(amsgrad=True)``: optimizer and state, both ways.

A built Keras optimizer holds, for the ``i``-th variable it was built on, ``_momentums[i]``,
``_velocities[i]`` and ``_velocity_hats[i]`` (AMSGrad's running maximum), and one
``iterations`` counter; the variables are named by their ``path``. Those are ``mu``,
``nu``, ``nu_max`` and ``count`` under ``convention="keras"``. The optimizer is read
through these attributes; Keras itself is never imported here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax

from amsgrad_jax._aliases import amsgrad, amsgradw
from amsgrad_jax.interop import _ported
from amsgrad_jax.interop._clipping import keras_clipnorm, keras_global_clipnorm
from amsgrad_jax.interop._keras_schedules import schedule_from_keras
from amsgrad_jax.interop._state import (
  MOMENTS,
  NamedState,
  cast,
  from_optax,
  marks,
  to_numpy,
  to_optax,
)


def _full_like(example: Any, value: float) -> np.ndarray:
  array = to_numpy(example)
  return np.full(array.shape, value, array.dtype)


def _checked(optimizer: Any, *, built: bool = True) -> Any:
  """``optimizer``, if it is a Keras Adam/AdamW whose state this module can read."""
  kind = type(optimizer).__name__
  if kind not in ("Adam", "AdamW") or not hasattr(optimizer, "iterations"):
    raise TypeError(f"expected keras.optimizers.Adam or AdamW, got {kind}.")
  unsupported = [
    name
    for name in ("use_ema", "gradient_accumulation_steps", "loss_scale_factor")
    if getattr(optimizer, name, None)
  ]
  if unsupported:
    raise ValueError(f"the Keras optimizer uses {unsupported}, which amsgrad_jax does not port.")
  if built and not optimizer.built:
    raise ValueError(
      "the Keras optimizer is not built yet: it builds at its first apply_gradients, or "
      "call optimizer.build(model.trainable_variables)."
    )
  return optimizer


def _variables(optimizer: Any) -> tuple[list[Any], list[str]]:
  variables = list(optimizer._trainable_variables)
  names = [variable.path for variable in variables]
  duplicates = sorted({name for name in names if names.count(name) > 1})
  if duplicates:
    raise ValueError(f"Keras variable paths must be unique to name the state, got {duplicates}.")
  return variables, names


def _hats(optimizer: Any) -> list[Any] | None:
  return list(optimizer._velocity_hats) if getattr(optimizer, "amsgrad", False) else None


def named_state(optimizer: Any, max_from_velocities: bool) -> NamedState:
  """The :class:`NamedState` of a built Keras Adam/AdamW, checked."""
  _checked(optimizer)
  _, names = _variables(optimizer)
  hats = _hats(optimizer)
  if hats is None and not max_from_velocities:
    raise ValueError(
      "the Keras optimizer was built without amsgrad=True: there are no velocity_hats to "
      "continue. Pass max_from_velocities=True to start AMSGrad's running maximum from "
      "the velocities."
    )
  columns = {
    "mu": list(optimizer._momentums),
    "nu": list(optimizer._velocities),
    "nu_max": hats if hats is not None else list(optimizer._velocities),
  }
  moments: dict[str, dict[str, np.ndarray]] = {field: {} for field in MOMENTS}
  for field, column in columns.items():
    for name, slot in zip(names, column, strict=True):
      if slot is None:
        raise ValueError(f"Keras keeps no optimizer state for {name!r} (overwrite_with_gradient).")
      moments[field][name] = to_numpy(slot)
  step = int(to_numpy(optimizer.iterations))
  return NamedState(names=tuple(names), groups=dict.fromkeys(names, 0), steps=(step,), **moments)


def _number_or_none(value: Any) -> float:
  return 0.0 if value is None else _ported.number(value)


def _check_against(tx: Any, optimizer: Any, step: int, *, rates: bool = True) -> None:
  ours = _ported.groups_of(tx)
  if ours is None:
    return
  if len(ours) != 1:
    raise ValueError(f"a Keras optimizer has one parameter group, and tx {len(ours)}.")
  theirs: dict[str, Any] = {
    "b1": _ported.number(optimizer.beta_1),
    "b2": _ported.number(optimizer.beta_2),
    "eps": _ported.number(optimizer.epsilon),
    "weight_decay": _number_or_none(optimizer.weight_decay),
    "decoupled": True,
  }
  if rates:
    theirs["learning_rate"] = _ported.number(optimizer.learning_rate)
  found = _ported.mismatches(ours[0], theirs, "keras", step)
  if found:
    raise ValueError("tx is not the Keras optimizer's: " + "; ".join(found) + ".")


def state_from_keras(
  tx: optax.GradientTransformation,
  optimizer: Any,
  params: optax.Params,
  convert: Callable[[dict[str, Any]], optax.Params],
  *,
  max_from_velocities: bool = False,
) -> optax.OptState:
  r"""The state of ``tx`` that continues a Keras 3 ``Adam``/``AdamW(amsgrad=True)`` run.

  The optimizer's momentums, velocities and velocity hats are ``mu``, ``nu`` and
  ``nu_max`` of :class:`~amsgrad_jax.ScaleByAmsgradState` under ``convention="keras"``,
  and ``iterations`` is ``count``. Each moment goes through ``convert``, the function that
  maps ``{variable.path: array}`` of weights to the JAX parameters; every step counter in
  the state is set to ``iterations``, the rest is ``tx.init(params)``'s.
  Moments that ``tx`` stores in :func:`~amsgrad_jax.blockwise8` are encoded into it
  (``nu_max`` rounded up, never below the framework's; see the porting guide).

  Args:
    tx: the optimizer that continues the run, e.g. :func:`optimizer_from_keras`'s.
    optimizer: the built ``keras.optimizers.Adam`` or ``AdamW``.
    params: the JAX parameters, the weights already converted.
    convert: ``{path: array} -> parameters``, the weights converter, given the variables
      the optimizer was built on.
    max_from_velocities: for an optimizer without ``amsgrad=True``, start AMSGrad's
      running maximum from the velocities (otherwise that is an error).

  Returns:
    A state of ``tx``.

  Raises:
    ValueError: naming the problem, for an optimizer that is not built or not AMSGrad, a
      variable missing, extra or of another shape after ``convert``, or (when ``tx`` is
      :func:`optimizer_from_keras`'s) hyperparameters that differ. Nothing is changed.

  Examples:
    >>> import amsgrad_jax
    >>> from amsgrad_jax import interop
    >>> tx = amsgrad_jax.amsgrad(1e-3, eps=1e-7, convention="keras")
    >>> opt_state = interop.state_from_keras(tx, optimizer, params, convert)  # doctest: +SKIP
  """
  named = named_state(optimizer, max_from_velocities)
  _check_against(tx, optimizer, named.steps[0])
  return to_optax(tx, params, convert, named, _full_like, "Keras")


def state_to_keras(
  tx: optax.GradientTransformation,
  opt_state: optax.OptState,
  optimizer: Any,
  convert_back: Callable[[optax.Params], Mapping[str, Any]],
) -> dict[str, np.ndarray]:
  r"""The values of a Keras ``Adam``/``AdamW``'s variables that continue ``tx``'s run.

  The inverse of :func:`state_from_keras`: ``count``, ``mu``, ``nu`` and ``nu_max``
  become ``iterations`` and each variable's momentum, velocity and velocity hat, laid out
  by ``convert_back`` (``parameters -> {variable.path: array}``). The result is what Keras
  saves for an optimizer, ``{"0": value, "1": value, ...}`` in the order of
  ``optimizer.variables``; ``optimizer.load_own_variables(result)`` loads it. The
  optimizer's other variables (a constant learning rate) keep their values.

  Args:
    tx: the optimizer ``opt_state`` belongs to.
    opt_state: its state.
    optimizer: the built Keras ``Adam`` or ``AdamW(amsgrad=True)`` that will continue.
    convert_back: ``parameters -> {path: array}``, the weights converter back.

  Returns:
    ``{str(i): NumPy array}`` for every variable of ``optimizer``.

  Raises:
    ValueError: naming the problem, for names or shapes that do not match the
      optimizer's variables, an optimizer without ``amsgrad=True``, several parameter
      groups, or hyperparameters that are not ``tx``'s. Nothing is changed.

  Examples:
    >>> from amsgrad_jax import interop
    >>> store = interop.state_to_keras(tx, opt_state, optimizer, convert_back)  # doctest: +SKIP
    >>> optimizer.load_own_variables(store)  # doctest: +SKIP
  """
  _checked(optimizer)
  named = from_optax(tx, opt_state, convert_back)
  if len(named.steps) != 1:
    raise ValueError(f"opt_state has {len(named.steps)} parameter groups; a Keras optimizer one.")
  hats = _hats(optimizer)
  if hats is None:
    raise ValueError(
      "the Keras optimizer was built without amsgrad=True: it has nowhere to keep nu_max."
    )
  _, names = _variables(optimizer)
  missing, extra = sorted(set(names) - set(named.names)), sorted(set(named.names) - set(names))
  if missing or extra:
    raise ValueError(
      f"convert_back gives the names {sorted(named.names)}; the Keras optimizer has the "
      f"variables {names} (missing from convert_back: {missing}; not in the optimizer: {extra})."
    )
  step = named.steps[0]
  _check_against(tx, optimizer, step, rates=False)
  roles = {}
  for field, column in (
    ("mu", optimizer._momentums),
    ("nu", optimizer._velocities),
    ("nu_max", hats),
  ):
    for variable, name in zip(column, names, strict=True):
      roles[id(variable)] = (field, name)
  values = {}
  for index, variable in enumerate(optimizer.variables):
    dtype = np.dtype(variable.dtype)
    if variable is optimizer.iterations:
      if step > np.iinfo(dtype).max:
        raise ValueError(f"step {step} does not fit Keras' {dtype} iterations.")
      values[str(index)] = np.asarray(step, dtype)
    elif id(variable) in roles:
      field, name = roles[id(variable)]
      array = to_numpy(getattr(named, field)[name])
      if array.shape != tuple(variable.shape):
        raise ValueError(
          f"the {field} of {name!r} has shape {array.shape} after convert_back, and the "
          f"variable has shape {tuple(variable.shape)}."
        )
      values[str(index)] = cast(array, dtype, round_up=field == "nu_max")
    else:
      values[str(index)] = to_numpy(variable)
  return values


def optimizer_from_keras(
  optimizer: Any,
  params: optax.Params,
  convert: Callable[[dict[str, Any]], optax.Params],
  *,
  mu_dtype: Any = None,
  nu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The amsgrad_jax optimizer of a Keras 3 ``Adam``/``AdamW(amsgrad=True)``.

  :func:`~amsgrad_jax.amsgrad` with ``convention="keras"``, or
  :func:`~amsgrad_jax.amsgradw` when the optimizer has a ``weight_decay`` (Keras' decay is
  decoupled, scaled by the learning rate), masked like ``exclude_from_weight_decay``; its
  ``learning_rate`` (a float or a schedule, see :func:`schedule_from_keras`),
  ``beta_1``, ``beta_2`` and ``epsilon``; and in front, its clipping: ``clipnorm``
  (:func:`keras_clipnorm`), ``global_clipnorm`` (:func:`keras_global_clipnorm`) or
  ``clipvalue`` (:func:`optax.clip`, the same operation).

  Args:
    optimizer: a ``keras.optimizers.Adam`` or ``AdamW``; built, when it decays weights
      (the mask is read from its variables).
    params: the JAX parameters.
    convert: ``{path: array} -> parameters``, the weights converter.
    mu_dtype: how JAX stores the moments (see :func:`~amsgrad_jax.amsgrad`), for
      example :func:`~amsgrad_jax.blockwise8` for 8-bit state; the Keras optimizer's float
      state converts into it (:func:`state_from_keras`).
    nu_dtype: the same for ``nu`` and ``nu_max``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; its ``groups`` attribute holds the
    options of its one group.

  Raises:
    ValueError: for a learning rate or beta given as a function, or an optimizer option
      amsgrad_jax does not port (EMA, gradient accumulation, loss scaling).

  Examples:
    >>> import keras  # doctest: +SKIP
    >>> from amsgrad_jax import interop
    >>> optimizer = keras.optimizers.Adam(1e-3, amsgrad=True, global_clipnorm=1.0)  # doctest: +SKIP
    >>> tx = interop.optimizer_from_keras(optimizer, params, convert)  # doctest: +SKIP
  """
  _checked(optimizer, built=False)
  rate = optimizer._learning_rate
  if hasattr(rate, "get_config") and not hasattr(rate, "assign"):
    learning_rate: Any = schedule_from_keras(rate)
  elif hasattr(rate, "assign"):  # a Keras variable holding a constant rate
    learning_rate = _ported.number(rate)
  else:
    raise ValueError("the Keras learning rate is a function: write it as an Optax schedule.")
  b1, b2, eps = (_hyperparameter(optimizer, name) for name in ("beta_1", "beta_2", "epsilon"))
  front: list[optax.GradientTransformation] = []
  if optimizer.clipnorm:
    front.append(keras_clipnorm(optimizer.clipnorm))
  elif optimizer.global_clipnorm:
    front.append(keras_global_clipnorm(optimizer.global_clipnorm))
  elif optimizer.clipvalue:
    front.append(optax.clip(optimizer.clipvalue))
  if optimizer.weight_decay is None:
    tx = amsgrad(
      learning_rate, b1, b2, eps, convention="keras", mu_dtype=mu_dtype, nu_dtype=nu_dtype
    )
  else:
    mask = _decay_mask(optimizer, params, convert)
    weight_decay = _ported.number(optimizer.weight_decay)
    tx = amsgradw(
      learning_rate,
      b1,
      b2,
      eps,
      0.0,
      weight_decay,
      mask=mask,
      convention="keras",
      mu_dtype=mu_dtype,
      nu_dtype=nu_dtype,
    )
  return _ported.build([tx], None, front)


def _hyperparameter(optimizer: Any, name: str) -> float:
  value = getattr(optimizer, name)
  if callable(value):
    raise ValueError(f"the Keras {name} is a function; amsgrad_jax takes a number.")
  return _ported.number(value)


def _decay_mask(optimizer: Any, params: Any, convert: Callable[[dict[str, Any]], Any]) -> Any:
  """``None`` when every variable decays, else a tree of booleans shaped like ``params``."""
  _checked(optimizer)
  variables, names = _variables(optimizer)
  decays = {
    name: bool(optimizer._use_weight_decay(v)) for v, name in zip(variables, names, strict=True)
  }
  if all(decays.values()):
    return None
  examples = {name: to_numpy(v) for v, name in zip(variables, names, strict=True)}
  values = {name: float(decays[name]) for name in names}
  numbers = marks(convert, examples, values, params, _full_like, "weight-decay flag")
  return jax.tree.unflatten(jax.tree.structure(params), [n != 0.0 for n in numbers])
