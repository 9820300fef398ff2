"""The frameworks' gradient clipping, exactly: PyTorch's clip_grad_norm_, Keras' clipnorm and
global_clipnorm, each run on the same 1,000 gradient trees in float64 (spikes that clip,
steps that do not, all-zero steps) and compared with ours, compiled, after every step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _peers import require
from _sequences import gradient_sequence
from test_port_keras import precision

from amsgrad_jax import interop

STEPS = 1000
RTOL = 1e-12
SHAPES = {"kernel": (5, 3), "bias": (3,), "scalar": (), "conv": (2, 3, 4)}


def grads64() -> list[dict[str, np.ndarray]]:
  return gradient_sequence(STEPS, np.float64, shapes=SHAPES)


def ours(transformation: optax.GradientTransformation, grads) -> list[dict[str, np.ndarray]]:
  with jax.enable_x64(True):
    update = jax.jit(transformation.update)
    state = transformation.init(grads[0])
    return [jax.tree.map(np.asarray, update(jax.tree.map(jnp.asarray, g), state)[0]) for g in grads]


def assert_close_every_step(ours, theirs) -> float:
  """Every leaf within ``RTOL`` of the framework's, relative to the leaf's largest
  magnitude; returns the largest relative difference seen."""
  worst = 0.0
  for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
    for name in b:
      assert a[name].dtype == b[name].dtype, name
      scale = float(np.max(np.abs(b[name]), initial=0.0))
      difference = float(np.max(np.abs(a[name] - b[name]), initial=0.0))
      assert difference <= RTOL * scale, f"step {step}, {name}: {difference} vs {scale}"
      worst = max(worst, difference / scale if scale else 0.0)
  return worst


def torch_clipped(grads, max_norm: float, norm_type: float) -> list[dict[str, np.ndarray]]:
  torch = require("torch")
  tensors = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in SHAPES.items()}
  clipped = []
  for tree in grads:
    for name, tensor in tensors.items():
      tensor.grad = torch.tensor(tree[name])
    torch.nn.utils.clip_grad_norm_(list(tensors.values()), max_norm, norm_type=norm_type)
    clipped.append({name: t.grad.numpy().copy() for name, t in tensors.items()})
  return clipped


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
def test_torch_clip_grad_norm_equals_pytorchs_at_every_step(norm_type):
  grads = grads64()
  # A threshold the standard-normal steps straddle, which every spike exceeds.
  max_norm = {2.0: 6.0, 1.0: 28.0, math.inf: 2.0, 3.0: 3.5}[norm_type]
  theirs = torch_clipped(grads, max_norm, norm_type)
  assert_close_every_step(ours(interop.torch_clip_grad_norm(max_norm, norm_type), grads), theirs)
  clipped = [not np.array_equal(t["conv"], g["conv"]) for t, g in zip(theirs, grads, strict=True)]
  assert 0.2 < np.mean(clipped) < 0.8, "the threshold clips some steps and not others"


def test_optax_clip_by_global_norm_is_not_pytorchs():
  """What the transformation above is for: Optax divides a step above the threshold by
  the norm without PyTorch's 1e-6, so the numbers move."""
  grads = grads64()
  theirs = torch_clipped(grads, 5.0, 2.0)
  optax_clipped = ours(optax.clip_by_global_norm(5.0), grads)
  gap = max(
    float(np.max(np.abs(a["kernel"] - b["kernel"])))
    for a, b in zip(optax_clipped, theirs, strict=True)
  )
  assert gap > 1e-8


def keras_clipped(option: str, value: float, grads) -> list[dict[str, np.ndarray]]:
  with precision(np.float64) as keras:
    optimizer = keras.optimizers.Adam(**{option: value})
    clip = jax.jit(optimizer._clip_gradients)  # As Keras' compiled training step runs it.
    clipped = []
    for tree in grads:
      values = clip([jnp.asarray(tree[name]) for name in SHAPES])
      clipped.append({name: np.asarray(v) for name, v in zip(SHAPES, values, strict=True)})
  return clipped


@pytest.mark.keras
def test_keras_clipnorm_equals_keras_at_every_step():
  grads = grads64()
  theirs = keras_clipped("clipnorm", 3.0, grads)
  assert_close_every_step(ours(interop.keras_clipnorm(3.0), grads), theirs)


@pytest.mark.keras
def test_keras_global_clipnorm_equals_keras_at_every_step():
  grads = grads64()
  theirs = keras_clipped("global_clipnorm", 5.0, grads)
  assert_close_every_step(ours(interop.keras_global_clipnorm(5.0), grads), theirs)


@pytest.mark.parametrize(
  "clip",
  [
    interop.torch_clip_grad_norm(1.0),
    interop.keras_clipnorm(1.0),
    interop.keras_global_clipnorm(1.0),
  ],
  ids=["torch_clip_grad_norm", "keras_clipnorm", "keras_global_clipnorm"],
)
def test_clipping_keeps_dtypes_and_has_an_empty_state(clip):
  grads = {"a": jnp.ones(3, jnp.bfloat16), "b": jnp.full((2,), 4.0, jnp.float32)}
  state = clip.init(grads)
  clipped, new_state = clip.update(grads, state)
  assert state == new_state == optax.EmptyState()
  assert jax.tree.map(lambda x: x.dtype, clipped) == jax.tree.map(lambda x: x.dtype, grads)


@pytest.mark.parametrize(
  "make", [interop.torch_clip_grad_norm, interop.keras_clipnorm, interop.keras_global_clipnorm]
)
def test_a_threshold_that_is_not_positive_is_refused(make):
  with pytest.raises(ValueError, match="must be > 0"):
    make(0.0)
