"""The frameworks' learning-rate schedules, exactly, over 1,000 steps in float64.

PyTorch's schedulers run here as a training loop runs them, stepped once after every
``optimizer.step()``, and the rate compared is ``param_groups[g]["lr"]`` before each step
(Python floats, computed by ``get_lr``'s recursions). Keras' schedules are evaluated as
Keras' compiled training step evaluates them, at its ``iterations``, under ``jax.jit``,
with Keras' float type set to float64. Ours are evaluated compiled, at the step count.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _peers import require
from test_port_keras import precision

from amsgrad_jax import interop

STEPS = 1000
RTOL = 1e-12
LR = 0.1


def ours(schedule: optax.Schedule) -> np.ndarray:
  """``schedule`` at counts ``0 .. STEPS - 1``, compiled, in float64."""
  with jax.enable_x64(True):
    compiled = jax.jit(schedule)
    return np.array([float(compiled(jnp.asarray(n, jnp.int32))) for n in range(STEPS)])


def assert_rates_equal(ours: np.ndarray, theirs: np.ndarray) -> float:
  """Every rate within ``RTOL`` of the framework's, relative to it; the largest relative
  difference seen."""
  relative = np.abs(ours - theirs) / np.where(theirs == 0, 1.0, np.abs(theirs))
  worst = int(np.argmax(relative))
  assert relative[worst] <= RTOL, f"step {worst}: {ours[worst]!r} vs {theirs[worst]!r}"
  return float(relative[worst])


def torch_rates(make_scheduler, *, groups=(LR,), optimizer="SGD", steps: int = STEPS):
  """``param_groups[g]["lr"]`` (and ``betas[0]`` for Adam) before each of ``steps`` steps,
  and the scheduler, built by ``make_scheduler(optimizer)``."""
  torch = require("torch")
  weights = [torch.zeros(1, requires_grad=True) for _ in groups]
  param_groups = [{"params": [w], "lr": lr} for w, lr in zip(weights, groups, strict=True)]
  opt = getattr(torch.optim, optimizer)(param_groups)
  scheduler = make_scheduler(opt)
  rates, betas = [], []
  for _ in range(steps):
    rates.append([group["lr"] for group in opt.param_groups])
    betas.append([group.get("betas", (0.0,))[0] for group in opt.param_groups])
    opt.step()  # No gradients: nothing moves, but the scheduler sees an optimizer step.
    scheduler.step()
  return np.array(rates).T, np.array(betas).T, scheduler


def lr_scheduler():
  return require("torch").optim.lr_scheduler


TORCH_CASES = {
  "StepLR": (
    lambda opt: lr_scheduler().StepLR(opt, step_size=30, gamma=0.7),
    lambda lr: interop.torch_step_lr(lr, 30, 0.7),
  ),
  "MultiStepLR": (
    lambda opt: lr_scheduler().MultiStepLR(opt, milestones=[100, 250, 250, 600], gamma=0.5),
    lambda lr: interop.torch_multistep_lr(lr, [100, 250, 250, 600], 0.5),
  ),
  "ExponentialLR": (
    lambda opt: lr_scheduler().ExponentialLR(opt, gamma=0.995),
    lambda lr: interop.torch_exponential_lr(lr, 0.995),
  ),
  "CosineAnnealingLR": (
    lambda opt: lr_scheduler().CosineAnnealingLR(opt, T_max=1000),
    lambda lr: interop.torch_cosine_annealing_lr(lr, 1000),
  ),
  "CosineAnnealingLR-past-T_max": (
    lambda opt: lr_scheduler().CosineAnnealingLR(opt, T_max=300, eta_min=1e-4),
    lambda lr: interop.torch_cosine_annealing_lr(lr, 300, 1e-4),
  ),
  "LinearLR-warmup": (
    lambda opt: lr_scheduler().LinearLR(opt, start_factor=0.01, total_iters=400),
    lambda lr: interop.torch_linear_lr(lr, 0.01, 1.0, 400),
  ),
  "LinearLR-decay": (
    lambda opt: lr_scheduler().LinearLR(opt, start_factor=1.0, end_factor=0.1, total_iters=700),
    lambda lr: interop.torch_linear_lr(lr, 1.0, 0.1, 700),
  ),
  "OneCycleLR": (
    lambda opt: lr_scheduler().OneCycleLR(opt, max_lr=0.3, total_steps=STEPS),
    lambda _: interop.torch_one_cycle_lr(0.3, STEPS),
  ),
  "OneCycleLR-linear-three-phase": (
    lambda opt: lr_scheduler().OneCycleLR(
      opt, max_lr=0.3, total_steps=STEPS, anneal_strategy="linear", three_phase=True
    ),
    lambda _: interop.torch_one_cycle_lr(0.3, STEPS, anneal_strategy="linear", three_phase=True),
  ),
  "SequentialLR-warmup-cosine": (
    lambda opt: lr_scheduler().SequentialLR(
      opt,
      [
        lr_scheduler().LinearLR(opt, start_factor=0.05, total_iters=100),
        lr_scheduler().CosineAnnealingLR(opt, T_max=900, eta_min=1e-5),
      ],
      milestones=[100],
    ),
    # Optax's join_schedules switches at the same step, restarting the count, as
    # SequentialLR does: it is the SequentialLR of two schedules.
    lambda lr: optax.join_schedules(
      [
        interop.torch_linear_lr(lr, 0.05, 1.0, 100),
        interop.torch_cosine_annealing_lr(lr, 900, 1e-5),
      ],
      [100],
    ),
  ),
}


@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_torch_schedule_equals_the_scheduler_at_every_step(case):
  make_scheduler, make_ours = TORCH_CASES[case]
  (theirs,), _, scheduler = torch_rates(make_scheduler, steps=STEPS)
  assert_rates_equal(ours(make_ours(LR)), theirs)
  [read] = interop.schedule_from_torch(scheduler)
  assert_rates_equal(ours(read), theirs)


@pytest.mark.parametrize("case", ["StepLR", "OneCycleLR", "SequentialLR-warmup-cosine"])
def test_schedule_from_torch_gives_each_parameter_group_its_own(case):
  make_scheduler, _ = TORCH_CASES[case]
  rates, _, scheduler = torch_rates(make_scheduler, groups=(LR, 0.02))
  schedules = interop.schedule_from_torch(scheduler)
  assert len(schedules) == 2
  for schedule, theirs in zip(schedules, rates, strict=True):
    assert_rates_equal(ours(schedule), theirs)


def test_torch_one_cycle_momentum_is_the_beta1_onecyclelr_sets_on_adam():
  _, (betas,), _ = torch_rates(
    lambda opt: lr_scheduler().OneCycleLR(opt, max_lr=0.3, total_steps=STEPS), optimizer="Adam"
  )
  assert_rates_equal(ours(interop.torch_one_cycle_momentum(STEPS)), betas)


def test_schedule_from_torch_refuses_a_scheduler_it_cannot_read():
  def make(opt):
    return lr_scheduler().LambdaLR(opt, lambda n: 0.5**n)

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    _, _, scheduler = torch_rates(make, steps=1)
  with pytest.raises(ValueError, match="not LambdaLR"):
    interop.schedule_from_torch(scheduler)


def keras_schedules():
  schedules = require("keras").optimizers.schedules
  return {
    "ExponentialDecay": (
      schedules.ExponentialDecay(LR, decay_steps=70, decay_rate=0.6),
      interop.keras_exponential_decay(LR, 70, 0.6),
    ),
    "ExponentialDecay-staircase": (
      schedules.ExponentialDecay(LR, decay_steps=70, decay_rate=0.6, staircase=True),
      interop.keras_exponential_decay(LR, 70, 0.6, staircase=True),
    ),
    "CosineDecay": (
      schedules.CosineDecay(LR, decay_steps=800, alpha=0.05),
      interop.keras_cosine_decay(LR, 800, alpha=0.05),
    ),
    "CosineDecay-warmup": (
      schedules.CosineDecay(1e-3, 700, alpha=0.1, warmup_target=LR, warmup_steps=200),
      interop.keras_cosine_decay(1e-3, 700, alpha=0.1, warmup_target=LR, warmup_steps=200),
    ),
    "PiecewiseConstantDecay": (
      schedules.PiecewiseConstantDecay([100, 400, 401], [LR, 0.05, 0.01, 0.001]),
      interop.keras_piecewise_constant_decay([100, 400, 401], [LR, 0.05, 0.01, 0.001]),
    ),
  }


KERAS_CASES = [
  "ExponentialDecay",
  "ExponentialDecay-staircase",
  "CosineDecay",
  "CosineDecay-warmup",
  "PiecewiseConstantDecay",
]


@pytest.mark.keras
@pytest.mark.parametrize("case", KERAS_CASES)
def test_keras_schedule_equals_keras_at_every_step(case):
  with precision(np.float64):
    theirs_schedule, our_schedule = keras_schedules()[case]
    compiled = jax.jit(theirs_schedule)
    theirs = np.array([float(compiled(jnp.asarray(n, jnp.int32))) for n in range(STEPS)])
  assert_rates_equal(ours(our_schedule), theirs)
  assert_rates_equal(ours(interop.schedule_from_keras(theirs_schedule)), theirs)


@pytest.mark.parametrize(
  "make",
  [
    lambda: interop.torch_step_lr(LR, 0),
    lambda: interop.keras_exponential_decay(LR, 0, 0.5),
    lambda: interop.torch_cosine_annealing_lr(LR, 0),
    lambda: interop.torch_linear_lr(LR, start_factor=0.0),
    lambda: interop.torch_one_cycle_lr(LR, 100, pct_start=1.5),
    lambda: interop.keras_piecewise_constant_decay([1, 2], [LR]),
    lambda: interop.keras_cosine_decay(LR, 0),
  ],
  ids=[
    "step_size",
    "keras_decay_steps",
    "T_max",
    "start_factor",
    "pct_start",
    "values",
    "decay_steps",
  ],
)
def test_an_argument_the_framework_refuses_is_refused(make):
  with pytest.raises(ValueError, match="must"):
    make()


def test_past_t_max_pytorchs_cosine_rises_again_where_optaxs_stays():
  """Why torch_cosine_annealing_lr is not optax.cosine_decay_schedule."""
  theirs = ours(interop.torch_cosine_annealing_lr(LR, 300))
  with jax.numpy_dtype_promotion("standard"):  # Optax mixes the count's and the rate's.
    optax_rates = ours(optax.cosine_decay_schedule(LR, 300))
  assert theirs[450] == pytest.approx(LR / 2)
  assert optax_rates[450] == 0.0
  assert math.isclose(theirs[600], LR, rel_tol=1e-12)
