"""Resume a PyTorch AMSGrad run in JAX mid-flight, on the same trajectory.

Shows: the MLP of ``mlp_flax.py`` trained for 200 steps in PyTorch (``AdamW(amsgrad=True)``,
``clip_grad_norm_``, a linear warmup then a cosine) and saved with ``torch.save``; the
checkpoint loaded into a Flax NNX model, with the optimizer ``interop.optimizer_from_torch``
builds from PyTorch's and the state ``interop.state_from_torch`` converts, and continued
for 300 steps; beside it PyTorch continues the same checkpoint. Prints the largest
difference of the loss and of the parameters at every step and plots both loss curves.
Takes about 9 s on 2 CPU cores, half of it importing PyTorch, JAX and Flax.

Usage::

    python examples/resume_from_pytorch.py            # 200 + 300 steps, float32
    python examples/resume_from_pytorch.py --float64  # the same without float32 rounding
    python examples/resume_from_pytorch.py --steps 40 --resume-steps 60 --print-every 10
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from mlp_flax import D_IN, D_OUT, MLP, H, N, make_train_step

from amsgrad_jax import interop

PEAK_LR, WARMUP, WEIGHT_DECAY, MAX_NORM = 1e-4, 50, 1e-4, 1.0


def convert(weights: dict[str, Any]) -> dict[str, Any]:
  """The weights converter, PyTorch -> Flax: a ``Linear`` weight ``(out, in)`` is the
  transpose of an ``nnx.Linear`` kernel ``(in, out)``. It converts the optimizer's
  moments too: ``interop`` passes it ``{name: tensor}`` of each."""

  def layer(index: int) -> dict[str, np.ndarray]:
    weight, bias = (np.asarray(weights[f"{index}.{part}"]) for part in ("weight", "bias"))
    return {"kernel": weight.T, "bias": bias}

  return {"hidden": layer(0), "output": layer(2)}


def torch_training(total_steps: int, float64: bool, seed: int) -> tuple[Any, Any, Any, Any]:
  """The PyTorch model, its AdamW(amsgrad=True) and warmup-cosine scheduler, and the loss."""
  import torch  # The example needs PyTorch; amsgrad_jax does not.

  torch.manual_seed(seed)
  model = torch.nn.Sequential(torch.nn.Linear(D_IN, H), torch.nn.ReLU(), torch.nn.Linear(H, D_OUT))
  model = model.to(torch.float64 if float64 else torch.float32)
  optimizer = torch.optim.AdamW(
    model.named_parameters(), lr=PEAK_LR, weight_decay=WEIGHT_DECAY, amsgrad=True
  )
  schedulers = torch.optim.lr_scheduler
  scheduler = schedulers.SequentialLR(
    optimizer,
    [
      schedulers.LinearLR(optimizer, start_factor=0.1, total_iters=WARMUP),
      schedulers.CosineAnnealingLR(optimizer, T_max=total_steps - WARMUP),
    ],
    milestones=[WARMUP],
  )
  return model, optimizer, scheduler, torch.nn.MSELoss(reduction="sum")


def torch_steps(model, optimizer, scheduler, loss_fn, x, y, steps: int):
  """``steps`` PyTorch training steps; the loss before each and the weights after each."""
  import torch

  losses, weights = [], []
  x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
  for _ in range(steps):
    loss = loss_fn(model(x_t), y_t)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    optimizer.step()
    scheduler.step()
    losses.append(loss.item())
    weights.append(convert({n: p.detach().clone() for n, p in model.named_parameters()}))
  return np.asarray(losses), weights


def restored(checkpoint: dict, total_steps: int, float64: bool, seed: int):
  """A PyTorch model, optimizer and scheduler loaded from ``checkpoint``."""
  model, optimizer, scheduler, loss_fn = torch_training(total_steps, float64, seed)
  model.load_state_dict(checkpoint["model"])
  scheduler.load_state_dict(checkpoint["scheduler"])
  optimizer.load_state_dict(checkpoint["optimizer"])  # After the scheduler, as PyTorch asks.
  return model, optimizer, scheduler, loss_fn


def relative_difference(ours: Any, theirs: Any) -> float:
  """The largest parameter difference, over the largest parameter magnitude."""
  ours_leaves, their_leaves = jax.tree.leaves(ours), jax.tree.leaves(theirs)
  difference = max(
    float(np.max(np.abs(a - b))) for a, b in zip(ours_leaves, their_leaves, strict=True)
  )
  return difference / max(float(np.max(np.abs(b))) for b in their_leaves)


def plot(before: np.ndarray, torch_after: np.ndarray, jax_after: np.ndarray, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  split = len(before)
  fig, ax = plt.subplots(figsize=(6, 4))
  steps_after = np.arange(split, split + len(torch_after))
  ax.semilogy(np.concatenate([before, torch_after]), label="PyTorch, AdamW(amsgrad=True)")
  ax.semilogy(steps_after, jax_after, "--", label="amsgrad_jax, from PyTorch's checkpoint")
  ax.axvline(split, color="gray", lw=0.8)
  ax.set_xlabel("step")
  ax.set_ylabel("sum of squared errors")
  ax.set_title("The MLP resumed in JAX after a PyTorch checkpoint")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200, help="PyTorch steps before saving")
  parser.add_argument("--resume-steps", type=int, default=300, help="steps after resuming")
  parser.add_argument("--print-every", type=int, default=1, help="print one step in this many")
  parser.add_argument("--float64", action="store_true", help="weights, data and state in float64")
  parser.add_argument("--seed", type=int, default=0, help="seed for data and weights")
  parser.add_argument("--out", type=Path, default=Path(), help="folder for the PNG (default .)")
  parser.add_argument("--no-plot", action="store_true", help="do not write the PNG")
  args = parser.parse_args()
  if args.float64:
    jax.config.update("jax_enable_x64", True)
  jax.config.update("jax_default_matmul_precision", "highest")  # As PyTorch on the CPU.
  import torch

  torch.set_num_threads(1)  # Small matrices: threads only add overhead.
  dtype = np.float64 if args.float64 else np.float32
  total = args.steps + args.resume_steps
  if total <= WARMUP:
    parser.error(f"--steps plus --resume-steps must exceed the {WARMUP} warmup steps")
  rng = np.random.default_rng(args.seed)
  x, y = rng.standard_normal((N, D_IN)).astype(dtype), rng.standard_normal((N, D_OUT)).astype(dtype)

  # 1. PyTorch trains, and saves a checkpoint as a PyTorch script would.
  start = time.perf_counter()
  model, optimizer, scheduler, loss_fn = torch_training(total, args.float64, args.seed)
  before, _ = torch_steps(model, optimizer, scheduler, loss_fn, x, y, args.steps)
  with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "checkpoint.pt"
    torch.save(
      {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
      },
      path,
    )
    checkpoint = torch.load(path)
  print(f"PyTorch: {args.steps} steps, saved with torch.save and loaded back")

  # 2. JAX resumes it: the weights into a Flax NNX model, then the optimizer and its state.
  model_shape = nnx.eval_shape(lambda: MLP(nnx.Rngs(args.seed), jnp.dtype(dtype)))
  graphdef, params = nnx.split(model_shape, nnx.Param)  # Shapes only: no weights drawn.
  # On the device, committed as the train step's outputs are: one compilation, not two.
  params.replace_by_pure_dict(jax.device_put(convert(checkpoint["model"]), jax.devices()[0]))
  _, torch_optimizer, torch_scheduler, _ = restored(checkpoint, total, args.float64, args.seed)
  tx = interop.optimizer_from_torch(
    torch_optimizer, params, convert, scheduler=torch_scheduler, max_grad_norm=MAX_NORM
  )
  opt_state = interop.state_from_torch(tx, checkpoint["optimizer"], params, convert)
  train_step = make_train_step(graphdef, tx)
  jax_losses, jax_weights = [], []
  for _ in range(args.resume_steps):
    params, opt_state, loss = train_step(params, opt_state, x, y)
    jax_losses.append(float(loss))
    jax_weights.append(jax.tree.map(np.asarray, nnx.to_pure_dict(params)))
  jax_losses = np.asarray(jax_losses)

  # 3. PyTorch resumes the same checkpoint, for comparison.
  continued = restored(checkpoint, total, args.float64, args.seed)
  torch_losses, torch_weights = torch_steps(*continued, x, y, args.resume_steps)

  # The loss falls by orders of magnitude, so its difference is shown as it is; the
  # parameters' relative to their largest magnitude.
  loss_differences = np.abs(jax_losses - torch_losses)
  param_differences = [
    relative_difference(a, b) for a, b in zip(jax_weights, torch_weights, strict=True)
  ]
  print("step  amsgrad_jax loss  PyTorch loss     loss difference  param rel. diff.")
  for index in range(args.resume_steps):
    if index % args.print_every == 0 or index == args.resume_steps - 1:
      print(
        f"{args.steps + index:4d}  {jax_losses[index]:.9e}  {torch_losses[index]:.9e}  "
        f"{loss_differences[index]:.3e}        {param_differences[index]:.3e}"
      )
  print(f"loss at the checkpoint: {before[-1]:.6e}")
  print(f"max absolute loss difference vs torch: {np.max(loss_differences):.3e}")
  print(f"max relative parameter difference vs torch: {max(param_differences):.3e}")
  print(f"{total} steps in {time.perf_counter() - start:.1f} s")
  if not args.no_plot:
    args.out.mkdir(parents=True, exist_ok=True)
    figure = args.out / "resume_from_pytorch.png"
    plot(before, torch_losses, jax_losses, figure)
    print(f"wrote {figure}")


if __name__ == "__main__":
  main()
