"""Argument and input checks.

Hyperparameters are checked at construction, but only where they are concrete:
under ``optax.inject_hyperparams`` and ``jax.jit`` they arrive as tracers, and a
traced value cannot be compared to a bound without stopping the trace.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from amsgrad_jax._blockwise import Blockwise8
from amsgrad_jax._rounding import ROUNDING_MODES
from amsgrad_jax._rules import CONVENTIONS, RULES


def concrete_values(name: str, value: Any, accepted: str) -> np.ndarray | None:
  """A numeric hyperparameter as a float64 NumPy array, or ``None`` when it is traced.

  Python numbers, NumPy scalars and arrays and concrete JAX arrays are read; a value of
  any other kind (a string, ``None``, a bool, a complex number) raises ``ValueError``
  whose message names ``name`` and the ``accepted`` range, since it would otherwise
  fail, or silently mean something else, deep inside the first update.
  """
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    array = np.asarray(value)
  except jax.errors.ConcretizationTypeError:
    return None
  except (TypeError, ValueError) as error:
    raise ValueError(f"{name} must be a real number {accepted}, got {value!r}.") from error
  is_real = jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype, jnp.integer)
  if not is_real:
    raise ValueError(
      f"{name} must be a real number {accepted}, got {value!r} of type {type(value).__name__}."
    )
  return array.astype(np.float64)


def check_in_interval(name: str, value: Any, low: float, high: float, *, high_open: bool) -> None:
  """Raise ``ValueError`` unless ``low <= value < high`` (or ``<= high``) everywhere.

  A concrete array is checked elementwise; a traced value is not checked.
  """
  interval = f"[{low:g}, {high:g})" if high_open else f"[{low:g}, {high:g}]"
  values = concrete_values(name, value, f"in {interval}")
  if values is None:
    return
  below_high = values < high if high_open else values <= high
  if not np.all((values >= low) & below_high):  # NaN fails both comparisons
    raise ValueError(f"{name} must be in {interval}, got {value!r}.")


def check_non_negative(name: str, value: Any) -> None:
  """Raise ``ValueError`` unless ``value`` is finite and ``>= 0`` (when concrete)."""
  values = concrete_values(name, value, ">= 0")
  if values is None:
    return
  if not np.all(np.isfinite(values) & (values >= 0.0)):
    raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")


def check_convention(convention: Any) -> str:
  """Return ``convention`` if it names a rule, else raise ``ValueError``."""
  if not isinstance(convention, str) or convention not in CONVENTIONS:
    names = ", ".join(repr(name) for name in CONVENTIONS)
    raise ValueError(f"convention must be one of {names}; got {convention!r}.")
  return convention


def check_hyperparameters(*, b1: Any, b2: Any, eps: Any, eps_root: Any, convention: Any) -> str:
  """Check the hyperparameters of :func:`scale_by_amsgrad`; return the convention."""
  check_in_interval("b1", b1, 0.0, 1.0, high_open=True)
  check_in_interval("b2", b2, 0.0, 1.0, high_open=True)
  check_non_negative("eps", eps)
  check_non_negative("eps_root", eps_root)
  convention = check_convention(convention)
  if not RULES[convention].bias_correction_from_double:
    check_below_one_in_float32("b1", b1, convention)
    check_below_one_in_float32("b2", b2, convention)
  return convention


def check_below_one_in_float32(name: str, value: Any, convention: str) -> None:
  """Raise ``ValueError`` when a concrete ``b`` in ``[0, 1)`` rounds to 1.0 in float32.

  The keras and optax rules raise ``b`` to the power ``t`` after rounding it to the
  arithmetic's dtype, at least float32, as those frameworks do. Above ``1 - 2**-25``
  that rounding gives 1.0, so ``1 - b**t`` is 0 and the step divides by zero.
  """
  values = concrete_values(name, value, "in [0, 1)")
  if values is not None and np.any(values.astype(np.float32) == 1.0):
    raise ValueError(
      f"{name} must be in [0, 1) after rounding to float32 for convention={convention!r}, "
      f"which forms 1 - {name}**t in float32: {value!r} rounds to 1.0 there (use at most "
      f"{float(np.nextafter(np.float32(1.0), np.float32(0.0))):.9g}, or convention='pytorch', "
      "which forms it in double precision)."
    )


def check_learning_rate(learning_rate: Any) -> None:
  """A float learning rate must be ``>= 0``; a schedule is checked by Optax's use of it."""
  if callable(learning_rate):
    return
  check_non_negative("learning_rate", learning_rate)


def check_weight_decay(weight_decay: Any) -> None:
  """A float weight decay must be ``>= 0``; Optax also takes a schedule, left unchecked."""
  if callable(weight_decay):
    return
  check_non_negative("weight_decay", weight_decay)


def check_initialised(state: Any, what: str) -> None:
  """Raise ``ValueError`` when ``state`` is ``None``: an update before ``init``."""
  if state is None:
    raise ValueError(
      f"{what} got opt_state=None: build the state first with state = tx.init(params), "
      "then pass it to every update."
    )


def check_flag(name: str, value: Any) -> None:
  """Raise ``TypeError`` unless ``value`` is a ``bool`` (a switch chosen at construction)."""
  if not isinstance(value, bool | np.bool_):
    raise TypeError(f"{name} must be True or False, got {value!r}.")


def canonical_state_dtype(name: str, dtype: Any) -> Any:
  """``dtype`` as a floating or complex numpy dtype, or ``None`` for "like the parameter",
  or a :class:`~amsgrad_jax.Blockwise8` format as given."""
  if dtype is None or isinstance(dtype, Blockwise8):
    return dtype
  if isinstance(dtype, np.ndarray | jax.Array):
    raise ValueError(
      f"{name} got an array ({dtype.dtype}{list(dtype.shape)}), not a dtype. Under "
      f"optax.inject_hyperparams a scalar type such as jnp.bfloat16 is callable and is "
      f"called as a schedule: pass jnp.dtype('{dtype.dtype.name}'), or name {name} in "
      "static_args."
    )
  try:
    canonical = jnp.dtype(dtype)
  except TypeError as error:
    raise ValueError(
      f"{name} must be a floating dtype, blockwise8() or None, got {dtype!r}."
    ) from error
  if not jnp.issubdtype(canonical, jnp.inexact):
    raise ValueError(f"{name} must be a floating dtype, blockwise8() or None, got {canonical}.")
  return canonical


def check_float_leaves(tree: Any, what: str) -> None:
  """Raise ``TypeError`` naming the first leaf of ``tree`` that is not floating or complex."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    where = jax.tree_util.keystr(path) or "(root)"
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
      try:
        dtype = jnp.result_type(leaf)  # a Python scalar gets the dtype JAX would give it
      except TypeError as error:
        raise TypeError(
          f"amsgrad_jax needs arrays of floating or complex {what}, but the leaf at "
          f"{where} is {leaf!r} of type {type(leaf).__name__}."
        ) from error
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
        f"amsgrad_jax needs floating or complex {what}, but the leaf at {where} has dtype "
        f"{dtype}. Keep integer and boolean leaves out of the optimizer, e.g. with optax.masked."
      )


def _paths(tree: Any) -> list[str]:
  return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def check_same_structure(
  updates: Any, state_like: Any, *, against: str = "optimizer state"
) -> None:
  """Raise ``ValueError`` naming the difference when ``updates`` does not match ``state_like``.

  ``against`` names what ``state_like`` is in the message: the optimizer state, or the
  parameters (for a weight decay that maps over gradients and parameters together).
  """
  updates_def: Any = jax.tree.structure(updates)
  state_def: Any = jax.tree.structure(state_like)
  if updates_def == state_def:
    _check_same_shapes(updates, state_like, against)
    return
  update_paths, state_paths = _paths(updates), _paths(state_like)
  missing = [p for p in state_paths if p not in set(update_paths)]
  extra = [p for p in update_paths if p not in set(state_paths)]
  detail = []
  if missing:
    detail.append(f"missing from the gradients: {_short(missing)}")
  if extra:
    detail.append(f"not in the {against}: {_short(extra)}")
  if not detail:
    detail.append(f"gradients are {updates_def}, {against} is {state_def}")
  hint = " (was the state built with init on these parameters?)" if "state" in against else ""
  raise ValueError(
    f"The gradient tree does not match the {against}{hint}: " + "; ".join(detail) + "."
  )


def _check_same_shapes(updates: Any, state_like: Any, against: str) -> None:
  for (path, update), state_leaf in zip(
    jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(state_like), strict=True
  ):
    if np.shape(update) != np.shape(state_leaf):
      raise ValueError(
        f"The gradient at {jax.tree_util.keystr(path) or '(root)'} has shape "
        f"{np.shape(update)}, but the {against} there {'have' if against.endswith('s') else 'has'} "
        f"shape {np.shape(state_leaf)}."
      )


def _short(items: Iterable[str], limit: int = 5) -> str:
  items = list(items)
  shown = ", ".join(items[:limit])
  return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_rounding(mode: Any, name: str) -> None:
  """Raise ``ValueError`` for an unknown rounding mode (``param_rounding``,
  ``state_rounding``)."""
  if mode not in ROUNDING_MODES:
    raise ValueError(f'{name} must be "nearest" or "stochastic", got {mode!r}.')


def check_seed(seed: Any) -> None:
  """Raise ``ValueError`` for a ``rounding_seed`` that is not a uint32 (an array from
  ``optax.inject_hyperparams`` is accepted)."""
  if hasattr(seed, "dtype") and np.shape(seed) == () and jnp.issubdtype(seed.dtype, jnp.integer):
    if isinstance(seed, jax.core.Tracer):
      return  # injected by optax.inject_hyperparams
    seed = int(seed)
  if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**32:
    raise ValueError(f"rounding_seed must be an integer in [0, 2**32), got {seed!r}.")
