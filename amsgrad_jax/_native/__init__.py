"""The native CPU training step: the kernel, its build, its loader and ``apply_step``."""

from amsgrad_jax._native._apply_step import NativeStatus, apply_step, native_status

__all__ = ["NativeStatus", "apply_step", "native_status"]
