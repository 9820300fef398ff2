"""The four parts of the GPU check, each in child processes and within its own budget.

Every part returns a record for ``gpu_results.json``: ``status`` ("passed", "failed" or
"out of time"), ``wall_s``, ``budget_s`` and what it measured. A child still running
at the end of its part's budget gets SIGINT (pytest then reports what it has run), and
SIGKILL :data:`GRACE_S` later; each child's output goes to a file, never to a pipe
that could fill and stall it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from benchmarks import driver
from benchmarks.cases import Case
from benchmarks.contenders import TORCH_FUSED
from gpucheck import step as gpu_step

ROOT = driver.ROOT
GRACE_S = 10
FLOAT = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf"
# What the suite leaves out on an accelerator (markers of pyproject.toml).
DESELECT = "not keras and not host_devices and not native_cpu"
# What the machine has, by distribution name, recorded with the results.
PACKAGES = [
  "jax",
  "jaxlib",
  "jax-cuda12-plugin",
  "jax-cuda13-plugin",
  "optax",
  "flax",
  "orbax-checkpoint",
  "torch",
  "numpy",
  "pytest",
  "hypothesis",
  "keras",
  "tqdm",
  "matplotlib",
]
PROBE = f"""
import importlib.metadata, json, jax
def version(name):
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None
devices = jax.devices()
print(json.dumps({{
  "backend": jax.default_backend(),
  "device_count": len(devices),
  "device_kind": devices[0].device_kind,
  "packages": {{name: version(name) for name in {PACKAGES!r}}},
}}))
"""
# examples/mlp_flax.py's progress bar, where tqdm is not installed.
TQDM_STAND_IN = """
class tqdm:
  def __init__(self, iterable, **options):
    self.iterable = iterable

  def __iter__(self):
    return iter(self.iterable)

  write = staticmethod(print)
"""


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the parts run: sizes, budgets, processes, and where."""

  smoke: bool
  platform: str  # JAX_PLATFORMS for the children: "cuda", or "cpu"
  budgets_s: dict[str, float]
  suite_paths: list[str]
  suite_processes: int
  example_steps: int
  sharded_steps: int
  step_cases: list[Case]
  step_groups: list[list[str]]

  @property
  def torch_device(self) -> str:
    return "cuda" if self.platform == "cuda" else "cpu"


@dataclasses.dataclass
class Ran:
  """One child process, as it ended."""

  returncode: int | None
  output: str
  wall_s: float
  out_of_time: bool


def environment(platform: str, **extra: str) -> dict[str, str]:
  """This environment for a child: the repository on ``PYTHONPATH``, JAX on ``platform``,
  no host-device count and no variables of a pytest running this command."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "JAX_PLATFORM"))}
  flags = env.get("XLA_FLAGS", "").split()
  env["XLA_FLAGS"] = " ".join(f for f in flags if "host_platform_device_count" not in f)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  return env | {"JAX_PLATFORMS": platform} | extra


def run_all(commands: list[list[str]], envs: list[dict[str, str]], timeout: float) -> list[Ran]:
  """Run ``commands`` side by side; stop those still running after ``timeout`` seconds."""
  start = time.monotonic()
  with tempfile.TemporaryDirectory(prefix="amsgrad-gpu-") as folder:
    logs: list[IO[str]] = []
    processes = []
    for index, (command, env) in enumerate(zip(commands, envs, strict=True)):
      logs.append(open(Path(folder) / f"{index}.log", "w+"))  # noqa: SIM115
      processes.append(
        subprocess.Popen(
          command, cwd=ROOT, env=env, stdout=logs[-1], stderr=subprocess.STDOUT,
          start_new_session=True,  # its own process group, to stop it with its children
        )
      )  # fmt: skip
    ended = []
    for process, log in zip(processes, logs, strict=True):
      out_of_time = False
      try:
        process.wait(timeout=max(0.0, start + timeout - time.monotonic()))
      except subprocess.TimeoutExpired:
        out_of_time = True
        os.killpg(process.pid, signal.SIGINT)
        try:
          process.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
          os.killpg(process.pid, signal.SIGKILL)
          process.wait()
      log.seek(0)
      ended.append(Ran(process.returncode, log.read(), time.monotonic() - start, out_of_time))
      log.close()
  return ended


def run_one(command: list[str], env: dict[str, str], timeout: float) -> Ran:
  return run_all([command], [env], timeout)[0]


def _record(started: float, budget_s: float, passed: bool, out_of_time: bool) -> dict[str, Any]:
  status = "out of time" if out_of_time else "passed" if passed else "failed"
  return {"status": status, "wall_s": time.monotonic() - started, "budget_s": budget_s}


def _tail(ran: Ran) -> str:
  return ran.output[-3000:]


# --- 0. the machine -------------------------------------------------------------------


def probe(platform: str, timeout: float) -> dict[str, Any]:
  """JAX's backend and devices under ``JAX_PLATFORMS=platform`` ("" chooses), and the
  versions of :data:`PACKAGES` (``None``: not installed)."""
  ran = run_one([sys.executable, "-c", PROBE], environment(platform), timeout)
  if ran.returncode != 0:
    raise SystemExit(f"JAX does not start with JAX_PLATFORMS={platform!r}:\n{_tail(ran)}")
  about = json.loads(ran.output.strip().splitlines()[-1])
  smi = "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader"
  try:
    done = subprocess.run(smi.split(), capture_output=True, text=True, timeout=20, check=True)
    about["nvidia_smi"] = done.stdout.strip().splitlines()
  except (OSError, subprocess.SubprocessError):
    about["nvidia_smi"] = []
  return about


# --- 1. the test suite ----------------------------------------------------------------


def suite(settings: Settings) -> dict[str, Any]:
  """The tests on the platform, in ``suite_processes`` slices side by side."""
  started, budget = time.monotonic(), settings.budgets_s["suite"]
  count = settings.suite_processes
  with tempfile.TemporaryDirectory(prefix="amsgrad-gpu-suite-") as folder:
    reports = [Path(folder) / f"{index}.xml" for index in range(count)]
    pytest = [sys.executable, "-m", "pytest", *settings.suite_paths, "-m", DESELECT, "-q"]
    commands = [
      [*pytest, "-p", "gpucheck.shard", f"--shard={index}/{count}", f"--junitxml={report}"]
      for index, report in enumerate(reports)
    ]
    # Several processes share the device: each allocates what it uses, not most of it.
    env = environment(settings.platform, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    ended = run_all(commands, [env] * count, budget - GRACE_S)
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "deselected": 0}
    selected = 0
    failures: dict[str, str] = {}
    durations: dict[str, float] = {}
    for ran, report in zip(ended, reports, strict=True):
      found = re.findall(r"(\d+) deselected", ran.output)
      counts["deselected"] += int(found[-1]) if found else 0
      found = re.findall(r"^shard: (\d+) tests to run", ran.output, re.M)
      selected += int(found[-1]) if found else 0
      if report.is_file():
        _read_junit(report, counts, failures, durations)
    ran_count = sum(counts[k] for k in ("passed", "failed", "errors", "skipped"))
    counts["not reached"] = max(0, selected - ran_count)
  out_of_time = any(ran.out_of_time for ran in ended)
  passed = all(ran.returncode == 0 for ran in ended) and counts["passed"] > 0
  record = _record(started, budget, passed, out_of_time)
  summary = ", ".join(f"{n} {what}" for what, n in counts.items())
  summary += f" in {record['wall_s']:.0f} s ({count} processes)"
  if out_of_time:
    summary += f"; stopped at its {budget:.0f} s budget"
  slowest = sorted(durations.items(), key=lambda item: -item[1])[:10]
  record |= {"summary": summary, "counts": counts, "failures": failures, "slowest": slowest}
  if not passed and not failures:
    record["output"] = [_tail(ran) for ran in ended]
  return record


def _read_junit(
  report: Path, counts: dict[str, int], failures: dict[str, str], durations: dict[str, float]
) -> None:
  for case in ElementTree.parse(report).getroot().iter("testcase"):
    if case.get("name") is None:  # the test an interrupt stopped
      continue
    module = case.get("classname", "")
    name = f"{module.replace('.', '/')}.py::{case.get('name')}"
    durations[name] = float(case.get("time", 0))
    outcome = {child.tag for child in case} & {"failure", "error", "skipped"}
    if "skipped" in outcome:
      counts["skipped"] += 1
    elif outcome:
      counts["failed" if "failure" in outcome else "errors"] += 1
      problem = case.find("failure") if "failure" in outcome else case.find("error")
      failures[name] = (problem.get("message") or "")[:300] if problem is not None else ""
    else:
      counts["passed"] += 1


# --- 2. the example -------------------------------------------------------------------


def example(settings: Settings) -> dict[str, Any]:
  """``examples/mlp_flax.py`` on the platform, on the CPU (the reference), and on the
  platform with "highest" matmul precision; the losses it prints, compared."""
  started, budget = time.monotonic(), settings.budgets_s["example"]
  runs = [(settings.platform, settings.platform, {}), ("cpu (the reference)", "cpu", {})]
  if settings.platform != "cpu":
    highest = {"JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    runs.append((f"{settings.platform}, matmuls at highest precision", settings.platform, highest))
  command = [sys.executable, "examples/mlp_flax.py", "--no-plot"]
  command += ["--steps", str(settings.example_steps)]
  records = []
  with tempfile.TemporaryDirectory(prefix="amsgrad-gpu-tqdm-") as stand_in:
    extra_path: list[str] = []
    if importlib.util.find_spec("tqdm") is None:
      (Path(stand_in) / "tqdm.py").write_text(TQDM_STAND_IN)
      extra_path = [stand_in]
    for label, platform, extra in runs:
      env = environment(platform, **extra)
      env["PYTHONPATH"] = os.pathsep.join([*extra_path, env["PYTHONPATH"]])
      ran = run_one(command, env, started + budget - GRACE_S - time.monotonic())
      records.append({"label": label} | _example_run(platform, ran))
  reference = records[1]
  for record in records[::2]:
    if "losses" in record and "losses" in reference:
      record["final_vs_cpu"] = record["final_loss"] / reference["final_loss"]
      steps = sorted(set(record["losses"]) & set(reference["losses"]))
      record["largest_relative_difference"] = max(
        abs(record["losses"][t] / reference["losses"][t] - 1) for t in steps
      )
  passed = all("losses" in record for record in records)
  out_of_time = any(record.get("out_of_time") for record in records)
  tqdm = "a stand-in (tqdm is not installed)" if extra_path else "tqdm"
  return _record(started, budget, passed, out_of_time) | {"runs": records, "progress_bar": tqdm}


def _example_run(platform: str, ran: Ran) -> dict[str, Any]:
  record: dict[str, Any] = {"platform": platform, "wall_s": ran.wall_s}
  backend = re.search(r"^backend: (\w+)", ran.output, re.M)
  final = re.search(rf"^final loss: ({FLOAT}) after \d+ steps in ({FLOAT}) s", ran.output, re.M)
  if ran.returncode != 0 or backend is None or final is None:
    return record | {"out_of_time": ran.out_of_time, "output": _tail(ran)}
  losses = {int(t): float(x) for t, x in re.findall(rf"^(\d+) ({FLOAT})$", ran.output, re.M)}
  return record | {
    "backend": backend.group(1),
    "final_loss": float(final.group(1)),
    "train_s": float(final.group(2)),
    "losses": losses,
  }


# --- 3. the update step ---------------------------------------------------------------


def step(settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
  """Every contender of :mod:`gpucheck.step` on its cases, timed on the device."""
  started, budget = time.monotonic(), settings.budgets_s["step"]
  groups = settings.step_groups
  results: dict[str, Any] = {}
  if importlib.util.find_spec("torch") is None:
    torch_names = {c.name for c in gpu_step.CONTENDERS if c.framework == "torch"}
    results = {name: {"error": "PyTorch is not installed"} for name in torch_names}
    groups = [[name for name in group if name not in torch_names] for group in groups]
  with tempfile.TemporaryDirectory(prefix="amsgrad-gpu-cache-") as cache:
    env = driver.worker_environment(cache) | {"JAX_PLATFORMS": settings.platform}
    results |= gpu_step.run(
      settings.step_cases,
      [group for group in groups if group],
      env,
      settings.torch_device,
      started + budget - GRACE_S,
      log,
    )
  failures = {name: result["error"] for name, result in results.items() if "error" in result}
  record = _record(started, budget, not failures, False)
  return record | {
    "cases": [
      {"id": case.id, "label": case.label, "parameters": case.parameters}
      for case in settings.step_cases
    ],
    "results": _step_summary(settings.step_cases, results),
    "devices": sorted({r["device"] for r in results.values() if "device" in r}),
    "failures": failures,
  }


def _step_summary(cases: list[Case], results: dict[str, Any]) -> dict[str, Any]:
  """Per contender and case: the step's median, fastest and slowest time, the copy's,
  GB/s, the share of the copy's speed, and the ratio to PyTorch's fused step."""
  summary: dict[str, Any] = {}
  for name in [c.name for c in gpu_step.CONTENDERS if "cases" in results.get(c.name, {})]:
    result = results[name]
    bytes_per_param = gpu_step.contender(name).bytes_per_param
    summary[name] = {}
    for case in cases:
      measured = result["cases"][case.id]
      step_s, copy_s = statistics.median(measured["times_s"]), statistics.median(measured["copy_s"])
      summary[name][case.id] = {
        "median_us": 1e6 * step_s,
        "min_us": 1e6 * min(measured["times_s"]),
        "max_us": 1e6 * max(measured["times_s"]),
        "copy_us": 1e6 * copy_s,
        "gb_per_s": bytes_per_param * case.parameters / step_s / 1e9,
        "copy_pct": 100 * copy_s / step_s,
        "batch": measured["batch"],
        "times_s": measured["times_s"],
      }
  if TORCH_FUSED in summary:
    for per_case in summary.values():
      for case_id, entry in per_case.items():
        entry["vs_torch_fused"] = entry["median_us"] / summary[TORCH_FUSED][case_id]["median_us"]
  return summary


# --- 4. the sharded example -----------------------------------------------------------


def sharded(settings: Settings) -> dict[str, Any]:
  """``examples/sharded_training.py`` on the platform's devices, with jit and with pmap."""
  started, budget = time.monotonic(), settings.budgets_s["sharded"]
  command = [sys.executable, "examples/sharded_training.py", "--steps", str(settings.sharded_steps)]
  runs = {}
  for mode, flags in (("jit", []), ("pmap", ["--pmap"])):
    timeout = started + budget - GRACE_S - time.monotonic()
    ran = run_one(command + flags, environment(settings.platform), timeout)
    runs[mode] = _sharded_run(mode, ran)
  passed = all(run["checked"] for run in runs.values())
  out_of_time = any(run.get("out_of_time") for run in runs.values())
  return _record(started, budget, passed, out_of_time) | {"runs": runs}


def _sharded_run(mode: str, ran: Ran) -> dict[str, Any]:
  layout = re.search(r"^(mesh: .*|pmap) over (\d+) (\w+) devices", ran.output, re.M)
  losses = [float(x) for x in re.findall(rf"loss ({FLOAT})", ran.output)]
  if mode == "jit":
    checked = ran.output.count("sharded exactly like the parameters") == 2
  else:
    checked = "replicas of parameters and optimizer state are identical" in ran.output
  record: dict[str, Any] = {"checked": ran.returncode == 0 and checked and layout is not None}
  record |= {"wall_s": ran.wall_s, "out_of_time": ran.out_of_time}
  if layout is not None:
    record |= {"layout": layout.group(1), "devices": int(layout.group(2))}
    record["platform"] = layout.group(3)
  if losses:
    record |= {"first_loss": losses[0], "last_loss": losses[-1]}
  if not record["checked"]:
    record["output"] = _tail(ran)
  return record
