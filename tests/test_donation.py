"""A jitted step with ``donate_argnums`` on the parameters and the state updates them in
place: every donated buffer is reused for its output, and the compiled step allocates
nothing of the parameters' size besides.

What ``memory_analysis()`` reports, and why each assertion is exact (XLA:CPU):

* ``alias_size_in_bytes``: bytes of the outputs that live in donated input buffers. The
  step returns new parameters and a new state of exactly the donated avals, so all of
  them alias: ``alias == nbytes(params) + nbytes(state)``.
* ``output_size_in_bytes``: all output buffers, aliased or not. On CPU the result tuple
  itself is one more buffer holding one 8-byte pointer per output leaf, so
  ``0 <= output - alias <= 8 * leaves``: any array output that did not alias would
  show up here (a parameter-sized one would be far above that bound).
* ``temp_size_in_bytes``: scratch space. With float32 state (arithmetic and storage in
  the same dtype, for float32 or bfloat16 parameters) XLA fuses the whole step into
  loops that read and write the donated buffers, so the scratch is a handful of
  scalars (count, bias corrections; measured 4 to 68 bytes): the test checks it is the
  same for a 64x larger model and below 1 KiB. Narrower state (bfloat16, float16) or
  complex leaves make XLA:CPU keep float32 intermediates and copies of the old moments
  today (measured: about one byte of scratch per donated byte for bfloat16, 0.75 for
  complex64), so for those only the aliasing is asserted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amsgrad_jax

POINTER_BYTES = 8


def nbytes(tree) -> int:
  return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def make_problem(dtype, rows: int):
  params = {
    "kernel": jnp.ones((rows, 128), dtype),
    "bias": jnp.ones((128,), dtype),
    "scale": jnp.ones((), dtype),
  }
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  return params, grads


def make_step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def memory(tx, dtype, rows: int, donate=(0, 1)):
  params, grads = make_problem(dtype, rows)
  state = tx.init(params)
  compiled = jax.jit(make_step(tx), donate_argnums=donate).lower(params, state, grads).compile()
  return compiled.memory_analysis(), params, state


OPTIMIZERS = {
  "amsgrad": lambda: amsgrad_jax.amsgrad(1e-3),
  "amsgrad_l2_keras": lambda: amsgrad_jax.amsgrad(1e-3, weight_decay=1e-4, convention="keras"),
  "amsgradw_optax": lambda: amsgrad_jax.amsgradw(1e-3, convention="optax"),
  "amsgrad_float32_state": lambda: amsgrad_jax.amsgrad(
    1e-3, mu_dtype=jnp.float32, nu_dtype=jnp.float32
  ),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.complex64])
def test_every_donated_buffer_is_aliased_to_an_output(name, dtype):
  analysis, params, state = memory(OPTIMIZERS[name](), dtype, rows=64)
  donated = nbytes(params) + nbytes(state)
  output_leaves = len(jax.tree.leaves((params, state)))
  assert analysis.alias_size_in_bytes == donated
  unaliased_output = analysis.output_size_in_bytes - analysis.alias_size_in_bytes
  assert unaliased_output in range(POINTER_BYTES * output_leaves + 1)


# float32 state: every optimizer on float32 parameters, and bfloat16 parameters whose
# state is kept in float32 (the update is rounded once, into the donated buffer).
FLOAT32_STATE_CASES = [(name, "float32") for name in OPTIMIZERS] + [
  ("amsgrad_float32_state", "bfloat16")
]


@pytest.mark.parametrize(("name", "dtype"), FLOAT32_STATE_CASES)
def test_float32_state_step_needs_no_scratch_that_grows_with_the_model(name, dtype):
  small, *_ = memory(OPTIMIZERS[name](), dtype, rows=8)
  large, params, _ = memory(OPTIMIZERS[name](), dtype, rows=512)
  assert large.temp_size_in_bytes == small.temp_size_in_bytes
  assert large.temp_size_in_bytes < 1024
  # The donated step's peak is its arguments plus the pointer table: no second copy
  # of the parameters or the state is ever live.
  unaliased_output = large.output_size_in_bytes - large.alias_size_in_bytes
  assert large.peak_memory_in_bytes <= (
    large.argument_size_in_bytes + unaliased_output + large.temp_size_in_bytes
  )
  assert large.peak_memory_in_bytes < large.argument_size_in_bytes + nbytes(params["kernel"])


def test_without_donation_the_outputs_are_fresh_buffers():
  """The control: the same analysis tells a donated step from one that is not."""
  analysis, params, state = memory(amsgrad_jax.amsgrad(1e-3), jnp.float32, rows=64, donate=())
  assert analysis.alias_size_in_bytes == 0
  assert analysis.output_size_in_bytes >= nbytes(params) + nbytes(state)


@pytest.mark.parametrize("convention", amsgrad_jax.CONVENTIONS)
def test_donated_step_writes_into_the_input_buffers(convention):
  tx = amsgrad_jax.amsgrad(1e-3, convention=convention)
  params, grads = make_problem(jnp.float32, rows=16)
  state = tx.init(params)
  expected_params, expected_state = jax.jit(make_step(tx))(params, state, grads)

  def pointers(tree):
    return sorted(leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(tree))

  before = pointers((params, state))
  step = jax.jit(make_step(tx), donate_argnums=(0, 1))
  new_params, new_state = step(params, state, grads)

  assert pointers((new_params, new_state)) == before
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves((params, state)))
  for got, want in zip(
    jax.tree.leaves((new_params, new_state)),
    jax.tree.leaves((expected_params, expected_state)),
    strict=True,
  ):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # and it goes on stepping in place
  again = step(new_params, new_state, grads)
  assert pointers(again) == before
