"""How far above the true running maximum an 8-bit code stores it, after many steps.

The running maximum of AMSGrad's second moment is stored rounded up. With blockwise8
(power-of-two block scales, a floating-point code) it is the true maximum rounded up once
onto the current grid, whatever the scale changes. With a linear 8-bit code and a free
float32 scale per block (value = code / 255 * scale), every growth of a block's scale
re-rounds every element up again and the stored maximum creeps. This simulates the second
moment of a gradient whose scale drifts and jumps, and prints the ratio of stored to true
maximum (median, 99th percentile, largest) for both, and how many elements sit more than
one rounding up above it (in code steps on the final grid): the creep.

  python -m studies.creep [--steps 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np

from amsgrad_jax import _blockwise as bw


def simulate(steps: int, seed: int = 0, shape: tuple[int, int] = (256, 256)) -> dict[str, dict]:
  """Run both codes on the same second-moment sequence; the ratio statistics of each."""
  rng = np.random.default_rng(seed)
  b2 = np.float32(0.999)
  nu = np.zeros(shape, np.float32)
  true_max = np.zeros(shape, np.float32)
  ours = bw.quantize(jnp.zeros(shape), 256, "nu_max", True)
  codes, scales = np.zeros(shape), np.zeros(shape[0], np.float32)
  # each row (a block) has its own drifting gradient scale, with occasional spikes
  log_scale = rng.normal(0.0, 2.0, (shape[0], 1))
  for _ in range(steps):
    log_scale += rng.normal(0.0, 0.05, log_scale.shape)
    spikes = np.where(rng.uniform(size=shape) < 1e-3, 30.0, 1.0)
    g = rng.standard_normal(shape) * np.exp(log_scale) * spikes
    nu = (b2 * nu + (1 - b2) * g * g).astype(np.float32)
    true_max = np.maximum(true_max, nu)
    ours = bw.quantize(jnp.maximum(bw.dequantize(ours), jnp.asarray(nu)), 256, "nu_max", True)
    values = np.maximum(codes / 255.0 * scales[:, None], nu).astype(np.float32)
    scales = values.max(axis=1).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0)
    codes = np.clip(np.ceil(values / safe[:, None] * 255.0), 0, 255)
  positive = true_max > 0
  # Code steps above the true maximum rounded up once onto each code's final grid.
  exponents = ours.exponents[..., None].astype(jnp.int32)
  once = bw.encode(jnp.asarray(true_max)[:, None, :], exponents, ours.code, True)[:, 0, :]
  ours_steps = np.asarray(ours.codes, np.int64) - np.asarray(once, np.int64)
  linear_steps = codes - np.ceil(true_max / np.where(scales > 0, scales, 1.0)[:, None] * 255.0)
  results = {}
  for name, stored, steps_above in (
    ("blockwise8", np.asarray(bw.dequantize(ours)), ours_steps),
    ("linear 8-bit, free scale", codes / 255.0 * scales[:, None], linear_steps),
  ):
    ratio = stored[positive] / true_max[positive]
    results[name] = {
      "below_true": int(np.sum(stored[positive] < true_max[positive])),
      "median": float(np.median(ratio)),
      "p99": float(np.percentile(ratio, 99)),
      "max": float(np.max(ratio)),
      "crept": float(np.mean(steps_above[positive] > 0)),
      "most_steps_above": int(np.max(steps_above)),
    }
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  results = simulate(args.steps)
  print(f"stored / true running maximum after {args.steps} steps (256 blocks of 256)")
  for name, stats in results.items():
    print(
      f"  {name:26s} median {stats['median']:.4f}  p99 {stats['p99']:.4f}  "
      f"max {stats['max']:.4f}  below the truth: {stats['below_true']}  "
      f"crept: {100 * stats['crept']:.1f}% (up to {stats['most_steps_above']} code steps)"
    )
  if args.json:
    with open(args.json, "w") as file:
      json.dump({"steps": args.steps, "results": results}, file, indent=2)


if __name__ == "__main__":
  main()
