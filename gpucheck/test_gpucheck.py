"""Tests of the GPU check: its smoke run on the CPU, its slices of the suite, its table.

The smoke run (``python -m gpucheck --smoke``: tiny sizes, short budgets) runs
every part's code on the CPU, so the check cannot rot between runs on a GPU; it takes
about 40 s on 2 CPU cores. Times are never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from gpucheck import check as gpu
from gpucheck import shard as gpu_shard
from gpucheck import step as gpu_step

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
  out = tmp_path_factory.mktemp("gpu")
  command = [sys.executable, "-m", "gpucheck", "--smoke", "--platform", "cpu"]
  done = subprocess.run(
    [*command, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
  return json.loads((out / "gpu_results.json").read_text()), (out / "gpu_table.md").read_text()


def test_smoke_run_passes_every_part_within_its_budget(smoke_run: tuple[dict, str]) -> None:
  summary, table = smoke_run
  assert summary["smoke"] is True
  assert summary["platform"] == "cpu"
  assert list(summary["parts"]) == list(gpu.PART_TITLES)
  for name, part in summary["parts"].items():
    assert part["status"] == "passed", (name, part)
    assert part["wall_s"] <= part["budget_s"] + gpu.gpu_parts.GRACE_S
    assert f"**{gpu.PART_TITLES[name]}** (passed" in table


def test_smoke_run_counts_the_suite_in_slices(smoke_run: tuple[dict, str]) -> None:
  suite = smoke_run[0]["parts"]["suite"]
  assert suite["counts"]["passed"] > 0
  assert suite["counts"]["failed"] == suite["counts"]["errors"] == 0
  assert suite["counts"]["not reached"] == 0
  assert suite["failures"] == {}
  assert "(2 processes)" in suite["summary"]


def test_smoke_run_compares_the_example_with_the_cpu(smoke_run: tuple[dict, str]) -> None:
  runs = smoke_run[0]["parts"]["example"]["runs"]
  assert [run["platform"] for run in runs] == ["cpu", "cpu"]  # the smoke run's device is the CPU
  assert sorted(runs[0]["losses"], key=int) == ["0", "19"]  # keys of JSON
  assert runs[0]["final_vs_cpu"] == pytest.approx(1.0, rel=1e-6)


def test_smoke_run_times_every_contender_against_the_copy(smoke_run: tuple[dict, str]) -> None:
  summary, table = smoke_run
  step = summary["parts"]["step"]
  assert step["failures"] == {}
  assert list(step["results"]) == [c.name for c in gpu_step.CONTENDERS]
  for name, per_case in step["results"].items():
    assert [case["id"] for case in step["cases"]] == list(per_case)
    for case in step["cases"]:
      entry = per_case[case["id"]]
      assert 0 < entry["min_us"] <= entry["median_us"] <= entry["max_us"]
      assert entry["copy_us"] > 0
      assert entry["gb_per_s"] > 0
      assert entry["vs_torch_fused"] > 0
      assert f"| {case['label']} | {name} |" in table


def test_smoke_run_checks_both_sharded_runs(smoke_run: tuple[dict, str]) -> None:
  runs = smoke_run[0]["parts"]["sharded"]["runs"]
  assert runs["jit"]["layout"] == "mesh: {'data': 4, 'model': 2}"
  assert runs["pmap"]["devices"] == 8
  assert all(run["checked"] for run in runs.values())


def test_shards_split_the_tests_into_contiguous_slices_that_cover_them_once() -> None:
  items = list(range(10))
  kept = []
  for index in range(3):
    config = SimpleNamespace(getoption=lambda name, index=index: f"{index}/3")
    shard = list(items)
    gpu_shard.pytest_collection_modifyitems(config, shard)
    assert shard == sorted(shard)
    assert shard == list(range(shard[0], shard[-1] + 1))
    kept += shard
  assert kept == items


def test_the_table_says_what_failed_without_failing_itself() -> None:
  failed = {"status": "failed", "wall_s": 1.0, "budget_s": 10.0}
  summary = {
    "smoke": False,
    "wall_s": 5.0,
    "machine": {
      "nvidia_smi": ["NVIDIA H200, 143771 MiB, 570.00"],
      "device_kind": "NVIDIA H200",
      "device_count": 1,
      "backend": "gpu",
      "cpu": "a CPU",
      "cores": 16,
      "date": "2026-01-01 00:00 UTC",
      "packages": {"jax": "1.0", "torch": None},
    },
    "parts": {
      "suite": failed
      | {"summary": "1 passed, 1 failed", "failures": {"tests/test_a.py::test_b": "assert"}},
      "example": failed | {"progress_bar": "tqdm", "runs": [{"label": "cuda", "platform": "cuda"}]},
      "step": failed | {"error": "Traceback ...\nValueError: no"},
      "sharded": failed | {"runs": {"jit": {"checked": False}, "pmap": {"checked": False}}},
    },
  }
  table = gpu.table(summary)
  assert table.startswith("NVIDIA H200, 143771 MiB, 570.00 (1 device(s)")
  assert "Failed: `tests/test_a.py::test_b`." in table
  assert "| cuda | failed | – | – |" in table
  assert "**Update step** (failed, 1 s of 10): see gpu_results.json" in table
  assert "jit failed; pmap failed" in table
