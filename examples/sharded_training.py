"""Train a small MLP data- and model-parallel on 8 devices, with AMSGrad state sharded like the parameters.

Shows: a ``("data", "model")`` device mesh; the batch split over ``data``; the hidden layer
split over ``model`` (Megatron-style: the first kernel by columns, the second by rows); an
optimizer state whose ``mu``, ``nu`` and ``nu_max`` carry exactly the parameters'
shardings, checked leaf by leaf; and the bytes each device holds. ``--pmap`` runs the
classic data-parallel version instead (replicated parameters and state, gradients averaged
with ``lax.pmean``). Takes about 5 s on 2 CPU cores.

On GPUs or TPUs it uses the devices there are (the largest power of two up to 8; one is
enough, the mesh is then 1 x 1); on the CPU it asks XLA for 8 CPU devices (before
importing jax).

Usage::

    python examples/sharded_training.py           # jit on a 4 x 2 mesh
    python examples/sharded_training.py --pmap    # data-parallel pmap on 8 devices
"""

from __future__ import annotations

import os

DEVICES = 8
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  # Only the CPU platform reads this flag; it must be set before jax is imported.
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
  ).strip()

import argparse  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import amsgrad_jax  # noqa: E402

BATCH, D_IN, HIDDEN, D_OUT = 256, 128, 512, 16
# How each parameter is laid out on the mesh: the hidden units are split over "model".
PARAM_SPECS = {
  "hidden": {"kernel": P(None, "model"), "bias": P("model")},
  "output": {"kernel": P("model", None), "bias": P()},
}
Params = dict[str, dict[str, jax.Array]]


def pick_devices() -> list[jax.Device]:
  """An accelerator's devices, as many as the largest power of two up to 8 (so the batch
  and the hidden layer split evenly), or the eight CPU devices."""
  devices = jax.devices()
  if devices[0].platform != "cpu":
    return devices[: 1 << (min(len(devices), DEVICES).bit_length() - 1)]
  if len(devices) < DEVICES:
    raise SystemExit(f"needs {DEVICES} CPU devices, found {len(devices)}: {devices}")
  return devices[:DEVICES]


def mesh_shape(count: int) -> dict[str, int]:
  """``{"data": 4, "model": 2}`` on 8 devices: the hidden units split in two where the
  devices allow, the batch over the rest."""
  model = 2 if count > 1 else 1
  return {"data": count // model, "model": model}


def init_params(key: jax.Array) -> Params:
  """LeCun-normal kernels and zero biases."""
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


def make_data(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A regression task: targets from a fixed random teacher network."""
  kx, kt = jax.random.split(key)
  x = jax.random.normal(kx, (BATCH, D_IN))
  teacher = init_params(kt)
  return x, forward(teacher, x)


def forward(params: Params, x: jax.Array) -> jax.Array:
  hidden = jax.nn.relu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  return hidden @ params["output"]["kernel"] + params["output"]["bias"]


def loss_fn(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean squared error."""
  return jnp.mean((forward(params, x) - y) ** 2)


def bytes_per_device(tree: Any) -> dict[jax.Device, int]:
  """How many bytes of ``tree``'s arrays each device holds."""
  totals: dict[jax.Device, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
  return totals


def print_memory(params: Any, opt_state: Any, copies: int = 1) -> None:
  """Print the model's size and the bytes of parameters and state on each device."""
  param_bytes, state_bytes = bytes_per_device(params), bytes_per_device(opt_state)
  model = sum(leaf.nbytes for leaf in jax.tree.leaves(params)) // copies
  print(f"model: {model} bytes of parameters; per device (parameters, optimizer state):")
  for device in sorted(param_bytes, key=lambda d: d.id):
    print(f"  {device}: {param_bytes[device]:7d} B  {state_bytes[device]:7d} B")


def check_state_sharding(params: Params, opt_state: Any, show_layout: bool = True) -> None:
  """Every moment buffer must have its parameter's sharding; exits with an error if not."""
  is_amsgrad = lambda node: isinstance(node, amsgrad_jax.ScaleByAmsgradState)  # noqa: E731
  (amsgrad_state,) = filter(is_amsgrad, jax.tree.leaves(opt_state, is_leaf=is_amsgrad))
  for name in ("mu", "nu", "nu_max"):
    same = jax.tree.map(
      lambda param, buffer: buffer.sharding.is_equivalent_to(param.sharding, param.ndim),
      params,
      getattr(amsgrad_state, name),
    )
    if not all(jax.tree.leaves(same)):
      raise SystemExit(f"{name} is not sharded like the parameters: {same}")
  print("optimizer state: mu, nu and nu_max are sharded exactly like the parameters")
  if not show_layout:
    return
  for path, param in jax.tree_util.tree_leaves_with_path(params):
    print(f"  {jax.tree_util.keystr(path):24s} {param.shape!s:12s} {param.sharding.spec}")


def train_jit(steps: int, devices: list[jax.Device]) -> None:
  """Data- and model-parallel training with ``jax.jit`` on a mesh (4 x 2 on 8 devices)."""
  shape = mesh_shape(len(devices))
  mesh = jax.make_mesh(
    tuple(shape.values()), tuple(shape), axis_types=(AxisType.Auto,) * len(shape), devices=devices
  )
  print(f"mesh: {dict(mesh.shape)} over {len(devices)} {devices[0].platform} devices")
  param_shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), PARAM_SPECS)
  batch_sharding = NamedSharding(mesh, P("data", None))

  params = jax.device_put(init_params(jax.random.key(0)), param_shardings)
  x, y = jax.device_put(make_data(jax.random.key(1)), batch_sharding)
  tx = amsgrad_jax.amsgrad(1e-3)
  # init places each buffer like the parameter it shadows, so no sharding annotation is needed.
  opt_state = jax.jit(tx.init)(params)
  check_state_sharding(params, opt_state)
  print_memory(params, opt_state)

  def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  # Shardings flow from the arguments; donation lets XLA update the sharded buffers in place.
  train_step = jax.jit(train_step, donate_argnums=(0, 1))
  run_steps(
    lambda p, s: train_step(p, s, x, y),
    params,
    opt_state,
    steps,
    lambda p, s: check_state_sharding(p, s, show_layout=False),
  )


def train_pmap(steps: int, devices: list[jax.Device]) -> None:
  """Data-parallel training with ``jax.pmap``: replicated parameters, averaged gradients."""
  print(f"pmap over {len(devices)} {devices[0].platform} devices")
  n = len(devices)
  tx = amsgrad_jax.amsgrad(1e-3)
  params = init_params(jax.random.key(0))
  x, y = make_data(jax.random.key(1))
  # pmap maps over a leading axis of size n, one entry per device: a copy of the parameters
  # and state on each, and one slice of the batch.
  per_device = NamedSharding(jax.make_mesh((n,), ("batch",), devices=devices), P("batch"))
  replicate = lambda tree: jax.device_put(  # noqa: E731
    jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), tree), per_device
  )
  params, opt_state = replicate(params), replicate(tx.init(params))
  x, y = (jax.device_put(a.reshape(n, BATCH // n, *a.shape[1:]), per_device) for a in (x, y))
  print_memory(params, opt_state, copies=n)

  def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    grads, loss = jax.lax.pmean((grads, loss), axis_name="batch")
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.pmap(train_step, axis_name="batch", devices=devices, donate_argnums=(0, 1))

  def check_replicas(params, opt_state):
    # Every device applies the same averaged update, so the replicas must stay identical.
    for leaf in jax.tree.leaves((params, opt_state)):
      if not bool(jnp.all(leaf == leaf[0])):
        raise SystemExit("the replicas of the parameters or state have drifted apart")
    print("replicas of parameters and optimizer state are identical on every device")

  run_steps(lambda p, s: step(p, s, x, y), params, opt_state, steps, check_replicas, index=0)


def run_steps(step, params, opt_state, steps, check, index=None) -> None:
  """Run ``steps`` steps, print the loss every 50, then ``check`` the final state."""
  start = time.perf_counter()
  for t in range(steps):
    params, opt_state, loss = step(params, opt_state)
    if jax.default_backend() == "cpu":
      # Emulated CPU devices share one small thread pool; with several steps in flight the
      # participants of their all-reduces can starve each other, so finish each step first.
      loss.block_until_ready()
    if t % 50 == 0 or t == steps - 1:
      value = loss if index is None else loss[index]
      print(f"step {t:4d}  loss {float(value):.4e}")
  print(f"{steps} steps in {time.perf_counter() - start:.1f} s")
  check(params, opt_state)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
  parser.add_argument("--pmap", action="store_true", help="data-parallel jax.pmap instead")
  args = parser.parse_args()
  devices = pick_devices()
  print(f"backend: {jax.default_backend()}, devices: {len(jax.devices())}")
  (train_pmap if args.pmap else train_jit)(args.steps, devices)


if __name__ == "__main__":
  main()
