"""The bridge every conversion crosses: AMSGrad's state by parameter name <-> an Optax state.

A framework keeps AMSGrad's state per named parameter, in its own layout (a PyTorch
``Linear`` weight is the transpose of a Flax ``Dense`` kernel); an Optax state keeps it in
trees shaped like the JAX parameters, somewhere inside the optimizer's chain.
:class:`NamedState` is the first; :func:`to_optax` and :func:`from_optax` cross over with the
user's own weights converter, applied to every moment, so the one mapping that carries
the weights carries the state too.

Inside the Optax state, each :class:`~amsgrad_jax.ScaleByAmsgradState` is found by walking
the state (a chain's tuple, ``optax.partition``'s groups, ``optax.masked``,
``optax.inject_hyperparams``); the parameters it covers (its leaves that are not
``optax.MaskedNode``) tell which parameter group it is, and every step counter beside it
(a schedule's ``count``) is set to that group's step.

A state stored in :func:`~amsgrad_jax.blockwise8` is converted through its values: the
framework's float moments are encoded into it (``mu`` and ``nu`` to nearest, ``nu_max``
rounded up, so it stays at or above the framework's running maximum), and its stored
values are decoded for the framework. ``nu`` is stored relative to the rule's running
maximum, so this needs a rule whose maximum is of ``v`` itself (``"pytorch"``,
``"keras"``, ``"paper"``) and an optimizer that says its rule (built by the aliases or
by ``optimizer_from_torch``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from amsgrad_jax import _blockwise
from amsgrad_jax._blockwise import Blockwise8Array, is_blockwise
from amsgrad_jax._flat import FlatMoment
from amsgrad_jax._transform import ScaleByAmsgradState
from amsgrad_jax.interop._ported import groups_of

MOMENTS = ("mu", "nu", "nu_max")
Convert = Callable[[dict[str, Any]], Any]
ConvertBack = Callable[[Any], Mapping[str, Any]]
# Marks an array with one number (its group, or whether it decays) so that the user's
# converter says where each parameter goes: an array full of the number is laid out
# like the weights, whatever the layout.
FullLike = Callable[[Any, float], Any]


@dataclasses.dataclass(frozen=True)
class NamedState:
  """AMSGrad's state as a framework keeps it.

  ``names`` lists the parameters in the framework's order; ``groups`` gives each name's
  parameter group; ``steps`` the step count of each group; ``mu``, ``nu`` and ``nu_max``
  map each name to an array in the framework's layout (a PyTorch tensor, a NumPy array).
  """

  names: tuple[str, ...]
  groups: Mapping[str, int]
  steps: tuple[int, ...]
  mu: Mapping[str, Any]
  nu: Mapping[str, Any]
  nu_max: Mapping[str, Any]


def to_numpy(value: Any) -> np.ndarray:
  """A host NumPy copy of a PyTorch tensor, a Keras variable, a JAX or NumPy array."""
  if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch.Tensor
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":  # NumPy has no bfloat16; ml_dtypes has.
      return value.float().numpy().astype(jnp.bfloat16)
    return value.numpy()
  return np.asarray(value)


def is_inexact(array: np.ndarray) -> bool:
  """Whether ``array`` holds floating or complex numbers (bfloat16 included)."""
  return bool(jnp.issubdtype(array.dtype, jnp.inexact))


def _path_key(path: tuple[Any, ...]) -> tuple[str, ...]:
  """A key path as strings, looking through Flax NNX's ``Variable.value``, so that a
  converter may return a plain nested dict for an ``nnx.State`` of parameters."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.GetAttrKey) and key.name == "value":
      continue
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
    else:
      parts.append(str(key))
  return tuple(parts)


def _shown(key: tuple[str, ...]) -> str:
  return "/".join(key) or "(the root)"


def leaves_like(tree: Any, params: Any, what: str) -> list[np.ndarray]:
  """The leaves of ``tree`` as NumPy arrays, in the order of ``params``' leaves.

  ``tree`` must have exactly the leaves of ``params``, by key path, each of the same
  shape: a ``ValueError`` names every missing or extra leaf, or the first wrong shape.
  """
  wanted = [
    (_path_key(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
  ]
  given = {_path_key(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  wanted_keys = {key for key, _ in wanted}
  missing = [_shown(key) for key, _ in wanted if key not in given]
  extra = [_shown(key) for key in given if key not in wanted_keys]
  if missing or extra:
    raise ValueError(
      f"the {what} converted does not have the leaves of the parameters: "
      + "; ".join(
        part
        for part in (
          f"missing {missing}" if missing else "",
          f"not a parameter {extra}" if extra else "",
        )
        if part
      )
      + ". convert must map every parameter the optimizer holds, and only those."
    )
  arrays = []
  for key, param in wanted:
    array = to_numpy(given[key])
    if array.shape != np.shape(param):
      raise ValueError(
        f"the {what} of {_shown(key)} has shape {array.shape} after convert, and the "
        f"parameter has shape {np.shape(param)}: convert must lay every moment out as "
        "it lays out the weights."
      )
    arrays.append(array)
  return arrays


def converted(
  convert: Convert, by_name: Mapping[str, Any], params: Any, what: str
) -> list[np.ndarray]:
  """``convert(by_name)`` as arrays in the order of ``params``' leaves (see ``leaves_like``)."""
  try:
    tree = convert(dict(by_name))
  except Exception as error:
    error.add_note(
      f"amsgrad_jax.interop: raised by convert on the {what}, given {{name: array}} for the "
      f"optimizer's parameters only: {list(by_name)[:8]}{'...' if len(by_name) > 8 else ''}"
    )
    raise
  return leaves_like(tree, params, what)


def marks(
  convert: Convert,
  named: Mapping[str, Any],
  values: Mapping[str, float],
  params: Any,
  full_like: FullLike,
  what: str,
) -> list[float | None]:
  """One number per leaf of ``params``: ``values[name]``, carried by ``convert``.

  ``None`` for an empty leaf (nothing to read). A leaf that converts from parameters
  with different numbers (a converter that concatenates two weights into one leaf of
  two groups) raises ``ValueError``.
  """
  arrays = converted(
    convert, {name: full_like(named[name], values[name]) for name in named}, params, what
  )
  numbers: list[float | None] = []
  for (path, _), array in zip(jax.tree_util.tree_flatten_with_path(params)[0], arrays, strict=True):
    flat = np.ravel(array.astype(np.float64))
    if flat.size == 0:
      numbers.append(None)
    elif np.all(flat == flat[0]):
      numbers.append(float(flat[0]))
    else:
      raise ValueError(
        f"convert makes {_shown(_path_key(path))} out of parameters of different {what}s "
        f"({sorted(set(flat.tolist()))}); one leaf of the optimizer has one {what}."
      )
  return numbers


def _is_masked(node: Any) -> bool:
  return isinstance(node, optax.MaskedNode)


def is_masked_or_blockwise(node: Any) -> bool:
  return _is_masked(node) or is_blockwise(node)


def has_blockwise(state: ScaleByAmsgradState) -> bool:
  return any(is_blockwise(x) for x in jax.tree.leaves(state, is_leaf=is_blockwise))


def check_blockwise_rules(tx: optax.GradientTransformation, opt_state: Any) -> None:
  """Raise ``ValueError`` unless every :func:`~amsgrad_jax.blockwise8` moment of
  ``opt_state`` can be converted: ``tx`` says its rules, and each keeps the maximum of
  ``v`` itself, against which ``nu`` is stored (see the module's docstring)."""
  if not any(has_blockwise(state) for state in amsgrad_states(opt_state)):
    return
  groups = groups_of(tx)
  if groups is None:
    raise ValueError(
      "8-bit (blockwise8) state is converted through its rule, and tx does not say it: "
      "build tx with amsgrad, amsgradw or optimizer_from_torch / optimizer_from_keras."
    )
  for options in groups:
    if not options.rule.maximum_of_raw_v:
      raise ValueError(
        f'8-bit (blockwise8) state under convention="{options.convention}" keeps the '
        "maximum of the bias-corrected second moment, which the frameworks do not: "
        "convert it with a float mu_dtype and nu_dtype."
      )


def stored_like(values: dict[str, np.ndarray], templates: dict[str, Any]) -> dict[str, Any]:
  """One leaf's float moments ``values``, stored as its ``templates`` (by moment) are:
  a float moment cast (``nu_max`` rounded up); a :func:`~amsgrad_jax.blockwise8` one
  encoded, ``mu`` and ``nu`` to nearest and ``nu_max`` up (never below the framework's),
  ``nu`` against the stored ``nu_max`` (the rule's ``a`` is 1, see
  :func:`check_blockwise_rules`)."""
  stored: dict[str, Any] = {}
  for field in ("mu", "nu_max", "nu"):  # nu after the maximum it is stored against
    template = templates[field]
    exact = cast(
      values[field],
      np.float32 if is_blockwise(template) else template.dtype,
      round_up=field == "nu_max",
    )
    if not is_blockwise(template):
      stored[field] = placed(exact, template)
      continue
    size = template.block_size
    if field == "nu":
      maximum = _blockwise.dequantize(stored["nu_max"])
      encoded = _blockwise.quantize_nu(jnp.asarray(exact), maximum, size)
    else:
      encoded = _blockwise.quantize(jnp.asarray(exact), size, field, upward=field == "nu_max")
    stored[field] = Blockwise8Array(
      placed(np.asarray(encoded.codes), template.codes),
      placed(np.asarray(encoded.exponents), template.exponents),
      size,
      field,
    )
  return stored


def decoded(state: ScaleByAmsgradState) -> ScaleByAmsgradState:
  """``state`` with every :func:`~amsgrad_jax.blockwise8` moment as the float32 values it
  stores (``a`` is 1, see :func:`check_blockwise_rules`)."""
  if not has_blockwise(state):
    return state

  def values(mu: Any, nu: Any, nu_max: Any) -> tuple[Any, Any, Any]:
    if is_blockwise(mu):
      mu = _blockwise.dequantize(mu)
    if is_blockwise(nu_max):  # nu and nu_max share nu_dtype
      nu_max = _blockwise.dequantize(nu_max)
      nu = _blockwise.dequantize_nu(nu, nu_max, 1.0)
    return mu, nu, nu_max

  leaves = [
    jax.tree.leaves(getattr(state, field), is_leaf=is_masked_or_blockwise) for field in MOMENTS
  ]
  treedef = jax.tree.structure(state.mu, is_leaf=is_masked_or_blockwise)
  columns = list(zip(*(values(*leaf) for leaf in zip(*leaves, strict=True)), strict=True))
  return state._replace(
    **{
      field: jax.tree.unflatten(treedef, column)
      for field, column in zip(MOMENTS, columns, strict=True)
    }
  )


def _moment_leaves(state: ScaleByAmsgradState, field: str, treedef: Any) -> list[Any]:
  """The leaves of one moment of ``state``, ``optax.MaskedNode`` where it does not apply."""
  moment = getattr(state, field)
  if isinstance(moment, FlatMoment):
    raise ValueError(
      "the interop conversions read and write the default state layout; build the "
      "optimizer without flat_state=True (the numbers are the same)."
    )
  leaves, structure = jax.tree.flatten(moment, is_leaf=is_masked_or_blockwise)
  if structure != treedef:
    raise ValueError(
      f"the optimizer state holds an AMSGrad {field} that is not shaped like the "
      f"parameters: {structure} against {treedef}."
    )
  return leaves


def _children(node: Any) -> Iterator[Any]:
  """The sub-states of one node of an Optax state, in a fixed order (dicts by key)."""
  if isinstance(node, dict):
    try:
      keys = sorted(node)
    except TypeError:
      keys = list(node)
    yield from (node[key] for key in keys)
  elif isinstance(node, list | tuple) and not _is_masked(node):
    yield from node


def amsgrad_states(state: Any) -> list[ScaleByAmsgradState]:
  """Every :class:`ScaleByAmsgradState` in ``state``, in walking order."""
  if isinstance(state, ScaleByAmsgradState):
    return [state]
  return [found for child in _children(state) for found in amsgrad_states(child)]


class _Filler:
  """Writes a :class:`NamedState`, converted to leaves, into a freshly initialised state."""

  def __init__(
    self,
    moments: dict[str, list[np.ndarray]],
    groups: list[float | None],
    steps: tuple[int, ...],
    treedef: Any,
  ) -> None:
    self.moments, self.groups, self.steps, self.treedef = moments, groups, steps, treedef
    self.covered = [False] * len(groups)

  def group_of(self, state: ScaleByAmsgradState) -> int | None:
    leaves = _moment_leaves(state, "mu", self.treedef)
    found = {
      int(group)
      for group, leaf in zip(self.groups, leaves, strict=True)
      if not _is_masked(leaf) and group is not None
    }
    if len(found) > 1:
      raise ValueError(
        f"one AMSGrad state of the optimizer covers parameters of groups {sorted(found)}, "
        "which take their own hyperparameters and step counts: give each group its own "
        "optimizer (optimizer_from_torch does, with optax.partition)."
      )
    return found.pop() if found else None

  def step_under(self, node: Any, outer: int | None) -> int | None:
    """The step of the AMSGrad states under ``node``: ``None`` when they disagree,
    ``outer`` (the step around ``node``) when they cover no parameter."""
    steps = {
      self.steps[group]
      for state in amsgrad_states(node)
      if (group := self.group_of(state)) is not None
    }
    return outer if not steps else steps.pop() if len(steps) == 1 else None

  def fill(self, node: Any, step: int | None) -> Any:
    """``node`` with its AMSGrad states filled and its step counters at ``step``."""
    if isinstance(node, ScaleByAmsgradState):
      return self.fill_amsgrad(node)
    if _is_masked(node):
      return node
    if isinstance(node, tuple | list | dict):
      step = self.step_under(node, step)
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      filled: Any = type(node)(*(self.fill(child, step) for child in node))
      if "count" in node._fields:
        filled = filled._replace(count=self.count(node.count, step, type(node).__name__))
      return filled
    if isinstance(node, list | tuple):
      return type(node)(self.fill(child, step) for child in node)
    if isinstance(node, dict):
      return {key: self.fill(value, step) for key, value in node.items()}
    return node

  def count(self, template: Any, step: int | None, where: str) -> jax.Array:
    if step is None:
      raise ValueError(
        f"the parameter groups have taken different numbers of steps ({sorted(set(self.steps))}), "
        f"and the step counter of {where} is shared by them; give each group its own chain."
      )
    dtype = np.asarray(template).dtype
    if step > np.iinfo(dtype).max:
      raise ValueError(f"step {step} does not fit the {dtype} step counter of {where}.")
    return placed(np.asarray(step, dtype), template)

  def fill_amsgrad(self, state: ScaleByAmsgradState) -> ScaleByAmsgradState:
    group = self.group_of(state)
    templates = [_moment_leaves(state, field, self.treedef) for field in MOMENTS]
    new: dict[str, list[Any]] = {field: [] for field in MOMENTS}
    for index, leaf in enumerate(zip(*templates, strict=True)):
      if _is_masked(leaf[0]):
        stored = dict(zip(MOMENTS, leaf, strict=True))
      else:
        self.covered[index] = True
        values = {field: self.moments[field][index] for field in MOMENTS}
        stored = stored_like(values, dict(zip(MOMENTS, leaf, strict=True)))
      for field in MOMENTS:
        new[field].append(stored[field])
    fields = {field: jax.tree.unflatten(self.treedef, new[field]) for field in MOMENTS}
    count = self.count(
      state.count, self.steps[group] if group is not None else 0, "an AMSGrad state"
    )
    return ScaleByAmsgradState(count=count, **fields)


def cast(value: np.ndarray, dtype: Any, *, round_up: bool) -> np.ndarray:
  """``value`` in ``dtype``; a running maximum stored narrower is rounded up, never down."""
  dtype = np.dtype(dtype)
  if jnp.iscomplexobj(value) and not jnp.issubdtype(dtype, jnp.complexfloating):
    raise ValueError(f"a complex moment ({value.dtype}) for a real parameter ({dtype}).")
  cast = value.astype(dtype)
  if round_up and cast.dtype != value.dtype and not jnp.iscomplexobj(value):
    low = cast.astype(value.dtype) < value
    cast = np.where(low, np.nextafter(cast, np.asarray(np.inf, dtype)), cast)
  return cast


def placed(value: np.ndarray, template: Any) -> jax.Array:
  """``value`` on the devices, and with the sharding, of the array it replaces."""
  sharding = getattr(template, "sharding", None)
  return jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)


def to_optax(
  tx: optax.GradientTransformation,
  params: Any,
  convert: Convert,
  named: NamedState,
  full_like: FullLike,
  framework: str,
) -> optax.OptState:
  """``tx``'s state holding ``named``: every moment through ``convert``, every step counter
  at its group's step. Nothing is changed when it raises."""
  template = tx.init(params)
  check_blockwise_rules(tx, template)
  if not named.names:  # A framework optimizer that has not stepped: nothing to carry.
    return template
  moments = {field: converted(convert, getattr(named, field), params, field) for field in MOMENTS}
  for field in MOMENTS:
    for (path, _), array in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], moments[field], strict=True
    ):
      if not is_inexact(array):
        raise ValueError(
          f"the {field} of {_shown(_path_key(path))} is {array.dtype} after convert; it must be floating."
        )
  values = {name: float(group) for name, group in named.groups.items()}
  groups = marks(convert, named.mu, values, params, full_like, "parameter group")
  if not amsgrad_states(template):
    raise ValueError("tx's state holds no ScaleByAmsgradState: tx is not an AMSGrad optimizer.")
  filler = _Filler(moments, groups, named.steps, jax.tree.structure(params))
  state = filler.fill(template, named.steps[0] if len(set(named.steps)) == 1 else None)
  uncovered = [
    _shown(_path_key(path))
    for (path, _), covered in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], filler.covered, strict=True
    )
    if not covered
  ]
  if uncovered:
    raise ValueError(f"no AMSGrad state of tx updates {uncovered}, which have {framework} state.")
  return state


def from_optax(
  tx: optax.GradientTransformation, opt_state: optax.OptState, convert_back: ConvertBack
) -> NamedState:
  """The :class:`NamedState` of ``tx``'s ``opt_state``, through ``convert_back``.

  Each :class:`ScaleByAmsgradState` found (in walking order) is a parameter group.
  """
  check_blockwise_rules(tx, opt_state)
  states = [decoded(state) for state in amsgrad_states(opt_state)]
  if not states:
    raise ValueError("the optimizer state holds no ScaleByAmsgradState: it is not AMSGrad's.")
  treedef = jax.tree.structure(states[0].mu, is_leaf=_is_masked)
  columns = {
    field: [_moment_leaves(state, field, treedef) for state in states] for field in MOMENTS
  }
  owners = []
  for index in range(len(columns["mu"][0])):
    owning = [group for group, leaves in enumerate(columns["mu"]) if not _is_masked(leaves[index])]
    if len(owning) != 1:
      raise ValueError(
        f"leaf {index} of the parameters is updated by {len(owning)} AMSGrad states of the "
        "optimizer; the conversion needs exactly one."
      )
    owners.append(owning[0])
  trees = {
    field: jax.tree.unflatten(
      treedef, [columns[field][owner][index] for index, owner in enumerate(owners)]
    )
    for field in MOMENTS
  }
  by_name = {field: _by_name(convert_back, trees[field], field) for field in MOMENTS}
  names = tuple(by_name["mu"])
  for field in MOMENTS[1:]:
    if tuple(by_name[field]) != names:
      raise ValueError(f"convert_back gives different names for mu and {field}.")
  # Each leaf full of its group's index, laid out by convert_back as the weights are.
  marked = [jnp.full_like(columns["mu"][owner][index], owner) for index, owner in enumerate(owners)]
  group_tree = jax.tree.unflatten(treedef, marked)
  group_arrays = _by_name(convert_back, group_tree, "parameter group")
  groups = {}
  for name in names:
    flat = np.ravel(to_numpy(group_arrays[name]).real.astype(np.float64))
    if flat.size and not np.all(flat == flat[0]):
      raise ValueError(f"convert_back makes {name!r} out of leaves of different parameter groups.")
    groups[name] = int(flat[0]) if flat.size else 0
  steps = tuple(int(state.count) for state in states)
  return NamedState(names=names, groups=groups, steps=steps, **by_name)


def _by_name(convert_back: ConvertBack, tree: Any, what: str) -> dict[str, Any]:
  try:
    result = convert_back(tree)
  except Exception as error:
    error.add_note(
      f"amsgrad_jax.interop: raised by convert_back on the {what}, a tree shaped like the parameters"
    )
    raise
  if not isinstance(result, Mapping):
    raise TypeError(
      f"convert_back must return a mapping {{name: array}}, got {type(result).__name__}."
    )
  return dict(result)
