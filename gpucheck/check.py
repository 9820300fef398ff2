"""``python -m gpucheck [--smoke] [--out DIR] [--platform P]``: the GPU check.

``make gpu-check`` runs it. One command for a machine with an NVIDIA GPU and no network:
it uses what is installed there (JAX with its CUDA plugin, Optax, Flax, PyTorch with CUDA,
pytest, hypothesis), installs nothing and builds nothing that needs the network; it finds
this repository through ``PYTHONPATH``. In this order, each part within its own budget
(:data:`BUDGETS_S`: 470 s in all with the probe of the machine, so a slow part cannot
starve the next):

1. the test suite with ``JAX_PLATFORMS=cuda``, without the tests marked ``keras``,
   ``host_devices`` or ``native_cpu`` (pyproject.toml), in parallel processes;
2. ``examples/mlp_flax.py`` on the GPU (also with "highest" matmul precision) and on the
   CPU, and their losses compared;
3. one update step of every contender of :mod:`gpucheck.step`, each in its own
   process, timed on the device against a device-to-device copy;
4. ``examples/sharded_training.py``, jit and pmap, on the GPUs there are.

It writes ``gpu_results.json`` (everything measured) and ``gpu_table.md`` (the Benchmarks
page's GPU section) into ``DIR`` (default ``docs/_static``), and exits with 1 if a part
failed. ``--smoke`` runs the same code on tiny sizes with short budgets, on the CPU when
there is no GPU (``gpucheck/test_gpucheck.py`` does, in about 45 s on 2 cores). Without a
GPU and without ``--smoke`` it stops and says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import driver, results
from benchmarks.contenders import TORCH_FUSED
from gpucheck import parts as gpu_parts
from gpucheck import step as gpu_step

BUDGETS_S = {"probe": 20, "suite": 195, "example": 60, "step": 160, "sharded": 35}
SMOKE_BUDGETS_S = {"probe": 30, "suite": 60, "example": 60, "step": 90, "sharded": 40}
PART_TITLES = {
  "suite": "Test suite",
  "example": "Example",
  "step": "Update step",
  "sharded": "Sharded example",
}


def settings(smoke: bool, platform: str) -> gpu_parts.Settings:
  """The full check, or the smoke run's tiny one."""
  names = [contender.name for contender in gpu_step.CONTENDERS]
  if smoke:  # one process per framework, as `python -m benchmarks --quick` does
    frameworks = {c.name: c.framework for c in gpu_step.CONTENDERS}
    groups = [[n for n in names if frameworks[n] == f] for f in ("jax", "torch")]
  else:
    groups = [[name] for name in names]
  return gpu_parts.Settings(
    smoke=smoke,
    platform=platform,
    budgets_s=SMOKE_BUDGETS_S if smoke else BUDGETS_S,
    suite_paths=["tests/test_count.py"] if smoke else ["tests", "amsgrad_jax"],
    suite_processes=2 if smoke else max(1, min(8, (os.cpu_count() or 2) // 2)),
    example_steps=20 if smoke else 500,
    sharded_steps=10 if smoke else 200,
    step_cases=gpu_step.cases(smoke),
    step_groups=groups,
  )


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m gpucheck", description=__doc__)
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, short budgets")
  parser.add_argument("--out", type=Path, default=driver.ROOT / "docs" / "_static")
  parser.add_argument(
    "--platform",
    choices=["auto", "cuda", "cpu"],
    default="auto",
    help="JAX_PLATFORMS of the parts (auto: cuda where JAX finds a GPU, else cpu)",
  )
  args = parser.parse_args(argv)
  import jax

  # This process only plans and reports; its children get the GPU to themselves.
  jax.config.update("jax_platforms", "cpu")
  start = time.monotonic()
  print("probing the machine", flush=True)
  wanted = "" if args.platform == "auto" else args.platform
  machine = gpu_parts.probe(wanted, BUDGETS_S["probe"])
  platform = "cuda" if machine["backend"] == "gpu" else "cpu"
  if platform == "cpu" and not args.smoke:
    print(
      f"the check is for a GPU, and JAX's backend here is {machine['backend']} "
      f"({machine['device_kind']}); `python -m gpucheck --smoke` runs its code on tiny "
      "sizes.",
      file=sys.stderr,
    )
    return 2
  plan = settings(args.smoke, platform)
  about = driver.machine() | machine
  about["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
  summary: dict[str, Any] = {"smoke": args.smoke, "platform": platform, "machine": about}
  parts: dict[str, Any] = {}
  for name in PART_TITLES:
    print(f"{PART_TITLES[name].lower()}: up to {plan.budgets_s[name]:.0f} s", flush=True)
    parts[name] = run_part(name, plan)
    print(f"  {parts[name]['status']} in {parts[name]['wall_s']:.0f} s", flush=True)
    # Written after every part: a run stopped from outside keeps what it measured.
    paths = write(summary | {"wall_s": time.monotonic() - start, "parts": parts}, args.out)
  print("\n" + paths[1].read_text() + "\nwrote " + ", ".join(map(str, paths)))
  return 0 if all(part["status"] == "passed" for part in parts.values()) else 1


def run_part(name: str, plan: gpu_parts.Settings) -> dict[str, Any]:
  """The part's record; a part that raises is recorded as failed, with the traceback."""
  started = time.monotonic()
  try:
    if name == "step":
      return gpu_parts.step(plan, lambda line: print(line, flush=True))
    return getattr(gpu_parts, name)(plan)
  except Exception:
    return {
      "status": "failed",
      "wall_s": time.monotonic() - started,
      "budget_s": plan.budgets_s[name],
      "error": traceback.format_exc(),
    }


def write(summary: dict[str, Any], folder: Path) -> tuple[Path, Path]:
  """``gpu_results.json`` and ``gpu_table.md`` in ``folder``."""
  folder.mkdir(parents=True, exist_ok=True)
  json_path, table_path = folder / "gpu_results.json", folder / "gpu_table.md"
  json_path.write_text(json.dumps(summary, indent=1) + "\n")
  table_path.write_text(table(summary))
  return json_path, table_path


# --- the table ------------------------------------------------------------------------


def table(summary: dict[str, Any]) -> str:
  """The markdown of the Benchmarks page's GPU section: a caption, then each part."""
  about, parts = summary["machine"], summary["parts"]
  packages = about["packages"]
  hardware = "; ".join(about["nvidia_smi"]) or f"{about['device_kind']}"
  versions = ", ".join(
    f"{name} {packages[name]}"
    for name in ("jax", "jax-cuda12-plugin", "jax-cuda13-plugin", "optax", "flax", "torch")
    if packages.get(name)
  )
  lines = [
    f"{hardware} ({about['device_count']} device(s), JAX backend {about['backend']}); "
    f"host {about['cpu']}, {about['cores']} cores; {about['date']}; {versions}; "
    f"{summary['wall_s']:.0f} s in all" + (" (smoke run: tiny sizes)" if summary["smoke"] else ""),
    "",
  ]
  for name, part in parts.items():
    head = f"**{PART_TITLES[name]}** ({part['status']}, "
    head += f"{part['wall_s']:.0f} s of {part['budget_s']:.0f}): "
    try:
      lines += [head + _PARTS[name](part), ""]
    except Exception as error:  # a record without what the table shows
      lines += [head + f"see gpu_results.json ({type(error).__name__}: {error}).", ""]
  return "\n".join(lines).rstrip() + "\n"


def _suite(part: dict[str, Any]) -> str:
  text = f"`{gpu_parts.DESELECT}`: {part['summary']}."
  if part["failures"]:
    shown = list(part["failures"])[:10]
    more = len(part["failures"]) - len(shown)
    text += " Failed: " + ", ".join(f"`{name}`" for name in shown)
    text += f" and {more} more." if more else "."
  return text


def _example(part: dict[str, Any]) -> str:
  lines = [
    f"`examples/mlp_flax.py`, progress bar {part['progress_bar']}.",
    "",
    "| run | final loss | ÷ CPU's | largest relative difference from the CPU's losses |",
    "|---|--:|--:|--:|",
  ]
  for run in part["runs"]:
    label = run["label"]
    if "final_loss" not in run:
      lines.append(f"| {label} | failed | – | – |")
      continue
    ratio = f"{run['final_vs_cpu']:.6f}" if "final_vs_cpu" in run else "–"
    largest = run.get("largest_relative_difference")
    difference = f"{largest:.1e}" if largest is not None else "–"
    lines.append(f"| {label} | {run['final_loss']:.6e} | {ratio} | {difference} |")
  return "\n".join(lines)


def _step(part: dict[str, Any]) -> str:
  lines = [
    "one jitted, donated update (PyTorch: `optimizer.step()`), timed in batches of "
    "back-to-back steps; % of copy: a device-to-device copy of the step's bytes over the "
    f"step's time; on {', '.join(part['devices']) or 'no device'}.",
    "",
    "| case | contender | µs per step [min–max] | ÷ torch fused | GB/s | % of copy |",
    "|---|---|--:|--:|--:|--:|",
  ]
  for case in part["cases"]:
    for name, per_case in part["results"].items():
      entry = per_case[case["id"]]
      time_us = results._range(entry["median_us"], entry["min_us"], entry["max_us"], ".3g")
      ratio = f"{entry['vs_torch_fused']:.2f}" if "vs_torch_fused" in entry else "–"
      lines.append(
        f"| {case['label']} | {name} | {time_us} | {ratio} | {entry['gb_per_s']:.0f} "
        f"| {entry['copy_pct']:.0f} |"
      )
  for name, error in part["failures"].items():
    lines.append(f"| – | {name} | {error.strip().splitlines()[-1][:80]} | – | – | – |")
  if TORCH_FUSED not in part["results"]:
    lines += ["", f"({TORCH_FUSED} did not run: no ratios.)"]
  return "\n".join(lines)


def _sharded(part: dict[str, Any]) -> str:
  said = []
  for mode, run in part["runs"].items():
    if "layout" not in run:
      said.append(f"{mode} failed")
      continue
    check = "state sharded like the parameters" if mode == "jit" else "replicas identical"
    check = check if run["checked"] else "check FAILED"
    loss = f"loss {run['first_loss']:.3g} → {run['last_loss']:.3g}" if "last_loss" in run else ""
    said.append(f"{run['layout']} over {run['devices']} {run['platform']} devices, {check}, {loss}")
  return "`examples/sharded_training.py`: " + "; ".join(said) + "."


_PARTS = {"suite": _suite, "example": _example, "step": _step, "sharded": _sharded}


if __name__ == "__main__":
  sys.exit(main())
