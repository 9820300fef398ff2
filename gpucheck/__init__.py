"""``make gpu-check`` (``python -m gpucheck``): the test suite, the examples and the update
step on an NVIDIA GPU, in one command that installs nothing and needs no network.

It reuses the benchmark harness (:mod:`benchmarks`) for the contenders and their steps;
``--smoke`` runs the same code on the CPU with tiny sizes, as the test suite does.
"""
