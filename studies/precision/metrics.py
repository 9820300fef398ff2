"""What both frameworks read off a run's per-step losses, defined once."""

from __future__ import annotations

import math

import numpy as np

from studies.precision import tasks
from studies.precision.tasks import TaskSpec

MAX_CURVE_POINTS = 300


def loss_curve(losses: np.ndarray) -> dict[str, list[float]]:
  """At most :data:`MAX_CURVE_POINTS` points: the mean loss of each window of consecutive
  steps, at the window's last (1-based) step."""
  stride = math.ceil(len(losses) / MAX_CURVE_POINTS)
  starts = range(0, len(losses), stride)
  return {
    "step": [min(start + stride, len(losses)) for start in starts],
    "loss": [float(np.mean(losses[start : start + stride])) for start in starts],
  }


def train_metrics(spec: TaskSpec, losses: np.ndarray) -> dict[str, float]:
  """The regression's loss at its report steps (``loss@K``: the loss the K-th step computes,
  before its update, as examples/mlp_flax.py prints it); for the other tasks the mean
  minibatch loss of the last ``spec.tail`` steps (``train_loss``)."""
  if spec.name == tasks.MLP_REGRESSION:
    return {f"loss@{step}": float(losses[step - 1]) for step in spec.report_steps}
  return {"train_loss": float(np.mean(losses[-spec.tail :]))}


def all_finite(losses: np.ndarray, metrics: dict[str, float]) -> bool:
  """Whether every loss and every metric is finite."""
  return bool(np.all(np.isfinite(losses))) and all(map(math.isfinite, metrics.values()))
