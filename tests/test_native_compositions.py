"""apply_step in real training configurations: the native step inside Optax's wrappers.

Each optimizer below is written as users write it, with Optax's own wrappers. For each,
the jitted step must contain the kernel's custom call, and 100 steps (with spikes, a
non-finite step, a schedule and accumulation boundaries) must stay within 2 float32 ulps
of the Optax path per parameter per step, with state trees of the same structure.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _peers import require
from _sequences import gradient_sequence, initial_params
from test_apply_step import STEPS, ULPS, native_kernel, worst_ulps

import amsgrad_jax
from amsgrad_jax._native._step import pure_step

pytestmark = pytest.mark.native_cpu

__all__ = ["native_kernel"]  # the fixture that requires the native step, used here too
SHAPES = {"body": (6, 5), "bias": (5,), "head": (5, 2), "scale": ()}
LABELS = {"body": "body", "bias": "body", "head": "head", "scale": "head"}
SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 3e-2, 10, STEPS, 1e-3)


def _configurations() -> dict[str, object]:
  a = amsgrad_jax
  return {
    "amsgradw(schedule, mask)": lambda: a.amsgradw(
      SCHEDULE, weight_decay=0.1, mask={k: k != "bias" for k in SHAPES}
    ),
    "chain(clip_by_global_norm, amsgrad)": lambda: optax.chain(
      optax.clip_by_global_norm(1.0), a.amsgrad(1e-2)
    ),
    "chain(clip, amsgradw)": lambda: optax.chain(optax.clip(0.5), a.amsgradw(1e-2)),
    "inject_hyperparams(amsgrad)": lambda: optax.inject_hyperparams(a.amsgrad)(
      learning_rate=SCHEDULE, b1=0.8
    ),
    "MultiSteps(amsgrad, 3)": lambda: optax.MultiSteps(a.amsgrad(1e-2), 3),
    "skip_nonfinite(amsgrad)": lambda: a.skip_nonfinite(a.amsgrad(1e-2), 5),
    "skip_nonfinite(chain(clip_by_global_norm, inject(amsgradw)))": lambda: a.skip_nonfinite(
      optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.inject_hyperparams(a.amsgradw)(learning_rate=SCHEDULE, weight_decay=1e-2),
      ),
      5,
    ),
    "multi_transform(amsgradw, amsgradw)": lambda: optax.multi_transform(
      {"body": a.amsgradw(1e-3), "head": a.amsgradw(1e-4)}, LABELS
    ),
    "masked(amsgrad)": lambda: optax.masked(a.amsgrad(1e-2), {k: k != "scale" for k in SHAPES}),
    # Nestings.
    "MultiSteps(chain(clip_by_global_norm, amsgradw), 2)": lambda: optax.MultiSteps(
      optax.chain(optax.clip_by_global_norm(0.5), a.amsgradw(1e-2)), 2
    ),
    "chain(clip_by_global_norm, multi_transform(inject, amsgrad))": lambda: optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.multi_transform(
        {
          "body": optax.inject_hyperparams(a.amsgradw)(learning_rate=1e-3),
          "head": a.amsgrad(1e-2, convention="keras"),
        },
        LABELS,
      ),
    ),
    "chain(scale_by_adam, amsgrad)": lambda: optax.chain(optax.scale_by_adam(), a.amsgrad(1e-2)),
    # Guards around what the check kernel cannot read: XLA checks, the kernel steps.
    "skip_nonfinite(MultiSteps(amsgrad, 3))": lambda: a.skip_nonfinite(
      optax.MultiSteps(a.amsgrad(1e-2), 3), 5
    ),
    "skip_nonfinite(masked(amsgrad))": lambda: a.skip_nonfinite(
      optax.masked(a.amsgrad(1e-2), {k: k != "scale" for k in SHAPES}), 5
    ),
    "skip_nonfinite(multi_transform(amsgradw, amsgrad))": lambda: a.skip_nonfinite(
      optax.multi_transform({"body": a.amsgradw(1e-3), "head": a.amsgrad(1e-2)}, LABELS), 5
    ),
  }


CONFIGURATIONS = _configurations()


@pytest.fixture(autouse=True)
def standard_promotion():
  """Optax's schedules and MultiSteps mix int and float scalars themselves."""
  with jax.numpy_dtype_promotion("standard"):
    yield


def _gradients(dtype: np.dtype) -> list[dict[str, np.ndarray]]:
  grads = gradient_sequence(STEPS, dtype, shapes=SHAPES)
  grads[17]["body"] = grads[17]["body"].copy()
  grads[17]["body"][1, 2] = np.nan  # a non-finite step (the guard rejects it)
  return grads


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_native_and_optax_paths_agree(name):
  tx = CONFIGURATIONS[name]()
  params = jax.tree.map(jnp.asarray, initial_params(np.float32, shapes=SHAPES))
  state = tx.init(params)
  assert amsgrad_jax.native_status(tx, state, params).active, name

  @functools.partial(jax.jit, donate_argnums=(1, 2))
  def native(grads, state, params):
    return amsgrad_jax.apply_step(tx, grads, state, params)

  pure = jax.jit(functools.partial(pure_step, tx))
  assert "amsgrad_jax_step" in native.lower(params, state, params).as_text()
  native_params, native_state = params, state
  pure_params, pure_state = jax.tree.map(jnp.copy, (params, state))
  for step, grads in enumerate(_gradients(np.float32)):
    grads = jax.tree.map(jnp.asarray, grads)
    if "skip_nonfinite" not in name and step == 17:
      continue  # a NaN reaches the running maximum for good without the guard
    native_params, native_state = native(grads, native_state, native_params)
    pure_params, pure_state = pure(grads, pure_state, pure_params)
    assert jax.tree.structure(native_state) == jax.tree.structure(pure_state)
    worst = float(worst_ulps((native_params, native_state), (pure_params, pure_state)))
    assert worst <= ULPS, (name, step, worst)


def test_the_guard_around_a_flat_state_steps_natively_as_the_tree_layout_does():
  """The flat layout's kernel follows the tree layout's Optax path (XLA's own flat-buffer
  step contracts its multiply-adds differently), so the guarded flat step is compared with
  the guarded tree step, a rejected step included."""
  tree_tx = amsgrad_jax.skip_nonfinite(amsgrad_jax.amsgradw(1e-2, weight_decay=0.1), 5)
  flat_tx = amsgrad_jax.skip_nonfinite(
    amsgrad_jax.amsgradw(1e-2, weight_decay=0.1, flat_state=True), 5
  )
  params = jax.tree.map(jnp.asarray, initial_params(np.float32, shapes=SHAPES))
  tree_params, tree_state = params, tree_tx.init(params)
  flat_params, flat_state = params, flat_tx.init(params)
  native = jax.jit(lambda g, s, p: amsgrad_jax.apply_step(flat_tx, g, s, p))
  pure = jax.jit(functools.partial(pure_step, tree_tx))
  assert amsgrad_jax.native_status(flat_tx, flat_state, params).active
  assert "amsgrad_jax_step_flat" in native.lower(params, flat_state, params).as_text()
  for grads in _gradients(np.float32):
    grads = jax.tree.map(jnp.asarray, grads)
    flat_params, flat_state = native(grads, flat_state, flat_params)
    tree_params, tree_state = pure(grads, tree_state, tree_params)
    assert float(worst_ulps(flat_params, tree_params)) <= ULPS
    flat_moments, tree_moments = flat_state.inner_state[0], tree_state.inner_state[0]
    for name in ("mu", "nu", "nu_max"):
      ours = getattr(flat_moments, name).leaves()
      assert float(worst_ulps(ours, jax.tree.leaves(getattr(tree_moments, name)))) <= ULPS
    assert int(flat_state.total_notfinite) == int(tree_state.total_notfinite)
  assert int(flat_state.total_notfinite) == 1  # the NaN step was rejected


def test_a_rejected_step_leaves_everything_bit_identical():
  tx = amsgrad_jax.skip_nonfinite(
    optax.chain(optax.clip_by_global_norm(1.0), amsgrad_jax.amsgradw(1e-2)), 3
  )
  params = jax.tree.map(jnp.asarray, initial_params(np.float32, shapes=SHAPES))
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: amsgrad_jax.apply_step(tx, g, s, p))
  grads = jax.tree.map(jnp.asarray, gradient_sequence(2, np.float32, shapes=SHAPES))
  params, state = step(grads[0], state, params)
  bad = {**grads[1], "head": grads[1]["head"].at[0, 0].set(jnp.inf)}
  new_params, new_state = step(bad, state, params)
  for before, after in zip(
    jax.tree.leaves((params, state.inner_state)),
    jax.tree.leaves((new_params, new_state.inner_state)),
    strict=True,
  ):
    assert np.asarray(before).tobytes() == np.asarray(after).tobytes()
  assert int(new_state.notfinite_count) == 1
  assert not bool(new_state.last_finite)


def compiled_entry(tx: optax.GradientTransformation) -> str:
  """The compiled ENTRY computation of ``apply_step`` with ``tx`` on one leaf of 64k,
  jitted with the parameters and state donated, as training loops write it."""
  params = {"w": jnp.ones((1 << 16,))}
  state = tx.init(params)

  def train_step(params, state, grads):
    return amsgrad_jax.apply_step(tx, grads, state, params)

  step = jax.jit(train_step, donate_argnums=(0, 1))
  return step.lower(params, state, params).compile().as_text().split("ENTRY")[1]


def test_a_clip_by_global_norm_in_front_is_a_scalar_of_the_kernel():
  """The clipped gradient is never written: XLA reads the gradients once for the norm,
  the kernel reads them once more and updates everything else in place."""
  entry = compiled_entry(optax.chain(optax.clip_by_global_norm(1.0), amsgrad_jax.amsgrad(1e-2)))
  lines = entry.splitlines()
  writes = [line for line in lines if re.match(r"\s*%\S+ = f32\[65536\]\S* (fusion|copy)\(", line)]
  assert not writes, writes  # no loop writes a parameter-sized array: all in place
  norm = [line for line in lines if re.match(r"\s*%\S+ = f32\[\] fusion\(%g", line)]
  assert len(norm) == 1, entry  # one read of the gradients for the norm
  assert sum('custom_call_target="amsgrad_jax_step"' in line for line in lines) == 1


@pytest.mark.parametrize(
  ("make", "reason"),
  [
    (lambda: optax.chain(amsgrad_jax.amsgrad(1e-2), optax.scale(0.5)), "optax.scale"),
    (
      lambda: amsgrad_jax.skip_nonfinite(
        optax.chain(amsgrad_jax.amsgrad(1e-2), optax.add_decayed_weights(1e-3)), 3
      ),
      "optax.add_decayed_weights",
    ),
    (
      lambda: optax.apply_if_finite(amsgrad_jax.amsgrad(1e-2), 3),
      "optax.apply_if_finite",
    ),
  ],
)
def test_what_is_not_understood_takes_the_optax_path_and_says_why(make, reason):
  from amsgrad_jax._native import _step

  tx = make()
  params = jax.tree.map(jnp.asarray, initial_params(np.float32, shapes=SHAPES))
  state = tx.init(params)
  status = amsgrad_jax.native_status(tx, state, params)
  assert not status.active
  assert reason in status.reason, status.reason
  _step._WARNED.clear()
  with pytest.warns(amsgrad_jax.NativeFallbackWarning, match=reason):
    got = amsgrad_jax.apply_step(tx, params, state, params)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # once per reason
    amsgrad_jax.apply_step(tx, params, state, params)
    expected = pure_step(tx, params, state, params)
  jax.tree.map(np.testing.assert_array_equal, got, expected)


# ---- derivatives through the step -------------------------------------------------------


def _unrolled_loss(step, log_lr, params, state, batches):
  """A meta-learning loss: train a few steps with a learned learning rate."""
  for batch in batches:
    grads = jax.grad(lambda p, x=batch: jnp.sum((p["w"] * x) ** 2))(params)
    grads = jax.tree.map(lambda g: g * jnp.exp(log_lr), grads)
    params, state = step(grads, state, params)
  return jnp.sum(params["w"] ** 2)


@pytest.mark.parametrize("transform", ["grad", "jvp", "linearize", "vmap_grad"])
def test_derivatives_are_the_optax_paths(transform):
  tx = optax.chain(optax.clip_by_global_norm(1.0), amsgrad_jax.amsgradw(1e-1))
  params = {"w": jnp.linspace(-1.0, 1.0, 8)}
  state = tx.init(params)
  batches = [jnp.cos(jnp.arange(8.0) * k) for k in range(3)]
  native = jax.jit(lambda g, s, p: amsgrad_jax.apply_step(tx, g, s, p))
  pure = jax.jit(functools.partial(pure_step, tx))
  assert "amsgrad_jax_step" in native.lower(params, state, params).as_text()
  losses = {
    name: functools.partial(_unrolled_loss, step, params=params, state=state, batches=batches)
    for name, step in (("native", native), ("pure", pure))
  }
  x = jnp.asarray(-1.0)
  results = {}
  for name, loss in losses.items():
    if transform == "grad":
      results[name] = jax.grad(loss)(x)
    elif transform == "jvp":
      results[name] = jax.jvp(loss, (x,), (jnp.asarray(1.0),))
    elif transform == "linearize":
      value, linear = jax.linearize(loss, x)
      results[name] = (value, linear(jnp.asarray(2.0)))
    else:
      results[name] = jax.vmap(jax.grad(loss))(jnp.asarray([-2.0, -1.0, 0.0]))
  for a, b in zip(
    jax.tree.leaves(results["native"]), jax.tree.leaves(results["pure"]), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert np.all(np.isfinite(jax.tree.leaves(results["native"])[0]))


def test_pytorch_parity_with_clipping_in_front():
  """``clip_grad_norm_`` then ``AdamW(amsgrad=True)`` in PyTorch against
  ``chain(clip_by_global_norm, amsgradw)`` through ``apply_step``. The two clips agree
  below the threshold; above it PyTorch divides by ``norm + 1e-6`` where Optax divides by
  ``norm``, a relative difference of ``1e-6 / norm`` in the gradient."""
  torch = require("torch")
  max_norm = 5.0
  params0 = initial_params(np.float32, shapes=SHAPES)
  grads = gradient_sequence(60, np.float32, shapes=SHAPES)
  tensors = {name: torch.tensor(value, requires_grad=True) for name, value in params0.items()}
  opt = torch.optim.AdamW(list(tensors.values()), lr=1e-2, weight_decay=0.1, amsgrad=True)
  tx = optax.chain(
    optax.clip_by_global_norm(max_norm), amsgrad_jax.amsgradw(1e-2, weight_decay=0.1)
  )
  params = jax.tree.map(jnp.asarray, params0)
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: amsgrad_jax.apply_step(tx, g, s, p), donate_argnums=(0, 1))
  assert "amsgrad_jax_step" in step.lower(params, state, params).as_text()
  clipped = 0
  for number, tree in enumerate(grads):
    for name, tensor in tensors.items():
      tensor.grad = torch.tensor(tree[name])
    norm = float(torch.nn.utils.clip_grad_norm_(list(tensors.values()), max_norm))
    clipped += norm > max_norm
    opt.step()
    params, state = step(params, state, jax.tree.map(jnp.asarray, tree))
    for name, tensor in tensors.items():
      expected = tensor.detach().numpy()
      scale = float(np.max(np.abs(expected), initial=1e-30))
      np.testing.assert_allclose(
        params[name], expected, rtol=1e-5, atol=1e-5 * scale, err_msg=f"step {number + 1}"
      )
  assert 0 < clipped < len(grads)  # both sides of the threshold were exercised


GUARD_READS = """
import re, sys
import jax, optax
import amsgrad_jax
from test_native_compositions import compiled_entry

assert jax.device_count() == 1
tx = amsgrad_jax.skip_nonfinite(amsgrad_jax.amsgrad(1e-2), 3)
if sys.argv[1] == "clipped":
  tx = amsgrad_jax.skip_nonfinite(
    optax.chain(optax.clip_by_global_norm(1.0), amsgrad_jax.amsgradw(1e-2)), 3
  )
entry = compiled_entry(tx)
print("check kernel:", 'custom_call_target="amsgrad_jax_check"' in entry)
print("gradient reads:", sum(bool(re.search(r" fusion\\(%g", l)) for l in entry.splitlines()))
"""


@pytest.mark.parametrize(("optimizer", "gradient_reads"), [("bare", 0), ("clipped", 1)])
def test_the_guard_reads_the_gradients_only_in_the_kernel(optimizer, gradient_reads):
  """On one device the check kernel tests every gradient it reads, so XLA needs no pass
  of its own (the clipped step reads them once more, for the norm). A fresh process:
  this one has eight devices, where XLA's per-shard reduction decides instead."""
  result = subprocess.run(
    [sys.executable, "-c", GUARD_READS, optimizer],
    capture_output=True,
    text=True,
    check=False,
    timeout=300,
    cwd=os.path.dirname(__file__),  # where the script imports compiled_entry from
    env={
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    },
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "check kernel: True" in result.stdout
  assert f"gradient reads: {gradient_reads}" in result.stdout
