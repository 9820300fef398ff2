"""``amsgrad`` and ``amsgradw``: complete optimizers built from Optax pieces."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import optax

from amsgrad_jax import _validation
from amsgrad_jax._transform import scale_by_amsgrad


@dataclass(frozen=True, eq=False)
class AliasSpec:
  """The hyperparameters :func:`amsgrad` or :func:`amsgradw` was built with.

  :func:`amsgrad_jax.apply_step` reads it to run the whole step natively; every other
  use of the transformation ignores it.

  Attributes:
    decoupled: ``False`` for :func:`amsgrad` (weight decay added to the gradient
      before the moments), ``True`` for :func:`amsgradw` (added to the update).
    mask: :func:`amsgradw`'s decay mask (``None`` for :func:`amsgrad`).
  """

  learning_rate: optax.ScalarOrSchedule
  b1: Any
  b2: Any
  eps: Any
  eps_root: Any
  convention: str
  weight_decay: Any
  decoupled: bool
  mask: Any = None


class AliasTransformation(optax.GradientTransformationExtraArgs):
  """A plain :class:`optax.GradientTransformationExtraArgs` that also carries ``spec``.

  It is the ``(init, update)`` pair for every Optax use; ``spec`` is an attribute, not a
  field, so a copy made through ``_replace`` or pickling simply has ``spec = None``.
  """

  spec: AliasSpec | None

  def __new__(cls, init: Any, update: Any, spec: AliasSpec | None = None) -> AliasTransformation:
    transformation = super().__new__(cls, init, update)
    transformation.spec = spec
    return transformation


def _is_zero(value: Any) -> bool:
  number = _validation.concrete_float(value)
  return number is not None and number == 0.0


def _gradients_checked(decay: optax.GradientTransformation) -> optax.GradientTransformation:
  """``decay``, checking first that the gradients match the parameters and are floating.

  ``add_decayed_weights`` maps over gradients and parameters together, so in front of
  :func:`scale_by_amsgrad` a mismatched gradient tree would otherwise fail inside
  ``jax.tree.map`` before the transform could name the mismatch. The state is
  ``decay``'s own, so the chain's layout does not change.
  """

  def update_fn(
    updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, optax.OptState]:
    if params is not None:
      _validation.check_same_structure(updates, params, against="parameters")
    _validation.check_float_leaves(updates, "gradients")
    return decay.update(updates, state, params)

  return optax.GradientTransformation(decay.init, update_fn)


def amsgrad(
  learning_rate: optax.ScalarOrSchedule,
  b1: float | jax.Array = 0.9,
  b2: float | jax.Array = 0.999,
  eps: float | jax.Array = 1e-8,
  eps_root: float | jax.Array = 0.0,
  *,
  convention: str = "pytorch",
  weight_decay: float | jax.Array = 0.0,
  mu_dtype: Any = None,
  nu_dtype: Any = None,
  flat_state: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""AMSGrad, with optional coupled (L2) weight decay.

  The step is :math:`\theta_t = \theta_{t-1} - \eta_t u_t`, with :math:`u_t`
  from :func:`scale_by_amsgrad` applied to :math:`g_t + \lambda \theta_{t-1}`:
  ``weight_decay`` (:math:`\lambda`) is added to the gradient *before* the
  moments, exactly as ``torch.optim.Adam(weight_decay=...)`` does.

  Args:
    learning_rate: a float ``>= 0`` or an Optax schedule ``count -> rate``.
    b1: decay rate of the first moment, in ``[0, 1)``.
    b2: decay rate of the second moment, in ``[0, 1)``.
    eps: added to the denominator outside the square root.
    eps_root: added to the running maximum inside the square root.
    convention: ``"pytorch"`` (default), ``"keras"``, ``"optax"`` or ``"paper"``;
      see :func:`scale_by_amsgrad`.
    weight_decay: coupled L2 coefficient :math:`\lambda \ge 0`.
    mu_dtype: storage dtype of the first moment (default: the parameter's).
    nu_dtype: storage dtype of the second moment and its maximum.
    flat_state: keep each moment as one 1-D buffer per parameter dtype instead of one
      array per leaf: the same numbers, far fewer arrays for a jitted step to pass on
      models of many small leaves; see :func:`scale_by_amsgrad`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from amsgrad_jax import amsgrad
    >>> tx = amsgrad(learning_rate=0.1)
    >>> params = jnp.array([1.0, 2.0])
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jnp.array([1.0, -1.0]), state, params)
    >>> optax.apply_updates(params, updates)
    Array([0.9, 2.1], dtype=float32)

  References:
    Reddi, Kale & Kumar, `On the Convergence of Adam and Beyond
    <https://openreview.net/forum?id=ryQu7f-RZ>`_, ICLR 2018.
  """
  _validation.check_learning_rate(learning_rate)
  _validation.check_weight_decay(weight_decay)
  # identity() keeps the chain's state layout when the decay is a concrete zero, so a
  # state built with weight_decay=0.0 still matches one built under inject_hyperparams.
  decay = (
    optax.identity()
    if _is_zero(weight_decay)
    else _gradients_checked(optax.add_decayed_weights(weight_decay))
  )
  chain = optax.chain(
    decay,
    scale_by_amsgrad(
      b1,
      b2,
      eps,
      eps_root,
      convention=convention,
      mu_dtype=mu_dtype,
      nu_dtype=nu_dtype,
      flat_state=flat_state,
    ),
    optax.scale_by_learning_rate(learning_rate),
  )
  spec = AliasSpec(learning_rate, b1, b2, eps, eps_root, convention, weight_decay, False)
  return AliasTransformation(chain.init, chain.update, spec)


def amsgradw(
  learning_rate: optax.ScalarOrSchedule,
  b1: float | jax.Array = 0.9,
  b2: float | jax.Array = 0.999,
  eps: float | jax.Array = 1e-8,
  eps_root: float | jax.Array = 0.0,
  weight_decay: float | jax.Array = 1e-2,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  *,
  convention: str = "pytorch",
  mu_dtype: Any = None,
  nu_dtype: Any = None,
  flat_state: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""AMSGrad with decoupled weight decay, as ``torch.optim.AdamW(amsgrad=True)``.

  .. math::

    \theta_t = \theta_{t-1} - \eta_t \left(u_t + \lambda \theta_{t-1}\right)
             = (1 - \eta_t \lambda)\,\theta_{t-1} - \eta_t u_t,

  with :math:`u_t` from :func:`scale_by_amsgrad` on the raw gradient: the decay
  never enters the moments (Loshchilov & Hutter, 2019).

  Args:
    learning_rate: a float ``>= 0`` or an Optax schedule ``count -> rate``.
    b1: decay rate of the first moment, in ``[0, 1)``.
    b2: decay rate of the second moment, in ``[0, 1)``.
    eps: added to the denominator outside the square root.
    eps_root: added to the running maximum inside the square root.
    weight_decay: decoupled decay coefficient :math:`\lambda \ge 0`.
    mask: a tree of booleans shaped like the parameters (or a function of the
      parameters returning one), ``True`` where decay applies, as in
      :func:`optax.adamw`.
    convention: ``"pytorch"`` (default), ``"keras"``, ``"optax"`` or ``"paper"``.
    mu_dtype: storage dtype of the first moment (default: the parameter's).
    nu_dtype: storage dtype of the second moment and its maximum.
    flat_state: keep each moment as one 1-D buffer per parameter dtype instead of one
      array per leaf: the same numbers, far fewer arrays for a jitted step to pass on
      models of many small leaves; see :func:`scale_by_amsgrad`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from amsgrad_jax import amsgradw
    >>> tx = amsgradw(learning_rate=0.1, weight_decay=0.5)
    >>> params = jnp.array([1.0, 2.0])
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jnp.array([1.0, -1.0]), state, params)
    >>> optax.apply_updates(params, updates)
    Array([0.85, 2. ], dtype=float32)

  References:
    Reddi, Kale & Kumar, `On the Convergence of Adam and Beyond
    <https://openreview.net/forum?id=ryQu7f-RZ>`_, ICLR 2018.

    Loshchilov & Hutter, `Decoupled Weight Decay Regularization
    <https://openreview.net/forum?id=Bkg6RiCqY7>`_, ICLR 2019.
  """
  _validation.check_learning_rate(learning_rate)
  _validation.check_weight_decay(weight_decay)
  chain = optax.chain(
    scale_by_amsgrad(
      b1,
      b2,
      eps,
      eps_root,
      convention=convention,
      mu_dtype=mu_dtype,
      nu_dtype=nu_dtype,
      flat_state=flat_state,
    ),
    optax.add_decayed_weights(weight_decay, mask),
    optax.scale_by_learning_rate(learning_rate),
  )
  spec = AliasSpec(learning_rate, b1, b2, eps, eps_root, convention, weight_decay, True, mask)
  return AliasTransformation(chain.init, chain.update, spec)
