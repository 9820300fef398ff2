"""Two processes with two CPU devices each, joined by ``jax.distributed.initialize``, run
a sharded train step over one global mesh of 4 devices; the result equals the same
steps run in this single process.

The worker is ``tests/_multiprocess_worker.py``. Each child gets its own
``XLA_FLAGS`` (2 devices), not the 8-device flag of this test process; the children
are killed if anything fails or runs past the deadline.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import _multiprocess_worker as worker
import jax
import numpy as np
import pytest

WORKER = pathlib.Path(worker.__file__)
DEADLINE_S = 120


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def child_env() -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  env["JAX_PLATFORMS"] = "cpu"
  # The repository root, for a checkout whose package is not installed.
  env["PYTHONPATH"] = os.pathsep.join(
    [str(WORKER.parent.parent), *filter(None, [env.get("PYTHONPATH")])]
  )
  return env


def run_two_processes(output_dir: pathlib.Path) -> list[int]:
  """Start both workers on a free port; return their exit codes.

  Waits until both have exited, or one has failed (the other is then killed rather
  than left waiting for its peer), or the deadline has passed (both are killed)."""
  port = free_port()
  logs = [open(output_dir / f"{i}.log", "w") for i in range(2)]  # noqa: SIM115
  processes: list[subprocess.Popen] = []
  try:
    for process_id in range(2):
      processes.append(
        subprocess.Popen(
          [sys.executable, str(WORKER), str(process_id), str(port), str(output_dir)],
          env=child_env(),
          stdout=logs[process_id],
          stderr=subprocess.STDOUT,
        )
      )
    deadline = time.monotonic() + DEADLINE_S
    while any(process.poll() is None for process in processes):
      if any(process.poll() not in (None, 0) for process in processes):
        break
      if time.monotonic() > deadline:
        pytest.fail(f"the processes did not finish in {DEADLINE_S} s:\n{read_logs(output_dir)}")
      time.sleep(0.05)
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
      process.wait()
    for log in logs:
      log.close()
  return [process.returncode for process in processes]


def read_logs(output_dir: pathlib.Path) -> str:
  return "\n".join(
    f"--- process {i} ---\n" + (output_dir / f"{i}.log").read_text()[-4000:] for i in range(2)
  )


def single_process_result():
  host_params, batches = worker.problem()
  tx = worker.optimizer()
  step = jax.jit(worker.make_train_step(tx))
  params, state = host_params, tx.init(host_params)
  for batch in batches:
    params, state = step(params, state, batch)
  return worker.leaves_by_path((params, state))


def test_two_processes_on_a_global_mesh_equal_one_process(tmp_path):
  codes = run_two_processes(tmp_path)
  if codes != [0, 0] and "already in use" in read_logs(tmp_path):
    codes = run_two_processes(tmp_path)  # the free port was taken meanwhile: once more
  assert codes == [0, 0], f"exit codes {codes}:\n{read_logs(tmp_path)}"
  results = [dict(np.load(tmp_path / f"{i}.npz")) for i in range(2)]
  specs = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]

  # Each process held half of the devices, and every state buffer sat where its
  # parameter did: split over "model", replicated over "data".
  assert [spec["process_index"] for spec in specs] == [0, 1]
  assert specs[0]["global_devices"] == specs[1]["global_devices"]
  assert len(specs[0]["global_devices"]) == 4
  local = [spec["addressable_devices"] for spec in specs]
  assert sorted(local[0] + local[1]) == specs[0]["global_devices"]
  assert [len(devices) for devices in local] == [2, 2]
  for spec in specs:
    # The batch is split over "data", across the processes: the gradient is all-reduced
    # between them (gloo); the optimizer update itself adds no collective.
    assert spec["collectives"] == ["all-reduce"]
    assert spec["params"] == {"kernel": "P(None, 'model')", "bias": "P('model',)"}
    for field in ("mu", "nu", "nu_max"):
      assert spec[field] == spec["params"], field

  expected = single_process_result()
  for result in results:
    assert result.keys() == expected.keys()
    for path, value in expected.items():
      # The cross-process gradient reduction may sum in another order: float32 rounding.
      np.testing.assert_allclose(result[path], value, rtol=1e-5, atol=1e-6, err_msg=path)
  assert int(results[0]["[1][0].count"]) == worker.STEPS
