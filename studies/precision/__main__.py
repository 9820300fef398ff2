"""Run the study: ``python -m studies.precision --out DIR [--smoke]``.

Trains every task with every JAX configuration in this process, then both PyTorch peers in
a subprocess, and writes ``DIR/precision_results.json``, ``DIR/precision_table.md`` and
``DIR/precision_curves.png``. ``--smoke`` runs a few steps of everything at one seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from studies.precision import jax_runs, report
from studies.precision.tasks import PEERS, TaskSpec, task_specs

ROOT = Path(__file__).resolve().parents[2]
RESULTS = "precision_results.json"
TABLE = "precision_table.md"
CURVES = "precision_curves.png"
PEER_TIMEOUT_S = 1800

DEFINITIONS = {
  "pairing": "for a task and seed every configuration starts from the same float32 initial "
  "weights (cast to bfloat16 for bf16-param runs; copied into PyTorch by name) and trains on "
  "the same batches",
  "bf16_params_forward": "parameters stored in bfloat16 are upcast to float32 inside the loss: "
  "the forward and backward passes run in float32 and the gradients reaching the optimizer are "
  "bfloat16",
  "loss@K": "the loss the K-th step (1-based) computes, before its update, as "
  "examples/mlp_flax.py prints it",
  "train_loss": "mean minibatch loss over the last `tail` steps, each taken before its update",
  "test_accuracy": "digits: accuracy on the 360 held-out images at the final parameters",
  "heldout_loss": "characters: mean next-character cross-entropy over 256 fixed held-out "
  "windows (last 10 % of the text) at the final parameters",
  "ratios": "paired ratio of a loss metric to the reference's at the same seed: f32 for JAX "
  "configurations, torch_amsgrad for PyTorch peers",
  "state_bytes_per_param": "sum of nbytes of the optimizer state's non-scalar arrays / number of "
  "parameters; torchao quantized tensors count codes and scales (code tables in "
  "qmap_bytes_per_param)",
  "curve": "mean loss of consecutive windows of steps (at most 300 points), at each window's "
  "last step",
}


def package_versions() -> dict[str, str]:
  """Versions of what the JAX side uses (the PyTorch side adds its own)."""
  names = ("jax", "jaxlib", "flax", "optax", "amsgrad_jax", "numpy", "scikit-learn")
  versions = {"python": platform.python_version()}
  for name in names:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = "not installed"
  return versions


def run_peers(specs: dict[str, TaskSpec], handoff: Path, eager: bool) -> dict[str, Any]:
  """Run :mod:`studies.precision.torch_peers` in a subprocess; on failure, its error."""
  request = {
    "handoff": str(handoff),
    "eager": eager,
    "specs": [dataclasses.asdict(spec) for spec in specs.values()],
  }
  request_path, result_path = handoff / "request.json", handoff / "torch_result.json"
  request_path.write_text(json.dumps(request))
  command = [sys.executable, "-m", "studies.precision.torch_peers", str(request_path)]
  environment = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
  }
  try:
    done = subprocess.run(
      [*command, str(result_path)],
      cwd=ROOT,
      env=environment,
      stderr=subprocess.PIPE,
      text=True,
      timeout=PEER_TIMEOUT_S,
      check=False,
    )
  except subprocess.TimeoutExpired:
    return {"error": f"the PyTorch peers took more than {PEER_TIMEOUT_S} s"}
  if done.returncode != 0:
    return {"error": f"the PyTorch peers exited with {done.returncode}: {done.stderr[-2000:]}"}
  return json.loads(result_path.read_text())


def merge_peers(results: dict[str, Any], peers: dict[str, Any]) -> None:
  """Put the peers' configurations beside the JAX ones (or their common error)."""
  for name, task in results.items():
    if "error" in peers:
      for peer in PEERS:
        task["configurations"][peer] = {"framework": "torch", "error": peers["error"], "runs": []}
      continue
    task["configurations"].update(peers["tasks"][name])


def study(out: Path, smoke: bool) -> dict[str, Any]:
  """Run everything; returns the results with ratios and summaries."""
  start = time.perf_counter()
  specs = task_specs(smoke)
  with tempfile.TemporaryDirectory(prefix="precision_handoff_") as handoff:
    tasks_results = jax_runs.run_all(specs, Path(handoff))
    peers = run_peers(specs, Path(handoff), eager=smoke)
  merge_peers(tasks_results, peers)
  for name, spec in specs.items():
    tasks_results[name]["spec"] = dataclasses.asdict(spec)
    report.summarize(tasks_results[name]["configurations"])
  command = f"python -m studies.precision --out {out}" + (" --smoke" if smoke else "")
  meta = {
    "command": command,
    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    "wall_time_s": time.perf_counter() - start,
    "cpu_count": os.cpu_count(),
    "smoke": smoke,
    "versions": package_versions() | peers.get("versions", {}),
    "definitions": DEFINITIONS,
  }
  return {"meta": meta, "tasks": tasks_results}


def compile_faster() -> None:
  """Ask XLA for less optimised CPU code, which compiles about twice as fast: a smoke run
  spends most of its time compiling. Takes effect as long as no JAX computation has run."""
  flags = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()


def main() -> None:
  parser = argparse.ArgumentParser(description="Memory and precision of AMSGrad state formats.")
  parser.add_argument("--out", type=Path, required=True, help="folder for the three outputs")
  parser.add_argument("--smoke", action="store_true", help="a few steps of everything, one seed")
  args = parser.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  if args.smoke:
    compile_faster()
  results = study(args.out, args.smoke)
  specs = task_specs(args.smoke)
  report.write_json(results, args.out / RESULTS)
  (args.out / TABLE).write_text(report.markdown(results, specs))
  report.plot(results, specs, args.out / CURVES)
  print(f"wrote {args.out / RESULTS}, {TABLE}, {CURVES} in {results['meta']['wall_time_s']:.0f} s")


if __name__ == "__main__":
  main()
