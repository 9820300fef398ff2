"""AMSGrad for Optax, with the exact update rule of PyTorch, Keras, Optax or the paper.

Reddi, Kale & Kumar, "On the Convergence of Adam and Beyond", ICLR 2018.
"""

from amsgrad_jax._aliases import amsgrad, amsgradw
from amsgrad_jax._blockwise import Blockwise8, Blockwise8Array, blockwise8
from amsgrad_jax._convert import convert_state
from amsgrad_jax._flat import FlatLayout, FlatMoment
from amsgrad_jax._guard import skip_nonfinite
from amsgrad_jax._native import NativeFallbackWarning, NativeStatus, apply_step, native_status
from amsgrad_jax._rules import CONVENTIONS
from amsgrad_jax._transform import ScaleByAmsgradState, scale_by_amsgrad

__version__ = "0.1.0"

__all__ = [
  "CONVENTIONS",
  "Blockwise8",
  "Blockwise8Array",
  "FlatLayout",
  "FlatMoment",
  "NativeFallbackWarning",
  "NativeStatus",
  "ScaleByAmsgradState",
  "amsgrad",
  "amsgradw",
  "apply_step",
  "blockwise8",
  "convert_state",
  "native_status",
  "scale_by_amsgrad",
  "skip_nonfinite",
]
