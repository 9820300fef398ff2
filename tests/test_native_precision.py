"""The native step with compact state and stochastic rounding: bit for bit the Optax path.

Over 100 steps with spikes, all-zero steps and a schedule, ``apply_step`` and
``tx.update`` + ``optax.apply_updates`` (both jitted) store the same 8-bit codes and block
exponents and the same stochastically rounded bfloat16 moments, and write the same
stochastically rounded bfloat16 parameters.
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _sequences import gradient_sequence
from test_apply_step import native_kernel  # noqa: F401  (the fixture: the kernel is active)

import amsgrad_jax

pytestmark = pytest.mark.native_cpu

STEPS = 100
SHAPES = {"kernel": (7, 300), "bias": (300,), "small": (3, 5), "scalar": (), "conv": (2, 3, 40)}


def SCHEDULE(count):  # a cosine decay, written for strict dtype promotion
  return 5e-3 * (1.0 + jnp.cos(jnp.pi * count.astype(jnp.float32) / STEPS))


def _options(kind: str) -> dict:
  fmt = amsgrad_jax.blockwise8(64)
  bf16_state = {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16}
  return {
    "blockwise8": {"mu_dtype": fmt, "nu_dtype": fmt},
    "stochastic": {"param_rounding": "stochastic", "rounding_seed": 11},
    "stochastic_f32_state": {"param_rounding": "stochastic", "mu_dtype": jnp.float32},
    "both": {"param_rounding": "stochastic", "mu_dtype": fmt, "nu_dtype": fmt},
    "blockwise8_nearest": {"mu_dtype": fmt, "nu_dtype": fmt, "state_rounding": "nearest"},
    "blockwise8_flat": {"mu_dtype": fmt, "nu_dtype": fmt, "flat_state": True},
    "both_flat": {
      "param_rounding": "stochastic",
      "mu_dtype": fmt,
      "nu_dtype": fmt,
      "flat_state": True,
    },
    "bf16_state_sr": {**bf16_state, "state_rounding": "stochastic", "rounding_seed": 5},
    "bf16_nu_sr": {"nu_dtype": jnp.bfloat16, "state_rounding": "stochastic"},
    "bf16_state_sr_flat": {**bf16_state, "state_rounding": "stochastic", "flat_state": True},
    "bf16_state_sr_both": {
      **bf16_state,
      "state_rounding": "stochastic",
      "param_rounding": "stochastic",
      "rounding_seed": 3,
    },
  }[kind]


def _run(tx, params, grads, native: bool):
  @jax.jit
  def step(p, s, g):
    if native:
      return amsgrad_jax.apply_step(tx, g, s, p)
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  state = tx.init(params)
  for g in grads:
    params, state = step(params, state, g)
  return params, state


def _bits(tree):
  def as_bits(x):
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
      return np.asarray(x)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
    return np.asarray(jax.lax.bitcast_convert_type(x, width) if x.dtype != width else x)

  return [as_bits(x) for x in jax.tree.leaves(tree)]


CASES = [
  (alias, kind, dtype, convention)
  for alias in ("amsgrad", "amsgradw")
  for kind in (
    "blockwise8",
    "blockwise8_nearest",
    "blockwise8_flat",
    "both_flat",
    "stochastic",
    "stochastic_f32_state",
    "both",
    "bf16_state_sr",
    "bf16_nu_sr",
    "bf16_state_sr_both",
  )
  for dtype in ("float32", "bfloat16")
  for convention in (
    ("pytorch", "keras", "optax", "paper") if kind == "blockwise8" else ("pytorch",)
  )
  # bfloat16 state beside float32 parameters: see the per-step test below
  if not (dtype == "float32" and (kind.startswith("stochastic") or kind.startswith("bf16")))
]


@pytest.mark.parametrize(("alias", "kind", "dtype", "convention"), CASES)
def test_native_and_optax_paths_agree_bit_for_bit(alias, kind, dtype, convention):
  dtype = {"float32": np.float32, "bfloat16": jnp.bfloat16}[dtype]
  weight_decay = {"weight_decay": 1e-2} if alias == "amsgrad" else {}
  tx = getattr(amsgrad_jax, alias)(
    SCHEDULE, convention=convention, **weight_decay, **_options(kind)
  )
  sequence = gradient_sequence(STEPS, dtype, shapes=SHAPES)
  params = jax.tree.map(lambda g: jnp.asarray(g) * 0 + 1, sequence[0])
  params = jax.tree.map(lambda p, g: (p + jnp.asarray(g)).astype(dtype), params, sequence[1])
  grads = [jax.tree.map(jnp.asarray, g) for g in sequence]
  status = amsgrad_jax.native_status(tx, tx.init(params), params)
  assert status.active, status.reason
  native = _run(tx, params, grads, native=True)
  optax_path = _run(tx, params, grads, native=False)
  assert jax.tree.structure(native) == jax.tree.structure(optax_path)
  for a, b in zip(_bits(native), _bits(optax_path), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("alias", ["amsgrad", "amsgradw"])
@pytest.mark.parametrize(
  ("kind", "dtype"),
  [
    ("bf16_state_sr", "float32"),
    ("bf16_nu_sr", "float32"),
    ("bf16_state_sr_flat", "float32"),
    ("bf16_state_sr_flat", "bfloat16"),
  ],
)
def test_stochastically_stored_bfloat16_state_per_step(alias, kind, dtype):
  """Beside float32 parameters, and in the flat layout, XLA may contract the other product
  of a moment's sum than the kernel does, so a float32 moment can differ by an ulp before
  it is rounded, and its stochastic rounding turns the other way where that ulp straddles
  the threshold. Each step, from the same inputs: the parameters within 2 ulps of the
  Optax path's, every moment within 2 bfloat16 ulps of its leaf's largest magnitude (a
  moment near 0 is a difference of nearly equal terms: there an ulp of the terms is many
  of the result's), and almost every stored moment identical."""
  from test_apply_step import ulps

  dtype = {"float32": np.float32, "bfloat16": jnp.bfloat16}[dtype]
  weight_decay = {"weight_decay": 1e-2} if alias == "amsgrad" else {}
  tx = getattr(amsgrad_jax, alias)(SCHEDULE, convention="pytorch", **weight_decay, **_options(kind))
  sequence = gradient_sequence(STEPS, dtype, shapes=SHAPES)
  params = jax.tree.map(lambda g: (jnp.asarray(g) * 0 + 1).astype(dtype), sequence[0])
  state = tx.init(params)
  assert amsgrad_jax.native_status(tx, state, params).active
  native = jax.jit(lambda p, s, g: amsgrad_jax.apply_step(tx, g, s, p))

  @jax.jit
  def optax_path(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  differing = total = 0
  for g in sequence:
    g = jax.tree.map(jnp.asarray, g)
    expected = optax_path(params, state, g)
    got = native(params, state, g)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(expected[0]), strict=True):
      assert float(ulps(a, b)) <= 2
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(expected[1]), strict=True):
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      scale = float(np.max(np.abs(b), initial=0.0))
      np.testing.assert_allclose(a, b, rtol=0, atol=2**-7 * scale)
      differing, total = differing + int(np.sum(a != b)), total + a.size
    params, state = expected
  assert differing <= 1e-3 * total, (differing, total)


def test_the_guard_around_8_bit_state_steps_natively_bit_for_bit():
  """XLA checks the step (the check kernel reads float state only), the blockwise kernel
  takes it; a non-finite step is rejected on both paths and leaves the codes as they were."""
  tx = amsgrad_jax.skip_nonfinite(amsgrad_jax.amsgradw(SCHEDULE, **_options("both")), 3)
  sequence = gradient_sequence(STEPS, jnp.bfloat16, shapes=SHAPES)
  sequence[40]["kernel"] = np.asarray(sequence[40]["kernel"]).copy()
  sequence[40]["kernel"][3, 7] = np.inf
  params = jax.tree.map(lambda g: (jnp.asarray(g) * 0 + 1).astype(jnp.bfloat16), sequence[0])
  grads = [jax.tree.map(jnp.asarray, g) for g in sequence]
  status = amsgrad_jax.native_status(tx, tx.init(params), params)
  assert status.active, status.reason
  native = _run(tx, params, grads, native=True)
  optax_path = _run(tx, params, grads, native=False)
  assert int(native[1].total_notfinite) == int(optax_path[1].total_notfinite) == 1
  for a, b in zip(_bits(native), _bits(optax_path), strict=True):
    np.testing.assert_array_equal(a, b)


def test_blockwise8_runs_in_the_blockwise_kernel():
  fmt = amsgrad_jax.blockwise8()
  tx = amsgrad_jax.amsgradw(1e-3, mu_dtype=fmt, nu_dtype=fmt)
  params = {"w": jnp.ones((4, 512)), "b": jnp.ones((512,))}
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: amsgrad_jax.apply_step(tx, g, s, p))
  text = step.lower(params, state, params).compile().as_text()
  targets = re.findall(r'custom_call_target="([a-z_]+)"', text)
  assert targets == ["amsgrad_jax_step_blockwise"]


def test_flat_blockwise8_state_runs_in_its_kernel_across_groups_and_calls():
  """Two dtype groups and more leaves than one call takes: the group's six buffers pass
  from call to call in place, every leaf at its offsets, and the bits are the Optax
  path's (which slices the same buffers)."""
  from amsgrad_jax._native._alias_step import LEAVES_PER_CALL

  fmt = amsgrad_jax.blockwise8(64)
  tx = amsgrad_jax.amsgradw(1e-2, mu_dtype=fmt, nu_dtype=fmt, flat_state=True)
  rng = np.random.default_rng(8)
  shapes = [(3, 100), (7,), (), (2, 5, 64), *[(40,)] * LEAVES_PER_CALL]
  params = [
    jnp.asarray(rng.standard_normal(shape), jnp.bfloat16 if i in (1, 3) else jnp.float32)
    for i, shape in enumerate(shapes)
  ]
  grads = [
    [
      jnp.asarray(rng.standard_normal(p.shape) * 10.0 ** rng.integers(-6, 2), p.dtype)
      for p in params
    ]
    for _ in range(12)
  ]
  status = amsgrad_jax.native_status(tx, tx.init(params), params)
  assert status.active, status.reason
  step = jax.jit(lambda p, s, g: amsgrad_jax.apply_step(tx, g, s, p))
  text = step.lower(params, tx.init(params), params).compile().as_text()
  targets = re.findall(r'custom_call_target="([a-z_]+)"', text)
  assert targets == ["amsgrad_jax_step_flat_blockwise"] * 3  # two groups, 66 + 2 leaves
  native = _run(tx, params, grads, native=True)
  optax_path = _run(tx, params, grads, native=False)
  for a, b in zip(_bits(native), _bits(optax_path), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
  ("make", "reason"),
  [
    (
      lambda: amsgrad_jax.amsgrad(1e-3, mu_dtype=amsgrad_jax.blockwise8(), nu_dtype=jnp.float32),
      "only one of mu_dtype and nu_dtype",
    ),
  ],
)
def test_what_the_kernel_does_not_take_falls_back_with_a_reason(make, reason):
  tx = make()
  params = {"w": jnp.ones((4, 300))}
  state = tx.init(params)
  status = amsgrad_jax.native_status(tx, state, params)
  assert not status.active
  assert reason in status.reason
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", amsgrad_jax.NativeFallbackWarning)
    new_params, _ = jax.jit(lambda p, s, g: amsgrad_jax.apply_step(tx, g, s, p))(
      params, state, params
    )
  updates, _ = tx.update(params, state, params)
  np.testing.assert_array_equal(new_params["w"], optax.apply_updates(params, updates)["w"])


def test_stochastically_stored_float16_state_falls_back_with_a_reason():
  tx = amsgrad_jax.amsgrad(
    1e-3, mu_dtype=jnp.float16, nu_dtype=jnp.float16, state_rounding="stochastic"
  )
  params = {"w": jnp.ones((8,))}
  status = amsgrad_jax.native_status(tx, tx.init(params), params)
  assert not status.active
  assert "float16" in status.reason


def test_float16_parameters_with_stochastic_rounding_fall_back():
  tx = amsgrad_jax.amsgrad(1e-3, param_rounding="stochastic")
  params = {"w": jnp.ones((8,), jnp.float16)}
  status = amsgrad_jax.native_status(tx, tx.init(params), params)
  assert not status.active
  assert "float16" in status.reason


@pytest.mark.parametrize("state_rounding", ["nearest", "stochastic"])
def test_bfloat16_maxima_of_tiny_gradients_round_up_alike_on_both_paths(state_rounding):
  """Gradients from 1e-25 to 1e-15, so that many second moments fall to float32's
  subnormal range (which XLA flushes to zero) and many just above it: the maximum rounded up to bfloat16 is the same bits natively and on the
  Optax path (integer arithmetic on the float32 bits, no comparison that flushes)."""
  tx = amsgrad_jax.amsgrad(
    1e-3, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16, state_rounding=state_rounding
  )
  rng = np.random.default_rng(4)
  shape = (4, 1000)
  params = {"w": jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)}
  grads = []
  for _ in range(20):
    magnitude = 10.0 ** rng.uniform(-25, -15, shape)
    grads.append({"w": jnp.asarray(rng.choice([-1, 1], shape) * magnitude, jnp.bfloat16)})
  assert amsgrad_jax.native_status(tx, tx.init(params), params).active
  native = _run(tx, params, grads, native=True)
  optax_path = _run(tx, params, grads, native=False)
  (amsgrad_state,) = [s for s in native[1] if hasattr(s, "nu_max")]
  nu_max = np.asarray(amsgrad_state.nu_max["w"], np.float32)
  assert np.mean(nu_max == 0) > 0.001  # flushed to zero
  assert np.mean((nu_max > 0) & (nu_max < 1e-33)) > 0.01  # just above
  for a, b in zip(_bits(native), _bits(optax_path), strict=True):
    np.testing.assert_array_equal(a, b)
