"""Time one JAX contender on every case, in this process only.

An update-step case builds float32 parameters and gradients of the case's shapes (or the
Flax transformer's parameter tree), compiles ``step(params, state, grads)`` with
``jax.jit(..., donate_argnums=(0, 1))`` so parameters and optimizer state are updated in
place, records what XLA says about the compiled step, runs ``warmup`` untimed steps and
then times ``repetitions`` steps one by one, each waited for with ``block_until_ready``.

For an ``amsgrad_jax.apply_step`` contender on a case of one leaf, the timed steps are
followed by as many passes of the in-process bandwidth probe (:mod:`benchmarks.probe`),
back to back like the steps, over the step's own five buffers: the parameter leaf, its
gradient and the leaf's ``mu``, ``nu`` and ``nu_max``, found by their raw pointers. Step
and probe see the same process, pages and (within a second) moment, and the steps are
timed exactly as for every other contender. The probe's times are recorded next to the
step's (``probe_times_s``), or why it did not run (``probe_error``).

The loop case runs the train step of ``examples/mlp_flax.py`` (forward, backward and
update, jitted with donation) for ``steps`` steps and times the whole loop, after one
untimed step that compiles it; the losses are fetched once at the end, as the example
does.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import amsgrad_jax
from benchmarks import hlo, models, probe
from benchmarks.config import MLP_LEARNING_RATE, STEP_LEARNING_RATE, Case, Config
from benchmarks.contenders import Contender


def step_function(contender: Contender, tx: optax.GradientTransformation) -> Any:
  """``(params, opt_state, grads) -> (params, opt_state)``, jitted, donating both."""
  if contender.apply == "apply_step":

    def step(params: Any, opt_state: Any, grads: Any) -> tuple[Any, Any]:
      return amsgrad_jax.apply_step(tx, grads, opt_state, params)

  else:

    def step(params: Any, opt_state: Any, grads: Any) -> tuple[Any, Any]:
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

  return jax.jit(step, donate_argnums=(0, 1))


def random_like(tree: Any, rng: np.random.Generator, scale: float) -> Any:
  """Float32 numbers uniform in ``[-scale, scale)`` shaped like ``tree``'s leaves (shapes or
  arrays); uniform rather than normal only because it is several times faster to draw."""
  return jax.tree.map(
    lambda leaf: jnp.asarray(
      (rng.random(leaf.shape, np.float32) - np.float32(0.5)) * np.float32(2 * scale)
    ),
    tree,
  )


def parameters(case: Case, config: Config) -> Any:
  """The case's parameter tree with ``jax.ShapeDtypeStruct`` leaves."""
  if case.model == "transformer":
    return models.abstract_transformer_params(config.transformer)
  return [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in case.shapes]


def time_step_case(contender: Contender, case: Case, config: Config) -> dict[str, Any]:
  """Times and compiled-step facts of one update-step case."""
  rng = np.random.default_rng(0)
  abstract = parameters(case, config)
  params = random_like(abstract, rng, 1.0)
  grads = random_like(abstract, rng, 1e-2)
  tx = contender.make_tx(STEP_LEARNING_RATE)
  opt_state = tx.init(params)
  parameter_count = sum(leaf.size for leaf in jax.tree.leaves(params))
  state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(opt_state))

  start = time.perf_counter()
  compiled = step_function(contender, tx).lower(params, opt_state, grads).compile()
  compile_s = time.perf_counter() - start
  facts = {
    **hlo.cost_summary(compiled, parameter_count),
    **hlo.memory_summary(compiled),
    "array_loops": hlo.array_loops(compiled.as_text()),
  }

  in_process_probe, probe_facts = _probe_for(contender, params, grads, opt_state)
  times = []
  index = 0
  while not case.done(times):
    start = time.perf_counter()
    params, opt_state = compiled(params, opt_state, grads)
    jax.block_until_ready((params, opt_state))
    if index >= case.warmup:
      times.append(time.perf_counter() - start)
    index += 1
  if in_process_probe is not None:
    pointers = leaf_pointers(params, grads, opt_state)
    in_process_probe.time_pass(pointers, parameter_count)  # untimed, as the first step
    probe_facts["probe_times_s"] = [
      in_process_probe.time_pass(pointers, parameter_count) for _ in times
    ]
  return {
    "times_s": times,
    "compile_s": compile_s,
    "parameters": parameter_count,
    "leaves": len(jax.tree.leaves(params)),
    "state_bytes_per_param": state_bytes / parameter_count,
    **facts,
    **probe_facts,
  }


def leaf_pointers(params: Any, grads: Any, opt_state: Any) -> list[int]:
  """Raw addresses of the five buffers one AMSGrad pass over a single-leaf tree touches:
  the gradient, then the parameter, ``mu``, ``nu`` and ``nu_max``.

  The state's three are the arrays of ``opt_state`` with as many elements as the leaf:
  one array per moment with per-leaf state, and one flat buffer per moment (the leaf's
  dtype group) with ``flat_state=True``; the step count and other scalars are smaller.
  They are the buffers the last step wrote: a donated step may hand back other buffers
  than it was given, so they are taken after the timed steps.
  """
  (param,) = jax.tree.leaves(params)
  (grad,) = jax.tree.leaves(grads)
  state = [
    leaf
    for leaf in jax.tree.leaves(opt_state)
    if isinstance(leaf, jax.Array) and leaf.size == param.size and leaf.dtype == param.dtype
  ]
  if len(state) != 3 or param.dtype != jnp.float32:
    raise ValueError(
      f"expected a float32 leaf and three state arrays of its {param.size} elements, "
      f"found {param.dtype} and {len(state)}"
    )
  return [x.unsafe_buffer_pointer() for x in (grad, param, *state)]


def _probe_for(
  contender: Contender, params: Any, grads: Any, opt_state: Any
) -> tuple[probe.Probe | None, dict[str, Any]]:
  """The in-process probe when ``contender`` is an ``apply_step`` one and ``params`` is a
  single leaf, with the facts to record about it (or why it cannot run)."""
  if contender.apply != "apply_step" or len(jax.tree.leaves(params)) != 1:
    return None, {}
  return probe.prepared(lambda: leaf_pointers(params, grads, opt_state))


def time_mlp_loop(contender: Contender, case: Case) -> dict[str, Any]:
  """The example's training loop, ``case.steps`` steps, timed end to end."""
  from flax import nnx

  example = models.mlp_example()
  data_key, init_key = jax.random.split(jax.random.key(0))
  x_key, y_key = jax.random.split(data_key)
  x = jax.random.normal(x_key, (example.N, example.D_IN))
  y = jax.random.normal(y_key, (example.N, example.D_OUT))
  graphdef, params = nnx.split(example.MLP(nnx.Rngs(init_key)), nnx.Param)
  tx = contender.make_tx(MLP_LEARNING_RATE)
  opt_state = tx.init(params)
  if contender.apply == "apply_step":
    train_step = _apply_step_train_step(example, graphdef, tx)
  else:
    train_step = example.make_train_step(graphdef, tx)

  start = time.perf_counter()
  params, opt_state, loss = train_step(params, opt_state, x, y)
  jax.block_until_ready(loss)
  compile_s = time.perf_counter() - start
  times, final_loss = [], float("nan")
  for _ in range(case.repetitions):
    start = time.perf_counter()
    losses = []
    for _ in range(case.steps):
      params, opt_state, loss = train_step(params, opt_state, x, y)
      losses.append(loss)
    final_loss = float(jax.device_get(losses)[-1])
    times.append(time.perf_counter() - start)
  return {
    "times_s": times,
    "compile_s": compile_s,
    "parameters": sum(leaf.size for leaf in jax.tree.leaves(params)),
    "final_loss": final_loss,
  }


def _apply_step_train_step(example: Any, graphdef: Any, tx: optax.GradientTransformation) -> Any:
  """The example's train step with the update made by ``amsgrad_jax.apply_step``."""
  from flax import nnx

  def loss_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    return example.sum_squared_error(nnx.merge(graphdef, params)(x), y)

  def train_step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    params, opt_state = amsgrad_jax.apply_step(tx, grads, opt_state, params)
    return params, opt_state, loss

  return jax.jit(train_step, donate_argnums=(0, 1))


def measure(contender: Contender, case: Case, config: Config) -> dict[str, Any]:
  """Times and facts of ``contender`` on ``case``."""
  if case.kind == "loop":
    return time_mlp_loop(contender, case)
  return time_step_case(contender, case, config)


def environment() -> dict[str, Any]:
  """What this process runs on."""
  return {
    "backend": jax.default_backend(),
    "device": str(jax.devices()[0].device_kind),
    "versions": {"jax": jax.__version__, "optax": optax.__version__},
  }
