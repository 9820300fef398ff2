"""The scaling plots: step time against parameter count and against leaf count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.contenders import ONE_PASS_BYTES_PER_PARAM


def _series(summary: dict[str, Any], cases: list[dict[str, Any]], x_key: str) -> dict[str, Any]:
  """``{contender: (x, median, low, high)}`` over ``cases`` sorted by ``x_key``."""
  cases = sorted(cases, key=lambda c: c[x_key])
  series = {}
  for name, per_case in summary["results"].items():
    points = [(c[x_key], per_case[c["id"]]) for c in cases if c["id"] in per_case]
    series[name] = (
      [x for x, _ in points],
      [e["median_ms"] for _, e in points],
      [e["median_ms"] - e["min_ms"] for _, e in points],
      [e["max_ms"] - e["median_ms"] for _, e in points],
    )
  return series


def _style(name: str) -> dict[str, Any]:
  if name.startswith("torch"):
    return {"linestyle": "--", "marker": "s"}
  if name.startswith("optax"):
    return {"linestyle": ":", "marker": "^"}
  return {"linestyle": "-", "marker": "o"}


def _draw(ax: Any, series: dict[str, Any]) -> None:
  for name, (x, y, low, high) in series.items():
    ax.errorbar(x, y, yerr=[low, high], label=name, capsize=2, markersize=4, **_style(name))


def _axes(summary: dict[str, Any], cases: list[dict[str, Any]], x: str) -> tuple[Any, Any]:
  """A figure with every contender's step time on ``cases`` against ``x``."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  _draw(ax, _series(summary, cases, x))
  return fig, ax


def _save(fig: Any, ax: Any, path: Path, xlabel: str, title: str) -> Path:
  """Log-log axes, labels and legend; writes the figure to ``path`` and closes it."""
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel("update step, ms (median, min–max)")
  ax.set_title(title)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot(summary: dict[str, Any], static_dir: Path) -> list[Path]:
  """Write ``bench_scaling_params.png`` and ``bench_scaling_leaves.png``; return their paths."""
  limit_gbs = summary["bandwidth"]["limit_gbs"]
  single = [c for c in summary["cases"] if c["kind"] == "step" and c["leaves"] == 1]
  paths = []

  fig, ax = _axes(summary, single, "parameters")
  sizes = sorted(c["parameters"] for c in single)
  floor = [n * ONE_PASS_BYTES_PER_PARAM["amsgrad"] / (limit_gbs * 1e9) * 1e3 for n in sizes]
  ax.plot(
    sizes,
    floor,
    color="black",
    linewidth=1,
    label=f"one AMSGrad pass at {limit_gbs:.0f} GB/s (stream.c limit)",
  )
  paths.append(
    _save(
      fig,
      ax,
      static_dir / "bench_scaling_params.png",
      "parameters (one float32 leaf)",
      "AMSGrad step time against parameter count",
    )
  )

  # Leaf-count series: cases splitting the same total, with the single leaf of that total.
  leaf_cases = [c for c in summary["cases"] if c["id"].startswith("leaves-")]
  total = leaf_cases[0]["parameters"] if leaf_cases else 0
  leaf_cases += [c for c in single if c["parameters"] == total]
  fig, ax = _axes(summary, leaf_cases, "leaves")
  paths.append(
    _save(
      fig,
      ax,
      static_dir / "bench_scaling_leaves.png",
      f"leaves ({total:,} float32 parameters in all)",
      "AMSGrad step time against leaf count",
    )
  )
  return paths
