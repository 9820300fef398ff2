"""Paired ratios and summaries of the runs, and the study's JSON, table and plot."""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from studies.precision.configurations import REFERENCE
from studies.precision.tasks import CHAR_TRANSFORMER, MLP_REGRESSION, TORCH_REFERENCE, TaskSpec

Entry = dict[str, Any]
WIDTH = 88  # columns of the markdown file's prose


def reference_of(entry: Entry) -> str:
  """The configuration a run is paired with: ``f32`` for JAX, ``torch_amsgrad`` for PyTorch."""
  return REFERENCE if entry["framework"] == "jax" else TORCH_REFERENCE


def completed(entry: Entry) -> dict[int, Entry]:
  """The runs of ``entry`` that finished, by seed."""
  return {run["seed"]: run for run in entry["runs"] if "metrics" in run}


def paired_ratios(run: Entry, reference: Entry | None) -> dict[str, float | None]:
  """``run``'s loss metrics over ``reference``'s (same seed); ``None`` where undefined."""
  if reference is None:
    return {}
  ratios: dict[str, float | None] = {}
  for key, value in run["metrics"].items():
    if "loss" in key:
      base = reference["metrics"][key]
      ratios[key] = value / base if base and math.isfinite(base) else None
  return ratios


def spread(values: Iterable[float | None]) -> dict[str, float] | None:
  """``{"mean", "min", "max"}`` of the finite values, or ``None`` when there are none."""
  finite = [value for value in values if value is not None and math.isfinite(value)]
  if not finite:
    return None
  return {"mean": sum(finite) / len(finite), "min": min(finite), "max": max(finite)}


def status(entry: Entry) -> str:
  """``ok``, ``not available``, ``error`` (a JAX configuration failed) or ``crashed`` (a
  peer raised in some run)."""
  if "not_available" in entry:
    return "not available"
  if "error" in entry:
    return "error"
  if any("error" in run for run in entry["runs"]):
    return "crashed"
  return "ok"


def summary(entry: Entry) -> Entry:
  """Means and ranges over seeds of the metrics and paired ratios, the state size, NaN."""
  runs = list(completed(entry).values())
  sizes = [run["state_bytes_per_param"] for run in entry["runs"] if "state_bytes_per_param" in run]
  keys = runs[0]["metrics"] if runs else {}
  ratio_keys = runs[0].get("ratios", {}) if runs else {}
  return {
    "status": status(entry),
    "seeds_completed": [run["seed"] for run in runs],
    "state_bytes_per_param": sizes[0] if sizes else None,
    "metrics": {key: spread(run["metrics"][key] for run in runs) for key in keys},
    "ratios": {key: spread(run["ratios"].get(key) for run in runs) for key in ratio_keys},
    "nan": any(run["nan"] for run in runs),
  }


def summarize(configurations: dict[str, Entry]) -> None:
  """Add paired ratios to every completed run and a summary to every configuration."""
  for entry in configurations.values():
    reference = configurations.get(reference_of(entry), {"runs": []})
    reference_runs = completed(reference)
    for seed, run in completed(entry).items():
      run["ratios"] = paired_ratios(run, reference_runs.get(seed))
    torch_reference = configurations.get(TORCH_REFERENCE)
    if entry["framework"] == "torch" and entry is torch_reference:
      jax_runs = completed(configurations[REFERENCE])
      for seed, run in completed(entry).items():
        run["ratios_vs_jax_f32"] = paired_ratios(run, jax_runs.get(seed))
  for entry in configurations.values():
    entry["summary"] = summary(entry)


def finite_json(value: Any) -> Any:
  """``value`` with non-finite floats as ``None``, so the file is strict JSON."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {key: finite_json(item) for key, item in value.items()}
  if isinstance(value, list | tuple):
    return [finite_json(item) for item in value]
  return value


def write_json(results: Entry, path: Path) -> None:
  """The whole study, indented."""
  path.write_text(json.dumps(finite_json(results), indent=1, allow_nan=False) + "\n")


# The table.


def number(value: float | None) -> str:
  """Three significant digits, compactly: ``0.987``, ``12.3``, ``4.56e-05``."""
  if value is None or not math.isfinite(value):
    return "nan"
  if value == 0 or 1e-3 <= abs(value) < 1e4:
    return f"{value:.3g}"
  return f"{value:.2e}"


def ratio(value: float) -> str:
  """A paired ratio to three decimals (``1.003``), one beyond 10 (``35.2``)."""
  if 0.01 <= abs(value) < 10:
    return f"{value:.3f}"
  return f"{value:.1f}" if 10 <= abs(value) < 1000 else f"{value:.1e}"


def why_missing(entry: Entry) -> str:
  """Why a configuration has no completed run: ``crashed at step N``, ``not available``
  or ``error``."""
  if entry["summary"]["status"] != "crashed":
    return entry["summary"]["status"]
  steps = sorted({run.get("failed_at_step", 0) for run in entry["runs"] if "error" in run})
  return "crashed at step " + ",".join(map(str, steps))


def ratio_cell(entry: Entry, key: str) -> str:
  """``mean [min,max]`` over seeds of a paired ratio, or why there is none."""
  values = entry["summary"]["ratios"].get(key)
  if values is None:
    return "-" if entry["summary"]["seeds_completed"] else why_missing(entry)
  return f"{ratio(values['mean'])} [{ratio(values['min'])},{ratio(values['max'])}]"


def ratio_mean_cell(entry: Entry, key: str) -> str:
  """The mean over seeds of a paired ratio."""
  values = entry["summary"]["ratios"].get(key)
  return "-" if values is None else ratio(values["mean"])


def metric_cell(entry: Entry, key: str) -> str:
  """A metric's mean over seeds."""
  values = entry["summary"]["metrics"].get(key)
  return "-" if values is None else number(values["mean"])


def bytes_cell(entry: Entry) -> str:
  """State bytes per parameter."""
  size = entry["summary"]["state_bytes_per_param"]
  return "-" if size is None else f"{size:.3g}"


def nan_cell(entry: Entry) -> str:
  """Whether any completed run met a non-finite loss."""
  if not entry["summary"]["seeds_completed"]:
    return "-"
  return "yes" if entry["summary"]["nan"] else "no"


Cell = Callable[[Entry], str]


def task_columns(spec: TaskSpec) -> list[list[tuple[str, Cell]]]:
  """The columns of a task's tables after the configuration's name (the regression has a
  second table for its ratios)."""
  size = ("B/p", bytes_cell)
  nan = ("NaN", nan_cell)

  def metric(key: str) -> Cell:
    return lambda entry: metric_cell(entry, key)

  def ratios(key: str) -> Cell:
    return lambda entry: ratio_cell(entry, key)

  if spec.name == MLP_REGRESSION:
    losses = [f"loss@{step}" for step in spec.report_steps]
    return [
      [size, *((key, metric(key)) for key in losses), nan],
      [(key.replace("loss", "ratio"), ratios(key)) for key in losses],
    ]
  if spec.name == CHAR_TRANSFORMER:
    held_out_ratio = ("h-o r", lambda entry: ratio_mean_cell(entry, "heldout_loss"))
    return [
      [
        *(size, ("train", metric("train_loss")), ("held-out", metric("heldout_loss"))),
        *(("ratio (train)", ratios("train_loss")), held_out_ratio, nan),
      ]
    ]
  return [
    [
      *(size, ("train", metric("train_loss")), ("test acc", metric("test_accuracy"))),
      *(("ratio (train)", ratios("train_loss")), nan),
    ]
  ]


def markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
  """A markdown table, padded to line up when that fits in :data:`WIDTH` columns (and
  without the padding round the separators when it does not). Names left, values right."""
  widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
  pad = " " if sum(widths) + 3 * len(widths) + 1 <= WIDTH else ""

  def line(cells: list[str]) -> str:
    padded = [
      cell.ljust(width) if index == 0 else cell.rjust(width)
      for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
    ]
    return f"|{pad}" + f"{pad}|{pad}".join(padded) + f"{pad}|"

  rules = [
    "-" * (width + 2 * len(pad)) if index == 0 else "-" * (width + 2 * len(pad) - 1) + ":"
    for index, width in enumerate(widths)
  ]
  return [line(headers), "|" + "|".join(rules) + "|", *(line(row) for row in rows)]


def bullet(text: str) -> list[str]:
  """A markdown list item wrapped to :data:`WIDTH` columns."""
  return textwrap.wrap(text, WIDTH, initial_indent="- ", subsequent_indent="  ")


def notes(configurations: dict[str, Entry]) -> list[str]:
  """Why each configuration that did not run everywhere did not."""
  lines = []
  for config, entry in configurations.items():
    if "not_available" in entry:
      lines += bullet(f"{config}: not available: {entry['not_available']}")
    elif "error" in entry:
      lines += bullet(f"{config}: failed: {entry['error'][:300]}")
    quantized = [run.get("quantized_state_tensors") for run in completed(entry).values()]
    if config != TORCH_REFERENCE and quantized and set(quantized) == {0}:
      lines += bullet(
        f"{config}: ran, but quantized no state tensor (torchao quantizes only parameters of "
        "at least 4096 elements that are a multiple of its block size, 256): float32 state."
      )
    for error in sorted({run["error"] for run in entry["runs"] if "error" in run}):
      failing = [run for run in entry["runs"] if run.get("error") == error]
      seeds = ",".join(str(run["seed"]) for run in failing)
      steps = ",".join(sorted({str(run.get("failed_at_step")) for run in failing}))
      first = failing[0]
      quantized = f"{first.get('quantized_state_tensors')} of {first.get('state_tensors')}"
      lines += bullet(
        f"{config}: raised at step {steps} (seeds {seeds}; {quantized} state tensors "
        f"quantized): `{error.split(', types=')[0][:200]}`"
      )
  return lines


def task_section(spec: TaskSpec, configurations: dict[str, Entry]) -> list[str]:
  """A task's heading, table(s) and notes."""
  seeds = ",".join(map(str, spec.seeds))
  lines = [f"### {spec.title}", "", f"{spec.steps} steps, seeds {seeds}, lr {spec.learning_rate:g}"]
  for columns in task_columns(spec):
    headers = ["config", *(header for header, _ in columns)]
    rows = [
      [config, *(cell(entry) for _, cell in columns)] for config, entry in configurations.items()
    ]
    lines += ["", *markdown_table(headers, rows)]
  extra = notes(configurations)
  return [*lines, *(["", *extra] if extra else []), ""]


def legend(tail: int) -> list[str]:
  """What the columns mean, with ``tail`` steps in the final training loss."""
  text = (
    "B/p: optimizer-state bytes per parameter (non-scalar state arrays; torchao: 8-bit codes "
    "and block scales, code tables apart). Losses and accuracy: means over seeds. "
    "loss@K: the loss the K-th step computes, before its update. "
    f"train: mean minibatch loss of the last {tail} steps. "
    "ratio: paired ratio to f32 (JAX) or torch_amsgrad (PyTorch) at the same seed, "
    "mean [min,max] over seeds; h-o r: the same for the held-out loss, mean. "
    "NaN: any non-finite loss."
  )
  return textwrap.wrap(text, WIDTH)


def markdown(results: Entry, specs: dict[str, TaskSpec]) -> str:
  """The whole table file."""
  meta = results["meta"]
  versions = ", ".join(f"{key} {value}" for key, value in meta["versions"].items())
  header = f"{meta['date']}, wall time {meta['wall_time_s']:.0f} s, {meta['cpu_count']} CPUs; "
  lines = [
    "# Memory and precision: AMSGrad state formats",
    "",
    f"`{meta['command']}`",
    "",
    *textwrap.wrap(header + versions + ".", WIDTH),
    "",
    *legend(max(spec.tail for spec in specs.values())),
    "",
  ]
  for name, spec in specs.items():
    lines += task_section(spec, results["tasks"][name]["configurations"])
  return "\n".join(lines)


# The plot.


def mean_curve(entry: Entry) -> tuple[list[int], list[float]] | None:
  """The loss curve averaged over the completed seeds, or ``None``."""
  curves = [run["curve"] for run in completed(entry).values()]
  if not curves:
    return None
  losses = [sum(values) / len(values) for values in zip(*(c["loss"] for c in curves), strict=True)]
  return curves[0]["step"], losses


def plot(results: Entry, specs: dict[str, TaskSpec], path: Path) -> None:
  """One panel per task: each configuration's mean loss curve, the f32 reference bold."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(specs), figsize=(5.2 * len(specs), 4.4))
  for ax, (name, spec) in zip(axes, specs.items(), strict=True):
    for config, entry in results["tasks"][name]["configurations"].items():
      curve = mean_curve(entry)
      if curve is None:
        ax.plot([], [], " ", label=f"{config}: {why_missing(entry)}")
        continue
      style: dict[str, Any] = {"linewidth": 1.2, "label": config}
      if config == REFERENCE:
        style |= {"linewidth": 3.5, "color": "black", "alpha": 0.55, "zorder": 1}
      if entry["framework"] == "torch":
        style["linestyle"] = "--"
      ax.semilogy(*curve, **style)
    ax.set_title(spec.title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (window mean, mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
