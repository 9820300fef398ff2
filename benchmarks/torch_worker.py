"""Time one PyTorch contender on every case, in this process only.

PyTorch runs with as many intra-op threads as the machine has cores
(``torch.set_num_threads(os.cpu_count())``). An update-step case creates float32
parameters of the case's shapes with gradients already in ``.grad``, builds
``torch.optim.Adam(params, lr, amsgrad=True, <form>)`` and times ``optimizer.step()``
(synchronous on the CPU), after ``warmup`` untimed steps that create the state. The loop
case is the original listing: ``Sequential(Linear, ReLU, Linear)``, ``MSELoss(sum)``,
``loss.item()`` every step, ``zero_grad``, ``backward``, ``step``, for ``steps`` steps.

For the fused contender (``fused=True``) on a case of one leaf, the timed steps are
followed by as many passes of the in-process bandwidth probe (:mod:`benchmarks.probe`,
the library and thread count the JAX worker uses), back to back like the steps, over the
step's own five buffers: the parameter, its gradient and the state's ``exp_avg``,
``exp_avg_sq`` and ``max_exp_avg_sq`` (AMSGrad's ``mu``, ``nu`` and ``nu_max``), found by
their raw pointers, as the JAX worker does for ``amsgrad_jax.apply_step``. The steps are
timed exactly as without the probe. PyTorch's OpenMP threads keep spinning for some
milliseconds after a step and would take the cores from the probe's threads, so before
the passes the worker waits for them to go to sleep (:func:`wait_for_threads_to_sleep`:
:data:`THREADS_ASLEEP_S`, longer while another thread of the process still runs). The
probe's times are recorded next to the step's (``probe_times_s``), or why it did not run
(``probe_error``).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import probe
from benchmarks.config import MLP_LEARNING_RATE, STEP_LEARNING_RATE, Case, Config
from benchmarks.contenders import Contender

# The sizes of the MLP listing (and of examples/mlp_flax.py).
N, D_IN, H, D_OUT = 64, 1000, 100, 10
# AMSGrad's mu, nu and nu_max in the state torch.optim.Adam keeps per parameter.
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# How long the probe waits at least after a step for PyTorch's OpenMP threads to go to
# sleep. Its runtime (libgomp) lets them spin GOMP_SPINCOUNT times (300,000 by default)
# before they sleep: on 2 idle cores, after a fused step of 16M parameters,
# /proc/self/task/*/stat showed them running for 4 to 10 ms. 20 ms is twice the longest
# seen. With other work on the cores the spinners get less of them and take longer
# (up to 35 ms was seen), so the wait then goes on while any of them still runs, up to
# THREADS_ASLEEP_LIMIT_S.
THREADS_ASLEEP_S = 0.02
THREADS_ASLEEP_LIMIT_S = 0.2


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
  probe_facts: dict[str, Any] = {}
  if contender.torch_options.get("fused") is True and len(params) == 1:
    in_process_probe, probe_facts = _probe_for(params[0], optimizer)
    if in_process_probe is not None:
      wait_for_threads_to_sleep()
      pointers = buffer_pointers(params[0], optimizer)
      in_process_probe.time_pass(pointers, params[0].numel())  # untimed, as the first step
      probe_facts["probe_times_s"] = [
        in_process_probe.time_pass(pointers, params[0].numel()) for _ in times
      ]
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
    **probe_facts,
  }


def wait_for_threads_to_sleep(
  minimum_s: float = THREADS_ASLEEP_S, limit_s: float = THREADS_ASLEEP_LIMIT_S
) -> float:
  """Sleep ``minimum_s``, then on until no other thread of this process is running (state
  ``R`` in ``/proc/self/task/*/stat``, looked at every millisecond), ``limit_s`` in all at
  most; returns the seconds waited. Without ``/proc`` it sleeps ``minimum_s`` only."""
  start = time.perf_counter()
  time.sleep(minimum_s)
  this_thread = str(threading.get_native_id())
  while time.perf_counter() - start < limit_s:
    try:
      tasks = [task for task in os.listdir("/proc/self/task") if task != this_thread]
    except OSError:
      break
    if not any(_running(task) for task in tasks):
      break
    time.sleep(0.001)
  return time.perf_counter() - start


def _running(task: str) -> bool:
  """Whether thread ``task`` of this process is running (or ready to run)."""
  try:
    stat = Path(f"/proc/self/task/{task}/stat").read_text()
  except OSError:  # the thread has ended
    return False
  # The state follows the command name, which is in brackets and may hold spaces.
  return stat.rsplit(")", 1)[-1].split()[:1] == ["R"]


def buffer_pointers(param: torch.Tensor, optimizer: torch.optim.Optimizer) -> list[int]:
  """Raw addresses of the five buffers one AMSGrad pass over ``param`` touches: the
  gradient, then the parameter, ``exp_avg``, ``exp_avg_sq`` and ``max_exp_avg_sq``.

  Each must be a contiguous float32 CPU tensor of ``param``'s size, and no two may
  overlap; otherwise :class:`ValueError` says which is not. Taken afresh before every
  pass, as the JAX worker takes its pointers.
  """
  state = optimizer.state.get(param, {})
  named = {"grad": param.grad, "param": param.data, **{key: state.get(key) for key in STATE_KEYS}}
  size = param.numel()
  spans = []
  for name, tensor in named.items():
    if not torch.is_tensor(tensor):
      raise ValueError(f"no {name} tensor for the parameter")
    if (
      tensor.dtype != torch.float32
      or tensor.device.type != "cpu"
      or not tensor.is_contiguous()
      or tensor.numel() != size
    ):
      raise ValueError(
        f"{name} is {tensor.dtype} on {tensor.device}, contiguous {tensor.is_contiguous()}, "
        f"{tensor.numel()} elements: expected a contiguous float32 CPU tensor of {size}"
      )
    spans.append((tensor.data_ptr(), tensor.data_ptr() + 4 * size))
  ordered = sorted(spans)
  if size == 0 or any(end > begin for (_, end), (begin, _) in itertools.pairwise(ordered)):
    raise ValueError(f"the five buffers of {size} elements overlap or are empty: {spans}")
  return [begin for begin, _ in spans]


def _probe_for(
  param: torch.Tensor, optimizer: torch.optim.Optimizer
) -> tuple[probe.Probe | None, dict[str, Any]]:
  """The in-process probe for the buffers of ``param``, with the facts to record about it
  (or why it cannot run)."""
  return probe.prepared(lambda: buffer_pointers(param, optimizer))


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
