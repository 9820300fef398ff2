"""``scale_by_amsgrad``: the AMSGrad gradient transformation and its state."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from amsgrad_jax import _blockwise, _numerics, _rounding, _validation
from amsgrad_jax._blockwise import Blockwise8
from amsgrad_jax._flat import FlatLayout, FlatMoment, flat_zeros
from amsgrad_jax._options import TransformOptions, built_from
from amsgrad_jax._rules import Coefficients, Rule, amsgrad_step, scaled

# The attribute of scale_by_amsgrad's update function that holds its options.
OPTIONS_ATTRIBUTE = "amsgrad_jax_transform_options"


class ScaleByAmsgradState(NamedTuple):
  """State of :func:`scale_by_amsgrad`.

  Attributes:
    count: int32 scalar, the number of steps taken (saturates at the int32 maximum).
    mu: first moment ``m_t``, shaped like the parameters, stored in ``mu_dtype``.
    nu: second moment ``v_t`` (never bias-corrected), stored in ``nu_dtype``.
    nu_max: the running maximum of the rule's second moment, stored in ``nu_dtype``
      and rounded up when that is narrower than the arithmetic.

  With ``flat_state=True``, ``mu``, ``nu`` and ``nu_max`` are each a
  :class:`~amsgrad_jax.FlatMoment` (one 1-D buffer per parameter dtype) instead of a tree
  shaped like the parameters.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as Optax's states do
  mu: optax.Updates
  nu: optax.Updates
  nu_max: optax.Updates


class StepScalars(NamedTuple):
  """Everything a step needs besides the buffers, in one real dtype."""

  b1: jax.Array
  b2: jax.Array
  one_minus_b1: jax.Array
  one_minus_b2: jax.Array
  eps: jax.Array
  eps_root: jax.Array
  coefficients: Coefficients
  nu_unscale_before: jax.Array | float  # 1 / a of the step before (decodes a blockwise8 nu)


def step_scalars(options: TransformOptions, count: jax.Array, dtype: Any) -> StepScalars:
  """Cast the hyperparameters to ``dtype`` and derive the rule's coefficients once."""
  rule = options.rule
  bc1, bc2 = _numerics.bias_corrections(
    options.b1, options.b2, count, dtype, from_double=rule.bias_correction_from_double
  )
  before = rule.coefficients(
    *_numerics.bias_corrections(
      options.b1, options.b2, count - 1, dtype, from_double=rule.bias_correction_from_double
    )
  ).nu_scale
  return StepScalars(
    nu_unscale_before=1.0 if isinstance(before, float) and before == 1.0 else 1.0 / before,
    b1=jnp.asarray(options.b1, dtype),
    b2=jnp.asarray(options.b2, dtype),
    one_minus_b1=_numerics.one_minus(options.b1, dtype),
    one_minus_b2=_numerics.one_minus(options.b2, dtype),
    eps=jnp.asarray(options.eps, dtype),
    eps_root=jnp.asarray(options.eps_root, dtype),
    coefficients=rule.coefficients(bc1, bc2),
  )


def _moments_and_step(
  gs: list[jax.Array], mus: list[jax.Array], nu: jax.Array, nu_max: jax.Array, s: StepScalars
) -> tuple[list[jax.Array], list[jax.Array], jax.Array, jax.Array]:
  """One leaf in real compute precision: returns ``(updates, mus, nu, nu_max)``.

  ``gs`` and ``mus`` hold one real array, or the real and imaginary parts of a
  complex one that shares a single second moment ``|g|^2 = re^2 + im^2``.
  """
  mus = [s.b1 * mu + s.one_minus_b1 * g for g, mu in zip(gs, mus, strict=True)]
  nu = s.b2 * nu + s.one_minus_b2 * sum(g * g for g in gs)
  steps = [amsgrad_step(mu, nu, nu_max, s.coefficients, s.eps, s.eps_root) for mu in mus]
  return [update for _, update in steps], mus, nu, steps[0][0]


def leaf_update(
  g: jax.Array,
  mu: jax.Array,
  nu: jax.Array,
  nu_max: jax.Array,
  rule: Rule,
  scalars_for: Any,
  state_bits: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Update one leaf; results come back in the gradient's and the state's dtypes.

  Complex leaves are computed on their real and imaginary parts: as two
  independent reals when ``rule.complex_as_pairs`` (PyTorch's ``view_as_real``),
  else with one shared ``|g|^2`` moment kept in the real part of ``nu``.
  """
  if any(_blockwise.is_blockwise(x) for x in (mu, nu, nu_max)):
    return _blockwise_leaf_update(g, mu, nu, nu_max, scalars_for, state_bits)
  dtype = _numerics.real_dtype(_numerics.compute_dtype(g.dtype, mu.dtype, nu.dtype, nu_max.dtype))
  s = scalars_for(dtype)
  if not jnp.iscomplexobj(g):
    (update,), (mu_c,), nu_c, nu_max_c = _moments_and_step(
      [g.astype(dtype)], [mu.astype(dtype)], nu.astype(dtype), nu_max.astype(dtype), s
    )
  else:
    gs, mus = _parts(g, dtype), _parts(mu, dtype)
    if rule.complex_as_pairs:
      pairs = [
        _moments_and_step([g_i], [mu_i], nu_i, nu_max_i, s)
        for g_i, mu_i, nu_i, nu_max_i in zip(
          gs, mus, _parts(nu, dtype), _parts(nu_max, dtype), strict=True
        )
      ]
      updates = [update for (update,), *_ in pairs]
      mus = [mu_i for _, (mu_i,), *_ in pairs]
      (_, _, nu_re, nu_max_re), (_, _, nu_im, nu_max_im) = pairs
      nu_c, nu_max_c = jax.lax.complex(nu_re, nu_im), jax.lax.complex(nu_max_re, nu_max_im)
    else:
      updates, mus, nu_r, nu_max_r = _moments_and_step(
        gs, mus, nu.real.astype(dtype), nu_max.real.astype(dtype), s
      )
      nu_c, nu_max_c = (jax.lax.complex(x, jnp.zeros_like(x)) for x in (nu_r, nu_max_r))
    update, mu_c = jax.lax.complex(*updates), jax.lax.complex(*mus)
  return (
    update.astype(g.dtype),
    _store(mu_c, mu.dtype, state_bits, g.shape, moment=0),
    _store(nu_c, nu.dtype, state_bits, g.shape, moment=1),
    _numerics.cast_rounding_up(nu_max_c, nu_max.dtype),
  )


def _store(value: jax.Array, dtype: Any, state_bits: Any, shape: Any, moment: int) -> jax.Array:
  """``value`` (float32) stored as a narrow float ``dtype``: stochastically when
  ``state_bits`` (``shape -> uint32 bits``) is given, else (and for every other dtype) to
  nearest. bfloat16 rounding takes 16 random bits: ``mu`` the low half, ``nu`` the high
  half of one hash; float16 takes 24, so ``nu``'s are hashed once more."""
  narrow = np.dtype(dtype) in _rounding.NARROW_DTYPES and value.dtype == jnp.float32
  if state_bits is None or not narrow:
    return value.astype(dtype)
  bits = state_bits(shape)
  if moment == 1:
    bits = bits >> 16 if np.dtype(dtype) == np.dtype(jnp.bfloat16) else _rounding.mix(bits)
  return _rounding.stochastic_round(value, dtype, bits)


def _blockwise_leaf_update(
  g: jax.Array, mu: Any, nu: Any, nu_max: Any, scalars_for: Any, state_bits: Any
) -> tuple[jax.Array, Any, Any, Any]:
  """:func:`leaf_update` where a moment is stored in :func:`~amsgrad_jax.blockwise8`:
  float32 arithmetic on the decoded values; ``mu`` rounded stochastically with the random
  bits' low 16 bits (to nearest when ``state_bits`` is ``None``), so that its moving
  average keeps the small steps a 3-bit mantissa would round away; the running maximum
  rounded up; ``nu`` stored relative to the new maximum, rounded with the high 16 bits
  (see :mod:`amsgrad_jax._blockwise`)."""
  bits = None if state_bits is None else state_bits(g.shape)
  widths = [x.dtype for x in (g, mu, nu, nu_max) if not _blockwise.is_blockwise(x)]
  dtype = _numerics.compute_dtype(*widths)
  s = scalars_for(dtype)

  def load(x: Any) -> jax.Array:
    return _blockwise.dequantize(x).astype(dtype) if _blockwise.is_blockwise(x) else x.astype(dtype)

  def store(value: jax.Array, like: Any, upward: bool, random: jax.Array | None = None) -> Any:
    if not _blockwise.is_blockwise(like):
      return _numerics.cast_rounding_up(value, like.dtype) if upward else value.astype(like.dtype)
    narrow = _numerics.cast_rounding_up(value, jnp.float32) if upward else value.astype(jnp.float32)
    return _blockwise.quantize(narrow, like.block_size, like.kind, upward, random)

  nu_max_before = load(nu_max)
  relative = _blockwise.is_blockwise(nu)
  if relative:
    nu_before = _blockwise.dequantize_nu(
      nu, nu_max_before.astype(jnp.float32), s.nu_unscale_before
    ).astype(dtype)
  else:
    nu_before = nu.astype(dtype)
  (update,), (mu_c,), nu_c, nu_max_c = _moments_and_step(
    [g.astype(dtype)], [load(mu)], nu_before, nu_max_before, s
  )
  new_nu_max = store(nu_max_c, nu_max, upward=True)
  nu_bits = None if bits is None else bits >> 16
  if relative:
    scaled_nu = scaled(s.coefficients.nu_scale, nu_c)
    new_nu = _blockwise.quantize_nu(
      scaled_nu.astype(jnp.float32), _blockwise.dequantize(new_nu_max), nu.block_size, nu_bits
    )
  else:
    new_nu = store(nu_c, nu, upward=False, random=nu_bits)
  return (update.astype(g.dtype), store(mu_c, mu, upward=False, random=bits), new_nu, new_nu_max)


def _parts(x: jax.Array, dtype: Any) -> list[jax.Array]:
  """The real and imaginary parts of a complex ``x``, cast to the real ``dtype``."""
  return [jnp.real(x).astype(dtype), jnp.imag(x).astype(dtype)]


@built_from(TransformOptions)
def scale_by_amsgrad(options: TransformOptions) -> optax.GradientTransformation:
  r"""Rescale updates by AMSGrad, with the update rule of a chosen framework.

  With :math:`t` the step count after increment, :math:`c_1 = 1 - \beta_1^t`
  and :math:`c_2 = 1 - \beta_2^t`, every rule keeps

  .. math::

    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2

  and differs in the running maximum :math:`\hat v_t` and the update
  :math:`u_t` (:math:`\epsilon_r` is ``eps_root``):

  ============  ========================================  =====================================================================
  convention    :math:`\hat v_t`                          :math:`u_t`
  ============  ========================================  =====================================================================
  ``pytorch``   :math:`\max(\hat v_{t-1}, v_t)`           :math:`\dfrac{m_t / c_1}{\sqrt{\hat v_t+\epsilon_r}/\sqrt{c_2}+\epsilon}`
  ``keras``     :math:`\max(\hat v_{t-1}, v_t)`           :math:`\dfrac{\sqrt{c_2}}{c_1}\dfrac{m_t}{\sqrt{\hat v_t+\epsilon_r}+\epsilon}`
  ``optax``     :math:`\max(\hat v_{t-1}, v_t / c_2)`     :math:`\dfrac{m_t / c_1}{\sqrt{\hat v_t+\epsilon_r}+\epsilon}`
  ``paper``     :math:`\max(\hat v_{t-1}, v_t)`           :math:`\dfrac{m_t}{\sqrt{\hat v_t+\epsilon_r}+\epsilon}`
  ============  ========================================  =====================================================================

  ``pytorch`` is ``torch.optim.Adam(amsgrad=True)``, ``keras`` is
  ``keras.optimizers.Adam(amsgrad=True)`` (and TensorFlow 2's tf.keras), ``optax`` is
  ``optax.amsgrad``, ``paper`` is Algorithm 2 of Reddi et al. (2018).
  ``eps_root`` is added to the stored maximum :math:`\hat v_t` under the square
  root in every rule. Complex parameters: ``pytorch`` and ``keras`` treat the
  real and imaginary parts as two independent reals (PyTorch's
  ``view_as_real``); ``optax`` and ``paper`` use :math:`|g|^2`.

  The result is the step direction; chain it with a negative scale (or use
  :func:`amsgrad`) to get an optimizer.

  Args:
    {args}

  Returns:
    An :class:`optax.GradientTransformation` whose state is a
    :class:`ScaleByAmsgradState`.

  Raises:
    ValueError: for a concrete hyperparameter out of range or an unknown convention.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from amsgrad_jax import scale_by_amsgrad
    >>> tx = optax.chain(scale_by_amsgrad(), optax.scale(-1e-2))
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.array([0.5, -0.5])}, state)
    >>> optax.apply_updates(params, updates)["w"]
    Array([ 0.99, -1.99], dtype=float32)

  References:
    Reddi, Kale & Kumar, `On the Convergence of Adam and Beyond
    <https://openreview.net/forum?id=ryQu7f-RZ>`_, ICLR 2018.
  """
  return transformation(options)


def transformation(options: TransformOptions) -> optax.GradientTransformation:
  """:func:`scale_by_amsgrad` built from a checked record (the aliases pass theirs)."""
  rule = options.rule
  mu_dtype, nu_dtype = options.mu_dtype, options.nu_dtype

  def init_fn(params: optax.Params) -> ScaleByAmsgradState:
    _validation.check_float_leaves(params, "parameters")
    if options.flat_state:
      return _flat_init(params, mu_dtype, nu_dtype)

    def zeros(dtype: Any, kind: str) -> optax.Updates:
      def leaf(p: Any) -> Any:
        stored = _numerics.state_dtype(_numerics.leaf_dtype(p), dtype)
        if isinstance(stored, Blockwise8):
          return _blockwise.zeros_like_param(p, stored.block_size, kind)
        return _numerics.zeros_like_param(p, stored)

      return jax.tree.map(leaf, params)

    return ScaleByAmsgradState(
      count=jnp.zeros([], jnp.int32),
      mu=zeros(mu_dtype, "mu"),
      nu=zeros(nu_dtype, "nu"),
      nu_max=zeros(nu_dtype, "nu_max"),
    )

  def update_fn(
    updates: optax.Updates, state: ScaleByAmsgradState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, ScaleByAmsgradState]:
    del params
    _validation.check_initialised(state, "scale_by_amsgrad's update")
    state = with_blockwise_moments(state, options)
    flat = isinstance(state.mu, FlatMoment)
    if not flat:
      _validation.check_same_structure(updates, _blockwise.shapes_of(state.mu))
    elif not state.mu.layout.covers(updates):  # then the trees or the shapes differ
      _validation.check_same_structure(updates, state.mu.layout.template())
    _validation.check_float_leaves(updates, "gradients")
    count = _numerics.safe_increment(state.count)
    cache: dict[Any, StepScalars] = {}

    def scalars_for(dtype: Any) -> StepScalars:
      if dtype not in cache:
        cache[dtype] = step_scalars(options, count, dtype)
      return cache[dtype]

    grads, treedef = jax.tree.flatten(updates)
    # Python scalars and NumPy float64 arrays (without x64) become the arrays JAX makes of them.
    grads = [jnp.asarray(g) for g in grads]
    moments = (state.mu, state.nu, state.nu_max)
    buffers = (m.leaves() if flat else _blockwise.moment_leaves(m) for m in moments)
    key = _rounding.step_key(options.rounding_seed, count)

    def state_bits(index: int, blockwise: bool) -> Any:
      stochastic = options.state_rounding or ("stochastic" if blockwise else "nearest")
      if stochastic != "stochastic":
        return None
      return lambda shape: _rounding.moment_bits(key, index, shape)

    results = [
      leaf_update(
        g,
        mu,
        nu,
        nu_max,
        rule,
        scalars_for,
        state_bits(index, any(_blockwise.is_blockwise(m) for m in (mu, nu))),
      )
      for index, (g, mu, nu, nu_max) in enumerate(zip(grads, *buffers, strict=True))
    ]
    columns = [[result[i] for result in results] for i in range(4)]
    if flat:
      mu, nu, nu_max = (FlatMoment.pack(state.mu.layout, column) for column in columns[1:])
    else:
      mu, nu, nu_max = (jax.tree.unflatten(treedef, column) for column in columns[1:])
    new_state = ScaleByAmsgradState(count=count, mu=mu, nu=nu, nu_max=nu_max)
    return jax.tree.unflatten(treedef, columns[0]), new_state

  setattr(update_fn, OPTIONS_ATTRIBUTE, options)  # how convert_state finds the rule
  return optax.GradientTransformation(init_fn, update_fn)


def with_blockwise_moments(state: Any, options: TransformOptions) -> Any:
  """``state`` with its :func:`~amsgrad_jax.blockwise8` moments restored where a framework
  handed them back as plain mappings of their arrays (see :func:`_blockwise.rewrapped`)."""
  if not isinstance(state, ScaleByAmsgradState) or isinstance(state.mu, FlatMoment):
    return state
  return state._replace(
    mu=_blockwise.rewrapped(state.mu, options.mu_dtype, "mu"),
    nu=_blockwise.rewrapped(state.nu, options.nu_dtype, "nu"),
    nu_max=_blockwise.rewrapped(state.nu_max, options.nu_dtype, "nu_max"),
  )


def _flat_init(params: optax.Params, mu_dtype: Any, nu_dtype: Any) -> ScaleByAmsgradState:
  """Zero state in the flat layout: one buffer per parameter dtype and moment."""
  leaves, treedef = jax.tree.flatten(params)
  dtypes = [_numerics.leaf_dtype(leaf) for leaf in leaves]
  layout = FlatLayout.of(leaves, treedef, dtypes)
  by_group = {dtype.name: dtype for dtype in dtypes}

  def zeros(requested: Any, kind: str) -> FlatMoment:
    stored = {name: _numerics.state_dtype(dtype, requested) for name, dtype in by_group.items()}
    return flat_zeros(layout, stored, kind)

  return ScaleByAmsgradState(
    count=jnp.zeros([], jnp.int32),
    mu=zeros(mu_dtype, "mu"),
    nu=zeros(nu_dtype, "nu"),
    nu_max=zeros(nu_dtype, "nu_max"),
  )
