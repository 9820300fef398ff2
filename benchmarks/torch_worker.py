"""Time one PyTorch contender on every case, in this process only.

PyTorch runs with as many intra-op threads as the machine has cores
(``torch.set_num_threads(os.cpu_count())``). An update-step case creates float32
parameters of the case's shapes with gradients already in ``.grad``, builds
``torch.optim.Adam(params, lr, amsgrad=True, <form>)`` and times ``optimizer.step()``
(synchronous on the CPU), after ``warmup`` untimed steps that create the state. The loop
case is the original listing: ``Sequential(Linear, ReLU, Linear)``, ``MSELoss(sum)``,
``loss.item()`` every step, ``zero_grad``, ``backward``, ``step``, for ``steps`` steps.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from benchmarks.config import MLP_LEARNING_RATE, STEP_LEARNING_RATE, Case, Config
from benchmarks.contenders import Contender

# The sizes of the MLP listing (and of examples/mlp_flax.py).
N, D_IN, H, D_OUT = 64, 1000, 100, 10


def _optimizer(contender: Contender, params: Any, learning_rate: float) -> torch.optim.Optimizer:
  return torch.optim.Adam(params, lr=learning_rate, amsgrad=True, **contender.torch_options)


def time_step_case(contender: Contender, case: Case) -> dict[str, Any]:
  """Times of ``optimizer.step()`` on one update-step case."""
  generator = torch.Generator().manual_seed(0)
  params = []
  for shape in case.shapes:
    param = (torch.rand(shape, generator=generator) * 2 - 1).requires_grad_()
    param.grad = (torch.rand(shape, generator=generator) * 2 - 1) * 1e-2
    params.append(param)
  optimizer = _optimizer(contender, params, STEP_LEARNING_RATE)
  times = []
  index = 0
  while not case.done(times):
    start = time.perf_counter()
    optimizer.step()
    if index >= case.warmup:
      times.append(time.perf_counter() - start)
    index += 1
  parameter_count = sum(param.numel() for param in params)
  state_bytes = sum(
    value.numel() * value.element_size()
    for state in optimizer.state.values()
    for value in state.values()
    if torch.is_tensor(value)
  )
  return {
    "times_s": times,
    "parameters": parameter_count,
    "leaves": len(params),
    "state_bytes_per_param": state_bytes / parameter_count,
  }


def time_mlp_loop(contender: Contender, case: Case) -> dict[str, Any]:
  """The original PyTorch training loop, ``case.steps`` steps, timed end to end."""
  torch.manual_seed(0)
  x, y = torch.randn(N, D_IN), torch.randn(N, D_OUT)
  model = torch.nn.Sequential(torch.nn.Linear(D_IN, H), torch.nn.ReLU(), torch.nn.Linear(H, D_OUT))
  loss_fn = torch.nn.MSELoss(reduction="sum")
  optimizer = _optimizer(contender, model.parameters(), MLP_LEARNING_RATE)

  def train(steps: int) -> float:
    loss_value = float("nan")
    for _ in range(steps):
      loss = loss_fn(model(x), y)
      loss_value = loss.item()
      optimizer.zero_grad()
      loss.backward()
      optimizer.step()
    return loss_value

  train(1)  # Creates the optimizer state, as the JAX loop's first step compiles.
  times, final_loss = [], float("nan")
  for _ in range(case.repetitions):
    start = time.perf_counter()
    final_loss = train(case.steps)
    times.append(time.perf_counter() - start)
  return {
    "times_s": times,
    "parameters": sum(param.numel() for param in model.parameters()),
    "final_loss": final_loss,
  }


def measure(contender: Contender, case: Case, config: Config) -> dict[str, Any]:
  """Times and facts of ``contender`` on ``case``."""
  del config
  if case.kind == "loop":
    return time_mlp_loop(contender, case)
  return time_step_case(contender, case)


def environment() -> dict[str, Any]:
  """What this process runs on; sets PyTorch's threads to the machine's cores."""
  torch.set_num_threads(os.cpu_count() or 1)
  return {
    "backend": "cpu",
    "device": "cpu",
    "threads": torch.get_num_threads(),
    "versions": {"torch": torch.__version__},
  }
