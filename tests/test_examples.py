"""Every example runs from the command line, prints what it promises and writes its files.

Each example runs in a subprocess, as a user would start it, with fewer steps where it has
the option. The subprocesses get the environment without this test process's 8-device
``XLA_FLAGS``: ``sharded_training.py`` must ask for its devices itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _peers import require

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FLOAT = r"[-+]?\d+(?:\.\d*)?(?:e[-+]?\d+)?"


def run_example(name: str, *args: str, cwd: Path, expect_rc: int = 0) -> str:
  """Run ``examples/<name>`` with ``args`` in ``cwd``; returns stdout and stderr together."""
  env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run(
    [sys.executable, str(EXAMPLES / name), *args],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=180,
    check=False,
  )
  output = result.stdout + result.stderr
  assert result.returncode == expect_rc, f"{name} {args} exited {result.returncode}:\n{output}"
  return output


def assert_png(path: Path) -> None:
  assert path.is_file(), f"{path} was not written"
  data = path.read_bytes()
  assert data.startswith(PNG_SIGNATURE)
  assert len(data) > 10_000, "the figure is suspiciously small"


def number_after(label: str, output: str) -> float:
  match = re.search(rf"{re.escape(label)}\s*({FLOAT})", output)
  assert match, f"no {label!r} in:\n{output}"
  return float(match.group(1))


def test_mlp_flax_trains_prints_the_loss_and_writes_the_curve_where_it_runs(tmp_path):
  require("tqdm")
  require("matplotlib")
  output = run_example("mlp_flax.py", "--steps", "150", cwd=tmp_path)
  assert "backend: cpu" in output
  # The loss is printed as the original listing prints it, every 100 steps and at the end.
  printed = {int(t): float(loss) for t, loss in re.findall(rf"^(\d+) ({FLOAT})$", output, re.M)}
  assert sorted(printed) == [0, 100, 149]
  assert printed[149] < printed[100] < printed[0] / 10
  assert number_after("final loss:", output) == printed[149]
  assert_png(tmp_path / "mlp_flax_loss.png")


def test_mlp_flax_follows_torch_to_float32_rounding(tmp_path):
  require("torch")
  require("tqdm")
  require("matplotlib")
  output = run_example(
    "mlp_flax.py", "--compare-torch", "--steps", "30", "--out", str(tmp_path / "out"), cwd=tmp_path
  )
  assert number_after("max relative loss difference vs torch:", output) < 1e-5
  assert number_after("max relative parameter difference vs torch:", output) < 1e-5
  assert_png(tmp_path / "out" / "mlp_flax_loss.png")


def test_mlp_flax_follows_torch_exactly_in_float64(tmp_path):
  require("torch")
  require("tqdm")
  output = run_example(
    "mlp_flax.py", "--compare-torch", "--float64", "--steps", "40", "--no-plot", cwd=tmp_path
  )
  assert number_after("max relative loss difference vs torch:", output) < 1e-12
  assert number_after("max relative parameter difference vs torch:", output) < 1e-12
  assert not list(tmp_path.iterdir()), "--no-plot wrote a file"


def test_reddi_synthetic_adam_goes_to_plus_one_and_amsgrad_to_minus_one(tmp_path):
  require("matplotlib")
  output = run_example(
    "reddi_synthetic.py", "--points", "500", "--out", str(tmp_path), cwd=tmp_path
  )
  for setting in ("online", "stochastic"):
    block = output.split(f"{setting}:", 1)[1]
    finals = dict(re.findall(rf"^\s+(\S.*?)\s+final x = ({FLOAT})", block, re.M)[:5])
    assert sorted(finals) == sorted(
      ["Adam", *(f"AMSGrad ({c})" for c in ("pytorch", "keras", "optax", "paper"))]
    )
    assert float(finals.pop("Adam")) > 0.95, setting
    for name, x in finals.items():
      assert float(x) < -0.95, f"{setting}: {name} ended at {x}"
  assert_png(tmp_path / "reddi_synthetic.png")


def test_sharded_training_asks_for_8_devices_and_shards_the_state_like_the_parameters(tmp_path):
  output = run_example("sharded_training.py", "--steps", "30", cwd=tmp_path)
  assert "over 8 cpu devices" in output
  assert output.count("sharded exactly like the parameters") == 2  # At init and after training.
  model_bytes = number_after("model:", output)
  per_device = [tuple(map(int, m)) for m in re.findall(r"cpu:\d+:\s+(\d+) B\s+(\d+) B", output)]
  assert len(per_device) == 8
  for params, state in per_device:
    assert params < model_bytes  # Model parallel: no device holds the whole model.
    assert state == 3 * params + 4  # mu, nu, nu_max like the parameters, plus an int32 count.
  losses = [float(x) for x in re.findall(rf"loss ({FLOAT})", output)]
  assert losses[-1] < losses[0]


def test_sharded_training_pmap_keeps_identical_replicas(tmp_path):
  output = run_example("sharded_training.py", "--pmap", "--steps", "30", cwd=tmp_path)
  assert "pmap over 8 cpu devices" in output
  assert "replicas of parameters and optimizer state are identical" in output
  model_bytes = number_after("model:", output)
  per_device = [tuple(map(int, m)) for m in re.findall(r"cpu:\d+:\s+(\d+) B\s+(\d+) B", output)]
  assert per_device == [(model_bytes, 3 * model_bytes + 4)] * 8


@pytest.mark.parametrize("reset_nu_max", [False, True], ids=["resume", "reset_nu_max_fails"])
def test_checkpoint_resume_is_bit_exact_and_the_check_catches_a_lost_nu_max(tmp_path, reset_nu_max):
  flags = ["--reset-nu-max"] if reset_nu_max else []
  output = run_example(
    "checkpoint_resume.py",
    "--steps", "40", "--save-at", "15", "--dir", str(tmp_path), *flags,
    cwd=tmp_path,
    expect_rc=1 if reset_nu_max else 0,
  )  # fmt: skip
  assert (tmp_path / "step_15").is_dir()
  assert "restored: step count 15" in output
  if reset_nu_max:
    assert "MISMATCH" in output
    assert ".nu_max[" in output
  else:
    assert "equals the uninterrupted run bit for bit" in output


def test_resume_from_pytorch_continues_pytorchs_run_to_float32_rounding(tmp_path):
  require("torch")
  output = run_example(
    "resume_from_pytorch.py",
    "--steps", "40", "--resume-steps", "30", "--print-every", "10", "--out", str(tmp_path),
    cwd=tmp_path,
  )  # fmt: skip
  # One line per printed step: step, both losses, and the two differences. (In float32 the
  # runs part later, as a ReLU unit falls on either side of zero: see mlp_flax.py.)
  rows = re.findall(rf"^\s*(\d+)\s+{FLOAT}\s+{FLOAT}\s+{FLOAT}\s+{FLOAT}$", output, re.M)
  assert [int(step) for step in rows] == [40, 50, 60, 69]
  assert number_after("max relative parameter difference vs torch:", output) < 1e-5
  checkpoint_loss = number_after("loss at the checkpoint:", output)
  assert number_after("max absolute loss difference vs torch:", output) < 1e-5 * checkpoint_loss
  assert_png(tmp_path / "resume_from_pytorch.png")


def test_resume_from_pytorch_continues_pytorchs_run_exactly_in_float64(tmp_path):
  require("torch")
  output = run_example(
    "resume_from_pytorch.py",
    "--float64", "--steps", "40", "--resume-steps", "40", "--print-every", "40", "--no-plot",
    cwd=tmp_path,
  )  # fmt: skip
  assert number_after("max relative parameter difference vs torch:", output) < 1e-12
  checkpoint_loss = number_after("loss at the checkpoint:", output)
  assert number_after("max absolute loss difference vs torch:", output) < 1e-12 * checkpoint_loss
  assert not list(tmp_path.iterdir()), "--no-plot wrote a file"
