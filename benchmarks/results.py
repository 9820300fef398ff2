"""Summarise a run: medians over rounds, ratios, the share of the limit; JSON and one table.

Each round gives, for each contender and case, the median of its timed steps. A cell of
the table is the median of those over rounds, with the fastest and slowest round in
brackets. "÷ torch fused" divides it by PyTorch's fused step's median on the same case.
"% of limit" is, per round, the time of one pass at the memory-bandwidth limit measured
in that process (:mod:`benchmarks.limit`, scaled to the contender's bytes per parameter)
over the step's median time; median over rounds, with the range.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks import limit
from benchmarks.cases import Plan
from benchmarks.contenders import TORCH_FUSED, by_name


def _entry(name: str, case_id: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
  """Medians over the rounds of one contender on one case."""
  results = [result["cases"][case_id] for result in rounds]
  step_s = [statistics.median(result["times_s"]) for result in results]
  entry: dict[str, Any] = {
    "median_ms": 1e3 * statistics.median(step_s),
    "min_ms": 1e3 * min(step_s),
    "max_ms": 1e3 * max(step_s),
    "rounds_ms": [1e3 * s for s in step_s],
  }
  if "limit_s" in results[0]:
    scale = by_name(name).bytes_per_param / limit.BYTES_PER_PARAM
    shares = [
      100 * scale * statistics.median(result["limit_s"]) / s
      for result, s in zip(results, step_s, strict=True)
    ]
    entry |= {"limit_pct": statistics.median(shares), "limit_pct_range": [min(shares), max(shares)]}
  if "native" in results[0]:
    entry["native"] = all(result["native"] for result in results)
  if "final_loss" in results[0]:
    entry["final_loss"] = results[-1]["final_loss"]
  return entry


def summarise(raw: dict[str, Any], plan: Plan) -> dict[str, Any]:
  """The run's numbers as written to the JSON file."""
  results, failures, versions = {}, {}, {}
  for name, rounds in raw["rounds"].items():
    errors = [result["error"] for result in rounds if "error" in result]
    if errors:
      failures[name] = errors[-1]
      continue
    versions |= rounds[0]["versions"]
    results[name] = {case.id: _entry(name, case.id, rounds) for case in plan.cases}
  for per_case in results.values():
    for case_id, entry in per_case.items():
      if TORCH_FUSED in results:
        entry["vs_torch_fused"] = entry["median_ms"] / results[TORCH_FUSED][case_id]["median_ms"]
  return {
    "machine": raw["machine"],
    "versions": versions,
    "rounds": plan.rounds,
    "wall_s": raw["wall_s"],
    "cases": [{"id": c.id, "label": c.label, "parameters": c.parameters} for c in plan.cases],
    "results": results,
    "failures": failures,
  }


def _range(median: float, low: float, high: float, form: str) -> str:
  def shown(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:{form}}"

  return f"{shown(median)} [{shown(low)}–{shown(high)}]"


def table(summary: dict[str, Any]) -> str:
  """The one generated table: a caption line, then a row per case and contender."""
  about = summary["machine"]
  lines = [
    f"{about['cpu']}, {about['cores']} cores, {about['date']}; rounds: {summary['rounds']}, "
    f"{summary['wall_s']:.0f} s; load average {about['load_average_at_start']:.1f} at the "
    f"start, {about['load_average_at_end']:.1f} at the end; "
    + ", ".join(f"{k} {v}" for k, v in sorted(summary["versions"].items())),
    "",
    "| case | contender | ms [min–max] | ÷ torch fused | % of limit |",
    "|---|---|--:|--:|--:|",
  ]
  for case in summary["cases"]:
    for name, per_case in summary["results"].items():
      entry = per_case[case["id"]]
      shown = name if entry.get("native", True) else f"{name} (Optax path)"
      ratio = f"{entry['vs_torch_fused']:.2f}" if "vs_torch_fused" in entry else "–"
      share = "–"
      if "limit_pct" in entry:
        share = _range(entry["limit_pct"], *entry["limit_pct_range"], ".0f")
      time_ms = _range(entry["median_ms"], entry["min_ms"], entry["max_ms"], ".3g")
      lines.append(f"| {case['label']} | {shown} | {time_ms} | {ratio} | {share} |")
  return "\n".join(lines) + "\n"


def write(summary: dict[str, Any], static: Path) -> tuple[Path, Path]:
  """``bench_results.json`` and ``bench_table.md`` in ``static``."""
  static.mkdir(parents=True, exist_ok=True)
  json_path, table_path = static / "bench_results.json", static / "bench_table.md"
  json_path.write_text(json.dumps(summary, indent=1) + "\n")
  table_path.write_text(table(summary))
  return json_path, table_path
