"""Time a PyTorch contender on one case, in this process.

PyTorch runs with one intra-op thread per core (``torch.set_num_threads(os.cpu_count())``,
its default on most machines). A step case creates float32 parameters of the case's
shapes with gradients in ``.grad`` and times ``optimizer.step()`` (synchronous on the
CPU), after ``clip_grad_norm_`` when the contender clips; the warmup steps create the
state. The loop case is the original listing: ``Sequential(Linear, ReLU, Linear)``,
``MSELoss(reduction="sum")``, and every step ``loss.item()``, ``zero_grad``, ``backward``,
``step``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.cases import Case
from benchmarks.contenders import Contender

# The sizes of the listing, as in examples/mlp_flax.py.
N, D_IN, H, D_OUT = 64, 1000, 100, 10


def _step(contender: Contender, params: list[torch.Tensor], learning_rate: float) -> Callable:
  """The contender's ``optimizer.step``, preceded by its gradient clipping if any."""
  optimizer_class = getattr(torch.optim, contender.torch_optimizer)
  optimizer = optimizer_class(params, lr=learning_rate, amsgrad=True, **contender.torch_options)
  if contender.clip is None:
    return optimizer.step

  def step() -> None:
    torch.nn.utils.clip_grad_norm_(params, contender.clip)
    optimizer.step()

  return step


def time_step(contender: Contender, case: Case, repeat: Callable) -> dict[str, Any]:
  """Step times on ``case``."""
  generator = torch.Generator().manual_seed(0)
  params = []
  for shape in case.shapes:
    param = (torch.rand(shape, generator=generator) * 2 - 1).requires_grad_()
    param.grad = (torch.rand(shape, generator=generator) * 2 - 1) * 1e-2
    params.append(param)
  return {"times_s": repeat(_step(contender, params, case.learning_rate), case)}


def time_loop(contender: Contender, case: Case, repeat: Callable) -> dict[str, Any]:
  """Times of the listing's training loop, ``case.steps`` steps each."""
  torch.manual_seed(0)
  x, y = torch.randn(N, D_IN), torch.randn(N, D_OUT)
  model = torch.nn.Sequential(torch.nn.Linear(D_IN, H), torch.nn.ReLU(), torch.nn.Linear(H, D_OUT))
  loss_fn = torch.nn.MSELoss(reduction="sum")
  step = _step(contender, list(model.parameters()), case.learning_rate)
  losses: list[float] = []

  def run() -> None:
    losses.clear()
    for _ in range(case.steps):
      loss = loss_fn(model(x), y)
      losses.append(loss.item())
      model.zero_grad()
      loss.backward()
      step()

  return {"times_s": repeat(run, case), "final_loss": losses[-1]}


def measure(contender: Contender, case: Case, repeat: Callable) -> dict[str, Any]:
  """Times of ``contender`` on ``case``."""
  return (time_loop if case.steps else time_step)(contender, case, repeat)


def setup() -> dict[str, str]:
  """Prepare this process (one PyTorch thread per core); returns the versions to record."""
  torch.set_num_threads(os.cpu_count() or 1)
  return {"torch": torch.__version__}
