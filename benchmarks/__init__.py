"""Benchmarks of one AMSGrad update, and of the MLP example's training loop.

``make bench`` (``python -m benchmarks``) times each contender of
:mod:`~benchmarks.contenders` in its own process, the processes alternating over rounds
(:mod:`~benchmarks.driver`, :mod:`~benchmarks.worker`), on the cases of
:mod:`~benchmarks.cases`, each step case also against the memory-bandwidth limit
measured in the same process (:mod:`~benchmarks.limit`); it writes the results as JSON
and one markdown table into ``docs/_static`` (:mod:`~benchmarks.results`).

``make gpu-check`` (``python -m gpucheck``) is the check for a machine with an
NVIDIA GPU: the test suite, the examples and the update step there (:mod:`gpucheck`).
"""
