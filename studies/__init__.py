"""Reproducible studies of amsgrad_jax, each run as ``python -m studies.NAME``."""
