"""PyTorch's ``Adam(amsgrad=True)`` and ``AdamW(amsgrad=True)``: optimizer and state, both ways.

A PyTorch optimizer's ``state_dict()`` numbers its parameters (``state[i]`` holds
``step``, ``exp_avg``, ``exp_avg_sq`` and ``max_exp_avg_sq``; ``param_groups[g]["params"]``
lists the numbers of group ``g``) and names them when the optimizer was built from
``model.named_parameters()`` (``param_groups[g]["param_names"]``); otherwise the caller
names them. PyTorch itself is imported only to make tensors for ``state_to_torch``: a
state dict of NumPy arrays converts without it.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax

from amsgrad_jax._aliases import amsgrad, amsgradw
from amsgrad_jax.interop import _ported
from amsgrad_jax.interop._clipping import torch_clip_grad_norm
from amsgrad_jax.interop._state import (
  NamedState,
  from_optax,
  marks,
  to_numpy,
  to_optax,
)
from amsgrad_jax.interop._torch_schedules import schedule_from_torch

_MOMENTS = {"mu": "exp_avg", "nu": "exp_avg_sq", "nu_max": "max_exp_avg_sq"}


def _state_dict_of(optimizer: Any) -> Mapping[str, Any]:
  """The state dict of a ``torch.optim.Adam``/``AdamW``, or ``optimizer`` if it is one."""
  if isinstance(optimizer, Mapping):
    if "state" not in optimizer or "param_groups" not in optimizer:
      raise ValueError("a PyTorch optimizer state dict has 'state' and 'param_groups' entries.")
    return optimizer
  kind = type(optimizer).__name__
  if kind not in ("Adam", "AdamW") or not hasattr(optimizer, "state_dict"):
    raise TypeError(
      f"expected torch.optim.Adam or AdamW (or its state_dict()), got {kind}: AMSGrad's "
      "state exists only in those."
    )
  return optimizer.state_dict()


def _full_like(example: Any, value: float) -> Any:
  """An array of ``value`` shaped like ``example``, of its kind (a tensor for a tensor)."""
  if hasattr(example, "new_full"):
    return example.new_full(tuple(example.shape), value)
  array = to_numpy(example)
  return np.full(array.shape, value, array.dtype)


def _names_by_group(state_dict: Mapping[str, Any], names: Sequence[str] | None) -> list[list[str]]:
  """The names of each group's parameters, from ``param_names`` or from ``names``."""
  groups = state_dict["param_groups"]
  sizes = [len(group["params"]) for group in groups]
  stored = [group.get("param_names") for group in groups]
  from_dict = [list(s) for s in stored] if all(s is not None for s in stored) else None
  if names is not None:
    names = list(names)
    if len(names) != sum(sizes):
      raise ValueError(
        f"names has {len(names)} entries and the optimizer {sum(sizes)} parameters; give one "
        "name per parameter, in the order the optimizer holds them."
      )
    starts = np.cumsum([0, *sizes]).tolist()
    given = [names[start:end] for start, end in itertools.pairwise(starts)]
    if from_dict is not None and from_dict != given:
      raise ValueError(f"names {names} differ from the state dict's param_names {from_dict}.")
    by_group = given
  elif from_dict is not None:
    by_group = from_dict
  else:
    raise ValueError(
      "the state dict does not name its parameters: build the optimizer from "
      "model.named_parameters(), or pass names=[...] with one name per parameter in the "
      "order the optimizer holds them (for Adam(model.parameters()): "
      "[name for name, _ in model.named_parameters()])."
    )
  _unique([name for group in by_group for name in group])
  return by_group


def _unique(names: list[str]) -> list[str]:
  """``names``, when no name is given twice."""
  duplicates = sorted({name for name in names if names.count(name) > 1})
  if duplicates:
    raise ValueError(f"parameter names must be unique, got {duplicates} more than once.")
  return names


def _is_inexact(value: Any) -> bool:
  if hasattr(value, "is_floating_point"):
    return bool(value.is_floating_point() or value.is_complex())
  array = to_numpy(value)
  return bool(np.issubdtype(array.dtype, np.inexact) or array.dtype.name == "bfloat16")


def _step(value: Any, where: str) -> int:
  step = float(value.item()) if hasattr(value, "item") else float(value)
  if step < 0 or step != int(step):
    raise ValueError(f"{where} step is {step}; a step count is a whole number >= 0.")
  return int(step)


def named_state(
  state_dict: Mapping[str, Any], names: Sequence[str] | None, max_from_exp_avg_sq: bool
) -> NamedState:
  """The :class:`NamedState` of a PyTorch Adam/AdamW state dict, checked."""
  by_group = _names_by_group(state_dict, names)
  groups = state_dict["param_groups"]
  state = state_dict["state"]
  index_name = {
    index: name
    for group, group_names in zip(groups, by_group, strict=True)
    for index, name in zip(group["params"], group_names, strict=True)
  }
  extra = sorted(set(state) - set(index_name), key=str)
  if extra:
    raise ValueError(
      f"state_dict['state'] has entries {extra} that belong to no parameter group: the "
      "state dict is not one optimizer's."
    )
  if not max_from_exp_avg_sq:
    plain = [g for g, group in enumerate(groups) if not group.get("amsgrad", False)]
    if plain:
      raise ValueError(
        f"parameter group(s) {plain} come from Adam without amsgrad=True: there is no "
        "max_exp_avg_sq to continue. Pass max_from_exp_avg_sq=True to start AMSGrad's "
        "running maximum from exp_avg_sq."
      )
  if not state:
    return NamedState(names=(), groups={}, steps=(0,) * len(groups), mu={}, nu={}, nu_max={})
  missing = [index_name[i] for group in groups for i in group["params"] if i not in state]
  if missing:
    raise ValueError(
      f"parameters {missing} have no state: PyTorch makes it at a parameter's first step, "
      "so they have never been updated (their grad was None). amsgrad_jax updates every "
      "parameter at every step, so the two runs could not agree."
    )
  moments: dict[str, dict[str, Any]] = {field: {} for field in _MOMENTS}
  steps = []
  for g, group in enumerate(groups):
    taken = {}
    for index in group["params"]:
      name, entry = index_name[index], state[index]
      where = f"state_dict['state'][{index!r}] (parameter {name!r})"
      taken[name] = _step(entry["step"], where + "'s")
      for field, key in _MOMENTS.items():
        if key not in entry and key == "max_exp_avg_sq" and max_from_exp_avg_sq:
          key = "exp_avg_sq"
        if key not in entry:
          raise ValueError(f"{where} has no {key!r}; it holds {sorted(entry)}.")
        if not _is_inexact(entry[key]):
          raise ValueError(
            f"{where}[{key!r}] is {getattr(entry[key], 'dtype', type(entry[key]))}: "
            "AMSGrad's moments are floating point."
          )
        moments[field][name] = entry[key]
    if len(set(taken.values())) > 1:
      raise ValueError(
        f"the parameters of group {g} have taken different numbers of steps ({taken}); an "
        "Optax optimizer keeps one step count per group."
      )
    steps.append(next(iter(taken.values()), 0))
  order = tuple(index_name[i] for group in groups for i in group["params"])
  group_of = {name: g for g, names_g in enumerate(by_group) for name in names_g}
  return NamedState(names=order, groups=group_of, steps=tuple(steps), **moments)


def _framework_hyperparameters(group: Mapping[str, Any]) -> dict[str, Any]:
  b1, b2 = group["betas"]
  theirs: dict[str, Any] = {
    "b1": _ported.number(b1),
    "b2": _ported.number(b2),
    "eps": _ported.number(group["eps"]),
    "weight_decay": _ported.number(group["weight_decay"]),
    "learning_rate": _ported.number(group["lr"]),
  }
  if "decoupled_weight_decay" in group:
    theirs["decoupled"] = bool(group["decoupled_weight_decay"])
  return theirs


def _check_against(
  tx: Any, groups: Sequence[Mapping[str, Any]], steps: Sequence[int], *, rates: bool = True
) -> None:
  """Raise when ``tx`` says its hyperparameters and they are not the state dict's (its
  learning rates too, when ``rates``)."""
  ours = _ported.groups_of(tx)
  if ours is None:
    return
  if len(ours) != len(groups):
    raise ValueError(
      f"the PyTorch optimizer has {len(groups)} parameter groups and tx {len(ours)}: build "
      "tx with optimizer_from_torch, which gives each group its own optimizer."
    )
  found = []
  for g, (options, group) in enumerate(zip(ours, groups, strict=True)):
    theirs = _framework_hyperparameters(group)
    if not rates:
      del theirs["learning_rate"]
    found += [f"group {g}: {m}" for m in _ported.mismatches(options, theirs, "pytorch", steps[g])]
  if found:
    raise ValueError("tx is not the PyTorch optimizer's: " + "; ".join(found) + ".")


def state_from_torch(
  tx: optax.GradientTransformation,
  state_dict: Mapping[str, Any],
  params: optax.Params,
  convert: Callable[[dict[str, Any]], optax.Params],
  *,
  names: Sequence[str] | None = None,
  max_from_exp_avg_sq: bool = False,
) -> optax.OptState:
  r"""The state of ``tx`` that continues a PyTorch ``Adam``/``AdamW(amsgrad=True)`` run.

  ``exp_avg``, ``exp_avg_sq`` and ``max_exp_avg_sq`` are ``mu``, ``nu`` and ``nu_max`` of
  :class:`~amsgrad_jax.ScaleByAmsgradState` under ``convention="pytorch"`` (the same
  numbers; see the algorithm page), and ``step`` is ``count``. Each goes through
  ``convert``, the function that maps a PyTorch ``{name: tensor}`` of weights to the JAX
  parameters, so the moments are laid out exactly as the weights. Every step counter in
  the state (AMSGrad's and a schedule's) is set to its group's ``step``; the rest of the
  state is ``tx.init(params)``'s, placed and sharded like ``params``.
  Moments that ``tx`` stores in :func:`~amsgrad_jax.blockwise8` are encoded into it
  (``nu_max`` rounded up, never below the framework's; see the porting guide).

  Args:
    tx: the optimizer that continues the run: :func:`optimizer_from_torch`'s, or any
      Optax chain with one :func:`~amsgrad_jax.amsgrad`/``amsgradw`` per parameter group.
    state_dict: ``optimizer.state_dict()`` of the PyTorch optimizer (as saved by
      ``torch.save``; tensors or NumPy arrays).
    params: the JAX parameters, the weights already converted.
    convert: ``{name: tensor} -> parameters``, the weights converter; it is given the
      optimizer's parameters only.
    names: the name of each parameter in the optimizer's order, when the state dict has
      no ``param_names`` (an optimizer built from ``model.parameters()``).
    max_from_exp_avg_sq: for a state dict of Adam without ``amsgrad=True``, start
      AMSGrad's running maximum from ``exp_avg_sq`` (otherwise that is an error).

  Returns:
    A state of ``tx``.

  Raises:
    ValueError: naming the problem, for a state that is not AMSGrad's, a parameter
      missing, extra or of another shape after ``convert``, a group ``tx`` does not
      have, a non-float tensor, or (when ``tx`` is :func:`optimizer_from_torch`'s)
      hyperparameters that differ. Nothing is changed.

  Examples:
    >>> import numpy as np
    >>> from amsgrad_jax import interop
    >>> import amsgrad_jax
    >>> state_dict = {  # what torch.optim.Adam([w], amsgrad=True) saves after 3 steps
    ...   "state": {0: {"step": 3.0, "exp_avg": np.ones((2, 3), np.float32),
    ...                 "exp_avg_sq": np.ones((2, 3), np.float32),
    ...                 "max_exp_avg_sq": np.full((2, 3), 2.0, np.float32)}},
    ...   "param_groups": [{"params": [0], "param_names": ["fc.weight"], "lr": 1e-3,
    ...                     "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
    ...                     "amsgrad": True}]}
    >>> def convert(weights):  # PyTorch's (out, in) weight is Flax's (in, out) kernel
    ...   return {"kernel": np.asarray(weights["fc.weight"]).T}
    >>> params = convert({"fc.weight": np.zeros((2, 3), np.float32)})
    >>> tx = amsgrad_jax.amsgrad(1e-3)
    >>> _, adam_state, _ = interop.state_from_torch(tx, state_dict, params, convert)
    >>> int(adam_state.count), adam_state.nu_max["kernel"].shape
    (3, (3, 2))
  """
  named = named_state(state_dict, names, max_from_exp_avg_sq)
  _check_against(tx, state_dict["param_groups"], named.steps)
  return to_optax(tx, params, convert, named, _full_like, "PyTorch")


def _torch_group(options: Any) -> dict[str, Any]:
  """The hyperparameters of a PyTorch Adam/AdamW group equal to ``options``."""
  return {
    "lr": _ported.learning_rate_at(options, 0),
    "betas": (_ported.number(options.b1), _ported.number(options.b2)),
    "eps": _ported.number(options.eps),
    "weight_decay": _ported.number(options.weight_decay),
    "amsgrad": True,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": None,
    "decoupled_weight_decay": options.decoupled,
  }


def _tensor(torch: Any, value: Any) -> Any:
  """A PyTorch tensor of ``value`` (a tensor is copied)."""
  if isinstance(value, torch.Tensor):
    return value.detach().clone()
  array = to_numpy(value)
  if array.dtype.name == "bfloat16":
    return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
  return torch.from_numpy(np.array(array))


def state_to_torch(
  tx: optax.GradientTransformation,
  opt_state: optax.OptState,
  convert_back: Callable[[optax.Params], Mapping[str, Any]],
  *,
  like: Any = None,
  names: Sequence[str] | None = None,
) -> dict[str, Any]:
  r"""A PyTorch ``Adam``/``AdamW`` state dict that continues ``tx``'s run.

  The inverse of :func:`state_from_torch`: ``mu``, ``nu``, ``nu_max`` and ``count`` of each
  :class:`~amsgrad_jax.ScaleByAmsgradState` become ``exp_avg``, ``exp_avg_sq``,
  ``max_exp_avg_sq`` and ``step``, laid out by ``convert_back`` (the function that maps
  the JAX parameters to a PyTorch ``{name: tensor}``). ``optimizer.load_state_dict``
  accepts the result; converted back with :func:`state_from_torch` it gives ``opt_state``
  bit for bit.

  The parameter groups are ``like``'s (the PyTorch optimizer that continues, or its
  state dict), with each group's ``lr`` set to ``tx``'s rate for the next step; without
  ``like`` they are made from ``tx``'s options (``tx`` from :func:`optimizer_from_torch`,
  or an :func:`~amsgrad_jax.amsgrad`/``amsgradw``), the parameters numbered in the order
  of ``names`` or, without it, of ``convert_back``'s result. A PyTorch scheduler keeps its
  own state: load it, or step it to the step count, before ``load_state_dict``.

  Args:
    tx: the optimizer ``opt_state`` belongs to.
    opt_state: its state.
    convert_back: ``parameters -> {name: tensor or array}``, the weights converter back.
    like: the PyTorch optimizer that will load the state (or its ``state_dict()``).
    names: the parameters' names in the PyTorch optimizer's order.

  Returns:
    A state dict: ``{"state": {i: {...}}, "param_groups": [...]}``.

  Raises:
    ValueError: naming the problem, for names or groups that do not match, or
      hyperparameters of ``like`` that are not ``tx``'s. Nothing is changed.

  Examples:
    >>> import jax.numpy as jnp
    >>> import amsgrad_jax
    >>> from amsgrad_jax import interop
    >>> tx = amsgrad_jax.amsgrad(1e-3)
    >>> opt_state = tx.init({"kernel": jnp.zeros((3, 2))})
    >>> convert_back = lambda tree: {"fc.weight": tree["kernel"].T}
    >>> state_dict = interop.state_to_torch(tx, opt_state, convert_back)  # doctest: +SKIP
    >>> state_dict["state"][0]["max_exp_avg_sq"].shape  # doctest: +SKIP
    torch.Size([2, 3])
  """
  torch = importlib.import_module("torch")
  named = from_optax(tx, opt_state, convert_back)
  ours = _ported.groups_of(tx)
  if like is not None:
    like_dict = _state_dict_of(like)
    templates = [dict(group) for group in like_dict["param_groups"]]
    by_group = _names_by_group(like_dict, names)
    # The rates are not compared: the state dict sets them, to tx's.
    _check_against(tx, templates, [0] * len(templates), rates=False)
  elif ours is not None:
    templates = [_torch_group(options) for options in ours]
    order = _unique(list(names) if names is not None else list(named.names))
    by_group = [[n for n in order if named.groups.get(n) == g] for g in range(len(templates))]
  else:
    raise ValueError(
      "tx does not say its hyperparameters (it is not an amsgrad_jax optimizer or "
      "optimizer_from_torch's): pass like=, the PyTorch optimizer that will load the state."
    )
  if len(by_group) != len(named.steps):
    raise ValueError(
      f"the PyTorch optimizer has {len(by_group)} parameter groups and opt_state "
      f"{len(named.steps)} AMSGrad states."
    )
  flat = [name for group in by_group for name in group]
  missing, extra = sorted(set(flat) - set(named.names)), sorted(set(named.names) - set(flat))
  if missing or extra:
    raise ValueError(
      f"convert_back gives the names {sorted(named.names)}; the PyTorch optimizer has "
      f"{sorted(flat)} (missing from convert_back: {missing}; not in the optimizer: {extra})."
    )
  moved = [(n, g) for g, group in enumerate(by_group) for n in group if named.groups[n] != g]
  if moved:
    raise ValueError(
      "parameters in a different group in opt_state than in the PyTorch optimizer "
      f"(name, PyTorch's group): {moved}."
    )
  state: dict[int, dict[str, Any]] = {}
  param_groups = []
  index = 0
  for g, (template, group_names) in enumerate(zip(templates, by_group, strict=True)):
    group = {key: value for key, value in template.items() if key not in ("params", "param_names")}
    if ours is not None:
      group["lr"] = _ported.learning_rate_at(ours[g], named.steps[g])
    group["params"] = list(range(index, index + len(group_names)))
    group["param_names"] = list(group_names)
    param_groups.append(group)
    for name in group_names:
      state[index] = {
        "step": torch.tensor(float(named.steps[g]), dtype=torch.float32),
        **{key: _tensor(torch, getattr(named, field)[name]) for field, key in _MOMENTS.items()},
      }
      index += 1
  return {"state": state, "param_groups": param_groups}


def _learning_rates(
  groups: Sequence[Mapping[str, Any]], scheduler: Any, learning_rate: Any
) -> list[Any]:
  if scheduler is not None and learning_rate is not None:
    raise ValueError("give scheduler= or learning_rate=, not both.")
  if scheduler is not None:
    if getattr(scheduler, "cycle_momentum", False):
      raise ValueError(
        "this OneCycleLR cycles beta1 (cycle_momentum=True): build the optimizer with "
        "optax.inject_hyperparams(amsgrad_jax.amsgrad)(learning_rate=..., "
        "b1=interop.torch_one_cycle_momentum(...)), or use cycle_momentum=False."
      )
    rates = schedule_from_torch(scheduler)
  elif learning_rate is None:
    driven = [g for g, group in enumerate(groups) if "initial_lr" in group]
    if driven:
      raise ValueError(
        f"parameter group(s) {driven} have an initial_lr: a scheduler drives their lr. "
        "Pass scheduler= (or learning_rate=, an Optax schedule of the step count)."
      )
    rates = [_ported.number(group["lr"]) for group in groups]
  elif isinstance(learning_rate, list | tuple):
    rates = list(learning_rate)
  else:
    rates = [learning_rate] * len(groups)
  if len(rates) != len(groups):
    raise ValueError(f"{len(rates)} learning rates for {len(groups)} parameter groups.")
  return rates


def optimizer_from_torch(
  optimizer: Any,
  params: optax.Params,
  convert: Callable[[dict[str, Any]], optax.Params],
  *,
  scheduler: Any = None,
  learning_rate: optax.ScalarOrSchedule | Sequence[optax.ScalarOrSchedule] | None = None,
  max_grad_norm: float | None = None,
  norm_type: float = 2.0,
  names: Sequence[str] | None = None,
  mu_dtype: Any = None,
  nu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The amsgrad_jax optimizer of a PyTorch ``Adam``/``AdamW(amsgrad=True)`` training step.

  Each parameter group becomes :func:`~amsgrad_jax.amsgrad` (``Adam``, coupled decay) or
  :func:`~amsgrad_jax.amsgradw` (``AdamW``, decoupled) with its ``lr``, ``betas``, ``eps``
  and ``weight_decay`` and ``convention="pytorch"``; several groups become
  ``optax.partition`` over the parameters, each leaf labelled with its group through
  ``convert``. ``scheduler`` becomes each group's schedule (:func:`schedule_from_torch`),
  and ``max_grad_norm`` puts :func:`torch_clip_grad_norm` in front, for a loop that calls
  ``clip_grad_norm_(model.parameters(), max_grad_norm)`` before ``optimizer.step()``.

  Args:
    optimizer: a ``torch.optim.Adam`` or ``AdamW``, or its ``state_dict()``.
    params: the JAX parameters.
    convert: ``{name: tensor} -> parameters``, the weights converter.
    scheduler: the PyTorch scheduler stepped once per optimizer step, if any.
    learning_rate: instead of ``scheduler``, the rate (a float or an Optax schedule) of
      every group, or a list with one per group; by default each group's ``lr``.
    max_grad_norm: ``clip_grad_norm_``'s ``max_norm``, or ``None`` for no clipping.
    norm_type: ``clip_grad_norm_``'s ``norm_type``.
    names: the parameters' names in the optimizer's order, when it was not built from
      ``model.named_parameters()`` (needed for several groups).
    mu_dtype: how JAX stores the moments (see :func:`~amsgrad_jax.amsgrad`), for
      example :func:`~amsgrad_jax.blockwise8` for 8-bit state; PyTorch's float state
      converts into it (:func:`state_from_torch`).
    nu_dtype: the same for ``nu`` and ``nu_max``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; its ``groups`` attribute holds the
    options of each group's optimizer.

  Raises:
    ValueError: for a group with ``maximize=True``, a scheduler it cannot read, or a
      group's ``lr`` a scheduler drives when no schedule is given.

  Examples:
    >>> import numpy as np
    >>> from amsgrad_jax import interop
    >>> state_dict = {"state": {}, "param_groups": [{"params": [0], "lr": 1e-3,
    ...   "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "amsgrad": True,
    ...   "decoupled_weight_decay": True}]}  # torch.optim.AdamW([w], amsgrad=True)
    >>> params = {"w": np.zeros(3, np.float32)}
    >>> tx = interop.optimizer_from_torch(state_dict, params, lambda w: {"w": w["w"]},
    ...                                   names=["w"], max_grad_norm=1.0)
    >>> tx.groups[0].decoupled, tx.groups[0].weight_decay
    (True, 0.01)
  """
  state_dict = _state_dict_of(optimizer)
  groups = state_dict["param_groups"]
  rates = _learning_rates(groups, scheduler, learning_rate)
  if scheduler is not None and state_dict["state"]:
    steps = {_step(entry["step"], "a parameter's") for entry in state_dict["state"].values()}
    if steps != {scheduler.last_epoch}:
      raise ValueError(
        f"the scheduler has stepped {scheduler.last_epoch} times and the optimizer "
        f"{sorted(steps)}: the schedules count optimizer steps, so the scheduler must step "
        "once per optimizer step (write a schedule of the step count as learning_rate= "
        "otherwise)."
      )
  optimizers = []
  for g, (group, rate) in enumerate(zip(groups, rates, strict=True)):
    if group.get("maximize", False):
      raise ValueError(f"parameter group {g} maximizes: differentiate the negated objective.")
    decoupled = group.get("decoupled_weight_decay", type(optimizer).__name__ == "AdamW")
    b1, b2 = group["betas"]
    alias = amsgradw if decoupled else amsgrad
    optimizers.append(
      alias(
        rate,
        b1=_ported.number(b1),
        b2=_ported.number(b2),
        eps=_ported.number(group["eps"]),
        weight_decay=_ported.number(group["weight_decay"]),
        convention="pytorch",
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
      )
    )
  labels = None
  if len(groups) > 1:
    labels = _group_labels(optimizer, state_dict, params, convert, names)
  front = [torch_clip_grad_norm(max_grad_norm, norm_type)] if max_grad_norm is not None else []
  return _ported.build(optimizers, labels, front)


def _group_labels(
  optimizer: Any,
  state_dict: Mapping[str, Any],
  params: Any,
  convert: Callable[[dict[str, Any]], Any],
  names: Sequence[str] | None,
) -> Any:
  """A tree shaped like ``params`` with each leaf's parameter group (for optax.partition)."""
  by_group = _names_by_group(state_dict, names)
  if not isinstance(optimizer, Mapping):
    tensors = [t for group in optimizer.param_groups for t in group["params"]]
  elif state_dict["state"] and all(
    i in state_dict["state"] for group in state_dict["param_groups"] for i in group["params"]
  ):
    tensors = [
      state_dict["state"][i]["exp_avg"]
      for group in state_dict["param_groups"]
      for i in group["params"]
    ]
  else:
    raise ValueError(
      "to split the parameters into groups, pass the optimizer itself (its state dict has no "
      "state yet to show each parameter's layout)."
    )
  flat = [name for group in by_group for name in group]
  examples = dict(zip(flat, tensors, strict=True))
  values = {name: float(g) for g, group in enumerate(by_group) for name in group}
  numbers = marks(convert, examples, values, params, _full_like, "parameter group")
  return jax.tree.unflatten(
    jax.tree.structure(params), [0 if n is None else int(n) for n in numbers]
  )
