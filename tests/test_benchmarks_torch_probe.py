"""The in-process limit of PyTorch's fused step: its five buffers and the probe over them.

The PyTorch worker finds the buffers of ``torch.optim.Adam(amsgrad=True, fused=True)`` on
one parameter by their raw pointers (the gradient, the parameter, ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``) and runs ``benchmarks/probe.c`` over them after the
timed steps, so the pointers must be those tensors' and the pass must leave every value as it
was. A pass with a scale of 1 checks that each pointer reaches the tensor it names: each
updated one must come back as itself plus the gradient. Before the passes the worker waits
for the other threads of its process (PyTorch's spinning OpenMP threads) to sleep.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from _peers import require
from test_benchmarks_probe import library

from benchmarks import probe
from benchmarks.config import Case
from benchmarks.contenders import TORCH_FUSED, by_name

__all__ = ["library"]  # the probe library fixture, built once per module

ROOT = Path(__file__).resolve().parents[1]
ELEMENTS = 37  # Not a whole number of 64-byte lines, so the last thread's part is short.


@pytest.fixture(scope="module")
def torch() -> ModuleType:
  return require("torch")


@pytest.fixture(scope="module")
def torch_worker(torch: ModuleType) -> ModuleType:
  from benchmarks import torch_worker

  return torch_worker


def _fused_step(torch: ModuleType, elements: int = ELEMENTS) -> tuple[object, object]:
  """One parameter after one fused AMSGrad step, and its optimizer; no value is 0."""
  generator = torch.Generator().manual_seed(0)
  param = (torch.rand(elements, generator=generator) + 0.5).requires_grad_()
  param.grad = torch.rand(elements, generator=generator) + 0.25
  optimizer = torch.optim.Adam([param], lr=1e-3, amsgrad=True, fused=True)
  optimizer.step()
  return param, optimizer


def _five(param: object, optimizer: object) -> list[object]:
  state = optimizer.state[param]
  return [param.grad, param.data, state["exp_avg"], state["exp_avg_sq"], state["max_exp_avg_sq"]]


def test_buffer_pointers_are_the_fused_steps_five_tensors(
  torch: ModuleType, torch_worker: ModuleType
) -> None:
  param, optimizer = _fused_step(torch)
  pointers = torch_worker.buffer_pointers(param, optimizer)
  assert pointers == [tensor.data_ptr() for tensor in _five(param, optimizer)]
  assert len(set(pointers)) == 5
  assert param.data_ptr() in pointers


def test_probe_leaves_the_fused_steps_values_bit_for_bit(
  torch: ModuleType, torch_worker: ModuleType, library: Path
) -> None:
  param, optimizer = _fused_step(torch)
  before = [tensor.clone() for tensor in _five(param, optimizer)]
  in_process_probe = probe.Probe(library, thread_count=2)
  seconds = in_process_probe.time_pass(torch_worker.buffer_pointers(param, optimizer), ELEMENTS)
  assert seconds > 0
  for after, original in zip(_five(param, optimizer), before, strict=True):
    assert torch.equal(after.view(torch.int32), original.view(torch.int32))
  # With a scale of 1 each pointer must reach its own tensor: g stays, the rest gain g.
  in_process_probe.time_pass(torch_worker.buffer_pointers(param, optimizer), ELEMENTS, 1.0)
  g, *updated = _five(param, optimizer)
  assert torch.equal(g, before[0])
  for after, original in zip(updated, before[1:], strict=True):
    assert torch.equal(after, original + before[0])


def test_buffer_pointers_refuse_what_is_not_one_amsgrad_pass(
  torch: ModuleType, torch_worker: ModuleType
) -> None:
  param = torch.ones(8, requires_grad=True)
  param.grad = torch.ones(8)
  optimizer = torch.optim.Adam([param], amsgrad=True, fused=True)
  with pytest.raises(ValueError, match="no exp_avg tensor"):  # no state before a step
    torch_worker.buffer_pointers(param, optimizer)
  adam = torch.optim.Adam([param], amsgrad=False, fused=True)
  adam.step()
  with pytest.raises(ValueError, match="no max_exp_avg_sq tensor"):
    torch_worker.buffer_pointers(param, adam)
  wide = torch.ones(8, dtype=torch.float64, requires_grad=True)
  wide.grad = torch.ones(8, dtype=torch.float64)
  wide_optimizer = torch.optim.Adam([wide], amsgrad=True, fused=True)
  wide_optimizer.step()
  with pytest.raises(ValueError, match="expected a contiguous float32"):
    torch_worker.buffer_pointers(wide, wide_optimizer)


def test_fused_worker_records_a_probe_time_per_timed_step_on_one_leaf(
  torch_worker: ModuleType, library: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
  monkeypatch.setenv(probe.LIBRARY_ENV, str(library))
  probe.from_environment.cache_clear()
  try:
    one = Case(id="one", group="a", label="1 leaf", kind="step", shapes=((40,),), repetitions=3)
    two = Case(id="two", group="b", label="2", kind="step", shapes=((40,), (40,)), repetitions=3)
    fused = torch_worker.time_step_case(by_name(TORCH_FUSED), one)
    assert len(fused["probe_times_s"]) == len(fused["times_s"]) == 3
    assert all(t > 0 for t in fused["probe_times_s"])
    assert fused["probe_threads"] == probe.threads()
    assert fused["probe_bytes_per_param"] == probe.BYTES_PER_ELEMENT
    assert "probe_error" not in fused
    for contender, case in ((by_name("torch foreach"), one), (by_name(TORCH_FUSED), two)):
      result = torch_worker.time_step_case(contender, case)
      assert not {key for key in result if key.startswith("probe")}, (contender.name, case.id)
  finally:
    probe.from_environment.cache_clear()


def test_wait_for_threads_to_sleep_outlasts_a_running_thread(
  torch_worker: ModuleType, library: Path
) -> None:
  # A thread making probe passes (in C, without the GIL) runs the whole time: the wait must
  # go on to its limit, and stop soon after its minimum once that thread has ended.
  buffers = [np.ones(1 << 20, np.float32) for _ in range(5)]
  single = probe.Probe(library, thread_count=1)
  stop = threading.Event()

  def spin() -> None:
    while not stop.is_set():
      single.time_pass([b.ctypes.data for b in buffers], buffers[0].size)

  spinner = threading.Thread(target=spin)
  spinner.start()
  try:
    busy = torch_worker.wait_for_threads_to_sleep(minimum_s=0.005, limit_s=0.1)
  finally:
    stop.set()
    spinner.join()
  idle = torch_worker.wait_for_threads_to_sleep(minimum_s=0.005, limit_s=0.5)
  assert busy >= 0.1
  assert 0.005 <= idle < 0.5


def test_the_probe_module_imports_neither_jax_nor_torch() -> None:
  # The PyTorch worker imports it; the JAX worker must never carry PyTorch's threads.
  completed = subprocess.run(
    [
      sys.executable,
      "-c",
      "import json, sys; import benchmarks.probe; "
      "print(json.dumps([m for m in ('jax', 'torch') if m in sys.modules]))",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=60,
    check=True,
  )
  assert json.loads(completed.stdout) == []
