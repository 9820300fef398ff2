"""A smoke run of the benchmarks (tiny sizes, one round, one repetition) so they cannot rot.

Times are never asserted: they depend on the machine and on what else runs on it. What is
checked is that every code path runs (a JAX contender, Optax, PyTorch, the native step when
the package has it, with flat state when ``amsgrad`` takes it, the stream.c bandwidth probe,
the in-process probe beside the native step and PyTorch's fused step, the compiled-step
analysis, the report and the plots) and that the numbers it writes are well formed. Takes
about 20 s on 2 idle CPU cores.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _peers import require

import amsgrad_jax

ROOT = Path(__file__).resolve().parents[1]


def smoke_contenders() -> list[str]:
  names = ["amsgrad_jax", "optax.amsgrad", "torch fused"]
  return names + native_contenders()


def native_contenders() -> list[str]:
  """The ``apply_step`` contenders this installation has."""
  if not hasattr(amsgrad_jax, "apply_step"):
    return []
  names = ["amsgrad_jax.apply_step"]
  if "flat_state" in inspect.signature(amsgrad_jax.amsgrad).parameters:
    names.append("amsgrad_jax.apply_step (flat state)")
  return names


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
  require("torch")
  out = tmp_path_factory.mktemp("bench")
  completed = subprocess.run(
    [
      sys.executable,
      "-m",
      "benchmarks",
      "--quick",
      "--out",
      str(out),
      "--only",
      ",".join(smoke_contenders()),
    ],
    cwd=ROOT,
    env={**os.environ, "MPLBACKEND": "Agg"},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
  return out, completed.stdout


def test_quick_run_writes_json_page_and_plots(quick_run: tuple[Path, str]) -> None:
  out, stdout = quick_run
  summary = json.loads((out / "_static" / "bench_results.json").read_text())
  assert summary["config"] == "quick"
  assert summary["failures"] == {}
  assert {c["name"] for c in summary["contenders"]} == set(smoke_contenders())
  for name in ("bench_scaling_params.png", "bench_scaling_leaves.png"):
    assert (out / "_static" / name).read_bytes().startswith(b"\x89PNG")
  page = (out / "benchmarks.md").read_text()
  assert "<!-- bench-results:start -->" in page
  assert "<!-- bench-results:end -->" in page
  assert "Ratios of median times" in page
  assert "Ratios of median times" in stdout


def test_every_contender_timed_every_case(quick_run: tuple[Path, str]) -> None:
  out, _ = quick_run
  summary = json.loads((out / "_static" / "bench_results.json").read_text())
  case_ids = {case["id"] for case in summary["cases"]}
  assert {case["group"] for case in summary["cases"]} >= {"a", "b", "c", "d"}
  for name, per_case in summary["results"].items():
    assert set(per_case) == case_ids, name
    for case_id, entry in per_case.items():
      assert entry["min_ms"] <= entry["median_ms"] <= entry["max_ms"], (name, case_id)
      assert 0 < entry["median_ms"] < math.inf, (name, case_id)
  # The MLP loop trains: a finite loss from both frameworks.
  for name in ("amsgrad_jax", "torch fused"):
    assert math.isfinite(summary["results"][name]["mlp-loop"]["final_loss"])


def test_limit_and_compiled_step_facts(quick_run: tuple[Path, str]) -> None:
  out, _ = quick_run
  summary = json.loads((out / "_static" / "bench_results.json").read_text())
  assert summary["bandwidth"]["limit_gbs"] > 0
  ours = summary["results"]["amsgrad_jax"]["leaf-16000"]
  # XLA reads and writes at least what one pass needs: 36 bytes per float32 parameter.
  assert ours["xla_bytes_per_param"] >= 36
  assert ours["state_bytes_per_param"] == pytest.approx(12.0, abs=0.01)  # mu, nu, nu_max
  assert ours["alias_bytes"] > 0  # donation took effect
  assert summary["results"]["torch fused"]["leaf-16000"]["state_bytes_per_param"] >= 12.0
  ratio = summary["ratios"]["leaf-16000"]
  assert ratio["ours_vs_optax"] > 0
  assert ratio["ours_vs_torch_fused"] > 0
  assert ratio["ours_vs_optax_same_process"] > 0


def test_in_process_limit_of_the_native_and_fused_steps_on_single_leaves(
  quick_run: tuple[Path, str],
) -> None:
  out, _ = quick_run
  summary = json.loads((out / "_static" / "bench_results.json").read_text())
  native = native_contenders()
  if not native:
    pytest.skip("this amsgrad_jax has no apply_step")
  assert summary["in_process_probe"]["built"] is True
  single = [case["id"] for case in summary["cases"] if case["leaves"] == 1]
  assert single  # the quick run has single-leaf cases
  for name, per_case in summary["results"].items():
    for case_id, entry in per_case.items():
      probed = name in (*native, "torch fused") and case_id in single
      assert ("percent_of_in_process_limit" in entry) == probed, (name, case_id)
      if probed:
        assert "probe_error" not in entry
        assert entry["percent_of_in_process_limit"] > 0
        assert len(entry["percent_of_in_process_limit_rounds"]) == summary["rounds"]
        assert entry["in_process_limit_ms"] > 0
        assert entry["in_process_limit_gbs"] > 0
        assert entry["probe_threads"] >= 1
  headline = summary["headline"]
  assert set(headline["contenders"]) == set(native)
  for check in headline["contenders"].values():
    assert check["percent_of_in_process_limit"] > 0
    assert isinstance(check["holds"], bool)
  fused = headline["comparison"]["torch fused"]
  assert fused["percent_of_in_process_limit"] > 0
  assert "holds" not in fused  # beside the check, not part of it
  page = (out / "benchmarks.md").read_text()
  assert "% of the in-process limit" in page
  # torch fused's row of the in-process table: a percentage [min–max] per single leaf.
  assert re.search(r"^\| torch fused \| \d+% \[\d+–\d+%\], [\d.]+ GB/s \|", page, re.M)
  assert "For comparison, torch fused reaches" in page
  assert "stream.c limit" in page
  ratio_keys = {
    "amsgrad_jax.apply_step": "apply_step_vs_torch_fused",
    "amsgrad_jax.apply_step (flat state)": "apply_step_flat_vs_torch_fused",
  }
  for name in native:
    assert f"{name} / torch fused" in page
    assert summary["ratios"]["leaf-16000"][ratio_keys[name]] > 0
