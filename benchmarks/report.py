"""Turn the rounds' raw times into the summary, the Markdown tables and the JSON file.

Each process times many steps of a case; the round's number is their median. A table
cell is the median of the rounds' numbers, with the smallest and largest of them in
brackets, in milliseconds. Effective bandwidth is the traffic one pass over memory must
make (36 bytes per float32 parameter for AMSGrad, 28 for Adam) divided by the median
time; "% of limit" compares it with the best streaming rate measured in the same run.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks import bandwidth
from benchmarks.config import Case, Config, describe
from benchmarks.contenders import DEFAULT, OPTAX, TORCH_FUSED, Contender

START_MARKER = "<!-- bench-results:start -->"
END_MARKER = "<!-- bench-results:end -->"
APPLY_STEP = "amsgrad_jax.apply_step"
# amsgrad_jax with its default rule must not be slower than optax.amsgrad by more than this.
TOLERATED_RATIO = 1.05
_FACTS = (
  "xla_bytes_per_param",
  "xla_flops_per_param",
  "array_loops",
  "argument_bytes",
  "output_bytes",
  "alias_bytes",
  "temp_bytes",
  "state_bytes_per_param",
  "compile_s",
  "final_loss",
)


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
  """The summary written to JSON and rendered as tables."""
  run_config: Config = raw["config"]
  racing: list[Contender] = raw["contenders"]
  limit = bandwidth.limit(raw["bandwidth_rounds"])
  results: dict[str, dict[str, Any]] = {}
  failures: dict[str, str] = {}
  for contender in racing:
    finished = [r for r in raw["rounds"][contender.name] if "error" not in r]
    errors = [r["error"] for r in raw["rounds"][contender.name] if "error" in r]
    if errors:
      failures[contender.name] = errors[0]
    per_case = {}
    for case in run_config.cases:
      timed = [r for r in finished if case.id in r["cases"]]
      if timed:
        per_case[case.id] = _case_summary(contender, case, timed, limit["limit_gbs"])
    if per_case:
      results[contender.name] = per_case
  runtime = next((r for rs in raw["rounds"].values() for r in rs if "versions" in r), {})
  versions: dict[str, str] = {}
  for rounds in raw["rounds"].values():
    for result in rounds:
      versions.update(result.get("versions", {}))
  return {
    "config": run_config.name,
    "machine": {**raw["machine"], "jax_backend": runtime.get("backend")},
    "versions": versions,
    "rounds": run_config.rounds,
    "worker_timeout_s": run_config.worker_timeout_s,
    "wall_s": raw["wall_s"],
    "bandwidth": {**limit, "rounds": raw["bandwidth_rounds"]},
    "cases": describe(run_config),
    "contenders": [
      {
        "name": c.name,
        "framework": c.framework,
        "description": c.description,
        "one_pass_bytes_per_param": c.one_pass_bytes_per_param,
      }
      for c in racing
    ],
    "results": results,
    "ratios": _ratios(run_config, results, raw.get("paired_rounds", [])),
    "failures": failures,
    "timed_out": raw.get("timed_out", {}),
  }


def _case_summary(
  contender: Contender, case: Case, rounds: list[dict[str, Any]], limit_gbs: float
) -> dict[str, Any]:
  round_medians = [statistics.median(r["cases"][case.id]["times_s"]) for r in rounds]
  median_s = statistics.median(round_medians)
  entry: dict[str, Any] = {
    "median_ms": 1e3 * median_s,
    "min_ms": 1e3 * min(round_medians),
    "max_ms": 1e3 * max(round_medians),
    "rounds_ms": [1e3 * t for t in round_medians],
  }
  first = rounds[0]["cases"][case.id]
  entry.update({fact: first[fact] for fact in _FACTS if fact in first})
  if "array_loops" in entry and case.leaf_count:
    entry["loops_per_leaf"] = entry["array_loops"] / case.leaf_count
  if case.kind == "step":
    one_pass_bytes = case.parameter_count * contender.one_pass_bytes_per_param
    entry["effective_gbs"] = one_pass_bytes / median_s * 1e-9
    entry["percent_of_limit"] = 100 * entry["effective_gbs"] / limit_gbs
    entry["limit_ms"] = 1e3 * one_pass_bytes / (limit_gbs * 1e9)
  return entry


def _ratio(results: dict[str, Any], numerator: str, denominator: str, case_id: str) -> float | None:
  top = results.get(numerator, {}).get(case_id)
  bottom = results.get(denominator, {}).get(case_id)
  if top is None or bottom is None:
    return None
  return top["median_ms"] / bottom["median_ms"]


def _paired_ratio(paired_rounds: list[dict[str, Any]], case_id: str) -> float | None:
  """Median over rounds of amsgrad_jax's median step over optax.amsgrad's, both timed in
  one process (:mod:`benchmarks.paired`)."""
  per_round = [
    statistics.median(r[case_id][DEFAULT]) / statistics.median(r[case_id][OPTAX])
    for r in paired_rounds
    if case_id in r
  ]
  return statistics.median(per_round) if per_round else None


def _ratios(
  run_config: Config, results: dict[str, Any], paired_rounds: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
  """Median-time ratios per headline case; ``holds`` checks the 1.05 bound on (a), (b)."""
  ratios = {}
  for case in run_config.cases:
    if case.group == "scaling":
      continue
    entry: dict[str, Any] = {
      "ours_vs_optax": _ratio(results, DEFAULT, OPTAX, case.id),
      "ours_vs_torch_fused": _ratio(results, DEFAULT, TORCH_FUSED, case.id),
      "apply_step_vs_torch_fused": _ratio(results, APPLY_STEP, TORCH_FUSED, case.id),
      "apply_step_vs_optax": _ratio(results, APPLY_STEP, OPTAX, case.id),
      "ours_vs_optax_same_process": _paired_ratio(paired_rounds, case.id),
    }
    if case.group in ("a", "b") and entry["ours_vs_optax"] is not None:
      entry["holds"] = entry["ours_vs_optax"] <= TOLERATED_RATIO
    ratios[case.id] = entry
  return ratios


# ----------------------------------------------------------------------------- Markdown


def _cell(entry: dict[str, Any] | None) -> str:
  if entry is None:
    return "–"
  return f"{_ms(entry['median_ms'])} [{_ms(entry['min_ms'])}–{_ms(entry['max_ms'])}]"


def _ms(value: float) -> str:
  return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _optional(value: float | None, spec: str) -> str:
  return "–" if value is None else format(value, spec)


def _load(machine: dict[str, Any]) -> str:
  start, end = machine.get("load_average") or (None, None)
  return f"{_optional(start, '.1f')} at the start, {_optional(end, '.1f')} at the end"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return lines


def _reference_case(summary: dict[str, Any]) -> dict[str, Any]:
  """The middle single-leaf headline case (16M parameters in the full run)."""
  single = [c for c in summary["cases"] if c["group"] == "a"]
  return sorted(single, key=lambda c: c["parameters"])[len(single) // 2]


def _floors(summary: dict[str, Any], case: dict[str, Any]) -> str:
  """The reference case against the limit: one pass, XLA's traffic, what was measured."""
  limit_gbs = summary["bandwidth"]["limit_gbs"]
  parameters = case["parameters"]
  ours = summary["results"].get(DEFAULT, {}).get(case["id"], {})
  xla_bytes = ours.get("xla_bytes_per_param")

  def at_limit(bytes_per_param: float) -> str:
    return f"{1e3 * parameters * bytes_per_param / (limit_gbs * 1e9):.3g} ms"

  measured = [
    f"{name} {summary['results'][name][case['id']]['median_ms']:.3g} ms"
    for name in (DEFAULT, OPTAX, TORCH_FUSED, APPLY_STEP)
    if case["id"] in summary["results"].get(name, {})
  ]
  text = (
    f"**Floors on {case['label']}** at {limit_gbs:.1f} GB/s: one pass (36 bytes/param) "
    f"takes {at_limit(36)}"
  )
  if xla_bytes is not None:
    loops = ours.get("loops_per_leaf")
    text += (
      f"; the {_optional(loops, '.0f')} loops XLA compiles ({xla_bytes:.0f} bytes/param) "
      f"take {at_limit(xla_bytes)}"
    )
  return text + ". Measured: " + ", ".join(measured) + "."


def markdown(summary: dict[str, Any]) -> str:
  """The generated part of the Benchmarks page."""
  machine, limit = summary["machine"], summary["bandwidth"]
  versions = ", ".join(f"{name} {version}" for name, version in sorted(summary["versions"].items()))
  names = [c["name"] for c in summary["contenders"]]
  results = summary["results"]
  headline = [c for c in summary["cases"] if c["group"] != "scaling"]
  step_cases = [c for c in headline if c["kind"] == "step"]
  lines = [
    f"Measured on {machine['cpu']} ({machine['cores']} CPU cores), {machine['date']}, "
    f"{machine['system']}, Python {machine['python']}, {versions}; "
    f"{summary['rounds']} rounds of alternating processes, {summary['wall_s']:.0f} s in all; "
    f"1-minute load average {_load(machine)} (other work on the same cores).",
    "",
    f"**Memory bandwidth** ({limit['method']}), best [median] GB/s: "
    + ", ".join(
      f"{kernel} {_optional(limit[f'{kernel}_best_gbs'], '.1f')} "
      f"[{_optional(limit[f'{kernel}_median_gbs'], '.1f')}]"
      for kernel in bandwidth.KERNELS
    )
    + f". **Limit: {limit['limit_gbs']:.1f} GB/s.**",
    "",
    "**Time per update step (case d: per whole training loop), ms, median [min–max] over rounds**",
    "",
  ]
  header = ["contender", *[f"({c['group']}) {c['label']}" for c in headline]]
  lines += _table(
    header,
    [[name, *[_cell(results.get(name, {}).get(c["id"])) for c in headline]] for name in names],
  )
  lines += [
    "",
    "**Effective bandwidth, GB/s (% of the limit)**, counting the bytes one pass must move "
    "(36 per parameter for AMSGrad, 28 for Adam)",
    "",
  ]
  header = ["contender", *[f"({c['group']}) {c['label']}" for c in step_cases]]
  rows = []
  for name in names:
    row = [name]
    for case in step_cases:
      entry = results.get(name, {}).get(case["id"])
      row.append(
        "–" if entry is None else f"{entry['effective_gbs']:.1f} ({entry['percent_of_limit']:.0f}%)"
      )
    rows.append(row)
  lines += _table(header, rows)

  reference = _reference_case(summary)
  many = next((c for c in headline if c["group"] == "b"), None)
  lines += [
    "",
    f"**The compiled step on {reference['label']}**: XLA's `cost_analysis()` and "
    "`memory_analysis()` of the donated step; state bytes per parameter for every contender",
    "",
  ]
  header = [
    "contender",
    "XLA bytes/param",
    "loops/leaf",
    f"loops/leaf, {many['label']}" if many else "loops/leaf (b)",
    "aliased MB",
    "temp bytes",
    "state bytes/param",
    f"compile s, {many['label']}" if many else "compile s (b)",
  ]
  rows = []
  for name in names:
    entry = results.get(name, {}).get(reference["id"])
    if entry is None:
      rows.append([name, *["–"] * (len(header) - 1)])
      continue
    many_entry = results.get(name, {}).get(many["id"]) if many else None
    rows.append(
      [
        name,
        _optional(entry.get("xla_bytes_per_param"), ".1f"),
        _optional(entry.get("loops_per_leaf"), ".3g"),
        _optional((many_entry or {}).get("loops_per_leaf"), ".3g"),
        _optional(None if entry.get("alias_bytes") is None else entry["alias_bytes"] / 1e6, ".0f"),
        _optional(entry.get("temp_bytes"), ".0f"),
        _optional(entry.get("state_bytes_per_param"), ".1f"),
        _optional((many_entry or {}).get("compile_s"), ".1f"),
      ]
    )
  lines += _table(header, rows)

  lines += ["", _floors(summary, reference)]
  lines += ["", "**Ratios of median times** (below 1: the first is faster)", ""]
  has_apply_step = APPLY_STEP in results
  header = [
    "case",
    f"{DEFAULT} / {OPTAX}",
    "the same, in one process",
    f"{DEFAULT} / {TORCH_FUSED}",
  ]
  if has_apply_step:
    header += [f"{APPLY_STEP} / {TORCH_FUSED}", f"{APPLY_STEP} / {OPTAX}"]
  rows = []
  for case in headline:
    ratio = summary["ratios"][case["id"]]
    holds = ratio.get("holds")
    mark = "" if holds is None else (" ✓" if holds else f" ✗ (above {TOLERATED_RATIO})")
    row = [
      f"({case['group']}) {case['label']}",
      _optional(ratio["ours_vs_optax"], ".3f") + mark,
      _optional(ratio["ours_vs_optax_same_process"], ".3f"),
      _optional(ratio["ours_vs_torch_fused"], ".3f"),
    ]
    if has_apply_step:
      row += [
        _optional(ratio["apply_step_vs_torch_fused"], ".3f"),
        _optional(ratio["apply_step_vs_optax"], ".3f"),
      ]
    rows.append(row)
  lines += _table(header, rows)
  lines += ["", "–: not run (see the notes below the tables) or not applicable."]
  if summary["failures"]:
    lines += ["", "**Failed:** " + ", ".join(sorted(summary["failures"]))]
  for name, case_ids in summary["timed_out"].items():
    lines += [
      "",
      f"**Stopped:** {name} did not finish {', '.join(case_ids)} within "
      f"{summary['worker_timeout_s']:.0f} s per process (compilation included).",
    ]
  lines += [
    "",
    "![step time against parameter count](_static/bench_scaling_params.png)",
    "",
    "![step time against leaf count](_static/bench_scaling_leaves.png)",
  ]
  return "\n".join(lines) + "\n"


def write(summary: dict[str, Any], docs_dir: Path) -> tuple[Path, Path]:
  """Write the JSON into ``docs_dir/_static`` and the tables into ``docs_dir/benchmarks.md``
  between the markers (creating the page if it does not exist); returns both paths."""
  static = docs_dir / "_static"
  static.mkdir(parents=True, exist_ok=True)
  json_path = static / "bench_results.json"
  json_path.write_text(json.dumps(summary, indent=1) + "\n")
  page = docs_dir / "benchmarks.md"
  block = f"{START_MARKER}\n{markdown(summary)}{END_MARKER}"
  text = page.read_text() if page.exists() else f"# Benchmarks\n\n{START_MARKER}\n{END_MARKER}\n"
  if START_MARKER not in text or END_MARKER not in text:
    text = text.rstrip("\n") + f"\n\n{START_MARKER}\n{END_MARKER}\n"
  before, rest = text.split(START_MARKER, 1)
  after = rest.split(END_MARKER, 1)[1]
  page.write_text(before + block + after)
  return json_path, page
