"""Tests of the benchmark harness: a smoke run of every code path, the limit, the summary.

Times are never asserted: they depend on the machine and on what else runs on it. The
smoke run (``python -m benchmarks --quick``) takes about 30 s on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import cases, limit, results
from benchmarks.contenders import CONTENDERS, TORCH_FUSED

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_times_every_contender_on_every_case(tmp_path: Path) -> None:
  command = [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)]
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  summary = json.loads((tmp_path / "bench_results.json").read_text())
  table = (tmp_path / "bench_table.md").read_text()
  assert summary["failures"] == {}
  assert list(summary["results"]) == [c.name for c in CONTENDERS]
  for case in cases.quick().cases:
    for contender in CONTENDERS:
      entry = summary["results"][contender.name][case.id]
      assert 0 < entry["min_ms"] <= entry["median_ms"] <= entry["max_ms"]
      assert entry["vs_torch_fused"] > 0
      assert ("limit_pct" in entry) == (case.steps == 0)
      assert ("native" in entry) == contender.native
      if case.steps:
        assert math.isfinite(entry["final_loss"])
      assert f"| {case.label} | {contender.name}" in table


@pytest.fixture
def compiler() -> None:
  if shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"):
    return
  if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    pytest.fail("CI has a C compiler")
  pytest.skip("no C compiler (cc, gcc or clang) for the bandwidth limit")


@pytest.mark.usefixtures("compiler")
@pytest.mark.parametrize("elements", [5, 100_003])
def test_limit_pass_reads_and_writes_all_five_buffers_and_changes_nothing(elements: int) -> None:
  rng = np.random.default_rng(0)
  buffers = [rng.standard_normal(elements, dtype=np.float32) for _ in range(5)]
  before = [b.copy() for b in buffers]
  assert limit.one_pass(buffers) > 0
  for after, original in zip(buffers, before, strict=True):
    np.testing.assert_array_equal(np.abs(after), np.abs(original))  # -0.0 may become +0.0
  limit.one_pass(buffers, scale=1.0)
  np.testing.assert_array_equal(buffers[0], before[0])
  for after, original in zip(buffers[1:], before[1:], strict=True):
    np.testing.assert_array_equal(after, original + before[0])


def test_summary_gives_medians_over_rounds_ratios_and_the_share_of_the_limit() -> None:
  plan = cases.Plan([cases.Case("c", "a case", [[1000]])], rounds=3)

  def rounds(step_ms: list[float], limit_ms: float) -> list[dict]:
    return [
      {
        "versions": {},
        "cases": {"c": {"times_s": [t / 1e3, t / 1e3, 9.0], "limit_s": [limit_ms / 1e3]}},
      }
      for t in step_ms
    ]

  raw = {
    "machine": {},
    "wall_s": 1.0,
    "rounds": {
      TORCH_FUSED: rounds([4.0, 2.0, 3.0], 1.5),
      "optax.adam": rounds([6.0, 8.0, 7.0], 3.6),
    },
  }
  summary = results.summarise(raw, plan)
  fused, adam = summary["results"][TORCH_FUSED]["c"], summary["results"]["optax.adam"]["c"]
  assert (fused["median_ms"], fused["min_ms"], fused["max_ms"]) == pytest.approx((3.0, 2.0, 4.0))
  assert adam["vs_torch_fused"] == pytest.approx(7.0 / 3.0)
  assert fused["limit_pct"] == pytest.approx(50.0)  # 1.5 ms at the limit, 3 ms a step
  # Adam moves 28 bytes where the limit's pass moves 36: 3.6 * 28 / 36 = 2.8 ms of 7.
  assert adam["limit_pct"] == pytest.approx(40.0)
  assert adam["limit_pct_range"] == pytest.approx([2.8 / 8 * 100, 2.8 / 6 * 100])


def test_the_nnx_comparison_times_every_way_at_each_size(tmp_path: Path) -> None:
  from benchmarks import nnx

  command = [sys.executable, "-m", "benchmarks.nnx", "--quick", "--out", str(tmp_path)]
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  rows = json.loads((tmp_path / "nnx_results.json").read_text())
  assert [row["parameters"] for row in rows] == [
    nnx.INPUTS * w + w + w * w + w + w + 1 for w in nnx.WIDTHS[:2]
  ]
  for row in rows:
    assert list(row["medians_s"]) == list(nnx.WAYS)
    assert all(len(times) == 1 and times[0] > 0 for times in row["medians_s"].values())
  lines = (tmp_path / "nnx_table.md").read_text().splitlines()
  assert len(lines) == 2 + len(rows)
  assert all(line.count("µs") == len(nnx.WAYS) for line in lines[2:])
