"""Keras 3's learning-rate schedules as Optax schedules.

A Keras optimizer evaluates its schedule at ``iterations``, the number of updates done
so far, as Optax does with its count, so the schedules here take the same argument. Each
one performs Keras' own operations in Keras' order, in JAX's default float (float64
under ``jax_enable_x64``; Keras computes in ``keras.config.floatx()``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from amsgrad_jax.interop._torch_schedules import _positive, _steps


def keras_exponential_decay(
  initial_learning_rate: float, decay_steps: int, decay_rate: float, staircase: bool = False
) -> optax.Schedule:
  r"""``keras.optimizers.schedules.ExponentialDecay``.

  .. math::

    \eta_n = \eta_0 \, r^{n / s} \quad (\text{or } r^{\lfloor n / s \rfloor} \text{ with staircase})

  :func:`optax.exponential_decay` is the same expression, but divides Optax's int32 count
  in float32; this schedule counts in JAX's default float, as Keras counts in its own.

  Args:
    initial_learning_rate: the rate at step 0.
    decay_steps: :math:`s`, ``> 0``.
    decay_rate: :math:`r`.
    staircase: decay in whole periods of ``decay_steps``.

  Returns:
    An Optax schedule, ``count -> rate``.

  Examples:
    >>> from amsgrad_jax import interop
    >>> schedule = interop.keras_exponential_decay(1.0, decay_steps=2,
    ...                                            decay_rate=0.25)
    >>> [float(schedule(n)) for n in range(3)]
    [1.0, 0.5, 0.25]
  """
  _positive("decay_steps", decay_steps)

  def schedule(count: Any) -> jax.Array:
    p = _steps(count) / decay_steps
    return initial_learning_rate * decay_rate ** (jnp.floor(p) if staircase else p)

  return schedule


def keras_cosine_decay(
  initial_learning_rate: float,
  decay_steps: int,
  alpha: float = 0.0,
  warmup_target: float | None = None,
  warmup_steps: int = 0,
) -> optax.Schedule:
  r"""``keras.optimizers.schedules.CosineDecay``, with its optional linear warmup.

  Without ``warmup_target``, the rate decays from ``initial_learning_rate`` as

  .. math::

    \eta_n = \eta_0 \left((1 - \alpha)\,\tfrac12\left(1 + \cos\frac{\pi \min(n, S)}{S}\right) + \alpha\right);

  with it, the rate first rises linearly from ``initial_learning_rate`` to
  ``warmup_target`` over ``warmup_steps`` steps, and then decays from ``warmup_target``
  the same way over the next ``decay_steps``. Unlike
  :func:`optax.warmup_cosine_decay_schedule`, ``decay_steps`` counts after the warmup and
  ``alpha`` is a fraction of the peak. Keras computes the cosine factor in float32 even
  when its float type is float64 (``keras.ops.cos`` caps its result type at 32 bits), and
  so does this schedule: it gives the rates Keras trains with.

  Args:
    initial_learning_rate: the rate at step 0.
    decay_steps: :math:`S`, the length of the decay, ``> 0``.
    alpha: the last rate as a fraction of the rate the decay starts from.
    warmup_target: the rate the warmup ends at, or ``None`` for no warmup.
    warmup_steps: the length of the warmup.

  Returns:
    An Optax schedule, ``count -> rate``.

  Examples:
    >>> from amsgrad_jax import interop
    >>> schedule = interop.keras_cosine_decay(0.0, 2, warmup_target=1.0,
    ...                                       warmup_steps=2)
    >>> [round(float(schedule(n)), 6) for n in range(5)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
  """
  _positive("decay_steps", decay_steps)

  def decayed(step: jax.Array) -> jax.Array:
    # Keras' ops.cos computes in float32 whatever its input (its result types stop at 32
    # bits), and the factor stays float32 until it multiplies the rate.
    angle = (math.pi * (step / decay_steps)).astype(jnp.float32)
    return (1 - alpha) * (0.5 * (1.0 + jnp.cos(angle))) + alpha

  def schedule(count: Any) -> jax.Array:
    step = _steps(count)
    if warmup_target is None:
      # Keras' initial rate is a weakly typed tensor here, so the product is float32.
      rate = jnp.float32(initial_learning_rate) * decayed(jnp.minimum(step, decay_steps))
      return rate.astype(step.dtype)
    step = jnp.minimum(step, decay_steps + warmup_steps)
    warmup = (warmup_target - initial_learning_rate) * (step / warmup_steps) + initial_learning_rate
    decay = warmup_target * decayed(step - warmup_steps).astype(step.dtype)
    return jnp.where(step < warmup_steps, warmup, decay)

  return schedule


def keras_piecewise_constant_decay(
  boundaries: Sequence[float], values: Sequence[float]
) -> optax.Schedule:
  r"""``keras.optimizers.schedules.PiecewiseConstantDecay``.

  ``values[0]`` while ``n <= boundaries[0]``, ``values[i]`` while
  ``boundaries[i-1] < n <= boundaries[i]``, and ``values[-1]`` after the last boundary.
  (:func:`optax.piecewise_constant_schedule` takes scales, not values.)

  Args:
    boundaries: increasing step counts.
    values: one more value than boundaries.

  Returns:
    An Optax schedule, ``count -> rate``.

  Examples:
    >>> from amsgrad_jax import interop
    >>> schedule = interop.keras_piecewise_constant_decay([1, 3], [1.0, 0.5, 0.25])
    >>> [float(schedule(n)) for n in range(5)]
    [1.0, 1.0, 0.5, 0.5, 0.25]
  """
  if len(values) != len(boundaries) + 1:
    raise ValueError(
      f"values must have one more entry than boundaries, got {len(values)} values and "
      f"{len(boundaries)} boundaries."
    )
  if list(boundaries) != sorted(boundaries):
    raise ValueError(f"boundaries must increase, got {list(boundaries)}.")

  def schedule(count: Any) -> jax.Array:
    step = _steps(count)
    bounds, table = jnp.asarray(boundaries, step.dtype), jnp.asarray(values, step.dtype)
    return table[jnp.searchsorted(bounds, step, side="left")]

  return schedule


def schedule_from_keras(schedule: Any) -> optax.Schedule:
  """The Optax schedule of a Keras ``LearningRateSchedule``.

  Reads an ``ExponentialDecay``, ``CosineDecay`` or ``PiecewiseConstantDecay`` through
  its ``get_config()``.

  Args:
    schedule: a ``keras.optimizers.schedules`` object.

  Returns:
    An Optax schedule, ``count -> rate``, equal to ``schedule(iterations)``.

  Raises:
    ValueError: for a schedule of another kind.

  Examples:
    >>> import keras  # doctest: +SKIP
    >>> from amsgrad_jax import interop
    >>> theirs = keras.optimizers.schedules.CosineDecay(1e-3, 1000)  # doctest: +SKIP
    >>> ours = interop.schedule_from_keras(theirs)  # doctest: +SKIP
  """
  kind, config = type(schedule).__name__, schedule.get_config()
  config.pop("name", None)
  builders: dict[str, Callable[..., optax.Schedule]] = {
    "ExponentialDecay": keras_exponential_decay,
    "CosineDecay": keras_cosine_decay,
    "PiecewiseConstantDecay": keras_piecewise_constant_decay,
  }
  if kind not in builders:
    raise ValueError(
      f"schedule_from_keras reads {', '.join(builders)}, not {kind}: write it as an Optax "
      "schedule of the optimizer's step count."
    )
  return builders[kind](**config)
