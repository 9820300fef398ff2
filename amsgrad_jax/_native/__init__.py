"""The native CPU training step.

``_interface`` defines the kernel's operands, scalars and codes (and generates the header
``amsgrad_step.cc`` includes); ``_build`` compiles it into a private cache; ``_loader``
loads, checks and registers it; ``_plan`` decides whether a step can run natively and why
not; ``_step`` is :func:`~amsgrad_jax.apply_step`; ``_sharding`` runs the kernel per shard.
"""

from amsgrad_jax._native._loader import NativeStatus
from amsgrad_jax._native._step import NativeFallbackWarning, apply_step, native_status

__all__ = ["NativeFallbackWarning", "NativeStatus", "apply_step", "native_status"]
