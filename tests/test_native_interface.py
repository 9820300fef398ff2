"""The kernel's interface and its cache: defined once, checked at load, loaded only if safe."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_apply_step import native_kernel

import amsgrad_jax
from amsgrad_jax._native import _build, _interface

pytestmark = pytest.mark.native_cpu

__all__ = ["native_kernel"]
ROOT = Path(__file__).resolve().parent.parent


def test_header_names_every_operand_scalar_and_code_in_order():
  header = _interface.header()
  for index, name in enumerate(_interface.SCALARS):
    camel = "".join(part.capitalize() for part in name.split("_"))
    assert f"  kScalar{camel} = {index}," in header
  assert f"kNumScalars = {len(_interface.SCALARS)}," in header
  assert f"kTreeOperandsPerLeaf = {len(_interface.TREE_OPERANDS)}," in header
  for code in _interface.Decay:
    assert f"kDecay{code.name.capitalize()} = {code.value}," in header
  assert _interface.description() in header


def test_the_loaded_kernel_reports_this_interface(native_kernel):
  library = ctypes.cdll.LoadLibrary(amsgrad_jax.native_status().library)
  describe = getattr(library, _interface.DESCRIBE_SYMBOL)
  describe.restype = ctypes.c_char_p
  assert describe().decode() == _interface.description()


def test_a_mismatch_is_named():
  scalars = ",".join(reversed(_interface.SCALARS))
  reported = _interface.description().replace(",".join(_interface.SCALARS), scalars)
  with pytest.raises(_interface.InterfaceMismatch, match="scalars: kernel has") as error:
    _interface.check(reported)
  assert "tree_operands" not in str(error.value)  # only what differs
  with pytest.raises(_interface.InterfaceMismatch, match="decay"):
    _interface.check(_interface.description().replace("coupled=1", "coupled=3"))


def _run(code: str, **env: str) -> dict:
  """Run ``code`` in a fresh process (the loader caches per process); it prints JSON."""
  result = subprocess.run(
    [sys.executable, "-c", textwrap.dedent(code)],
    capture_output=True,
    text=True,
    check=True,
    cwd=ROOT,
    env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
  )
  return json.loads(result.stdout.strip().splitlines()[-1])


STATUS = """
import json, amsgrad_jax
status = amsgrad_jax.native_status()
print(json.dumps({"active": status.active, "reason": status.reason, "library": status.library}))
"""


def test_a_kernel_built_against_another_interface_reports_it(native_kernel, tmp_path):
  """The kernel's report is compiled from the header, not written by hand."""
  out = _run(
    """
    import ctypes, json
    from amsgrad_jax._native import _build, _interface
    _interface.SCALARS = _interface.SCALARS[::-1]
    path, _ = _build.library_path()
    library = ctypes.cdll.LoadLibrary(str(path))
    describe = getattr(library, _interface.DESCRIBE_SYMBOL)
    describe.restype = ctypes.c_char_p
    print(json.dumps({"reported": describe().decode()}))
    """,
    AMSGRAD_JAX_CACHE_DIR=str(tmp_path / "cache"),
  )
  with pytest.raises(_interface.InterfaceMismatch, match="scalars"):
    _interface.check(out["reported"])


def test_a_shared_writable_cache_is_not_trusted(native_kernel, tmp_path):
  shared = tmp_path / "shared"
  shared.mkdir()
  shared.chmod(0o777)
  status = _run(STATUS, AMSGRAD_JAX_CACHE_DIR=str(shared))
  assert status["active"], status
  assert "writable by other users" in status["reason"]
  assert not status["library"].startswith(str(shared))
  assert list(shared.iterdir()) == []  # nothing built or loaded there


def test_an_unwritable_home_falls_back_to_a_private_cache(native_kernel, tmp_path):
  home = tmp_path / "home"
  home.write_text("")  # a file: nothing can be created below it, not even by root
  env = {"HOME": str(home), "XDG_CACHE_HOME": ""}
  code = "import os; os.environ.pop('AMSGRAD_JAX_CACHE_DIR', None)\n" + STATUS
  status = _run(code, **env)
  assert status["active"], status
  assert "cannot be created" in status["reason"]
  directory = Path(status["library"]).parent
  assert _build.unsafe_because(directory, directory=True) is None


def test_an_unsafe_cached_file_is_rebuilt_not_loaded(native_kernel, tmp_path):
  cache = tmp_path / "cache"
  first = _run(STATUS, AMSGRAD_JAX_CACHE_DIR=str(cache))
  library = Path(first["library"])
  planted = b"not a library"
  library.write_bytes(planted)
  library.chmod(0o666)  # writable by anyone: someone else may have written it
  second = _run(STATUS, AMSGRAD_JAX_CACHE_DIR=str(cache))
  assert second["active"], second
  assert library.read_bytes() != planted
  assert _build.unsafe_because(library, directory=False) is None


def test_unsafe_because_names_the_problem(tmp_path):
  directory = tmp_path / "d"
  directory.mkdir(mode=0o700)
  assert _build.unsafe_because(directory, directory=True) is None
  directory.chmod(0o775)
  assert "writable by other users" in _build.unsafe_because(directory, directory=True)
  link = tmp_path / "link"
  link.symlink_to(directory)
  assert "not a directory" in _build.unsafe_because(link, directory=True)
  file = tmp_path / "f.so"
  file.write_bytes(b"")
  file.chmod(0o644)
  assert _build.unsafe_because(file, directory=False) is None
  assert "cannot be read" in _build.unsafe_because(tmp_path / "missing", directory=False)
  if os.getuid() == 0:  # only root can hand a file to another user
    os.chown(file, 65534, 65534)
    assert "belongs to another user" in _build.unsafe_because(file, directory=False)
