"""Benchmarks of the AMSGrad update and of the MLP example's training loop.

``make bench`` (``python -m benchmarks``) races amsgrad_jax (every rule), optax.amsgrad,
optax.adam, ``torch.optim.Adam(amsgrad=True)`` in its fused, foreach and single-tensor
forms, and ``amsgrad_jax.apply_step`` when the package has it (with per-leaf and with
flat optimizer state), each in its own process, against the memory-bandwidth limit
measured in the same run (by stream.c in a process of its own, and for the native step and
PyTorch's fused step on one leaf also inside the step's process, on its own buffers); it prints the tables and
writes them, a JSON file and two plots into the docs. About 8 minutes on 2 CPU cores;
``--quick`` checks every code path in well under a minute.

Modules: :mod:`~benchmarks.config` (cases and sizes), :mod:`~benchmarks.contenders`,
:mod:`~benchmarks.driver` (rounds of processes), :mod:`~benchmarks.worker` with
:mod:`~benchmarks.jax_worker` and :mod:`~benchmarks.torch_worker`,
:mod:`~benchmarks.bandwidth` (``stream.c``), :mod:`~benchmarks.probe` (``probe.c``, the
in-process limit), :mod:`~benchmarks.hlo` (what XLA reports),
:mod:`~benchmarks.models`, :mod:`~benchmarks.report` and :mod:`~benchmarks.plots`.
"""
