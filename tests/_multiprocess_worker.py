"""One process of the two-process test in ``tests/test_multiprocess.py``.

Run as ``python tests/_multiprocess_worker.py PROCESS_ID PORT OUTPUT_DIR`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=2``: the two processes join through
``jax.distributed.initialize`` on 127.0.0.1 (CPU collectives over gloo), build one
global (2, 2) mesh ("data", "model") of their 4 devices, and train a sharded linear
model for a few steps. The batch is split over "data", which spans the processes, so
the gradient is reduced across them; the parameters and the optimizer state are split
over "model". Each process writes the gathered result to ``OUTPUT_DIR/PROCESS_ID.npz``
and the state's sharding specs to ``OUTPUT_DIR/PROCESS_ID.json``.

Importing this module has no side effects: the test imports it for the problem, the
optimizer and the step, so both sides run exactly the same code.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import amsgrad_jax

STEPS = 3
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
SPECS = {"kernel": P(None, "model"), "bias": P("model")}
BATCH_SPECS = {"inputs": P("data", None), "targets": P("data", "model")}


def problem() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
  """Initial parameters and ``STEPS`` batches of 16 examples, from a fixed seed."""
  rng = np.random.default_rng(0)
  params = {
    "kernel": rng.standard_normal((4, 8)).astype(np.float32),
    "bias": np.zeros((8,), np.float32),
  }
  true_kernel = rng.standard_normal((4, 8)).astype(np.float32)
  batches = []
  for _ in range(STEPS):
    inputs = rng.standard_normal((16, 4)).astype(np.float32)
    batches.append({"inputs": inputs, "targets": inputs @ true_kernel})
  return params, batches


def optimizer() -> optax.GradientTransformation:
  return amsgrad_jax.amsgradw(1e-2, weight_decay=1e-2)


def make_train_step(tx: optax.GradientTransformation):
  def loss(params, batch):
    predictions = batch["inputs"] @ params["kernel"] + params["bias"][None, :]
    return jnp.mean(jnp.square(predictions - batch["targets"]))

  def train_step(params, state, batch):
    grads = jax.grad(loss)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return train_step


def leaves_by_path(tree) -> dict[str, np.ndarray]:
  return {
    jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree.leaves_with_path(tree)
  }


def main(process_id: int, port: int, output_dir: pathlib.Path) -> None:
  from jax.experimental import multihost_utils

  jax.config.update("jax_numpy_dtype_promotion", "strict")
  jax.config.update("jax_numpy_rank_promotion", "raise")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=2,
    process_id=process_id,
    initialization_timeout=60,
  )
  assert jax.process_count() == 2
  assert jax.local_device_count() == 2, jax.local_devices()
  assert jax.device_count() == 4

  mesh = jax.make_mesh((2, 2), ("data", "model"))

  def global_array(host: np.ndarray, spec: P) -> jax.Array:
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  host_params, host_batches = problem()
  params = {name: global_array(x, SPECS[name]) for name, x in host_params.items()}
  tx = optimizer()
  state = jax.jit(tx.init)(params)
  step = jax.jit(make_train_step(tx), donate_argnums=(0, 1))
  with jax.set_mesh(mesh):
    batches = [
      {name: global_array(x, BATCH_SPECS[name]) for name, x in batch.items()}
      for batch in host_batches
    ]
    hlo = step.lower(params, state, batches[0]).compile().as_text()
    for batch in batches:
      params, state = step(params, state, batch)

  (amsgrad_state,) = [
    s
    for s in jax.tree.leaves(
      state, is_leaf=lambda n: isinstance(n, amsgrad_jax.ScaleByAmsgradState)
    )
    if isinstance(s, amsgrad_jax.ScaleByAmsgradState)
  ]

  def specs_of(tree: dict[str, jax.Array]) -> dict[str, str]:
    return {name: str(leaf.sharding.spec) for name, leaf in tree.items()}

  kernel_devices = params["kernel"].sharding.addressable_devices
  specs = {
    "params": specs_of(params),
    **{f: specs_of(getattr(amsgrad_state, f)) for f in ("mu", "nu", "nu_max")},
    "process_index": jax.process_index(),
    "collectives": sorted({op for op in COLLECTIVES if op in hlo}),
    "global_devices": sorted(d.id for d in mesh.devices.flat),
    "addressable_devices": sorted(d.id for d in kernel_devices),
  }
  gathered = multihost_utils.process_allgather((params, state), tiled=True)
  print(json.dumps(specs))
  np.savez(output_dir / f"{process_id}.npz", **leaves_by_path(gathered))
  (output_dir / f"{process_id}.json").write_text(json.dumps(specs))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3]))
