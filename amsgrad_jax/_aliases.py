"""``amsgrad`` and ``amsgradw``: complete optimizers built from Optax pieces."""

from __future__ import annotations

from typing import Any

import optax

from amsgrad_jax import _rounding, _validation
from amsgrad_jax._options import (
  AliasOptions,
  AmsgradOptions,
  AmsgradwOptions,
  built_from,
)
from amsgrad_jax._transform import transformation

# The attribute of an alias's update function that holds its options (read by apply_step).
OPTIONS_ATTRIBUTE = "amsgrad_jax_options"


class AliasTransformation(optax.GradientTransformationExtraArgs):
  """A plain :class:`optax.GradientTransformationExtraArgs` that also carries ``options``.

  It is the ``(init, update)`` pair for every Optax use; :func:`amsgrad_jax.apply_step`
  reads ``options`` to run the whole step natively. ``options`` is an attribute, not a
  field, so a copy made through ``_replace`` or pickling simply has ``options = None``.
  """

  options: AliasOptions | None

  def __new__(
    cls, chain: optax.GradientTransformation, options: AliasOptions | None = None
  ) -> AliasTransformation:
    name = "amsgradw" if options is not None and options.decoupled else "amsgrad"

    stochastic = options is not None and options.param_rounding == "stochastic"

    def update_fn(
      updates: optax.Updates,
      state: optax.OptState,
      params: optax.Params | None = None,
      **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
      _validation.check_initialised(state, f"{name}'s update")
      if stochastic and params is None:
        raise ValueError(
          f'{name}(param_rounding="stochastic") rounds the new parameters, so its update '
          "needs them: call tx.update(grads, opt_state, params)."
        )
      updates, state = chain.update(updates, state, params, **extra_args)
      if stochastic:
        assert options is not None
        count = state[amsgrad_position(options)].count
        updates = _rounding.rounded_updates(params, updates, options.rounding_seed, count)
      return updates, state

    if options is not None:  # how apply_step finds the alias inside Optax's wrappers
      setattr(update_fn, OPTIONS_ATTRIBUTE, options)
    transformation = super().__new__(cls, chain.init, update_fn)
    transformation.options = options
    return transformation


def amsgrad_position(options: AliasOptions) -> int:
  """Where :func:`scale_by_amsgrad`'s state sits in an alias's chain state."""
  return 0 if options.decoupled else 1


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


@built_from(AmsgradOptions)
def amsgrad(options: AmsgradOptions) -> optax.GradientTransformationExtraArgs:
  r"""AMSGrad, with optional coupled (L2) weight decay.

  The step is :math:`\theta_t = \theta_{t-1} - \eta_t u_t`, with :math:`u_t`
  from :func:`scale_by_amsgrad` applied to :math:`g_t + \lambda \theta_{t-1}`:
  ``weight_decay`` (:math:`\lambda`) is added to the gradient *before* the
  moments, exactly as ``torch.optim.Adam(weight_decay=...)`` does.

  Args:
    {args}

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
  # identity() keeps the chain's state layout when the decay is a concrete zero, so a
  # state built with weight_decay=0.0 still matches one built under inject_hyperparams.
  decay = (
    _gradients_checked(optax.add_decayed_weights(options.weight_decay))
    if options.decays
    else optax.identity()
  )
  chain = optax.chain(
    decay,
    transformation(options),
    optax.scale_by_learning_rate(options.learning_rate),
  )
  return AliasTransformation(chain, options)


@built_from(AmsgradwOptions)
def amsgradw(options: AmsgradwOptions) -> optax.GradientTransformationExtraArgs:
  r"""AMSGrad with decoupled weight decay, as ``torch.optim.AdamW(amsgrad=True)``.

  .. math::

    \theta_t = \theta_{t-1} - \eta_t \left(u_t + \lambda \theta_{t-1}\right)
             = (1 - \eta_t \lambda)\,\theta_{t-1} - \eta_t u_t,

  with :math:`u_t` from :func:`scale_by_amsgrad` on the raw gradient: the decay
  never enters the moments (Loshchilov & Hutter, 2019).

  Args:
    {args}

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
  chain = optax.chain(
    transformation(options),
    optax.add_decayed_weights(options.weight_decay, options.mask),
    optax.scale_by_learning_rate(options.learning_rate),
  )
  return AliasTransformation(chain, options)
