"""Move a PyTorch or Keras AMSGrad run to JAX mid-flight, and back, with the same numbers.

- The optimizer from the framework's hyperparameters: :func:`optimizer_from_torch`,
  :func:`optimizer_from_keras`.
- Its state, both ways, through the user's own weights converter:
  :func:`state_from_torch`, :func:`state_to_torch`, :func:`state_from_keras`,
  :func:`state_to_keras`.
- The frameworks' gradient clipping: :func:`torch_clip_grad_norm`,
  :func:`keras_clipnorm`, :func:`keras_global_clipnorm`.
- Their learning-rate schedules, as Optax schedules of the step count: ``torch_*`` and
  ``keras_*``, and :func:`schedule_from_torch`, :func:`schedule_from_keras` to read a
  scheduler object.

Neither PyTorch nor Keras is imported by this package (``state_to_torch`` imports PyTorch
to make tensors): the functions read the frameworks' objects by their attributes, and a
PyTorch state dict of NumPy arrays converts without PyTorch installed.
"""

from amsgrad_jax.interop._clipping import (
  keras_clipnorm,
  keras_global_clipnorm,
  torch_clip_grad_norm,
)
from amsgrad_jax.interop._keras import optimizer_from_keras, state_from_keras, state_to_keras
from amsgrad_jax.interop._keras_schedules import (
  keras_cosine_decay,
  keras_exponential_decay,
  keras_piecewise_constant_decay,
  schedule_from_keras,
)
from amsgrad_jax.interop._torch import optimizer_from_torch, state_from_torch, state_to_torch
from amsgrad_jax.interop._torch_schedules import (
  schedule_from_torch,
  torch_cosine_annealing_lr,
  torch_exponential_lr,
  torch_linear_lr,
  torch_multistep_lr,
  torch_one_cycle_lr,
  torch_one_cycle_momentum,
  torch_step_lr,
)

__all__ = [
  "keras_clipnorm",
  "keras_cosine_decay",
  "keras_exponential_decay",
  "keras_global_clipnorm",
  "keras_piecewise_constant_decay",
  "optimizer_from_keras",
  "optimizer_from_torch",
  "schedule_from_keras",
  "schedule_from_torch",
  "state_from_keras",
  "state_from_torch",
  "state_to_keras",
  "state_to_torch",
  "torch_clip_grad_norm",
  "torch_cosine_annealing_lr",
  "torch_exponential_lr",
  "torch_linear_lr",
  "torch_multistep_lr",
  "torch_one_cycle_lr",
  "torch_one_cycle_momentum",
  "torch_step_lr",
]
