"""Time a JAX contender on one case, in this process.

A step case fills float32 parameters and gradients of the case's shapes with random
numbers, and compiles ``step(params, opt_state, grads)`` with
``jax.jit(step, donate_argnums=(0, 1))``, so parameters and state are updated in place;
compilation is done before any step is timed, and each timed step is waited for with
``block_until_ready``. For an ``apply_step`` contender it records whether the lowered
step calls the native kernel. The loop case runs ``examples/mlp_flax.py``'s model and
loss in the same jitted, donated train step, with the contender's update, and fetches
the losses once at the end, as the example does.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import amsgrad_jax
from benchmarks.cases import Case
from benchmarks.contenders import Contender

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mlp_flax.py"
Update = Callable[[Any, Any, Any], tuple[Any, Any]]


def update_function(contender: Contender, tx: optax.GradientTransformation) -> Update:
  """``(params, opt_state, grads) -> (params, opt_state)`` as the contender applies ``tx``."""
  if contender.native:
    return lambda params, state, grads: amsgrad_jax.apply_step(tx, grads, state, params)

  def update(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return update


def time_step(contender: Contender, case: Case, repeat: Callable) -> dict[str, Any]:
  """Step times on ``case`` (and, for ``apply_step``, whether the kernel ran)."""
  rng = np.random.default_rng(0)

  def uniform(shape: list[int], scale: float) -> jax.Array:
    return jnp.asarray((rng.random(shape, np.float32) - np.float32(0.5)) * np.float32(2 * scale))

  params = [uniform(shape, 1.0) for shape in case.shapes]
  grads = [uniform(shape, 1e-2) for shape in case.shapes]
  tx = contender.make_tx(case.learning_rate)
  state = tx.init(params)
  lowered = jax.jit(update_function(contender, tx), donate_argnums=(0, 1)).lower(
    params, state, grads
  )
  compiled = lowered.compile()

  def run() -> None:
    nonlocal params, state
    params, state = jax.block_until_ready(compiled(params, state, grads))

  return {"times_s": repeat(run, case)} | _native(contender, lowered)


def _native(contender: Contender, lowered: jax.stages.Lowered) -> dict[str, bool]:
  """For an ``apply_step`` contender, whether its step calls the native kernel."""
  return {"native": "amsgrad_jax_step" in lowered.as_text()} if contender.native else {}


def time_loop(contender: Contender, case: Case, repeat: Callable) -> dict[str, Any]:
  """Times of the example's training loop, ``case.steps`` steps each."""
  from flax import nnx

  spec = importlib.util.spec_from_file_location("mlp_flax", EXAMPLE)
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  x_key, y_key, init_key = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(x_key, (example.N, example.D_IN))
  y = jax.random.normal(y_key, (example.N, example.D_OUT))
  graphdef, params = nnx.split(example.MLP(nnx.Rngs(init_key)), nnx.Param)
  tx = contender.make_tx(case.learning_rate)
  state = tx.init(params)
  update = update_function(contender, tx)

  def train_step(params: Any, state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any, Any]:
    def loss_fn(params: Any) -> jax.Array:
      return example.sum_squared_error(nnx.merge(graphdef, params)(x), y)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    return (*update(params, state, grads), loss)

  train_step = jax.jit(train_step, donate_argnums=(0, 1))
  losses: list[jax.Array] = []

  def run() -> None:
    nonlocal params, state
    losses.clear()
    for _ in range(case.steps):
      params, state, loss = train_step(params, state, x, y)
      losses.append(loss)
    jax.device_get(losses)

  result = {"times_s": repeat(run, case), "final_loss": float(losses[-1])}
  return result | _native(contender, train_step.lower(params, state, x, y))


def measure(contender: Contender, case: Case, repeat: Callable) -> dict[str, Any]:
  """Times of ``contender`` on ``case``."""
  return (time_loop if case.steps else time_step)(contender, case, repeat)


def setup() -> dict[str, str]:
  """Prepare this process; returns the versions to record."""
  return {"jax": jax.__version__, "optax": optax.__version__}
