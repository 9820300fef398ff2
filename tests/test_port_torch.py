"""A PyTorch AMSGrad run moves to amsgrad_jax mid-flight, and back, on the same trajectory.

The run is a training step as a port carries it: two parameter groups (weights with weight
decay, biases with their own lr, betas and eps), ``clip_grad_norm_`` before every step, a
warmup-then-cosine ``SequentialLR`` stepped after it, PyTorch's ``(out, in)`` weights
against JAX's ``(in, out)`` kernels, and a seeded gradient sequence whose spikes trip the
clipping. PyTorch runs all 500 steps; the other run switches frameworks after step 200,
through a ``torch.save``/``torch.load`` checkpoint, and is compared with PyTorch's after
every step.
"""

from __future__ import annotations

import copy
import io
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _peers import require
from _sequences import gradient_sequence, initial_params
from test_parity_torch import assert_trajectories_close

import amsgrad_jax
from amsgrad_jax import _blockwise as bw
from amsgrad_jax import interop
from amsgrad_jax.interop import _state as interop_state

STEPS, SPLIT = 500, 200
MAX_NORM = 5.0
RTOL = {np.float64: 1e-9, np.float32: 1e-5}
# torch.nn.Sequential(Linear(3, 4), ReLU(), Linear(4, 2)), by parameter name.
SHAPES = {"0.weight": (4, 3), "0.bias": (4,), "2.weight": (2, 4), "2.bias": (2,)}
DTYPES = pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
OPTIMIZERS = pytest.mark.parametrize("optimizer", ["Adam", "AdamW"])


def convert(weights):
  """The weights converter: PyTorch names and (out, in) weights -> Flax-style kernels."""
  return {
    "hidden": {"kernel": weights["0.weight"].T, "bias": weights["0.bias"]},
    "output": {"kernel": weights["2.weight"].T, "bias": weights["2.bias"]},
  }


def convert_back(params):
  return {
    "0.weight": params["hidden"]["kernel"].T,
    "0.bias": params["hidden"]["bias"],
    "2.weight": params["output"]["kernel"].T,
    "2.bias": params["output"]["bias"],
  }


class TorchRun:
  """Tensors, a two-group Adam/AdamW and its warmup-cosine scheduler, stepped as a loop
  steps them: clip_grad_norm_, optimizer.step(), scheduler.step()."""

  def __init__(self, optimizer: str, weights: dict[str, np.ndarray], *, named: bool = True):
    torch = require("torch")
    self.torch = torch
    self.tensors = {n: torch.tensor(np.array(w), requires_grad=True) for n, w in weights.items()}

    def params(suffix):
      pairs = [(n, t) for n, t in self.tensors.items() if n.endswith(suffix)]
      return pairs if named else [t for _, t in pairs]

    groups = [
      {"params": params("weight"), "weight_decay": 0.1},
      {"params": params("bias"), "lr": 3e-2, "betas": (0.8, 0.99), "eps": 1e-6},
    ]
    self.optimizer = getattr(torch.optim, optimizer)(
      groups, lr=1e-2, weight_decay=0.0, amsgrad=True, foreach=False
    )
    lr_scheduler = torch.optim.lr_scheduler
    self.scheduler = lr_scheduler.SequentialLR(
      self.optimizer,
      [
        lr_scheduler.LinearLR(self.optimizer, start_factor=0.1, total_iters=50),
        lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=450, eta_min=1e-4),
      ],
      milestones=[50],
    )

  def names(self) -> list[str]:
    """The parameter names in the optimizer's order (weights, then biases)."""
    return [n for suffix in ("weight", "bias") for n in self.tensors if n.endswith(suffix)]

  def step(self, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for name, tensor in self.tensors.items():
      tensor.grad = self.torch.tensor(grads[name])
    self.torch.nn.utils.clip_grad_norm_(list(self.tensors.values()), MAX_NORM)
    self.optimizer.step()
    self.scheduler.step()
    return self.weights()

  def weights(self) -> dict[str, np.ndarray]:
    return {name: t.detach().numpy().copy() for name, t in self.tensors.items()}

  def checkpoint(self) -> dict:
    """What ``torch.save`` writes and ``torch.load`` reads back."""
    buffer = io.BytesIO()
    weights = {n: t.detach() for n, t in self.tensors.items()}
    self.torch.save({"model": weights, "optimizer": self.optimizer.state_dict()}, buffer)
    buffer.seek(0)
    return self.torch.load(buffer)

  def fast_forward_scheduler(self, steps: int) -> None:
    """Step a fresh scheduler to ``steps`` (PyTorch warns: no optimizer step between)."""
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      for _ in range(steps):
        self.scheduler.step()


def jax_tree(tree):
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), tree)


def run_jax(tx, params, state, grads) -> tuple[list[dict[str, np.ndarray]], object, object]:
  """Weights after every step (in PyTorch's layout), and the final parameters and state."""

  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  trajectory = []
  for tree in grads:
    params, state = step(params, state, jax_tree(convert(tree)))
    trajectory.append({n: np.asarray(w) for n, w in convert_back(params).items()})
  return trajectory, params, state


def sequence(dtype):
  return initial_params(dtype, shapes=SHAPES), gradient_sequence(STEPS, dtype, shapes=SHAPES)


@DTYPES
@OPTIMIZERS
def test_pytorch_then_amsgrad_jax_follows_pytorch_at_every_step(optimizer, dtype):
  weights0, grads = sequence(dtype)
  torch_run = TorchRun(optimizer, weights0)
  reference = []
  for step, tree in enumerate(grads):
    if step == SPLIT:
      checkpoint = torch_run.checkpoint()
      with jax.enable_x64(dtype == np.float64):
        params = jax_tree(convert(checkpoint["model"]))
        tx = interop.optimizer_from_torch(
          torch_run.optimizer,
          params,
          convert,
          scheduler=torch_run.scheduler,
          max_grad_norm=MAX_NORM,
        )
    reference.append(torch_run.step(tree))
  with jax.enable_x64(dtype == np.float64):
    state = interop.state_from_torch(tx, checkpoint["optimizer"], params, convert)
    ours, _, _ = run_jax(tx, params, state, grads[SPLIT:])
  assert_trajectories_close(ours, reference[SPLIT:], RTOL[dtype])


@DTYPES
@OPTIMIZERS
def test_amsgrad_jax_then_pytorch_follows_pytorch_at_every_step(optimizer, dtype):
  weights0, grads = sequence(dtype)
  fresh = TorchRun(optimizer, weights0)
  with jax.enable_x64(dtype == np.float64):
    params = jax_tree(convert(weights0))
    tx = interop.optimizer_from_torch(
      fresh.optimizer, params, convert, scheduler=fresh.scheduler, max_grad_norm=MAX_NORM
    )
    _, params, state = run_jax(tx, params, tx.init(params), grads[:SPLIT])
    weights = {n: np.asarray(w) for n, w in convert_back(params).items()}
    continued = TorchRun(optimizer, weights)
    continued.fast_forward_scheduler(SPLIT)
    state_dict = interop.state_to_torch(tx, state, convert_back, like=continued.optimizer)
  continued.optimizer.load_state_dict(state_dict)
  theirs = [continued.step(tree) for tree in grads[SPLIT:]]
  reference = TorchRun(optimizer, weights0)
  expected = [reference.step(tree) for tree in grads][SPLIT:]
  assert_trajectories_close(theirs, expected, RTOL[dtype])


@DTYPES
def test_state_to_pytorch_and_back_is_bit_identical(dtype):
  weights0, grads = sequence(dtype)
  with jax.enable_x64(dtype == np.float64):
    params = jax_tree(convert(weights0))
    fresh = TorchRun("AdamW", weights0)
    tx = interop.optimizer_from_torch(fresh.optimizer, params, convert, scheduler=fresh.scheduler)
    _, params, state = run_jax(tx, params, tx.init(params), grads[:7])
    state_dict = interop.state_to_torch(tx, state, convert_back)
    back = interop.state_from_torch(tx, state_dict, params, convert)
  assert jax.tree.structure(back) == jax.tree.structure(state)
  for ours, theirs in zip(jax.tree.leaves(state), jax.tree.leaves(back), strict=True):
    assert ours.dtype == theirs.dtype
    np.testing.assert_array_equal(np.asarray(theirs), np.asarray(ours))


@DTYPES
def test_pytorch_state_to_jax_and_back_is_bit_identical_and_loads(dtype):
  torch = require("torch")
  weights0, grads = sequence(dtype)
  run = TorchRun("Adam", weights0, named=False)
  for tree in grads[:7]:
    run.step(tree)
  original = run.optimizer.state_dict()
  with jax.enable_x64(dtype == np.float64):
    params = jax_tree(convert(run.weights()))
    names = run.names()
    tx = interop.optimizer_from_torch(
      run.optimizer, params, convert, scheduler=run.scheduler, names=names
    )
    state = interop.state_from_torch(tx, original, params, convert, names=names)
    back = interop.state_to_torch(tx, state, convert_back, like=run.optimizer, names=names)
  assert sorted(back["state"]) == sorted(original["state"])
  for index, entry in original["state"].items():
    for key, tensor in entry.items():
      assert back["state"][index][key].dtype == tensor.dtype, key
      assert torch.equal(back["state"][index][key], tensor), (index, key)
  for ours, theirs in zip(back["param_groups"], original["param_groups"], strict=True):
    assert ours["lr"] == pytest.approx(theirs["lr"], rel=1e-12)
  run.optimizer.load_state_dict(back)  # PyTorch accepts it, and nothing moves.
  assert jax.tree.map(np.shape, run.optimizer.state_dict()["state"]) == jax.tree.map(
    np.shape, original["state"]
  )


def small_run(optimizer: str = "Adam", *, amsgrad: bool = True, steps: int = 3) -> TorchRun:
  weights0, grads = sequence(np.float32)
  run = TorchRun(optimizer, weights0)
  if not amsgrad:
    for group in run.optimizer.param_groups:
      group["amsgrad"] = False
  for tree in grads[:steps]:
    run.step(tree)
  return run


def refused(state_dict: dict, call, match: str) -> None:
  """``call()`` raises ValueError matching ``match`` and leaves ``state_dict`` unchanged."""
  torch = require("torch")
  before = copy.deepcopy(state_dict)
  with pytest.raises(ValueError, match=match):
    call()
  assert jax.tree.structure(state_dict) == jax.tree.structure(before)
  for a, b in zip(jax.tree.leaves(state_dict), jax.tree.leaves(before), strict=True):
    assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def params_and_tx(run: TorchRun):
  params = jax_tree(convert(run.weights()))
  return params, interop.optimizer_from_torch(
    run.optimizer, params, convert, scheduler=run.scheduler
  )


def test_adam_without_amsgrad_is_refused_unless_the_maximum_starts_from_exp_avg_sq():
  run = small_run(amsgrad=False)
  state_dict = run.optimizer.state_dict()
  params, tx = params_and_tx(run)
  refused(
    state_dict,
    lambda: interop.state_from_torch(tx, state_dict, params, convert),
    "without amsgrad=True.*max_from_exp_avg_sq=True",
  )
  state = interop.state_from_torch(tx, state_dict, params, convert, max_from_exp_avg_sq=True)
  for amsgrad_state in (s.inner_state[1] for s in state.inner_states.values()):
    leaves = zip(
      jax.tree.leaves(amsgrad_state.nu), jax.tree.leaves(amsgrad_state.nu_max), strict=True
    )
    for nu, nu_max in leaves:
      np.testing.assert_array_equal(nu, nu_max)


def _held(x):
  """The values a stored moment holds (``nu`` in 8 bits: its codes, relative values)."""
  if not bw.is_blockwise(x):
    return np.asarray(x)
  return np.asarray(x.codes) if x.kind == "nu" else np.asarray(bw.dequantize(x))


@pytest.mark.parametrize(
  ("block_size", "stored"),
  [(4, ("mu", "nu")), (256, ("mu", "nu")), (4, ("mu",)), (4, ("nu",))],
  ids=["both-4", "both-256", "mu-only", "nu-only"],
)
def test_pytorch_state_into_blockwise8_and_back(block_size, stored):
  """PyTorch's float moments are encoded into 8-bit state (``nu_max`` rounded up, never
  below PyTorch's), within one code step of PyTorch's; decoded for PyTorch, they are the
  values the 8-bit state holds, and encoding them again stores the same values. Either
  moment may be 8-bit on its own."""
  run = small_run(steps=5)
  state_dict = run.optimizer.state_dict()
  params, float_tx = params_and_tx(run)
  fmt = amsgrad_jax.blockwise8(block_size)
  storage = {f"{name}_dtype": fmt for name in stored}
  tx8 = interop.optimizer_from_torch(
    run.optimizer, params, convert, scheduler=run.scheduler, **storage
  )
  float_state = interop.state_from_torch(float_tx, state_dict, params, convert)
  state = interop.state_from_torch(tx8, state_dict, params, convert)
  floats = interop_state.amsgrad_states(float_state)
  encoded_states = interop_state.amsgrad_states(state)
  for exact, encoded in zip(floats, encoded_states, strict=True):
    assert int(encoded.count) == int(exact.count)
    for field in ("mu", "nu"):
      leaves = bw.moment_leaves(getattr(encoded, field))
      assert all(bw.is_blockwise(x) == (field in stored) for x in leaves)
    for true_max, kept in zip(
      jax.tree.leaves(exact.nu_max), bw.moment_leaves(encoded.nu_max), strict=True
    ):
      value, true_max = _held(kept), np.asarray(true_max, np.float32)
      assert np.all(value >= true_max)
      assert np.all(value <= np.where(true_max > 0, true_max * (1 + 2.0**-4), 2.0**-100))
    if "mu" not in stored:
      jax.tree.map(np.testing.assert_array_equal, encoded.mu, exact.mu)
  back = interop.state_to_torch(tx8, state, convert_back)
  again = interop.state_from_torch(tx8, back, params, convert)
  for a, b in zip(encoded_states, interop_state.amsgrad_states(again), strict=True):
    for field in ("mu", "nu", "nu_max"):
      for x, y in zip(
        bw.moment_leaves(getattr(a, field)), bw.moment_leaves(getattr(b, field)), strict=True
      ):
        np.testing.assert_array_equal(_held(x), _held(y))


def test_blockwise8_state_needs_a_rule_the_frameworks_have():
  run = small_run()
  params, _ = params_and_tx(run)
  fmt = amsgrad_jax.blockwise8()
  plain = optax.chain(amsgrad_jax.scale_by_amsgrad(mu_dtype=fmt, nu_dtype=fmt), optax.scale(-1e-3))
  with pytest.raises(ValueError, match="does not say it"):
    interop.state_to_torch(plain, plain.init(params), convert_back, like=run.optimizer)
  optax_rule = amsgrad_jax.amsgrad(1e-3, mu_dtype=fmt, nu_dtype=fmt, convention="optax")
  with pytest.raises(ValueError, match='convention="optax"'):
    interop.state_to_torch(optax_rule, optax_rule.init(params), convert_back, like=run.optimizer)


def test_a_parameter_without_state_is_refused():
  run = small_run()
  state_dict = run.optimizer.state_dict()
  del state_dict["state"][3]
  params, tx = params_and_tx(run)
  refused(
    state_dict,
    lambda: interop.state_from_torch(tx, state_dict, params, convert),
    r"\['2.bias'\] have no state",
  )


def test_state_of_a_parameter_no_group_has_is_refused():
  run = small_run()
  state_dict = run.optimizer.state_dict()
  state_dict["state"][7] = state_dict["state"][0]
  params, tx = params_and_tx(run)
  refused(
    state_dict,
    lambda: interop.state_from_torch(tx, state_dict, params, convert),
    r"entries \[7\] that belong to no parameter group",
  )


def test_a_converter_that_misses_or_adds_a_leaf_is_refused():
  run = small_run()
  state_dict = run.optimizer.state_dict()
  params, tx = params_and_tx(run)

  def convert_missing(weights):
    tree = convert(weights)
    del tree["output"]["bias"]
    return tree

  def convert_extra(weights):
    return {**convert(weights), "extra": weights["0.bias"]}

  refused(
    state_dict,
    lambda: interop.state_from_torch(tx, state_dict, params, convert_missing),
    r"missing \['output/bias'\]",
  )
  refused(
    state_dict,
    lambda: interop.state_from_torch(tx, state_dict, params, convert_extra),
    r"not a parameter \['extra'\]",
  )


def test_a_shape_that_does_not_match_after_convert_is_refused():
  run = small_run()
  state_dict = run.optimizer.state_dict()
  params, tx = params_and_tx(run)

  def convert_untransposed(weights):
    tree = convert(weights)
    tree["hidden"]["kernel"] = weights["0.weight"]
    return tree

  refused(
    state_dict,
    lambda: interop.state_from_torch(tx, state_dict, params, convert_untransposed),
    r"hidden/kernel has shape \(4, 3\) after convert.*shape \(3, 4\)",
  )


def test_a_parameter_group_the_optimizer_does_not_have_is_refused():
  run = small_run()
  state_dict = run.optimizer.state_dict()
  params = jax_tree(convert(run.weights()))
  one_group = amsgrad_jax.amsgrad(1e-2, weight_decay=0.1)
  refused(
    state_dict,
    lambda: interop.state_from_torch(one_group, state_dict, params, convert),
    "has 2 parameter groups and tx 1",
  )
  plain_chain = optax.chain(optax.identity(), one_group)  # it does not say its groups
  refused(
    state_dict,
    lambda: interop.state_from_torch(plain_chain, state_dict, params, convert),
    r"covers parameters of groups \[0, 1\]",
  )


def test_a_non_float_tensor_is_refused():
  torch = require("torch")
  run = small_run()
  state_dict = run.optimizer.state_dict()
  state_dict["state"][0]["exp_avg"] = torch.zeros(4, 3, dtype=torch.int64)
  params, tx = params_and_tx(run)
  refused(
    state_dict,
    lambda: interop.state_from_torch(tx, state_dict, params, convert),
    r"\['exp_avg'\] is torch.int64: AMSGrad's moments are floating point",
  )


def test_hyperparameters_that_differ_from_the_state_dicts_are_refused():
  run = small_run()
  state_dict = run.optimizer.state_dict()
  params, tx = params_and_tx(run)
  state_dict["param_groups"][1]["betas"] = (0.9, 0.99)
  state_dict["param_groups"][0]["lr"] = 1.0
  refused(
    state_dict,
    lambda: interop.state_from_torch(tx, state_dict, params, convert),
    r"group 0: learning rate of the next step.*group 1: b1: 0.8 in tx, 0.9",
  )


def test_unnamed_parameters_need_names_of_the_right_length():
  run = small_run()
  state_dict = run.optimizer.state_dict()
  for group in state_dict["param_groups"]:
    del group["param_names"]
  params, tx = params_and_tx(run)
  refused(
    state_dict,
    lambda: interop.state_from_torch(tx, state_dict, params, convert),
    "does not name its parameters",
  )
  refused(
    state_dict,
    lambda: interop.state_from_torch(tx, state_dict, params, convert, names=["0.weight"]),
    "names has 1 entries and the optimizer 4",
  )
  state = interop.state_from_torch(tx, state_dict, params, convert, names=run.names())
  assert int(state.inner_states[0].inner_state[1].count) == 3


def test_a_scheduler_that_does_not_step_with_the_optimizer_is_refused():
  run = small_run()
  params = jax_tree(convert(run.weights()))
  run.fast_forward_scheduler(5)  # As if stepped per epoch and per batch, say.
  with pytest.raises(ValueError, match="stepped 8 times and the optimizer"):
    interop.optimizer_from_torch(run.optimizer, params, convert, scheduler=run.scheduler)


def test_a_state_dict_of_numpy_arrays_converts_without_pytorch_tensors():
  run = small_run()
  state_dict = run.optimizer.state_dict()
  as_numpy = {
    "state": {
      i: {k: v.numpy() if hasattr(v, "numpy") else v for k, v in entry.items()}
      for i, entry in state_dict["state"].items()
    },
    "param_groups": state_dict["param_groups"],
  }
  params, tx = params_and_tx(run)
  from_tensors = interop.state_from_torch(tx, state_dict, params, convert)
  from_arrays = interop.state_from_torch(tx, as_numpy, params, convert)
  for a, b in zip(jax.tree.leaves(from_tensors), jax.tree.leaves(from_arrays), strict=True):
    np.testing.assert_array_equal(a, b)
