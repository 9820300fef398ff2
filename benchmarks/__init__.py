"""Benchmarks of the AMSGrad update and of the MLP example's training loop.

``make bench`` (``python -m benchmarks``) races amsgrad_jax (every rule), optax.amsgrad,
optax.adam, ``torch.optim.Adam(amsgrad=True)`` in its fused, foreach and single-tensor
forms, and ``amsgrad_jax.apply_step`` when the package has it, each in its own process,
against the memory-bandwidth limit measured in the same run; it prints the tables and
writes them, a JSON file and two plots into the docs. About 8 minutes on 2 CPU cores;
``--quick`` checks every code path in well under a minute.

Modules: :mod:`~benchmarks.config` (cases and sizes), :mod:`~benchmarks.contenders`,
:mod:`~benchmarks.driver` (rounds of processes), :mod:`~benchmarks.worker` with
:mod:`~benchmarks.jax_worker` and :mod:`~benchmarks.torch_worker`,
:mod:`~benchmarks.bandwidth` (``stream.c``), :mod:`~benchmarks.hlo` (what XLA reports),
:mod:`~benchmarks.models`, :mod:`~benchmarks.report` and :mod:`~benchmarks.plots`.
"""
