"""The precision study end to end at smoke size: ``python -m studies.precision --smoke``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from studies.precision.configurations import CONFIGURATIONS, REFERENCE
from studies.precision.tasks import PEERS, TASK_NAMES, TORCH_REFERENCE

ROOT = Path(__file__).resolve().parents[1]


def run_smoke_study(out: Path) -> dict:
  """Run the study as a user would; returns its JSON."""
  command = [sys.executable, "-m", "studies.precision", "--smoke", "--out", str(out)]
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  return json.loads((out / "precision_results.json").read_text())


def finished_runs(entry: dict) -> list[dict]:
  """The runs of a configuration that trained to the end."""
  return [run for run in entry["runs"] if "metrics" in run]


def test_smoke_study_covers_every_task_and_configuration(tmp_path: Path) -> None:
  results = run_smoke_study(tmp_path)

  expected = {configuration.name for configuration in CONFIGURATIONS} | set(PEERS)
  assert set(results["tasks"]) == set(TASK_NAMES)
  for name, task in results["tasks"].items():
    configurations = task["configurations"]
    assert set(configurations) == expected, name
    for reference in (REFERENCE, TORCH_REFERENCE):
      assert finished_runs(configurations[reference]), (name, reference)
    for config, entry in configurations.items():
      # Each configuration ran, or says why it did not.
      said_why = "not_available" in entry or "error" in entry
      said_why = said_why or any("error" in run for run in entry["runs"])
      assert finished_runs(entry) or said_why, (name, config)
      for run in finished_runs(entry):
        losses = run["curve"]["loss"]
        assert not run["nan"], (name, config)
        assert losses, (name, config)
        assert all(loss is not None and math.isfinite(loss) for loss in losses), (name, config)
        assert all(math.isfinite(value) for value in run["metrics"].values())

  table = (tmp_path / "precision_table.md").read_text()
  assert all(config in table for config in expected)
  assert (tmp_path / "precision_curves.png").stat().st_size > 0
