"""PyTorch's learning-rate schedulers as Optax schedules, stepped once per optimizer step.

A PyTorch scheduler stepped after every ``optimizer.step()`` has stepped ``n`` times when
the optimizer takes its step ``n + 1``; an Optax schedule is evaluated at the number of
updates done so far, also ``n``. So ``schedule(n)`` here is ``param_groups[g]["lr"]``
after ``n`` calls of ``scheduler.step()``.

Stepped one at a time, PyTorch's schedulers compute the next rate from the current one
(``get_lr``, a recursion in Python floats); the schedules here are the closed forms the
recursions follow, which PyTorch itself uses when it is given an epoch
(``_get_closed_form_lr``). The two agree to within a few float64 roundings over
thousands of steps (``tests/test_framework_schedules.py`` measures it against the real
schedulers). Optax's own schedules of the same shapes differ in the last bits or more
(each docstring says how); ``SequentialLR`` is :func:`optax.join_schedules`, reused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax


def _steps(count: Any) -> jax.Array:
  """``count`` as a float in JAX's default precision (float64 under ``jax_enable_x64``)."""
  return jnp.asarray(count).astype(jax.dtypes.canonicalize_dtype(jnp.float64))


def _positive(name: str, value: float) -> None:
  if not value > 0:
    raise ValueError(f"{name} must be > 0, got {value!r}.")


def torch_step_lr(learning_rate: float, step_size: int, gamma: float = 0.1) -> optax.Schedule:
  r"""``torch.optim.lr_scheduler.StepLR``: the rate times ``gamma`` every ``step_size`` steps.

  .. math::

    \eta_n = \eta_0 \, \gamma^{\lfloor n / \text{step\_size} \rfloor}

  :func:`optax.exponential_decay` with ``staircase=True`` is the same expression, but it
  divides Optax's int32 count in float32, which moves the rate by about 1e-7 even under
  ``jax_enable_x64``; this schedule counts in JAX's default float.

  Args:
    learning_rate: the rate before the first decay, PyTorch's ``lr`` (``base_lrs``).
    step_size: steps between two decays, ``> 0``.
    gamma: the factor of each decay.

  Returns:
    An Optax schedule, ``count -> rate``.

  Examples:
    >>> from amsgrad_jax import interop
    >>> schedule = interop.torch_step_lr(0.1, step_size=30, gamma=0.5)
    >>> [round(float(schedule(n)), 6) for n in (0, 29, 30, 60)]
    [0.1, 0.1, 0.05, 0.025]
  """
  _positive("step_size", step_size)

  def schedule(count: Any) -> jax.Array:
    return learning_rate * gamma ** jnp.floor(_steps(count) / step_size)

  return schedule


def torch_multistep_lr(
  learning_rate: float, milestones: Sequence[int], gamma: float = 0.1
) -> optax.Schedule:
  r"""``torch.optim.lr_scheduler.MultiStepLR``: the rate times ``gamma`` at each milestone.

  .. math::

    \eta_n = \eta_0 \, \gamma^{\#\{m \in \text{milestones} : m \le n\}}

  A milestone listed twice decays twice, as in PyTorch. (:func:`optax.piecewise_constant_schedule`
  switches one step later, at ``count > boundary``.)

  Args:
    learning_rate: the rate before the first milestone.
    milestones: the steps at which the rate decays.
    gamma: the factor of each decay.

  Returns:
    An Optax schedule, ``count -> rate``.

  Examples:
    >>> from amsgrad_jax import interop
    >>> schedule = interop.torch_multistep_lr(1.0, milestones=[2, 4], gamma=0.5)
    >>> [float(schedule(n)) for n in range(6)]
    [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
  """
  bounds = jnp.asarray(sorted(int(m) for m in milestones), jnp.int32)

  def schedule(count: Any) -> jax.Array:
    passed = jnp.searchsorted(bounds, jnp.asarray(count), side="right")
    return learning_rate * gamma ** passed.astype(_steps(0).dtype)

  return schedule


def torch_exponential_lr(learning_rate: float, gamma: float) -> optax.Schedule:
  r"""``torch.optim.lr_scheduler.ExponentialLR``: the rate times ``gamma`` at every step.

  .. math::

    \eta_n = \eta_0 \, \gamma^{n}

  (:func:`optax.exponential_decay` with ``transition_steps=1`` is the same expression,
  with its count divided in float32.)

  Args:
    learning_rate: the rate at the first step.
    gamma: the factor per step.

  Returns:
    An Optax schedule, ``count -> rate``.

  Examples:
    >>> from amsgrad_jax import interop
    >>> schedule = interop.torch_exponential_lr(1.0, gamma=0.5)
    >>> [float(schedule(n)) for n in range(4)]
    [1.0, 0.5, 0.25, 0.125]
  """

  def schedule(count: Any) -> jax.Array:
    return learning_rate * gamma ** _steps(count)

  return schedule


def torch_cosine_annealing_lr(
  learning_rate: float, T_max: int, eta_min: float = 0.0
) -> optax.Schedule:
  r"""``torch.optim.lr_scheduler.CosineAnnealingLR``, including what it does after ``T_max``.

  .. math::

    \eta_n = \eta_{\min} + \frac{\eta_0 - \eta_{\min}}{2}
      \left(1 + \cos\frac{\pi n}{T_{\max}}\right)

  Past ``T_max`` PyTorch's rate rises again along the same cosine (period
  ``2 * T_max``), and so does this one. :func:`optax.cosine_decay_schedule` stays at
  its end value instead.

  Args:
    learning_rate: the rate at the first step.
    T_max: steps from the first rate down to ``eta_min``, ``> 0``.
    eta_min: the lowest rate.

  Returns:
    An Optax schedule, ``count -> rate``.

  Examples:
    >>> from amsgrad_jax import interop
    >>> schedule = interop.torch_cosine_annealing_lr(1.0, T_max=4)
    >>> [round(float(schedule(n)), 4) for n in range(6)]
    [1.0, 0.8536, 0.5, 0.1464, 0.0, 0.1464]
  """
  _positive("T_max", T_max)

  def schedule(count: Any) -> jax.Array:
    return eta_min + (learning_rate - eta_min) * (1 + jnp.cos(math.pi * _steps(count) / T_max)) / 2

  return schedule


def torch_linear_lr(
  learning_rate: float,
  start_factor: float = 1.0 / 3,
  end_factor: float = 1.0,
  total_iters: int = 5,
) -> optax.Schedule:
  r"""``torch.optim.lr_scheduler.LinearLR``: a factor going linearly from one value to another.

  .. math::

    \eta_n = \eta_0 \left(s + (e - s)\,\frac{\min(n, T)}{T}\right)

  with :math:`s` = ``start_factor``, :math:`e` = ``end_factor``, :math:`T` =
  ``total_iters``; the usual warmup is ``start_factor`` small and ``end_factor=1``.

  Args:
    learning_rate: the rate the factors multiply, PyTorch's ``lr``.
    start_factor: the factor at the first step, in ``(0, 1]``.
    end_factor: the factor from step ``total_iters`` on, in ``[0, 1]``.
    total_iters: steps from ``start_factor`` to ``end_factor``, ``> 0``.

  Returns:
    An Optax schedule, ``count -> rate``.

  Examples:
    >>> from amsgrad_jax import interop
    >>> schedule = interop.torch_linear_lr(1.0, start_factor=0.25, total_iters=3)
    >>> [float(schedule(n)) for n in range(5)]
    [0.25, 0.5, 0.75, 1.0, 1.0]
  """
  if not 0 < start_factor <= 1 or not 0 <= end_factor <= 1:
    raise ValueError(
      f"start_factor must be in (0, 1] and end_factor in [0, 1], as PyTorch requires; "
      f"got {start_factor!r} and {end_factor!r}."
    )
  _positive("total_iters", total_iters)

  def schedule(count: Any) -> jax.Array:
    done = jnp.minimum(_steps(count), total_iters)
    return learning_rate * (start_factor + (end_factor - start_factor) * done / total_iters)

  return schedule


Phase = tuple[float, float, float]  # (last step of the phase, value at its start, at its end)


def _one_cycle_phases(
  total_steps: int, pct_start: float, three_phase: bool, values: tuple[float, float, float]
) -> list[Phase]:
  """PyTorch's phases of a cycle through ``values = (first, peak, last)``."""
  _positive("total_steps", total_steps)
  if not 0 <= pct_start <= 1:
    raise ValueError(f"pct_start must be in [0, 1], got {pct_start!r}.")
  first, peak, last = values
  rise_end = float(pct_start * total_steps) - 1
  if three_phase:
    fall_end = float(2 * pct_start * total_steps) - 2
    return [(rise_end, first, peak), (fall_end, peak, first), (total_steps - 1, first, last)]
  return [(rise_end, first, peak), (total_steps - 1, peak, last)]


def _one_cycle(phases: list[Phase], anneal_strategy: str) -> optax.Schedule:
  """OneCycleLR's ``get_lr`` for one quantity: within each phase, from its start value to
  its end value, by half a cosine or by a line."""
  if anneal_strategy not in ("cos", "linear"):
    raise ValueError(f'anneal_strategy must be "cos" or "linear", got {anneal_strategy!r}.')

  def anneal(start: float, end: float, pct: jax.Array) -> jax.Array:
    if anneal_strategy == "cos":
      return end + (start - end) / 2.0 * (jnp.cos(math.pi * pct) + 1)
    return (end - start) * pct + start

  def schedule(count: Any) -> jax.Array:
    step = _steps(count)
    result = jnp.zeros_like(step)
    decided = jnp.zeros(step.shape, bool)
    start_step = 0.0
    for index, (end_step, start, end) in enumerate(phases):
      here = ~decided & ((step <= end_step) | (index == len(phases) - 1))
      # PyTorch divides by zero in an empty phase only when a step falls in it; where()
      # keeps the quotient of a phase no step is in out of the result.
      span = end_step - start_step
      pct = (step - start_step) / (span if span != 0 else 1.0)
      result = jnp.where(here, anneal(start, end, pct), result)
      decided = decided | here
      start_step = end_step
    return result

  return schedule


def torch_one_cycle_lr(
  max_lr: float,
  total_steps: int,
  *,
  pct_start: float = 0.3,
  anneal_strategy: Literal["cos", "linear"] = "cos",
  div_factor: float = 25.0,
  final_div_factor: float = 1e4,
  three_phase: bool = False,
) -> optax.Schedule:
  r"""``torch.optim.lr_scheduler.OneCycleLR``'s learning rate.

  From ``max_lr / div_factor`` up to ``max_lr`` over the first ``pct_start * total_steps
  - 1`` steps, then down to ``max_lr / div_factor / final_div_factor`` at step
  ``total_steps - 1`` (by half a cosine, or linearly), with PyTorch's phase boundaries:
  :func:`optax.cosine_onecycle_schedule` puts them one step later. PyTorch raises after
  ``total_steps``; this schedule follows its last phase on. With ``cycle_momentum=True``
  (PyTorch's default) the scheduler also cycles Adam's ``beta1``: see
  :func:`torch_one_cycle_momentum`.

  Args:
    max_lr: the peak rate.
    total_steps: the length of the cycle in steps.
    pct_start: the fraction of the cycle spent rising.
    anneal_strategy: ``"cos"`` or ``"linear"``.
    div_factor: the first rate is ``max_lr / div_factor``.
    final_div_factor: the last rate is the first over ``final_div_factor``.
    three_phase: PyTorch's third phase: up, back down to the first rate, then to the last.

  Returns:
    An Optax schedule, ``count -> rate``.

  Examples:
    >>> from amsgrad_jax import interop
    >>> schedule = interop.torch_one_cycle_lr(
    ...   1.0, total_steps=10, anneal_strategy="linear"
    ... )
    >>> [round(float(schedule(n)), 4) for n in (0, 2, 9)]
    [0.04, 1.0, 0.0]
  """
  initial = max_lr / div_factor
  values = (initial, max_lr, initial / final_div_factor)
  return _one_cycle(_one_cycle_phases(total_steps, pct_start, three_phase, values), anneal_strategy)


def torch_one_cycle_momentum(
  total_steps: int,
  *,
  pct_start: float = 0.3,
  anneal_strategy: Literal["cos", "linear"] = "cos",
  base_momentum: float = 0.85,
  max_momentum: float = 0.95,
  three_phase: bool = False,
) -> optax.Schedule:
  r"""The ``beta1`` that ``torch.optim.lr_scheduler.OneCycleLR(cycle_momentum=True)`` sets.

  The momentum moves against the learning rate: from ``max_momentum`` down to
  ``base_momentum`` while the rate rises, and back up while it falls. PyTorch's Adam
  computes its bias correction :math:`1 - \beta_1^t` with the current ``beta1``, as
  :func:`~amsgrad_jax.scale_by_amsgrad` does with a traced ``b1``, so
  ``optax.inject_hyperparams(amsgrad_jax.amsgrad)(learning_rate=..., b1=this)`` follows
  the scheduler step for step.

  Args:
    total_steps: the length of the cycle in steps.
    pct_start: the fraction of the cycle spent rising.
    anneal_strategy: ``"cos"`` or ``"linear"``.
    base_momentum: the lowest ``beta1``, at the peak learning rate.
    max_momentum: the highest ``beta1``, at the start and the end.
    three_phase: PyTorch's third phase.

  Returns:
    An Optax schedule, ``count -> beta1``.

  Examples:
    >>> from amsgrad_jax import interop
    >>> b1 = interop.torch_one_cycle_momentum(10, anneal_strategy="linear")
    >>> [round(float(b1(n)), 4) for n in (0, 2, 9)]
    [0.95, 0.85, 0.95]
  """
  values = (max_momentum, base_momentum, max_momentum)
  return _one_cycle(_one_cycle_phases(total_steps, pct_start, three_phase, values), anneal_strategy)


def schedule_from_torch(scheduler: Any) -> list[optax.Schedule]:
  """The Optax schedule of each parameter group that a PyTorch scheduler drives.

  Reads a ``StepLR``, ``MultiStepLR``, ``ExponentialLR``, ``CosineAnnealingLR``,
  ``LinearLR``, ``OneCycleLR`` or a ``SequentialLR`` of those (which becomes
  :func:`optax.join_schedules`, the same switch at the same milestones) and returns the
  schedule of each of its optimizer's parameter groups, counted in scheduler steps from
  the scheduler's start: evaluated at the optimizer's step count when the scheduler
  steps once per optimizer step.

  Args:
    scheduler: a ``torch.optim.lr_scheduler`` object, at any point of its run.

  Returns:
    One Optax schedule per parameter group, in the optimizer's order.

  Raises:
    ValueError: for a scheduler of another kind (``LambdaLR`` and friends compute the
      rate in user code; write it as an Optax schedule).

  Examples:
    >>> import torch  # doctest: +SKIP
    >>> from amsgrad_jax import interop
    >>> weights = torch.nn.Parameter(torch.zeros(3))  # doctest: +SKIP
    >>> optimizer = torch.optim.Adam([weights], lr=0.1, amsgrad=True)  # doctest: +SKIP
    >>> scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 30)  # doctest: +SKIP
    >>> [schedule] = interop.schedule_from_torch(scheduler)  # doctest: +SKIP
  """
  kind = type(scheduler).__name__
  if kind == "SequentialLR":
    parts = [schedule_from_torch(inner) for inner in scheduler._schedulers]
    milestones = list(scheduler._milestones)
    return [optax.join_schedules(list(group), milestones) for group in zip(*parts, strict=True)]
  if kind == "OneCycleLR":
    return [one_cycle_of(scheduler, group) for group in scheduler.optimizer.param_groups]
  base_lrs = [_number(lr) for lr in scheduler.base_lrs]
  if kind == "StepLR":
    return [torch_step_lr(lr, scheduler.step_size, scheduler.gamma) for lr in base_lrs]
  if kind == "MultiStepLR":
    milestones = sorted(scheduler.milestones.elements())
    return [torch_multistep_lr(lr, milestones, scheduler.gamma) for lr in base_lrs]
  if kind == "ExponentialLR":
    return [torch_exponential_lr(lr, scheduler.gamma) for lr in base_lrs]
  if kind == "CosineAnnealingLR":
    return [torch_cosine_annealing_lr(lr, scheduler.T_max, scheduler.eta_min) for lr in base_lrs]
  if kind == "LinearLR":
    return [
      torch_linear_lr(lr, scheduler.start_factor, scheduler.end_factor, scheduler.total_iters)
      for lr in base_lrs
    ]
  raise ValueError(
    f"schedule_from_torch reads StepLR, MultiStepLR, ExponentialLR, CosineAnnealingLR, "
    f"LinearLR, OneCycleLR and SequentialLR, not {kind}: write its rate as an Optax "
    "schedule of the optimizer's step count."
  )


def one_cycle_of(scheduler: Any, group: dict[str, Any], quantity: str = "lr") -> optax.Schedule:
  """The ``"lr"`` or ``"momentum"`` of one group of a ``OneCycleLR``, from the phases it
  holds and the values it stored in the group."""
  phases = [
    (
      float(phase["end_step"]),
      _number(group[phase[f"start_{quantity}"]]),
      _number(group[phase[f"end_{quantity}"]]),
    )
    for phase in scheduler._schedule_phases
  ]
  return _one_cycle(phases, scheduler._anneal_func_type)


def _number(value: Any) -> float:
  """A learning rate PyTorch may hold as a tensor, as a Python float."""
  return float(value.item()) if hasattr(value, "item") else float(value)
