"""The four AMSGrad update rules.

Every rule updates the same two moments,

.. math::

    m_t = \\beta_1 m_{t-1} + (1 - \\beta_1) g_t, \\qquad
    v_t = \\beta_2 v_{t-1} + (1 - \\beta_2) g_t^2,

and differs only in where the bias corrections
:math:`c_1 = 1 - \\beta_1^t`, :math:`c_2 = 1 - \\beta_2^t` sit and what the
running maximum :math:`\\hat v_t` holds.  Each rule is therefore written as the
three scalars it feeds into one shared step,

.. math::

    \\hat v_t = \\max(\\hat v_{t-1},\\; a\\, v_t), \\qquad
    u_t = \\frac{b\\, m_t}{d\\, \\sqrt{\\hat v_t + \\epsilon_{root}} + \\epsilon},

so the rules can be read side by side, and the XLA path and the native kernel
share a single formula.  ``eps_root`` is always added to the *stored* running
maximum, under the square root.

References:
  Reddi, Kale & Kumar, "On the Convergence of Adam and Beyond", ICLR 2018.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Coefficients(NamedTuple):
  """The per-step scalars of one rule (see the module docstring).

  Attributes:
    nu_scale: ``a``, applied to ``v_t`` before it enters the running maximum.
    mu_scale: ``b``, applied to ``m_t`` in the numerator.
    root_scale: ``d``, applied to ``sqrt(nu_max + eps_root)`` in the denominator.
  """

  nu_scale: jax.Array | float
  mu_scale: jax.Array | float
  root_scale: jax.Array | float


def pytorch(bc1: jax.Array, bc2: jax.Array) -> Coefficients:
  """``torch.optim.Adam(amsgrad=True)`` and ``torch.optim.AdamW(amsgrad=True)``.

  ``nu_max = max(nu_max, v)``;  ``u = (m / c1) / (sqrt(nu_max) / sqrt(c2) + eps)``.
  """
  return Coefficients(nu_scale=1.0, mu_scale=1.0 / bc1, root_scale=jax.lax.rsqrt(bc2))


def keras(bc1: jax.Array, bc2: jax.Array) -> Coefficients:
  """``keras.optimizers.Adam(amsgrad=True)`` (Keras 3, and tf.keras in TensorFlow 2).

  ``nu_max = max(nu_max, v)``;  ``u = (sqrt(c2) / c1) * m / (sqrt(nu_max) + eps)``,
  so ``eps`` is the paper's "epsilon hat", added to the uncorrected root.
  """
  return Coefficients(nu_scale=1.0, mu_scale=jnp.sqrt(bc2) / bc1, root_scale=1.0)


def optax(bc1: jax.Array, bc2: jax.Array) -> Coefficients:
  """``optax.amsgrad`` with its defaults: bias-correct *before* the maximum.

  ``nu_max = max(nu_max, v / c2)``;  ``u = (m / c1) / (sqrt(nu_max) + eps)``.
  """
  return Coefficients(nu_scale=1.0 / bc2, mu_scale=1.0 / bc1, root_scale=1.0)


def paper(bc1: jax.Array, bc2: jax.Array) -> Coefficients:
  """Algorithm 2 of Reddi et al. (2018): no bias correction at all.

  ``nu_max = max(nu_max, v)``;  ``u = m / (sqrt(nu_max) + eps)``.
  """
  del bc1, bc2
  return Coefficients(nu_scale=1.0, mu_scale=1.0, root_scale=1.0)


@dataclass(frozen=True)
class Rule:
  """A named update rule.

  Attributes:
    name: the ``convention`` string that selects it.
    coefficients: maps the bias corrections ``(c1, c2)`` to :class:`Coefficients`.
    complex_as_pairs: whether a complex number is treated as two independent
      reals (PyTorch's ``view_as_real``), rather than through ``|g|^2`` (Optax).
    bias_correction_from_double: whether ``1 - b**t`` is formed from ``b`` in double
      precision (PyTorch, in Python floats) rather than from ``b`` rounded to the
      compute dtype (Keras and Optax); see ``_numerics.bias_corrections``.
    matches: the framework whose numbers the rule reproduces.
  """

  name: str
  coefficients: Callable[[jax.Array, jax.Array], Coefficients]
  complex_as_pairs: bool
  bias_correction_from_double: bool
  matches: str

  @property
  def maximum_of_raw_v(self) -> bool:
    """Whether the running maximum is of ``v_t`` itself (``a = 1`` at every step), so
    that an 8-bit ``nu``, stored against it, reads back without knowing the step."""
    half = jnp.asarray(0.5, jnp.float32)
    scale = self.coefficients(half, half).nu_scale
    return isinstance(scale, float) and scale == 1.0


RULES: dict[str, Rule] = {
  "pytorch": Rule("pytorch", pytorch, True, True, "torch.optim.Adam(amsgrad=True)"),
  "keras": Rule("keras", keras, True, False, "keras.optimizers.Adam(amsgrad=True), tf.keras"),
  "optax": Rule("optax", optax, False, False, "optax.amsgrad"),
  "paper": Rule("paper", paper, False, True, "Reddi et al. (2018), Algorithm 2"),
}
CONVENTIONS: tuple[str, ...] = tuple(RULES)


def amsgrad_step(
  mu: jax.Array,
  nu: jax.Array,
  nu_max: jax.Array,
  coefficients: Coefficients,
  eps: jax.Array,
  eps_root: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """The step every rule shares: returns ``(nu_max, update)``.

  ``mu`` may be complex while ``nu`` and ``nu_max`` are real (the ``|g|^2``
  treatment); all three are real for a rule that splits complex numbers.
  """
  a, b, d = coefficients
  if isinstance(a, float) and a == 1.0:
    # A lone ``maximum`` is compiled by XLA:CPU's older single-instruction emitter, whose
    # loop moves every vector through the stack; multiplying by a 1 that XLA cannot fold
    # makes it a fusion with a plain vectorised loop. ``a * nu == nu`` exactly.
    a = jax.lax.optimization_barrier(jnp.ones((), nu.dtype))
  nu_max = jnp.maximum(nu_max, a * nu)
  root = jnp.sqrt(nu_max + eps_root)
  return nu_max, scaled(b, mu) / (scaled(d, root) + eps)


def scaled(coefficient: Any, x: jax.Array) -> jax.Array:
  """``coefficient * x``, or ``x`` itself when the coefficient is the literal 1, so that
  a rule whose coefficient is 1 adds no operation to the step."""
  return x if isinstance(coefficient, float) and coefficient == 1.0 else coefficient * x
