"""convention="pytorch" reproduces torch.optim.Adam/AdamW(amsgrad=True), step by step.

Both frameworks run here, on the same initial parameters and the same gradient
sequences (spikes, exact-zero steps and coordinates); parameters are compared
after every one of the 120 steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _peers import require
from _sequences import gradient_sequence, initial_params, run_steps

import amsgrad_jax

STEPS = 120
RTOL = {np.float64: 1e-9, np.float32: 1e-5, np.complex128: 1e-9, np.complex64: 1e-5}

HYPERPARAMETERS = [
  dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8),
  dict(lr=1e-2, b1=0.0, b2=0.99, eps=1e-6),
  dict(lr=3e-2, b1=0.5, b2=0.9, eps=1e-3),
]


def run_torch(optimizer: str, params0, grads, *, implementation: str = "single", **hyper):
  """Parameters after every step of torch.optim.<optimizer>(amsgrad=True)."""
  torch = require("torch")
  tensors = {name: torch.tensor(value, requires_grad=True) for name, value in params0.items()}
  flags = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
  opt = getattr(torch.optim, optimizer)(
    list(tensors.values()),
    lr=hyper["lr"],
    betas=(hyper["b1"], hyper["b2"]),
    eps=hyper["eps"],
    weight_decay=hyper["weight_decay"],
    amsgrad=True,
    **flags[implementation],
  )
  trajectory = []
  for tree in grads:
    for name, tensor in tensors.items():
      tensor.grad = torch.tensor(tree[name])
    opt.step()
    trajectory.append({name: t.detach().numpy().copy() for name, t in tensors.items()})
  return trajectory


def run_ours(tx: optax.GradientTransformation, params0, grads):
  """Parameters after every step of ``tx`` (jitted), as NumPy arrays."""
  return [jax.tree.map(np.asarray, params) for params, _ in run_steps(tx, params0, grads)]


def assert_trajectories_close(ours, theirs, rtol: float) -> None:
  """Every step, every coordinate within ``rtol`` of torch, relative to the leaf's
  magnitude (a coordinate crossing zero is not judged against its own tiny value)."""
  for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
    for name in b:
      scale = float(np.max(np.abs(b[name]), initial=1e-30))
      np.testing.assert_allclose(
        a[name], b[name], rtol=rtol, atol=rtol * scale, err_msg=f"step {step + 1}, leaf {name}"
      )


def ours_for(optimizer: str, hyper: dict) -> optax.GradientTransformation:
  common = dict(b1=hyper["b1"], b2=hyper["b2"], eps=hyper["eps"], convention="pytorch")
  if optimizer == "Adam":
    return amsgrad_jax.amsgrad(hyper["lr"], weight_decay=hyper["weight_decay"], **common)
  return amsgrad_jax.amsgradw(hyper["lr"], weight_decay=hyper["weight_decay"], **common)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("optimizer", ["Adam", "AdamW"])
@pytest.mark.parametrize("hyper", HYPERPARAMETERS, ids=["default", "b1=0", "large-eps"])
def test_matches_torch_every_step(hyper, optimizer, weight_decay, dtype):
  hyper = dict(hyper, weight_decay=weight_decay)
  params0 = initial_params(dtype)
  grads = gradient_sequence(STEPS, dtype)
  with jax.enable_x64(dtype == np.float64):
    ours = run_ours(ours_for(optimizer, hyper), params0, grads)
  theirs = run_torch(optimizer, params0, grads, **hyper)
  assert_trajectories_close(ours, theirs, RTOL[dtype])


@pytest.mark.parametrize("implementation", ["foreach", "fused"])
@pytest.mark.parametrize("optimizer", ["Adam", "AdamW"])
def test_matches_torch_foreach_and_fused(optimizer, implementation):
  hyper = dict(HYPERPARAMETERS[0], weight_decay=0.05)
  params0, grads = initial_params(np.float32), gradient_sequence(STEPS, np.float32)
  ours = run_ours(ours_for(optimizer, hyper), params0, grads)
  theirs = run_torch(optimizer, params0, grads, implementation=implementation, **hyper)
  assert_trajectories_close(ours, theirs, RTOL[np.float32])


@pytest.mark.parametrize("dtype", [np.complex128, np.complex64], ids=["complex128", "complex64"])
@pytest.mark.parametrize("optimizer", ["Adam", "AdamW"])
def test_matches_torch_on_complex_parameters(optimizer, dtype):
  """PyTorch treats real and imaginary parts as independent reals (view_as_real)."""
  hyper = dict(HYPERPARAMETERS[2], weight_decay=0.1)
  params0, grads = initial_params(dtype), gradient_sequence(STEPS, dtype)
  with jax.enable_x64(dtype == np.complex128):
    ours = run_ours(ours_for(optimizer, hyper), params0, grads)
  theirs = run_torch(optimizer, params0, grads, **hyper)
  assert_trajectories_close(ours, theirs, RTOL[dtype])


def test_state_matches_torch_buffers():
  """mu, nu and nu_max hold torch's exp_avg, exp_avg_sq and max_exp_avg_sq."""
  torch = require("torch")
  hyper = dict(HYPERPARAMETERS[0], weight_decay=0.0)
  params0, grads = initial_params(np.float64), gradient_sequence(30, np.float64)
  with jax.enable_x64(True):
    tx = amsgrad_jax.scale_by_amsgrad(hyper["b1"], hyper["b2"], hyper["eps"])
    state = tx.init(jax.tree.map(jnp.asarray, params0))
    for tree in grads:
      _, state = tx.update(jax.tree.map(jnp.asarray, tree), state)
  tensors = {name: torch.tensor(value, requires_grad=True) for name, value in params0.items()}
  opt = torch.optim.Adam(list(tensors.values()), lr=1e-3, amsgrad=True, foreach=False)
  for tree in grads:
    for name, tensor in tensors.items():
      tensor.grad = torch.tensor(tree[name])
    opt.step()
  for name, tensor in tensors.items():
    buffers = opt.state[tensor]
    assert int(state.count) == int(buffers["step"]) == 30
    np.testing.assert_allclose(state.mu[name], buffers["exp_avg"].numpy(), rtol=1e-12)
    np.testing.assert_allclose(state.nu[name], buffers["exp_avg_sq"].numpy(), rtol=1e-12)
    np.testing.assert_allclose(state.nu_max[name], buffers["max_exp_avg_sq"].numpy(), rtol=1e-12)
