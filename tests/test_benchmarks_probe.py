"""The in-process bandwidth limit: the probe library, the step's buffers, the report's fraction.

The probe (``benchmarks/probe.c``) runs inside the JAX worker on the very buffers of the
step it has just timed, so it must leave every value as it was, and must really read and
write all five buffers over their whole length (checked by running it once with a scale
of 1, when each updated buffer must come back as itself plus the gradient). The report's
"% of the in-process limit" is the median over rounds of each process's probe median over
its step median; it is checked against rounds built from chosen fractions, with step
speeds that differ from round to round as the machine's processes do.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import statistics
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import amsgrad_jax
from benchmarks import bandwidth, jax_worker, probe, report
from benchmarks.config import Case, Config
from benchmarks.contenders import APPLY_STEP, APPLY_STEP_FLAT, TORCH_FUSED, Contender


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
  if bandwidth.compiler() is None:
    pytest.skip("no C compiler on this machine")
  built = probe.build(tmp_path_factory.mktemp("probe"))
  assert built is not None, "a C compiler was found but could not build benchmarks/probe.c"
  return built


def _buffers(elements: int, seed: int = 0) -> list[np.ndarray]:
  """g, p, mu, nu, nu_max: random float32 of both signs (never -0.0)."""
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(elements, dtype=np.float32) + np.float32(3.0) for _ in range(5)]


@pytest.mark.parametrize(("elements", "threads"), [(100_003, 3), (5, 4), (4096, 1)])
def test_probe_leaves_every_value_bit_for_bit(library: Path, elements: int, threads: int) -> None:
  buffers = _buffers(elements)
  buffers[1][::2] *= np.float32(-1.0)  # Negative values too: x + 0*g must be x for both.
  before = [b.copy() for b in buffers]
  seconds = probe.Probe(library, thread_count=threads).time_pass(
    [b.ctypes.data for b in buffers], elements
  )
  assert seconds > 0
  for after, original in zip(buffers, before, strict=True):
    np.testing.assert_array_equal(after.view(np.uint32), original.view(np.uint32))


@pytest.mark.parametrize(("elements", "threads"), [(100_003, 3), (5, 4), (33, 2)])
def test_probe_reads_and_writes_all_five_buffers_to_the_end(
  library: Path, elements: int, threads: int
) -> None:
  # With a scale of 1 the pass must add g to each of the other four, over every element
  # and every thread's part, and leave g alone.
  buffers = _buffers(elements, seed=1)
  g, *updated = [b.copy() for b in buffers]
  probe.Probe(library, thread_count=threads).time_pass(
    [b.ctypes.data for b in buffers], elements, scale=1.0
  )
  np.testing.assert_array_equal(buffers[0], g)
  for after, original in zip(buffers[1:], updated, strict=True):
    np.testing.assert_array_equal(after, original + g)


def test_probe_refuses_buffers_that_are_not_five_distinct_ones(library: Path) -> None:
  buffers = _buffers(8)
  pointers = [b.ctypes.data for b in buffers]
  with pytest.raises(ValueError, match="five distinct"):
    probe.Probe(library).time_pass([*pointers[:4], pointers[0]], 8)
  with pytest.raises(ValueError, match="five distinct"):
    probe.Probe(library).time_pass(pointers[:4], 8)


_MOMENT = re.compile(r"\.(nu_max|nu|mu)(?!\w)")


def _moment_pointers(opt_state: object) -> dict[str, int]:
  """The buffer addresses of mu, nu and nu_max, found by their names in the state."""
  found = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
    match = _MOMENT.search(jax.tree_util.keystr(path))
    if match is not None:
      found[match.group(1)] = leaf.unsafe_buffer_pointer()
  return found


@pytest.mark.parametrize("flat_state", [False, True])
def test_leaf_pointers_are_the_steps_five_buffers(flat_state: bool) -> None:
  if flat_state and "flat_state" not in inspect.signature(amsgrad_jax.amsgrad).parameters:
    pytest.skip("amsgrad_jax.amsgrad has no flat_state")
  options = {"flat_state": True} if flat_state else {}
  params = [jnp.arange(64, dtype=jnp.float32)]
  grads = [jnp.full((64,), 0.5, jnp.float32)]
  opt_state = amsgrad_jax.amsgrad(1e-3, **options).init(params)
  pointers = jax_worker.leaf_pointers(params, grads, opt_state)
  moments = _moment_pointers(opt_state)
  assert sorted(moments) == ["mu", "nu", "nu_max"]
  assert pointers[:2] == [grads[0].unsafe_buffer_pointer(), params[0].unsafe_buffer_pointer()]
  assert sorted(pointers[2:]) == sorted(moments.values())
  assert len(set(pointers)) == 5


def test_leaf_pointers_refuse_a_tree_of_several_leaves() -> None:
  params = [jnp.zeros(8, jnp.float32), jnp.zeros(8, jnp.float32)]
  with pytest.raises(ValueError):  # noqa: PT011 (the unpacking's own message)
    jax_worker.leaf_pointers(params, params, amsgrad_jax.amsgrad(1e-3).init(params))


# ------------------------------------------------------------------------------ report

ELEMENTS = 1_000_000


def _round(step_median_s: float, fraction: float, rng: np.random.Generator) -> dict[str, object]:
  """One process's times: steps with median ``step_median_s`` and probe passes with median
  ``fraction * step_median_s``, each spread around its median (differently, so that their
  fastest, mean or slowest times have other ratios) and shuffled."""
  steps = step_median_s * np.array([0.8, 0.95, 1.0, 1.1, 1.6])
  probes = fraction * step_median_s * np.array([0.97, 0.99, 1.0, 1.3, 2.0])
  return {
    "times_s": rng.permutation(steps).tolist(),
    "probe_times_s": rng.permutation(probes).tolist(),
    "probe_threads": 2,
    "probe_bytes_per_param": 36,
  }


def _bandwidth_round(best: float) -> dict[str, object]:
  rates = {f"{k}_{s}_gbs": best * 0.9 for k in bandwidth.KERNELS for s in ("best", "median")}
  return {**rates, "step_best_gbs": best, "threads": 2, "method": "stream.c (test)"}


def _raw(fractions: dict[str, list[float]], step_medians_s: list[float]) -> dict[str, object]:
  """A hand-made raw result: one single-leaf case, one contender per entry of
  ``fractions``, one process per round."""
  case = Case(id="leaf-1M", group="a", label="1 leaf of 1M", kind="step", shapes=((ELEMENTS,),))
  run_config = Config(
    name="test",
    cases=(case,),
    rounds=len(step_medians_s),
    bandwidth_elements=0,
    bandwidth_repetitions=0,
    worker_timeout_s=1.0,
  )
  rng = np.random.default_rng(7)
  racing = [
    Contender(name, "torch", "amsgrad", f"{name}(...)", torch_options={"fused": True})
    if name == TORCH_FUSED
    else Contender(name, "jax", "amsgrad", f"{name}(...)", apply="apply_step")
    for name in fractions
  ]
  rounds = {
    name: [
      {"contender": name, "cases": {case.id: _round(median, fraction, rng)}}
      for median, fraction in zip(step_medians_s, per_round, strict=True)
    ]
    for name, per_round in fractions.items()
  }
  return {
    "config": run_config,
    "contenders": racing,
    "machine": {
      "cpu": "test",
      "cores": 2,
      "system": "test",
      "python": "3",
      "date": "today",
      "load_average": [0.0, 0.0],
    },
    "bandwidth_rounds": [_bandwidth_round(best) for best in (120.0, 72.0, 75.0)],
    "probe": {"method": probe.METHOD, "built": True, "error": None},
    "rounds": rounds,
    "timed_out": {},
    "paired_rounds": [],
    "wall_s": 1.0,
  }


def test_report_takes_the_median_over_rounds_of_each_process_fraction() -> None:
  # The processes run at different speeds (a fast round, a slow one, a middling one), and
  # in each the step reaches a chosen share of what the probe reached beside it.
  step_medians_s = [4e-3, 7e-3, 4.5e-3]
  fractions = {APPLY_STEP: [0.97, 0.62, 0.91], APPLY_STEP_FLAT: [0.80, 0.86, 0.84]}
  summary = report.summarise(_raw(fractions, step_medians_s))
  for name, per_round in fractions.items():
    entry = summary["results"][name]["leaf-1M"]
    assert entry["percent_of_in_process_limit_rounds"] == pytest.approx(
      [100 * f for f in per_round]
    )
    assert entry["percent_of_in_process_limit"] == pytest.approx(100 * statistics.median(per_round))
    probe_medians_s = [f * m for f, m in zip(per_round, step_medians_s, strict=True)]
    assert entry["in_process_limit_rounds_ms"] == pytest.approx([1e3 * t for t in probe_medians_s])
    assert entry["in_process_limit_gbs"] == pytest.approx(
      statistics.median(36 * ELEMENTS / t * 1e-9 for t in probe_medians_s)
    )
    # The stream.c limit stays what it was: the best step rate of any round (120 GB/s).
    step_gbs = 36 * ELEMENTS / statistics.median(step_medians_s) * 1e-9
    assert entry["percent_of_limit"] == pytest.approx(100 * step_gbs / 120.0)
  headline = summary["headline"]
  assert headline["case"] == "leaf-1M"
  assert headline["contenders"][APPLY_STEP]["holds"] is True  # 91% >= 90%
  assert headline["contenders"][APPLY_STEP_FLAT]["holds"] is False  # 84% < 90%

  page = report.markdown(summary)
  assert "% of the in-process limit" in page
  assert "stream.c limit: 120.0 GB/s" in page
  row = next(line for line in page.splitlines() if line.startswith(f"| {APPLY_STEP} | 91% "))
  assert "[62–97%]" in row
  assert "reaches 91% of the in-process limit ✓" in page
  assert "reaches 84% of the in-process limit ✗" in page


def test_report_sets_torch_fused_beside_the_headline_check_not_in_it() -> None:
  fractions = {APPLY_STEP: [0.95, 0.93, 0.90], TORCH_FUSED: [0.70, 0.55, 0.66]}
  summary = report.summarise(_raw(fractions, [4e-3, 7e-3, 4.5e-3]))
  entry = summary["results"][TORCH_FUSED]["leaf-1M"]
  assert entry["percent_of_in_process_limit"] == pytest.approx(66.0)
  assert entry["percent_of_in_process_limit_rounds"] == pytest.approx([70.0, 55.0, 66.0])
  headline = summary["headline"]
  assert set(headline["contenders"]) == {APPLY_STEP}
  assert headline["comparison"][TORCH_FUSED]["percent_of_in_process_limit"] == pytest.approx(66.0)

  page = report.markdown(summary)
  row = next(line for line in page.splitlines() if line.startswith(f"| {TORCH_FUSED} | 66% "))
  assert "[55–70%]" in row
  assert "reaches 93% of the in-process limit ✓" in page
  assert f"For comparison, {TORCH_FUSED} reaches 66% of its in-process limit" in page
  assert f"in the {TORCH_FUSED} processes" in page


def test_report_says_when_the_probe_did_not_run() -> None:
  raw = _raw({APPLY_STEP: [0.9]}, [4e-3])
  result = raw["rounds"][APPLY_STEP][0]["cases"]["leaf-1M"]
  for key in ("probe_times_s", "probe_threads", "probe_bytes_per_param"):
    del result[key]
  result["probe_error"] = probe.NOT_BUILT
  raw["config"] = dataclasses.replace(raw["config"], rounds=1)
  summary = report.summarise(raw)
  entry = summary["results"][APPLY_STEP]["leaf-1M"]
  assert "percent_of_in_process_limit" not in entry
  assert entry["probe_error"] == probe.NOT_BUILT
  assert summary["headline"]["contenders"][APPLY_STEP]["holds"] is None
  assert f"**In-process probe not run:** {probe.NOT_BUILT}." in report.markdown(summary)
