"""Turn the rounds' raw times into the summary, the Markdown tables and the JSON file.

Each process times many steps of a case; the round's number is their median. A table
cell is the median of the rounds' numbers, with the smallest and largest of them in
brackets, in milliseconds. Effective bandwidth is the traffic one pass over memory must
make (36 bytes per float32 parameter for AMSGrad, 28 for Adam) divided by the median
time. Two limits put it in context:

* the **stream.c limit** (``percent_of_limit``, ``limit_gbs``): the best rate stream.c
  reached in any round, each round in a process of its own (:mod:`benchmarks.bandwidth`).
  A process's memory speed varies from one process to the next, so a step's median
  against the best of other processes is context, not a like-for-like comparison;
* the **in-process limit** (``percent_of_in_process_limit``), for the ``apply_step``
  contenders and for PyTorch's fused step (:data:`PROBED`) on one leaf: in each of their
  worker processes, as many passes of ``probe.c`` over the step's own buffers as timed steps, right after them
  (:mod:`benchmarks.probe`). Both move 36 bytes per parameter, so the step runs at
  ``f = median(probe times) / median(step times)`` of the rate the probe reached in that
  process; the summary is the median of ``f`` over the rounds
  (``percent_of_in_process_limit_rounds`` keeps each round's). The headline check is
  about the ``apply_step`` contenders; torch fused's share is given beside it for
  comparison.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks import bandwidth, probe
from benchmarks.config import Case, Config, describe
from benchmarks.contenders import (
  APPLY_STEP,
  APPLY_STEP_FLAT,
  DEFAULT,
  OPTAX,
  TORCH_FUSED,
  Contender,
)

START_MARKER = "<!-- bench-results:start -->"
END_MARKER = "<!-- bench-results:end -->"
# amsgrad_jax with its default rule must not be slower than optax.amsgrad by more than this.
TOLERATED_RATIO = 1.05
# On the middle single leaf (16M), apply_step must reach this share of the in-process limit.
HEADLINE_PERCENT = 90.0
NATIVE = (APPLY_STEP, APPLY_STEP_FLAT)
# The contenders whose workers run the in-process probe on single-leaf cases.
PROBED = (*NATIVE, TORCH_FUSED)
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
  cases = describe(run_config)
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
    "in_process_probe": raw.get("probe", {"method": probe.METHOD}),
    "cases": cases,
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
    "headline": _headline(cases, results),
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
    entry.update(_in_process(case, [r["cases"][case.id] for r in rounds]))
  return entry


def in_process_fraction(case_result: dict[str, Any]) -> float | None:
  """One process's step as a fraction of its in-process limit: the probe's median time
  over the step's median time (both passes move 36 bytes per parameter, so this is the
  step's rate over the probe's); ``None`` when the probe did not run."""
  probe_times = case_result.get("probe_times_s")
  if not probe_times or not case_result.get("times_s"):
    return None
  return statistics.median(probe_times) / statistics.median(case_result["times_s"])


def _in_process(case: Case, case_results: list[dict[str, Any]]) -> dict[str, Any]:
  """The in-process limit of one contender on ``case`` from each round's process
  (``case_results``): the median over rounds of :func:`in_process_fraction`, as a
  percentage, with each round's, and the probe's own median time and rate."""
  entry: dict[str, Any] = {}
  errors = [r["probe_error"] for r in case_results if r.get("probe_error")]
  if errors:
    entry["probe_error"] = errors[0]
  measured = [r for r in case_results if in_process_fraction(r) is not None]
  if not measured:
    return entry
  percents = [100 * in_process_fraction(r) for r in measured]
  probe_medians = [statistics.median(r["probe_times_s"]) for r in measured]
  bytes_per_param = measured[0].get("probe_bytes_per_param", probe.BYTES_PER_ELEMENT)
  probe_gbs = [case.parameter_count * bytes_per_param / t * 1e-9 for t in probe_medians]
  entry.update(
    {
      "percent_of_in_process_limit": statistics.median(percents),
      "percent_of_in_process_limit_rounds": percents,
      "in_process_limit_ms": 1e3 * statistics.median(probe_medians),
      "in_process_limit_rounds_ms": [1e3 * t for t in probe_medians],
      "in_process_limit_gbs": statistics.median(probe_gbs),
      "probe_threads": measured[0].get("probe_threads"),
    }
  )
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
      "apply_step_flat_vs_torch_fused": _ratio(results, APPLY_STEP_FLAT, TORCH_FUSED, case.id),
      "apply_step_flat_vs_optax": _ratio(results, APPLY_STEP_FLAT, OPTAX, case.id),
      "apply_step_flat_vs_apply_step": _ratio(results, APPLY_STEP_FLAT, APPLY_STEP, case.id),
      "ours_vs_optax_same_process": _paired_ratio(paired_rounds, case.id),
    }
    if case.group in ("a", "b") and entry["ours_vs_optax"] is not None:
      entry["holds"] = entry["ours_vs_optax"] <= TOLERATED_RATIO
    ratios[case.id] = entry
  return ratios


def _headline(cases: list[dict[str, Any]], results: dict[str, Any]) -> dict[str, Any] | None:
  """The headline check: on the middle single leaf (16M parameters in the full run), each
  ``apply_step`` contender's share of the in-process limit (``holds`` when it is at least
  :data:`HEADLINE_PERCENT`), with its share of the stream.c limit beside it for context;
  ``comparison`` gives torch fused's two shares on the same case (no check)."""
  if not any(c["group"] == "a" for c in cases):
    return None
  reference = _reference_case(cases)
  per_contender = {}
  for name in NATIVE:
    entry = results.get(name, {}).get(reference["id"])
    if entry is None:
      continue
    percent = entry.get("percent_of_in_process_limit")
    per_contender[name] = {
      "percent_of_in_process_limit": percent,
      "percent_of_stream_limit": entry.get("percent_of_limit"),
      "holds": None if percent is None else percent >= HEADLINE_PERCENT,
    }
  comparison = {}
  entry = results.get(TORCH_FUSED, {}).get(reference["id"])
  if entry is not None:
    comparison[TORCH_FUSED] = {
      "percent_of_in_process_limit": entry.get("percent_of_in_process_limit"),
      "percent_of_stream_limit": entry.get("percent_of_limit"),
    }
  return {
    "case": reference["id"],
    "label": reference["label"],
    "required_percent_of_in_process_limit": HEADLINE_PERCENT,
    "contenders": per_contender,
    "comparison": comparison,
  }


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


def _reference_case(cases: list[dict[str, Any]]) -> dict[str, Any]:
  """The middle single-leaf headline case (16M parameters in the full run)."""
  single = [c for c in cases if c["group"] == "a"]
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
    for name in (DEFAULT, OPTAX, TORCH_FUSED, *NATIVE)
    if case["id"] in summary["results"].get(name, {})
  ]
  text = (
    f"**Floors on {case['label']}** at the stream.c limit of {limit_gbs:.1f} GB/s: one pass "
    f"(36 bytes/param) takes {at_limit(36)}"
  )
  if xla_bytes is not None:
    loops = ours.get("loops_per_leaf")
    text += (
      f"; the {_optional(loops, '.0f')} loops XLA compiles ({xla_bytes:.0f} bytes/param) "
      f"take {at_limit(xla_bytes)}"
    )
  text += ". Measured: " + ", ".join(measured) + "."
  probed = [
    f"{summary['results'][name][case['id']]['in_process_limit_ms']:.3g} ms in the {name} processes"
    for name in PROBED
    if "in_process_limit_ms" in summary["results"].get(name, {}).get(case["id"], {})
  ]
  if probed:
    text += " The in-process probe's pass over the step's own buffers: " + ", ".join(probed) + "."
  return text


def _in_process_lines(summary: dict[str, Any], single: list[dict[str, Any]]) -> list[str]:
  """The table of the steps' shares of the in-process limit, and the headline check."""
  results = summary["results"]
  names = [
    c["name"]
    for c in summary["contenders"]
    if any(
      "percent_of_in_process_limit" in results.get(c["name"], {}).get(x["id"], {}) for x in single
    )
  ]
  errors = sorted(
    {
      entry["probe_error"]
      for per_case in results.values()
      for entry in per_case.values()
      if entry.get("probe_error")
    }
  )
  lines: list[str] = []
  if names:
    lines += [
      "",
      "**% of the in-process limit** (`benchmarks/probe.c`): in each worker process of "
      "the `apply_step` contenders and of torch fused, on single leaves, the timed steps are "
      "followed by as many passes over the step's own five buffers (parameter, gradient, `mu`, "
      "`nu`, `nu_max`; PyTorch's `exp_avg`, `exp_avg_sq`, `max_exp_avg_sq`) making the same "
      "36 bytes/param of traffic with almost no arithmetic (in PyTorch's process once its "
      "OpenMP threads have stopped spinning). Per process, the probe's median time over the "
      "step's median time is the step's share of the rate the memory gave that process; "
      "median [min–max] over rounds, then the probe's own rate in GB/s (median over rounds)",
      "",
    ]
    rows = []
    for name in names:
      row = [name]
      for case in single:
        entry = results.get(name, {}).get(case["id"], {})
        percents = entry.get("percent_of_in_process_limit_rounds")
        row.append(
          "–"
          if not percents
          else f"{entry['percent_of_in_process_limit']:.0f}% "
          f"[{min(percents):.0f}–{max(percents):.0f}%], {entry['in_process_limit_gbs']:.1f} GB/s"
        )
      rows.append(row)
    lines += _table(["contender", *[f"({c['group']}) {c['label']}" for c in single]], rows)
  headline = summary.get("headline") or {}
  checks = []
  for name, check in headline.get("contenders", {}).items():
    if check["percent_of_in_process_limit"] is None:
      continue
    mark = "✓" if check["holds"] else "✗"
    checks.append(
      f"{name} reaches {check['percent_of_in_process_limit']:.0f}% of the in-process limit "
      f"{mark} ({_optional(check['percent_of_stream_limit'], '.0f')}% of the stream.c limit)"
    )
  if checks:
    compared = [
      f"{name} reaches {check['percent_of_in_process_limit']:.0f}% of its in-process limit "
      f"({_optional(check['percent_of_stream_limit'], '.0f')}% of the stream.c limit)"
      for name, check in headline.get("comparison", {}).items()
      if check["percent_of_in_process_limit"] is not None
    ]
    lines += [
      "",
      f"**Headline check on {headline['label']}** (within "
      f"{100 - headline['required_percent_of_in_process_limit']:.0f}% of the memory-bandwidth "
      "limit measured in the same process): "
      + "; ".join(checks)
      + "."
      + ("" if not compared else " For comparison, " + "; ".join(compared) + "."),
    ]
  if errors:
    lines += ["", "**In-process probe not run:** " + "; ".join(errors) + "."]
  return lines


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
    + f". **stream.c limit: {limit['limit_gbs']:.1f} GB/s**, the best rate of any kernel in any "
    "round, each round a process of its own. A process's memory speed varies from one process "
    'to the next, so "% of the stream.c limit" below sets a step\'s median against the '
    "fastest stream.c process: context, not like for like. The in-process limit further down "
    "is measured in the step's own process, on its own buffers.",
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
    f"**Effective bandwidth, GB/s (% of the stream.c limit of {limit['limit_gbs']:.1f} GB/s)**, "
    "counting the bytes one pass must move (36 per parameter for AMSGrad, 28 for Adam)",
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
  lines += _in_process_lines(summary, [c for c in step_cases if c["leaves"] == 1])

  reference = _reference_case(summary["cases"])
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
  native_columns = [
    (f"{numerator} / {denominator}", key)
    for numerator, denominator, key in (
      (APPLY_STEP, TORCH_FUSED, "apply_step_vs_torch_fused"),
      (APPLY_STEP, OPTAX, "apply_step_vs_optax"),
      (APPLY_STEP_FLAT, TORCH_FUSED, "apply_step_flat_vs_torch_fused"),
      (APPLY_STEP_FLAT, OPTAX, "apply_step_flat_vs_optax"),
      (APPLY_STEP_FLAT, APPLY_STEP, "apply_step_flat_vs_apply_step"),
    )
    if numerator in results
  ]
  header = [
    "case",
    f"{DEFAULT} / {OPTAX}",
    "the same, in one process",
    f"{DEFAULT} / {TORCH_FUSED}",
    *[title for title, _ in native_columns],
  ]
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
    row += [_optional(ratio[key], ".3f") for _, key in native_columns]
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
