"""Import peer frameworks for parity tests: skip with a reason locally, fail in CI."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def in_ci() -> bool:
  return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(module_name: str) -> ModuleType:
  """Import ``module_name``; outside CI a missing peer skips, under ``CI=true`` it fails."""
  try:
    return importlib.import_module(module_name)
  except ImportError as error:
    if in_ci():
      raise AssertionError(f"{module_name} must be installed in CI: {error}") from error
    pytest.skip(f"{module_name} is not installed ({error}); `make test` installs it")
