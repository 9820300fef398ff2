"""apply_step: the native one-pass CPU step equals the Optax composition it replaces.

Every comparison runs both paths from the same state: the native kernel through
``apply_step`` and ``tx.update`` followed by ``optax.apply_updates``. Differences are
counted in units in the last place (ulps) of each buffer's own dtype.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _peers import in_ci, require
from _sequences import gradient_sequence, initial_params
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import amsgrad_jax
from amsgrad_jax._native import _step
from amsgrad_jax._native._step import pure_step

pytestmark = pytest.mark.native_cpu

STEPS = 100
ULPS = 2
SHAPES = {"kernel": (5, 3), "bias": (3,), "scalar": (), "conv": (2, 3, 4), "empty": (0, 4)}
TARGET = "amsgrad_jax_step"
DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float64": np.float64}


@pytest.fixture(scope="module", autouse=True)
def native_kernel() -> None:
  """These tests are about the native path: it must be active (always in CI)."""
  status = amsgrad_jax.native_status()
  if not status.active:
    if in_ci():
      pytest.fail(f"the native step must be active in CI: {status.reason}")
    pytest.skip(f"the native step is not active here: {status.reason}")


def ulps(a: jax.Array, b: jax.Array) -> jax.Array:
  """The largest ``|a - b|`` in ulps of ``a``'s dtype at ``max(|a|, |b|)`` (0 where equal)."""
  wide = jnp.float64 if a.dtype == jnp.float64 else jnp.float32
  magnitude = jnp.maximum(jnp.abs(a), jnp.abs(b))
  spacing = (jnp.nextafter(magnitude, jnp.asarray(jnp.inf, a.dtype)) - magnitude).astype(wide)
  difference = jnp.abs(a.astype(wide) - b.astype(wide))
  return jnp.max(jnp.where(a == b, 0.0, difference / spacing), initial=0.0).astype(jnp.float32)


def worst_ulps(native: object, pure: object) -> jax.Array:
  """The largest ulp difference over every floating leaf; integer leaves must be equal."""
  worst = [jnp.zeros([], jnp.float32)]
  for a, b in zip(jax.tree.leaves(native), jax.tree.leaves(pure), strict=True):
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    if jnp.issubdtype(a.dtype, jnp.floating):
      worst.append(ulps(a, b))
    else:
      worst.append(jnp.where(jnp.all(a == b), 0.0, jnp.inf).astype(jnp.float32))
  return jnp.max(jnp.stack(worst))


def assert_native_in(lowered_text: str, expected_calls: int | None = None) -> None:
  calls = lowered_text.count(TARGET)
  assert calls > 0, "the native kernel was not called"
  if expected_calls is not None:
    assert calls == expected_calls, f"{calls} kernel calls, expected {expected_calls}"


def per_step_ulps(tx, params, grads_sequence) -> tuple[np.ndarray, str]:
  """Both paths from the pure path's state at each of the steps, jitted and scanned."""

  def compare(params, grads_sequence):
    def body(carry, grads):
      params, state = carry
      native = amsgrad_jax.apply_step(tx, grads, state, params)
      pure = pure_step(tx, grads, state, params)
      return pure, worst_ulps(native, pure)

    _, worst = jax.lax.scan(body, (params, tx.init(params)), grads_sequence)
    return worst

  lowered = jax.jit(compare).lower(params, grads_sequence)
  return np.asarray(lowered.compile()(params, grads_sequence)), lowered.as_text()


def _mask(params: dict) -> dict:
  return {name: name != "bias" for name in params}


def make_tx(mode: str, convention: str) -> optax.GradientTransformation:
  """The three ways an alias can apply weight decay, with and without schedules."""
  if mode == "coupled":
    return amsgrad_jax.amsgrad(1e-2, convention=convention, weight_decay=0.1)
  if mode == "decoupled":
    return amsgradw_with(warmup_cosine, convention)
  schedule = optax.exponential_decay(3e-2, 10, 0.8)
  return amsgrad_jax.amsgrad(schedule, b1=0.5, b2=0.99, eps_root=1e-10, convention=convention)


def warmup_cosine(count: jax.Array) -> jax.Array:
  """A learning rate that rises over 10 steps, then falls along a cosine."""
  t = count.astype(jnp.float32)
  return 3e-2 * jnp.minimum(t / 10.0, 1.0) * (0.5 + 0.5 * jnp.cos(jnp.pi * t / STEPS))


def amsgradw_with(learning_rate, convention: str) -> optax.GradientTransformation:
  return amsgrad_jax.amsgradw(
    learning_rate, eps=1e-6, weight_decay=0.05, mask=_mask, convention=convention
  )


MODES = ("coupled", "decoupled", "no-decay")
# Every rule with every dtype, the decay mode rotating so that each rule and each dtype
# meets every mode (a Latin square: 12 compilations instead of 36).
CASES = [
  (convention, dtype, MODES[(i + j) % len(MODES)])
  for i, convention in enumerate(amsgrad_jax.CONVENTIONS)
  for j, dtype in enumerate(DTYPES)
]


@pytest.mark.parametrize(("convention", "dtype", "mode"), CASES)
def test_native_matches_pure_every_step(convention, dtype, mode):
  """Spikes (x1e4), exact-zero steps and coordinates, a scalar and an empty leaf."""
  np_dtype = DTYPES[dtype]
  with jax.enable_x64(dtype == "float64"):
    params = jax.tree.map(jnp.asarray, initial_params(np_dtype, shapes=SHAPES))
    sequence = gradient_sequence(STEPS, np_dtype, shapes=SHAPES)
    stacked = {name: jnp.asarray(np.stack([g[name] for g in sequence])) for name in SHAPES}
    worst, text = per_step_ulps(make_tx(mode, convention), params, stacked)
  assert_native_in(text)
  assert worst.shape == (STEPS,)
  assert worst.max() <= ULPS, f"{worst.max()} ulps at step {int(worst.argmax()) + 1}"


@pytest.mark.parametrize(
  ("mu_dtype", "nu_dtype"),
  [(jnp.bfloat16, jnp.bfloat16), (jnp.bfloat16, None), (None, jnp.bfloat16), (jnp.float32, None)],
)
def test_native_matches_pure_with_state_dtypes(mu_dtype, nu_dtype):
  """State stored narrower or wider than the parameters; nu_max rounded up when narrower."""
  tx = amsgrad_jax.amsgradw(1e-2, mu_dtype=mu_dtype, nu_dtype=nu_dtype, weight_decay=0.1)
  params = {
    "f32": jnp.asarray(initial_params(np.float32, shapes={"w": (6, 5)})["w"]),
    "bf16": jnp.asarray(initial_params(jnp.bfloat16, shapes={"w": (7,)})["w"]),
  }
  shapes = {"f32": (6, 5), "bf16": (7,)}
  sequence = gradient_sequence(40, np.float32, shapes=shapes)
  stacked = {
    name: jnp.asarray(np.stack([g[name] for g in sequence]), params[name].dtype) for name in shapes
  }
  worst, text = per_step_ulps(tx, params, stacked)
  assert_native_in(text)
  assert worst.max() <= ULPS


def mixed_tree(rng: np.random.Generator) -> dict:
  """Many leaves of many shapes and dtypes, nested, with scalars and empty arrays."""
  tree: dict = {"layers": [], "empty": jnp.zeros((0,), jnp.float32)}
  for i in range(30):
    dtype = jnp.bfloat16 if i % 3 == 0 else jnp.float32
    shape = [(), (1,), (17,), (4, 9), (2, 3, 5), (0, 3)][i % 6]
    tree["layers"].append(
      {"w": jnp.asarray(rng.standard_normal(shape), dtype), "scale": jnp.asarray(1.5, dtype)}
    )
  return tree


@pytest.mark.parametrize("alias", ["amsgrad", "amsgradw"])
def test_mixed_tree_one_kernel_call_per_dtype_group(alias):
  rng = np.random.default_rng(0)
  params = mixed_tree(rng)
  if alias == "amsgrad":
    tx = amsgrad_jax.amsgrad(1e-2, weight_decay=1e-3)
    groups = 2  # bfloat16 and float32
  else:
    tx = amsgrad_jax.amsgradw(1e-2, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
    groups = 4  # each dtype, decayed or not
  state = tx.init(params)
  step = jax.jit(amsgrad_jax.apply_step, static_argnums=0)
  reference = jax.jit(pure_step, static_argnums=0)
  assert_native_in(step.lower(tx, params, state, params).as_text(), expected_calls=groups)
  for _ in range(5):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)
    native = step(tx, grads, state, params)
    pure = reference(tx, grads, state, params)
    assert jax.tree.structure(native) == jax.tree.structure(pure)
    assert float(worst_ulps(native, pure)) <= ULPS
    params, state = pure


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_scalar_and_empty_leaves(jit):
  tx = amsgrad_jax.amsgrad(0.1)
  params = {"scalar": jnp.asarray(2.0), "empty": jnp.zeros((0,))}
  grads = {"scalar": jnp.asarray(-1.0), "empty": jnp.zeros((0,))}
  state = tx.init(params)
  step = jax.jit(amsgrad_jax.apply_step, static_argnums=0) if jit else amsgrad_jax.apply_step
  new_params, new_state = step(tx, grads, state, params)
  assert float(new_params["scalar"]) == pytest.approx(2.1)
  assert new_params["empty"].shape == (0,)
  assert int(new_state[1].count) == 1


def train_step_for(tx):
  """The usual shape of a training step: params and state in, the same order out."""

  def train_step(params, opt_state, grads):
    return amsgrad_jax.apply_step(tx, grads, opt_state, params)

  return jax.jit(train_step, donate_argnums=(0, 1))


def test_donated_step_updates_in_place():
  """memory_analysis shows no buffer beyond the aliased ones, and the data stays put."""
  tx = amsgrad_jax.amsgrad(1e-2)
  params = {"w": jnp.ones((256, 1024)), "b": jnp.ones((1024,))}
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  compiled = train_step_for(tx).lower(params, state, grads).compile()
  memory = compiled.memory_analysis()
  model_bytes = sum(x.nbytes for x in jax.tree.leaves((params, state)))
  assert memory.alias_size_in_bytes == model_bytes
  assert memory.output_size_in_bytes - model_bytes < 1024  # the output tuple's pointers
  assert memory.temp_size_in_bytes < 1024, memory  # the 11 step scalars, no model-sized copy
  assert " copy(" not in compiled.as_text()

  pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves((params, state))]
  new_params, new_state = compiled(params, state, grads)
  assert all(x.is_deleted() for x in jax.tree.leaves(params))
  assert [x.unsafe_buffer_pointer() for x in jax.tree.leaves((new_params, new_state))] == pointers


def test_pytorch_parity_through_apply_step():
  """torch.optim.Adam/AdamW(amsgrad=True) side by side, 120 steps, every rule option."""
  require("torch")
  from test_parity_torch import HYPERPARAMETERS, ours_for, run_torch
  from test_parity_torch import STEPS as TORCH_STEPS

  params0 = initial_params(np.float32)
  grads = gradient_sequence(TORCH_STEPS, np.float32)
  for optimizer in ("Adam", "AdamW"):
    for hyper in HYPERPARAMETERS[:2]:
      hyper = dict(hyper, weight_decay=0.1)
      tx = ours_for(optimizer, hyper)
      step = train_step_for(tx)
      params = jax.tree.map(jnp.asarray, params0)
      state = tx.init(params)
      assert_native_in(step.lower(params, state, params).as_text())
      theirs = run_torch(optimizer, params0, grads, **hyper)
      for number, (tree, expected) in enumerate(zip(grads, theirs, strict=True)):
        params, state = step(params, state, jax.tree.map(jnp.asarray, tree))
        for name, value in expected.items():
          scale = float(np.max(np.abs(value), initial=1e-30))
          np.testing.assert_allclose(
            params[name], value, rtol=1e-5, atol=1e-5 * scale, err_msg=f"step {number + 1}"
          )


@pytest.mark.filterwarnings("ignore::amsgrad_jax.NativeFallbackWarning")
def test_complex_parameters_take_the_optax_path():
  tx = amsgrad_jax.amsgrad(0.1, weight_decay=0.1)
  params = {"z": jnp.asarray([1.0 + 2.0j, -0.5j], jnp.complex64), "x": jnp.ones((3,))}
  grads = {"z": jnp.asarray([0.5 - 1.0j, 2.0 + 0.0j], jnp.complex64), "x": jnp.ones((3,))}
  state = tx.init(params)
  lowered = jax.jit(amsgrad_jax.apply_step, static_argnums=0).lower(tx, grads, state, params)
  assert TARGET not in lowered.as_text()
  got = lowered.compile()(grads, state, params)
  expected = jax.jit(pure_step, static_argnums=0)(tx, grads, state, params)
  jax.tree.map(np.testing.assert_array_equal, got, expected)


@pytest.mark.filterwarnings("ignore::amsgrad_jax.NativeFallbackWarning")
def test_other_transformations_take_the_optax_path():
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  grads = {"w": jnp.ones((2, 3))}
  after = optax.chain(amsgrad_jax.amsgrad(0.1), optax.scale(0.5))
  for tx in (optax.sgd(0.1), after):
    state = tx.init(params)
    lowered = jax.jit(amsgrad_jax.apply_step, static_argnums=0).lower(tx, grads, state, params)
    assert TARGET not in lowered.as_text()
    got = amsgrad_jax.apply_step(tx, grads, state, params)
    expected = pure_step(tx, grads, state, params)
    jax.tree.map(np.testing.assert_array_equal, got, expected)


FALLBACK_SCRIPT = textwrap.dedent(
  """
  import jax, jax.numpy as jnp, numpy as np
  import amsgrad_jax
  from amsgrad_jax._native._step import pure_step

  status = amsgrad_jax.native_status()
  assert not status.active and "AMSGRAD_JAX_DISABLE_NATIVE" in status.reason, status
  tx = amsgrad_jax.amsgradw(1e-2, weight_decay=0.1)
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "s": jnp.asarray(0.5)}
  grads = jax.tree.map(lambda x: jnp.cos(3.0 * x), params)
  state = tx.init(params)
  step = jax.jit(amsgrad_jax.apply_step, static_argnums=0)
  assert "amsgrad_jax_step" not in step.lower(tx, grads, state, params).as_text()
  got = step(tx, grads, state, params)
  expected = jax.jit(pure_step, static_argnums=0)(tx, grads, state, params)
  jax.tree.map(np.testing.assert_array_equal, got, expected)
  print("fallback ok:", status.reason)
  """
)


def test_disabled_native_falls_back_to_optax():
  env = dict(os.environ, AMSGRAD_JAX_DISABLE_NATIVE="1", JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, "-c", FALLBACK_SCRIPT],
    env=env,
    capture_output=True,
    text=True,
    check=False,
    cwd=Path(__file__).parent,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "fallback ok" in result.stdout


def test_native_status_explains_itself():
  status = amsgrad_jax.native_status()
  assert status.active
  assert bool(status)
  assert status.library is not None
  assert Path(status.library).exists()
  assert "registered" in status.reason


@pytest.mark.parametrize(
  ("make", "params", "reason"),
  [
    (lambda: amsgrad_jax.amsgradw(1e-3), {"w": jnp.ones(4)}, None),
    (
      lambda: optax.chain(optax.clip_by_global_norm(1.0), amsgrad_jax.amsgrad(1e-3)),
      {"w": jnp.ones(4)},
      None,
    ),
    (
      lambda: optax.chain(amsgrad_jax.amsgrad(1e-3), optax.scale(0.5)),
      {"w": jnp.ones(4)},
      "optax.scale is not a transformation the native step runs",
    ),
    (lambda: optax.sgd(1e-3), {"w": jnp.ones(4)}, "holds no amsgrad_jax.amsgrad"),
    (
      lambda: amsgrad_jax.amsgrad(1e-3),
      {"w": jnp.ones(4, jnp.float16)},
      "not float16",
    ),
    (
      lambda: amsgrad_jax.amsgradw(1e-3, weight_decay=optax.linear_schedule(0.1, 0.0, 10)),
      {"w": jnp.ones(4)},
      "weight_decay is a schedule",
    ),
  ],
)
def test_native_status_of_an_optimizer_says_why_not(native_kernel, make, params, reason):
  tx = make()
  _step._WARNED.clear()
  status = amsgrad_jax.native_status(tx, tx.init(params), params)
  if reason is None:
    assert status.active, status
  else:
    assert not status.active
    assert reason in status.reason, status.reason
  # The answer is the step's: the native kernel appears in the lowered step exactly then.
  step = jax.jit(lambda g, s, p: amsgrad_jax.apply_step(tx, g, s, p))
  warns = status.active or "holds no" in status.reason
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    text = step.lower(params, tx.init(params), params).as_text()
  assert ("amsgrad_jax_step" in text) == status.active
  fallback_warnings = [w for w in caught if w.category is amsgrad_jax.NativeFallbackWarning]
  assert len(fallback_warnings) == (0 if warns else 1), fallback_warnings
  if not warns:
    assert status.reason in str(fallback_warnings[0].message)


COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")


@pytest.mark.host_devices
@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_sharded_step_runs_per_shard_without_collectives(axis_type):
  """On a 4x2 mesh each device steps its own shards: no gather, no reduction."""
  kind = getattr(jax.sharding.AxisType, axis_type)
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(kind, kind))
  specs = {"w": P("data", "model"), "b": P("model"), "s": P(), "v": P("data")}
  shardings = {name: NamedSharding(mesh, spec) for name, spec in specs.items()}
  rng = np.random.default_rng(0)
  shapes = {"w": (64, 32), "b": (32,), "s": (), "v": (40,)}
  params = {
    name: jnp.asarray(rng.standard_normal(shape), jnp.float32) for name, shape in shapes.items()
  }
  params = jax.device_put(params, shardings)
  grads = jax.device_put(jax.tree.map(jnp.cos, params), shardings)
  tx = amsgrad_jax.amsgradw(1e-2, weight_decay=0.1)
  state = tx.init(params)
  compiled = (
    jax.jit(lambda p, s, g: amsgrad_jax.apply_step(tx, g, s, p))
    .lower(params, state, grads)
    .compile()
  )
  text = compiled.as_text()
  assert_native_in(text)
  assert [name for name in COLLECTIVES if name in text] == []
  assert "f32[16,16]" in text  # the kernel sees one device's shard of w
  native = compiled(params, state, grads)
  pure = jax.jit(lambda p, s, g: pure_step(tx, g, s, p))(params, state, grads)
  assert float(worst_ulps(native, pure)) <= ULPS
  for name, sharding in shardings.items():
    assert native[0][name].sharding.is_equivalent_to(sharding, len(shapes[name]))
    assert native[1][0].nu_max[name].sharding.is_equivalent_to(sharding, len(shapes[name]))


@pytest.mark.host_devices
def test_stochastically_rounded_state_on_a_mesh():
  """Random bits number the elements of whole parameters: a call that rounds bfloat16
  moments stochastically sees whole arrays (XLA gathers them) and matches the Optax path
  bit for bit, its results placed as its operands were; float32 moments are not rounded,
  so ``state_rounding="stochastic"`` leaves a float32 step per shard, with no collective."""
  auto = jax.sharding.AxisType.Auto
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(auto, auto))
  sharding = NamedSharding(mesh, P("data", "model"))
  rng = np.random.default_rng(4)
  for dtype in (jnp.bfloat16, jnp.float32):
    params = {"w": jax.device_put(jnp.asarray(rng.standard_normal((64, 32)), dtype), sharding)}
    tx = amsgrad_jax.amsgrad(
      1e-2, mu_dtype=dtype, nu_dtype=dtype, state_rounding="stochastic", rounding_seed=2
    )
    state = tx.init(params)
    step = jax.jit(lambda p, s, g, tx=tx: amsgrad_jax.apply_step(tx, g, s, p))
    pure = jax.jit(lambda p, s, g, tx=tx: pure_step(tx, g, s, p))
    text = step.lower(params, state, params).compile().as_text()
    assert_native_in(text)
    if dtype == jnp.float32:
      assert [name for name in COLLECTIVES if name in text] == []
    for k in range(3):
      grads = jax.tree.map(lambda x, k=k: jnp.sin(x * (k + 1)), params)
      native = step(params, state, grads)
      expected = pure(params, state, grads)
      for a, b in zip(jax.tree.leaves(native), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      params, state = native
    assert params["w"].sharding.is_equivalent_to(sharding, 2)
    moments = [x for x in jax.tree.leaves(state) if x.ndim == 2]
    assert len(moments) == 3
    assert all(x.sharding.is_equivalent_to(sharding, 2) for x in moments)


@pytest.mark.host_devices
def test_a_guarded_sharded_step_checks_and_steps_per_shard():
  """Under skip_nonfinite the check is XLA's per-shard reduction and one all-reduce of a
  flag; the kernel still steps each device's shards, and nothing is gathered."""
  auto = jax.sharding.AxisType.Auto
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(auto, auto))
  shardings = {"w": NamedSharding(mesh, P("data", "model")), "b": NamedSharding(mesh, P())}
  rng = np.random.default_rng(3)
  params = {"w": rng.standard_normal((64, 32)), "b": rng.standard_normal((32,))}
  params = jax.device_put(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params), shardings)
  grads = jax.device_put(jax.tree.map(jnp.cos, params), shardings)
  bad = {**grads, "w": grads["w"].at[5, 7].set(jnp.nan)}
  tx = amsgrad_jax.skip_nonfinite(amsgrad_jax.amsgradw(1e-2, weight_decay=0.1), 3)
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: amsgrad_jax.apply_step(tx, g, s, p))
  compiled = step.lower(params, state, grads).compile()
  text = compiled.as_text()
  assert_native_in(text)
  assert "f32[16,16]" in text  # the kernel sees one device's shard of w
  assert [name for name in COLLECTIVES if name in text and name != "all-reduce"] == []
  reduced = [line for line in text.splitlines() if re.search(r"= \S+ all-reduce(-start)?\(", line)]
  assert all(re.search(r"= (pred|s32|f32|u8)\[\]", line) for line in reduced), reduced
  pure = jax.jit(lambda p, s, g: pure_step(tx, g, s, p))
  for g in (grads, bad, grads):
    native = compiled(params, state, g)
    expected = pure(params, state, g)
    assert float(worst_ulps(native, expected)) <= ULPS
    params, state = native
  assert int(state.total_notfinite) == 1
  assert params["w"].sharding.is_equivalent_to(shardings["w"], 2)


def test_pmap_step_runs_per_device():
  devices = jax.local_device_count()
  tx = amsgrad_jax.amsgrad(1e-2, weight_decay=0.1)
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.standard_normal((devices, 6, 5)), jnp.float32)}
  grads = {"w": jnp.asarray(rng.standard_normal((devices, 6, 5)), jnp.float32)}
  state = jax.pmap(tx.init)(params)
  step = jax.pmap(lambda p, s, g: amsgrad_jax.apply_step(tx, g, s, p))
  assert_native_in(step.lower(params, state, grads).as_text())
  native = step(params, state, grads)
  pure = jax.pmap(lambda p, s, g: pure_step(tx, g, s, p))(params, state, grads)
  assert float(worst_ulps(native, pure)) <= ULPS


def _elements(shape: str) -> int:
  """The number of elements of an HLO shape such as ``f32[3,16]``."""
  dims = shape[shape.index("[") + 1 : -1]
  return int(np.prod([int(d) for d in dims.split(",") if d]))


def nnx_apply_step(optimizer, model, grads) -> None:
  """``optimizer.update(model, grads)`` through apply_step (the recipe in docs/guides/native.md)."""
  nnx = require("flax.nnx")
  params = nnx.as_pure(nnx.state(model, optimizer.wrt))
  grads = nnx.as_pure(nnx.state(grads, optimizer.wrt))
  opt_state = nnx.as_pure(optimizer.opt_state)
  params, opt_state = amsgrad_jax.apply_step(optimizer.tx, grads, opt_state, params)
  nnx.update(model, params)
  nnx.update(optimizer.opt_state, nnx.state(opt_state))
  optimizer.step[...] += 1


@pytest.mark.parametrize("flat_state", [False, True], ids=["tree-state", "flat-state"])
def test_nnx_train_step_with_apply_step(flat_state):
  """An nnx train step built on apply_step follows nnx.Optimizer.update step for step (the
  optimizer's state is built from Variables, the step passes their bare values)."""
  nnx = require("flax.nnx")
  rng = np.random.default_rng(0)
  inputs = jnp.asarray(rng.uniform(-2.0, 2.0, (64, 3)), jnp.float32)
  targets = jnp.sin(inputs[:, :1]) + 0.5 * inputs[:, 1:2]

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(3, 16, rngs=rngs)
      self.out = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
      return self.out(jnp.tanh(self.hidden(x)))

  def loss_fn(model):
    return jnp.mean(jnp.square(model(inputs) - targets))

  def make(seed):
    model = MLP(nnx.Rngs(seed))
    tx = amsgrad_jax.amsgradw(0.02, weight_decay=1e-3, flat_state=flat_state)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit(donate_argnums=(0, 1))  # in place: without donation XLA copies every buffer first
  def native_step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    nnx_apply_step(optimizer, model, grads)
    return loss

  @nnx.jit
  def optax_step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  native_model, native_optimizer = make(0)
  optax_model, optax_optimizer = make(0)
  graphdef, state = nnx.split((native_model, native_optimizer))

  def functional_step(state):  # the same step on nnx.split state, returning the new state
    model, optimizer = nnx.merge(graphdef, state)
    native_step(model, optimizer)
    return nnx.state((model, optimizer))

  text = jax.jit(functional_step).lower(state).as_text()
  assert_native_in(text)
  assert ("amsgrad_jax_step_flat" in text) == flat_state
  compiled = native_step.lower(native_model, native_optimizer).compile().as_text()
  copied = [_elements(shape) for shape in re.findall(r"= (\w+\[[\d,]*\])\S* copy\(", compiled)]
  assert sum(copied) <= 2, copied  # nothing parameter-sized is copied (a 1-element bias may be)
  initial = float(loss_fn(native_model))
  for _ in range(60):
    native_step(native_model, native_optimizer)
    optax_step(optax_model, optax_optimizer)
  final = float(loss_fn(native_model))
  assert final < 0.1 * initial, (initial, final)
  assert int(native_optimizer.step[...]) == 60
  np.testing.assert_allclose(final, float(loss_fn(optax_model)), rtol=1e-4)
  native_params = nnx.state(native_model, nnx.Param)
  optax_params = nnx.state(optax_model, nnx.Param)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), native_params, optax_params
  )


def test_the_guide_code_runs_natively():
  """docs/guides/native.md: its Python blocks, run in order, train with the native step."""
  require("flax.nnx")
  page = Path(__file__).resolve().parent.parent / "docs" / "guides" / "native.md"
  blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(), re.M | re.S)
  assert len(blocks) >= 3
  namespace: dict = {"__name__": "docs_native"}
  # Readers run the code with JAX's default promotion rules, not this suite's strict ones.
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    for number, block in enumerate(blocks):
      exec(compile(block, f"native.md (block {number + 1})", "exec"), namespace)
    assert namespace["status"].active
    lowered = namespace["train_step"].lower(
      namespace["params"], namespace["opt_state"], jnp.ones((32, 256))
    )
  assert_native_in(lowered.as_text())
  assert int(namespace["optimizer"].step[...]) == 50
  assert float(namespace["loss"]) < 0.05


def test_vmapped_step_takes_the_optax_path():
  """Under jax.vmap (an ensemble of optimizers) the step is the vmapped Optax composition."""
  tx = amsgrad_jax.amsgradw(1e-2, weight_decay=0.1)
  rng = np.random.default_rng(2)
  params = {"w": jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32)}
  grads = {"w": jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)}  # shared by the ensemble
  state = jax.vmap(tx.init)(params)

  def vmapped(step):
    return jax.jit(jax.vmap(lambda p, s, g: step(tx, g, s, p), in_axes=(0, 0, None)))

  native = vmapped(amsgrad_jax.apply_step)(params, state, grads)
  pure = vmapped(pure_step)(params, state, grads)
  jax.tree.map(np.testing.assert_array_equal, native, pure)
  assert native[0]["w"].shape == (3, 4, 5)


def test_large_groups_split_into_calls_of_bounded_size():
  """130 leaves of one dtype: three kernel calls (XLA compiles huge calls slowly)."""
  from amsgrad_jax._native._alias_step import LEAVES_PER_CALL

  tx = amsgrad_jax.amsgrad(1e-2)
  params = [jnp.full((3,), float(i)) for i in range(130)]
  grads = [jnp.ones((3,)) for _ in range(130)]
  state = tx.init(params)
  lowered = jax.jit(amsgrad_jax.apply_step, static_argnums=0).lower(tx, grads, state, params)
  assert_native_in(lowered.as_text(), expected_calls=-(-130 // LEAVES_PER_CALL))
  native = lowered.compile()(grads, state, params)
  pure = jax.jit(pure_step, static_argnums=0)(tx, grads, state, params)
  assert float(worst_ulps(native, pure)) <= ULPS
