"""The options of every optimizer in this package, written down once.

Each public constructor is built from one frozen record: :func:`scale_by_amsgrad` from
:class:`TransformOptions`, :func:`amsgrad` from :class:`AmsgradOptions`,
:func:`amsgradw` from :class:`AmsgradwOptions`. A record's fields give the constructor
its signature (for type checkers through :data:`typing.ParamSpec`, for ``help`` and the
docs through ``__signature__``), its defaults, the checks of its arguments
(``__post_init__``) and the ``Args:`` section of its docstring (each field's ``doc``).
The transformation, the aliases, the native plan and the kernel's scalars all read the
same record, so a new option is one field here, plus what uses it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import textwrap
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar, ParamSpec, TypeVar

import jax
import optax

from amsgrad_jax import _numerics, _validation
from amsgrad_jax._rules import RULES, Rule

Options = TypeVar("Options")
Result = TypeVar("Result")
Signature = ParamSpec("Signature")


def option(default: Any = dataclasses.MISSING, *, doc: str) -> Any:
  """A record field with its default and the sentence the docstring shows for it."""
  return dataclasses.field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class _LearningRate:
  learning_rate: optax.ScalarOrSchedule = option(
    doc="a float ``>= 0`` or an Optax schedule ``count -> rate``."
  )


@dataclass(frozen=True)
class TransformOptions:
  """The options of :func:`~amsgrad_jax.scale_by_amsgrad`, checked when it is built.

  ``mu_dtype`` and ``nu_dtype`` are stored canonical (a NumPy dtype or ``None``).
  """

  b1: float | jax.Array = option(0.9, doc="decay rate of the first moment, in ``[0, 1)``.")
  b2: float | jax.Array = option(0.999, doc="decay rate of the second moment, in ``[0, 1)``.")
  eps: float | jax.Array = option(
    1e-8, doc="added to the denominator outside the square root, ``>= 0``."
  )
  eps_root: float | jax.Array = option(
    0.0, doc="added to the running maximum inside the square root, ``>= 0``."
  )
  _: KW_ONLY
  convention: str = option(
    "pytorch",
    doc='the update rule: ``"pytorch"`` (default), ``"keras"``, ``"optax"`` or ``"paper"``; '
    "see :func:`~amsgrad_jax.scale_by_amsgrad`.",
  )
  mu_dtype: Any = option(
    None, doc="storage dtype of the first moment; ``None`` keeps each parameter's dtype."
  )
  nu_dtype: Any = option(
    None,
    doc="storage dtype of the second moment and its running maximum; ``None`` keeps each "
    "parameter's dtype. Arithmetic is always done in at least float32, and the maximum is "
    "rounded up when stored narrower.",
  )
  flat_state: bool = option(
    False,
    doc="store each moment as one 1-D buffer per parameter dtype "
    "(:class:`~amsgrad_jax.FlatMoment`) instead of one array per leaf: the same numbers, "
    "three state arrays per dtype instead of three per leaf for a jitted step to pass, "
    "which pays on CPU for models of many small leaves. Keep the default for sharded "
    "models: a flat buffer cannot follow each parameter's sharding.",
  )

  state_rounding: str | None = option(
    None,
    doc='how ``mu`` and ``nu`` are stored when narrower than the arithmetic: ``"stochastic"`` '
    "(up or down at random, right in expectation, so that their moving averages do not "
    'stall on steps under half the storage\'s spacing) or ``"nearest"`` (as Optax casts). '
    'The default, ``None``, is ``"stochastic"`` for :func:`~amsgrad_jax.blockwise8` and '
    '``"nearest"`` for bfloat16 and float16. ``nu_max`` is always rounded up.',
  )
  rounding_seed: int = option(
    0,
    doc="the seed of every stochastic rounding: the moments stored with "
    ':func:`~amsgrad_jax.blockwise8` and, with ``param_rounding="stochastic"``, the '
    "parameters; an integer in ``[0, 2**32)``. With the step count it fixes every random "
    "bit, so a resumed run repeats them.",
  )

  def __post_init__(self) -> None:
    if self.state_rounding is not None:
      _validation.check_rounding(self.state_rounding, "state_rounding")
    _validation.check_seed(self.rounding_seed)
    _validation.check_hyperparameters(
      b1=self.b1, b2=self.b2, eps=self.eps, eps_root=self.eps_root, convention=self.convention
    )
    for name in ("mu_dtype", "nu_dtype"):
      canonical = _validation.canonical_state_dtype(name, getattr(self, name))
      object.__setattr__(self, name, canonical)
    _validation.check_flag("flat_state", self.flat_state)

  @property
  def rule(self) -> Rule:
    """The update rule ``convention`` names."""
    return RULES[self.convention]


@dataclass(frozen=True)
class AliasOptions(TransformOptions, _LearningRate):
  """What :func:`~amsgrad_jax.amsgrad` and :func:`~amsgrad_jax.amsgradw` share: the
  transformation's options, a learning rate and a weight decay."""

  decoupled: ClassVar[bool] = False
  _: KW_ONLY
  weight_decay: float | jax.Array = option(
    0.0,
    doc=r"coupled L2 coefficient :math:`\lambda \ge 0`, added to the gradient before the "
    "moments.",
  )

  param_rounding: str = option(
    "nearest",
    doc='how bfloat16 and float16 parameters take their step: ``"nearest"`` (as '
    '``optax.apply_updates``) or ``"stochastic"`` (up or down at random, in proportion '
    "to the distance, so that small steps are not lost; the update then needs ``params``). "
    "Wider parameters are unaffected.",
  )

  def __post_init__(self) -> None:
    _validation.check_learning_rate(self.learning_rate)
    _validation.check_weight_decay(self.weight_decay)
    _validation.check_rounding(self.param_rounding, "param_rounding")
    super().__post_init__()

  @property
  def decays(self) -> bool:
    """Whether weight decay can be nonzero (``False`` only for a concrete zero)."""
    number = _numerics.concrete_float(self.weight_decay)
    return number is None or number != 0.0


@dataclass(frozen=True)
class AmsgradOptions(AliasOptions):
  """The options of :func:`~amsgrad_jax.amsgrad`: coupled (L2) weight decay, keyword-only."""


@dataclass(frozen=True)
class AmsgradwOptions(AliasOptions):
  """The options of :func:`~amsgrad_jax.amsgradw`: decoupled weight decay, given by
  position after ``eps_root`` (as in ``optax.adamw``), with a mask."""

  decoupled: ClassVar[bool] = True
  weight_decay: float | jax.Array = option(
    1e-2, doc=r"decoupled decay coefficient :math:`\lambda \ge 0`."
  )
  mask: Any | Callable[[optax.Params], Any] | None = option(
    None,
    doc="a tree of booleans shaped like the parameters (or a function of the parameters "
    "returning one), ``True`` where decay applies, as in ``optax.adamw``.",
  )


def built_from(
  record: Callable[Signature, Options],
) -> Callable[[Callable[[Options], Result]], Callable[Signature, Result]]:
  """Make ``build(options)`` a constructor whose parameters are ``record``'s fields.

  The constructor's signature is the record's (so ``help``, the docs and
  ``optax.inject_hyperparams`` see every option by name), and the line ``{args}`` in
  ``build``'s docstring becomes one ``name: doc`` entry per field, in signature order.
  """

  def decorate(build: Callable[[Options], Result]) -> Callable[Signature, Result]:
    signature = inspect.signature(record).replace(
      return_annotation=inspect.signature(build).return_annotation
    )

    @functools.wraps(build)
    def constructor(*args: Signature.args, **kwargs: Signature.kwargs) -> Result:
      try:
        signature.bind(*args, **kwargs)
      except TypeError as error:
        raise TypeError(f"{build.__name__}(): {error}") from None
      return build(record(*args, **kwargs))

    constructor.__signature__ = signature  # type: ignore[attr-defined]
    constructor.__doc__ = _with_args(build.__doc__ or "", record, signature)
    return constructor

  return decorate


def _with_args(doc: str, record: Any, signature: inspect.Signature) -> str:
  """``doc`` with its ``{args}`` line replaced by the documented fields of ``record``."""
  docs = {f.name: f.metadata.get("doc") for f in dataclasses.fields(record)}
  lines = doc.splitlines()
  for index, line in enumerate(lines):
    if line.strip() == "{args}":
      indent = line[: len(line) - len(line.lstrip())]
      entries = []
      for name in signature.parameters:
        text = textwrap.wrap(f"{name}: {docs[name]}", 88 - len(indent))
        entries += [indent + text[0], *(indent + "  " + rest for rest in text[1:])]
      return "\n".join([*lines[:index], *entries, *lines[index + 1 :]])
  raise ValueError("the docstring has no {args} line")


def numeric(value: Any) -> bool:
  """Whether ``value`` is a plain Python number (not a bool, an array or a schedule)."""
  return isinstance(value, int | float) and not isinstance(value, bool)
