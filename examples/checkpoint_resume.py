"""Save AMSGrad's state with Orbax mid-run, restore it, and resume bit for bit.

Shows: parameters and the whole optimizer state (step counts, ``mu``, ``nu`` and the
running maximum ``nu_max``, which a restart must not lose) saved with
``orbax.checkpoint.StandardCheckpointer``, restored into fresh objects from an abstract
target built with ``jax.eval_shape``, and a resumed run that equals an uninterrupted one
exactly. Exits with status 1 if any array differs (``--reset-nu-max`` shows that it does
when the running maximum is lost). Takes about 6 s on 2 CPU cores.

Usage::

    python examples/checkpoint_resume.py                  # checkpoint in a temporary folder
    python examples/checkpoint_resume.py --dir ckpt --steps 400 --save-at 150
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import amsgrad_jax

BATCH, D_IN, HIDDEN, D_OUT = 32, 64, 128, 8
Params = dict[str, dict[str, jax.Array]]


def make_optimizer(steps: int) -> optax.GradientTransformation:
  """AMSGrad with decoupled weight decay and a warmup-cosine schedule.

  The schedule makes the result depend on the restored step count, the maximum on the
  restored ``nu_max``: a resume that lost either would not match.
  """
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, steps // 10, steps)
  return amsgrad_jax.amsgradw(schedule, weight_decay=1e-4)


def init_params(key: jax.Array) -> Params:
  k1, k2 = jax.random.split(key)
  return {
    "hidden": {
      "kernel": jax.random.normal(k1, (D_IN, HIDDEN)) / jnp.sqrt(D_IN),
      "bias": jnp.zeros(HIDDEN),
    },
    "output": {
      "kernel": jax.random.normal(k2, (HIDDEN, D_OUT)) / jnp.sqrt(HIDDEN),
      "bias": jnp.zeros(D_OUT),
    },
  }


def forward(params: Params, x: jax.Array) -> jax.Array:
  hidden = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  return hidden @ params["output"]["kernel"] + params["output"]["bias"]


def batch(step: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The batch of step ``step``: a function of the step alone, so a resumed run sees the
  same data as an uninterrupted one."""
  kx, ky = jax.random.split(jax.random.fold_in(jax.random.key(1), step))
  x = jax.random.normal(kx, (BATCH, D_IN))
  return x, jnp.sin(x[:, :D_OUT]) + 0.1 * jax.random.normal(ky, (BATCH, D_OUT))


def make_train(tx: optax.GradientTransformation) -> Any:
  """A jitted ``(params, opt_state, first, count) -> (params, opt_state, losses)`` running
  steps ``first .. first + count - 1`` in a ``lax.scan``."""

  def loss_fn(params: Params, step: jax.Array) -> jax.Array:
    x, y = batch(step)
    return jnp.mean((forward(params, x) - y) ** 2)

  def one_step(carry, step):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, step)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  def train(params, opt_state, first, count):
    steps = first + jnp.arange(count)
    (params, opt_state), losses = jax.lax.scan(one_step, (params, opt_state), steps)
    return params, opt_state, losses

  return jax.jit(train, static_argnums=3)


def differences(a: Any, b: Any) -> list[str]:
  """Paths of the leaves where two trees differ in structure, dtype or any bit."""
  leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  if tree_a != tree_b:
    return [f"tree structure: {tree_a} != {tree_b}"]
  return [
    jax.tree_util.keystr(path)
    for (path, x), y in zip(leaves_a, leaves_b, strict=True)
    if x.dtype != y.dtype or not np.array_equal(np.asarray(x), np.asarray(y))
  ]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300, help="total steps (default 300)")
  parser.add_argument("--save-at", type=int, default=None, help="checkpoint step (steps / 2)")
  parser.add_argument("--dir", type=Path, default=None, help="checkpoint folder (a temp one)")
  parser.add_argument(
    "--reset-nu-max", action="store_true", help="zero nu_max after restoring: the check fails"
  )
  args = parser.parse_args()
  save_at = args.steps // 2 if args.save_at is None else args.save_at
  if not 0 < save_at < args.steps:
    parser.error("--save-at must lie strictly between 0 and --steps")

  tx = make_optimizer(args.steps)
  train = make_train(tx)
  params = init_params(jax.random.key(0))
  opt_state = tx.init(params)

  # The reference: every step in one go.
  ref_params, ref_state, ref_losses = train(params, opt_state, 0, args.steps)
  print(f"uninterrupted: loss {float(ref_losses[0]):.5f} -> {float(ref_losses[-1]):.5f}")

  # The same run, stopped at save_at and written to disk.
  params, opt_state, first_losses = train(params, opt_state, 0, save_at)
  with tempfile.TemporaryDirectory() as temporary:
    folder = (args.dir or Path(temporary)).absolute() / f"step_{save_at}"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(folder, {"params": params, "opt_state": opt_state}, force=True)
    checkpointer.wait_until_finished()
    print(f"saved step {save_at} to {folder}")
    del params, opt_state  # Nothing of the first half survives but the checkpoint.

    # A fresh process would start here: a new optimizer, the shapes from eval_shape, restore.
    fresh_tx = make_optimizer(args.steps)

    def fresh_state() -> dict[str, Any]:
      params = init_params(jax.random.key(0))
      return {"params": params, "opt_state": fresh_tx.init(params)}

    abstract = jax.eval_shape(fresh_state)  # ShapeDtypeStructs only: nothing is computed.
    restored = ocp.StandardCheckpointer().restore(folder, abstract)
  (amsgrad_state,) = [
    s for s in restored["opt_state"] if isinstance(s, amsgrad_jax.ScaleByAmsgradState)
  ]
  largest = max(float(jnp.max(leaf)) for leaf in jax.tree.leaves(amsgrad_state.nu_max))
  print(f"restored: step count {int(amsgrad_state.count)}, largest nu_max {largest:.3e}")
  if args.reset_nu_max:
    print("resetting nu_max to zero, as a checkpoint without it would")
    amsgrad_state = amsgrad_state._replace(
      nu_max=jax.tree.map(jnp.zeros_like, amsgrad_state.nu_max)
    )
    restored["opt_state"] = tuple(
      amsgrad_state if isinstance(s, amsgrad_jax.ScaleByAmsgradState) else s
      for s in restored["opt_state"]
    )

  params, opt_state, second_losses = make_train(fresh_tx)(
    restored["params"], restored["opt_state"], save_at, args.steps - save_at
  )
  losses = jnp.concatenate([first_losses, second_losses])
  print(f"resumed:       loss {float(losses[0]):.5f} -> {float(losses[-1]):.5f}")

  mismatches = differences((ref_params, ref_state, ref_losses), (params, opt_state, losses))
  if mismatches:
    print(f"MISMATCH: the resumed run differs from the uninterrupted one at {mismatches}")
    return 1
  print("resumed run equals the uninterrupted run bit for bit (params, optimizer state, losses)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
