"""A pytest plugin: ``-p gpucheck.shard --shard I/N`` runs the I-th of N shares.

The shares are contiguous slices of the collected tests, so each process keeps whole
files (and what their tests cache) together. They are cut before markers deselect, and
the other shares are dropped without being reported as deselected, so the counts of the
N processes add up to one run's. Each says how many tests it has to run, so that a slice
stopped early can tell how many it did not reach. It imports nothing else: it loads
before ``tests/conftest.py`` sets up JAX.
"""

from __future__ import annotations

from typing import Any

import pytest


def pytest_addoption(parser: Any) -> None:
  parser.addoption("--shard", default=None, help="I/N: run the I-th of N slices of the tests")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
  shard = config.getoption("--shard")
  if shard is None:
    return
  index, count = map(int, shard.split("/"))
  begin, end = index * len(items) // count, (index + 1) * len(items) // count
  items[:] = items[begin:end]


def pytest_collection_finish(session: Any) -> None:
  terminal = session.config.pluginmanager.get_plugin("terminalreporter")
  if session.config.getoption("--shard") is not None and terminal is not None:
    terminal.write_line(f"shard: {len(session.items)} tests to run")
