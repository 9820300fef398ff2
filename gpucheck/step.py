"""The update step on an accelerator, timed on the device against a device-to-device copy.

Part of ``python -m gpucheck`` (:mod:`gpucheck`). Each contender of
:data:`CONTENDERS` runs in its own process (``python -m gpucheck.step``, the request
as JSON on stdin, the result as the last line of stdout, as in :mod:`benchmarks.worker`),
on the cases of :func:`cases`. Parameters, gradients and state are made on the device;
the JAX step is :mod:`benchmarks.jax_worker`'s jitted, donated update, the PyTorch step
:mod:`benchmarks.torch_worker`'s ``optimizer.step()`` on CUDA tensors.

A device runs asynchronously, so a step is not timed alone: ``k`` steps are issued back to
back and the batch ends with one wait for the device (``jax.block_until_ready``,
``torch.cuda.synchronize``), ``k`` chosen so that a batch lasts at least a 25th of the
case's ``budget_s`` (20 ms of the default 0.5 s); a step's time is the batch's over
``k``, and a case times batches as :func:`benchmarks.worker.repeat` times steps. That is
the time a training loop pays per step: the device's, or the host's dispatch when that is
slower.

The yardstick, measured the same way in the same process right after the step: a
device-to-device copy (``jax.jit(jnp.copy)``, ``Tensor.copy_``) of a buffer of half the
step's bytes, so that reading it and writing the copy moves exactly what one pass of the
step must move (the contender's ``bytes_per_param`` per parameter). "% of copy" is the
copy's time over the step's; GB/s is the step's bytes over its time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

import amsgrad_jax
from benchmarks import cases as cpu_cases
from benchmarks import worker
from benchmarks.cases import Case
from benchmarks.contenders import TORCH_FUSED, Contender, by_name
from benchmarks.jax_worker import update_function

MAX_BATCH = 1000
PROCESS_TIMEOUT_S = 90


def _optax_path(name: str, native_name: str) -> Contender:
  """The CPU benchmarks' ``apply_step`` contender, through ``tx.update`` instead: on an
  accelerator ``apply_step`` is that path."""
  return dataclasses.replace(by_name(native_name), name=name, native=False)


def _rule(convention: str) -> Contender:
  make_tx = functools.partial(amsgrad_jax.amsgrad, convention=convention)
  return Contender(f"amsgrad_jax, {convention} rule", make_tx)


# Most important first: a run out of time loses the last ones.
CONTENDERS = [
  by_name("amsgrad_jax"),
  by_name("optax.amsgrad"),
  by_name(TORCH_FUSED),
  by_name("torch foreach"),
  by_name("optax.adam"),
  by_name("amsgrad_jax, bf16 state"),
  by_name("amsgrad_jax, 8-bit state"),
  _optax_path("amsgrad_jax, flat state", "apply_step, flat state"),
  *(_rule(convention) for convention in ("keras", "optax", "paper")),
]


def contender(name: str) -> Contender:
  return next(c for c in CONTENDERS if c.name == name)


def cases(smoke: bool) -> list[Case]:
  """One leaf of 16M and of 256M, 400 leaves of 10k, the Flax transformer; tiny when ``smoke``."""
  if smoke:  # one case, of three leaves: one compilation per contender
    once = {"warmup": 1, "min_reps": 1, "max_reps": 2, "budget_s": 0.05}
    return [Case("3 leaves", "3 leaves (1k, 10x10, a scalar)", [[1_000], [10, 10], []], **once)]
  from benchmarks import models  # Flax, only where the cases are made.

  return [
    Case("16M", "1 leaf of 16M", [[16_000_000]]),
    Case("256M", "1 leaf of 256M", [[256_000_000]], min_reps=3, max_reps=10),
    Case("400x10k", "400 leaves of 10k", [[10_000]] * 400),
    Case("transformer", "Flax transformer", models.transformer_shapes(cpu_cases.TRANSFORMER)),
  ]


# --- in the worker process ------------------------------------------------------------


def batch_times(step: Callable[[], None], wait: Callable[[], None], case: Case) -> dict[str, Any]:
  """Seconds per step, from batches of ``k`` back-to-back steps that end in one ``wait``."""

  def batch(k: int) -> None:
    for _ in range(k):
      step()
    wait()

  def timed(k: int) -> float:
    start = time.perf_counter()
    batch(k)
    return time.perf_counter() - start

  least = case.budget_s / 25
  timed(1)
  k = 1
  while (elapsed := timed(k)) < least and k < MAX_BATCH:
    k = min(MAX_BATCH, max(2 * k, math.ceil(1.2 * k * least / max(elapsed, 1e-7))))
  times = worker.repeat(lambda: batch(k), case)
  return {"times_s": [t / k for t in times], "batch": k}


def measure_jax(entry: Contender, case: Case) -> dict[str, Any]:
  @jax.jit
  def draw(key: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
    keys = jax.random.split(key, 2 * len(case.shapes))
    uniform = functools.partial(jax.random.uniform, minval=-1.0, maxval=1.0)
    params = [uniform(k, s) for k, s in zip(keys[::2], case.shapes, strict=True)]
    grads = [1e-2 * uniform(k, s) for k, s in zip(keys[1::2], case.shapes, strict=True)]
    return params, grads

  params, grads = draw(jax.random.key(0))
  tx = entry.make_tx(case.learning_rate)
  state = jax.jit(tx.init)(params)
  compiled = jax.jit(update_function(entry, tx), donate_argnums=(0, 1))
  compiled = compiled.lower(params, state, grads).compile()

  def step() -> None:
    nonlocal params, state
    params, state = compiled(params, state, grads)

  result = batch_times(step, lambda: jax.block_until_ready((params, state)), case)
  source = jnp.zeros(case.parameters * entry.bytes_per_param // 8, jnp.float32)
  copy = jax.jit(jnp.copy).lower(source).compile()
  copies: list[Any] = []

  def copy_once() -> None:
    copies[:] = [copy(source)]

  copied = batch_times(copy_once, lambda: jax.block_until_ready(copies), case)
  return result | {"copy_s": copied["times_s"]}


def measure_torch(entry: Contender, case: Case, device: str) -> dict[str, Any]:
  import torch

  from benchmarks.torch_worker import _step

  generator = torch.Generator(device=device).manual_seed(0)
  params = []
  for shape in case.shapes:
    param = (torch.rand(shape, generator=generator, device=device) * 2 - 1).requires_grad_()
    param.grad = (torch.rand(shape, generator=generator, device=device) * 2 - 1) * 1e-2
    params.append(param)
  wait = torch.cuda.synchronize if device == "cuda" else lambda: None
  result = batch_times(_step(entry, params, case.learning_rate), wait, case)
  source = torch.zeros(case.parameters * entry.bytes_per_param // 8, device=device)
  target = torch.empty_like(source)
  copied = batch_times(lambda: target.copy_(source), wait, case)
  return result | {"copy_s": copied["times_s"]}


def device_name(framework: str, device: str) -> str:
  """The device this process times on, as its framework names it."""
  if framework == "torch":
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "cpu"
  return jax.devices()[0].device_kind


def main() -> None:
  request = json.loads(sys.stdin.read())
  device = request["torch_device"]
  plan = [Case(**case) for case in request["cases"]]
  results = {}
  for name in request["contenders"]:
    entry = contender(name)
    if entry.framework == "torch" and device == "cpu":
      from benchmarks import torch_worker

      torch_worker.setup()  # one thread per core, as on the CPU benchmarks page
    measure = (
      functools.partial(measure_torch, device=device) if entry.framework == "torch" else measure_jax
    )
    cases = {case.id: measure(entry, case) for case in plan}
    results[name] = {"device": device_name(entry.framework, device), "cases": cases}
  print(json.dumps(results))


# --- in the parent process ------------------------------------------------------------


def run(
  plan: list[Case],
  groups: list[list[str]],
  env: dict[str, str],
  torch_device: str,
  deadline: float,
  log: Callable[[str], None],
) -> dict[str, Any]:
  """Each group of contenders in one process, until ``deadline`` (``time.monotonic()``)."""
  request = {"cases": [dataclasses.asdict(c) for c in plan], "torch_device": torch_device}
  results: dict[str, Any] = {}
  for group in groups:
    left = deadline - time.monotonic()
    if left < 5:
      results |= {name: {"error": "not run: the part's time was spent"} for name in group}
      continue
    timeout = min(PROCESS_TIMEOUT_S * len(group), left)
    command = [sys.executable, "-m", "gpucheck.step"]
    start = time.monotonic()
    try:
      done = subprocess.run(
        command,
        input=json.dumps(request | {"contenders": group}),
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        timeout=timeout,
      )
      if done.returncode == 0:
        results |= json.loads(done.stdout.splitlines()[-1])
      else:
        results |= {name: {"error": done.stderr[-3000:]} for name in group}
    except subprocess.TimeoutExpired:
      results |= {name: {"error": f"stopped after {timeout:.0f} s"} for name in group}
    status = "FAILED" if any("error" in results[name] for name in group) else "done"
    log(f"  {'; '.join(group)}: {status} ({time.monotonic() - start:.0f} s)")
  return results


if __name__ == "__main__":
  main()
