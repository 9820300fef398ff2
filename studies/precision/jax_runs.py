"""Train every task with every JAX configuration, paired by seed.

For a task and a seed, the float32 initial weights, the data and the batch plan are made
once; every configuration starts from those weights (cast to bfloat16 for the bf16-param
configurations) and sees the same batches. Each run is a Python loop over jitted chunks
of ``spec.chunk`` steps, each chunk one ``jax.lax.scan``.

bf16-param runs store the parameters in bfloat16; the forward and backward passes upcast
them to float32 inside the loss, so the gradients reaching the optimizer are bfloat16
(the transpose of the cast) and the loss is the float32 loss of the bfloat16 parameters.
"""

from __future__ import annotations

import functools
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from studies.precision import tasks
from studies.precision.configurations import CONFIGURATIONS, REFERENCE, Configuration, Unavailable
from studies.precision.jax_models import build_model, task_loss
from studies.precision.metrics import all_finite, loss_curve, train_metrics
from studies.precision.tasks import Data, TaskSpec

Params = Any
ChunkStep = Callable[[Params, optax.OptState, Data, Data], tuple[Params, optax.OptState, jax.Array]]


def regression_data(seed: int) -> Data:
  """examples/mlp_flax.py's data at ``seed``: ``x`` and ``y`` standard normal, float32."""
  data_key, _ = jax.random.split(jax.random.key(seed))
  x_key, y_key = jax.random.split(data_key)
  sizes = tasks.REGRESSION_SIZES
  x = jax.random.normal(x_key, (sizes["batch"], sizes["inputs"]), jnp.float32)
  y = jax.random.normal(y_key, (sizes["batch"], sizes["outputs"]), jnp.float32)
  return {"x": np.asarray(x), "y": np.asarray(y)}


def task_data(name: str, seed: int) -> Data:
  """The data of task ``name``; only the regression's depends on the seed."""
  if name == tasks.MLP_REGRESSION:
    return regression_data(seed)
  return tasks.digits_data() if name == tasks.DIGITS_MLP else tasks.char_data()


def initial_model(spec: TaskSpec, seed: int, data: Data) -> tuple[nnx.GraphDef, nnx.State]:
  """The float32 model at ``seed``: for the regression, the example's initialisation key."""
  if spec.name == tasks.MLP_REGRESSION:
    _, init_key = jax.random.split(jax.random.key(seed))
    rngs = nnx.Rngs(init_key)
  else:
    rngs = nnx.Rngs(seed)
  vocabulary_size = int(data.get("vocabulary_size", 0))
  return nnx.split(build_model(spec.name, spec.sizes, rngs, vocabulary_size), nnx.Param)


def flat_weights(params: nnx.State) -> Data:
  """``{"hidden.kernel": array, ...}``: a host copy of an NNX parameter state."""
  return {
    ".".join(str(key) for key in path): np.asarray(value)
    for path, value in nnx.to_flat_state(params)
  }


def copy_as(params: nnx.State, dtype: Any) -> nnx.State:
  """A fresh copy of ``params`` in ``dtype`` (fresh, as the chunk step donates its input)."""
  return jax.tree.map(lambda leaf: jnp.array(leaf, dtype=dtype, copy=True), params)


def upcast(params: nnx.State) -> nnx.State:
  """``params`` in float32, for the forward pass."""
  return jax.tree.map(lambda leaf: leaf.astype(jnp.float32), params)


def make_chunk_step(
  name: str, graphdef: nnx.GraphDef, tx: optax.GradientTransformation
) -> ChunkStep:
  """A jitted ``(params, opt_state, fixed, xs) -> (params, opt_state, losses)`` scanning
  one step per leading row of ``xs``; each loss is taken before that step's update."""

  def loss_fn(params: nnx.State, batch: Data) -> jax.Array:
    return task_loss(name, nnx.merge(graphdef, upcast(params)), batch)

  def step(carry: tuple[Params, optax.OptState], xs: Data, fixed: Data) -> tuple[Any, jax.Array]:
    params, opt_state = carry
    batch = {**fixed, **{key: value for key, value in xs.items() if key != "plan"}}
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  def chunk(params: Params, opt_state: optax.OptState, fixed: Data, xs: Data) -> Any:
    (params, opt_state), losses = jax.lax.scan(
      lambda carry, row: step(carry, row, fixed), (params, opt_state), xs
    )
    return params, opt_state, losses

  return jax.jit(chunk, donate_argnums=(0, 1))


def state_bytes_per_param(opt_state: optax.OptState, params: nnx.State) -> float:
  """Bytes of the optimizer state's non-scalar arrays per parameter element."""
  state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(opt_state) if leaf.ndim > 0)
  return state_bytes / sum(leaf.size for leaf in jax.tree.leaves(params))


def chunk_timing(seconds: list[float], chunk: int) -> dict[str, float | None]:
  """``step_ms``: milliseconds per step in the steady state (the median chunk after the
  first); ``compile_s``: the time of all chunks in excess of that steady state (the
  compilations). Both ``None`` with a single chunk."""
  if len(seconds) < 2:
    return {"step_ms": None, "compile_s": None}
  steady = float(np.median(seconds[1:]))
  return {"step_ms": 1000 * steady / chunk, "compile_s": sum(seconds) - steady * len(seconds)}


EVALUATION_INPUTS = {
  tasks.MLP_REGRESSION: (),
  tasks.DIGITS_MLP: ("x_test", "y_test"),
  tasks.CHAR_TRANSFORMER: ("heldout_windows",),
}


@functools.cache
def evaluator(name: str, graphdef: nnx.GraphDef) -> Callable[[nnx.State, Data], Any]:
  """A jitted ``(params, inputs) -> held-out metrics`` of task ``name``, at the parameters
  upcast to float32: test accuracy (digits) or held-out loss (characters)."""

  def evaluate(params: nnx.State, inputs: Data) -> dict[str, jax.Array]:
    model = nnx.merge(graphdef, upcast(params))
    if name == tasks.DIGITS_MLP:
      predictions = jnp.argmax(model(inputs["x_test"]), axis=-1)
      return {"test_accuracy": jnp.mean(predictions == inputs["y_test"])}
    if name == tasks.CHAR_TRANSFORMER:
      return {"heldout_loss": task_loss(name, model, {"tokens": inputs["heldout_windows"]})}
    return {}

  return jax.jit(evaluate)


def evaluation_metrics(
  spec: TaskSpec, graphdef: nnx.GraphDef, params: nnx.State, data: Data
) -> dict[str, float]:
  """Held-out metrics at the final parameters."""
  inputs = {key: data[key] for key in EVALUATION_INPUTS[spec.name]}
  metrics = evaluator(spec.name, graphdef)(params, inputs)
  return {key: float(value) for key, value in metrics.items()}


def train(
  spec: TaskSpec,
  configuration: Configuration,
  seed: int,
  model: tuple[nnx.GraphDef, nnx.State],
  data: Data,
  plan: np.ndarray,
) -> dict[str, Any]:
  """One run: its metrics, loss curve, NaN flag, state size and wall time."""
  start = time.perf_counter()
  graphdef, initial = model
  tx = configuration.optimizer(spec.learning_rate, seed)
  params = copy_as(initial, jnp.bfloat16 if configuration.bf16_params else jnp.float32)
  opt_state = tx.init(params)
  bytes_per_param = state_bytes_per_param(opt_state, params)
  chunk_step = make_chunk_step(spec.name, graphdef, tx)
  fixed = jax.device_put(tasks.fixed_batch(spec.name, data))
  losses, chunk_seconds = [], []
  for first in range(0, spec.steps, spec.chunk):
    chunk_start = time.perf_counter()
    rows = plan[first : first + spec.chunk]
    xs = {"plan": rows, **tasks.step_batches(spec.name, data, rows)}
    params, opt_state, chunk_losses = chunk_step(params, opt_state, fixed, xs)
    losses.append(np.asarray(chunk_losses))  # waits for the chunk
    chunk_seconds.append(time.perf_counter() - chunk_start)
  all_losses = np.concatenate(losses).astype(np.float64)
  metrics = train_metrics(spec, all_losses) | evaluation_metrics(spec, graphdef, params, data)
  return {
    "seed": seed,
    "metrics": metrics,
    "nan": not all_finite(all_losses, metrics),
    "state_bytes_per_param": bytes_per_param,
    "curve": loss_curve(all_losses),
    "wall_s": time.perf_counter() - start,
    **chunk_timing(chunk_seconds, spec.chunk),
  }


def configuration_entry(configuration: Configuration) -> dict[str, Any]:
  """The JSON entry of a configuration before its runs."""
  return {"framework": "jax", "description": configuration.description, "runs": []}


def run_configuration(
  spec: TaskSpec,
  configuration: Configuration,
  seed: int,
  model: tuple[nnx.GraphDef, nnx.State],
  data: Data,
  plan: np.ndarray,
  entry: dict[str, Any],
) -> None:
  """Train one configuration at one seed into ``entry``; record, rather than raise, why
  a configuration other than the reference could not run."""
  if "not_available" in entry or "error" in entry:
    return
  try:
    run = train(spec, configuration, seed, model, data, plan)
  except Unavailable as reason:
    entry["not_available"] = str(reason)
    print(f"  {configuration.name}: not available ({reason})", flush=True)
    return
  except Exception as error:
    if configuration.name == REFERENCE:
      raise
    entry["error"] = f"{type(error).__name__}: {error}"
    entry["traceback"] = traceback.format_exc(limit=-4)
    print(f"  {configuration.name}: failed ({entry['error'][:200]})", flush=True)
    return
  entry["runs"].append(run)
  shown = ", ".join(f"{key} {value:.4g}" for key, value in run["metrics"].items())
  print(f"  {configuration.name}: {shown} ({run['wall_s']:.1f} s)", flush=True)


def run_task(spec: TaskSpec, handoff: Path) -> dict[str, Any]:
  """Every configuration of one task at every seed; writes the PyTorch side's handoff
  files (``handoff/TASK_seedN.npz``) on the way."""
  entries = {
    configuration.name: configuration_entry(configuration) for configuration in CONFIGURATIONS
  }
  parameter_count = 0
  for seed in spec.seeds:
    print(f"[jax] {spec.name} seed {seed}", flush=True)
    data = task_data(spec.name, seed)
    model = initial_model(spec, seed, data)
    plan = tasks.batch_plan(spec, data, seed)
    tasks.save_handoff(
      str(handoff / f"{spec.name}_seed{seed}.npz"), flat_weights(model[1]), data, plan
    )
    parameter_count = sum(leaf.size for leaf in jax.tree.leaves(model[1]))
    for configuration in CONFIGURATIONS:
      run_configuration(spec, configuration, seed, model, data, plan, entries[configuration.name])
  return {"parameters": parameter_count, "configurations": entries}


def run_all(specs: dict[str, TaskSpec], handoff: Path) -> dict[str, dict[str, Any]]:
  """:func:`run_task` for every task."""
  return {name: run_task(spec, handoff) for name, spec in specs.items()}
