"""The kernel's vectorised 8-bit codes equal its scalar ones, which equal the Optax path's.

The sixteen-at-a-time encoding and decoding (float16 conversions of AVX-512) run for
every whole group of 16 elements; the scalar functions only for the rest of a block, so
the end-to-end tests mostly see the vector path. This builds a small program around the
kernel source, with the kernel's own flags, that compares the two over every code and
a million random elements (NaN, infinities, zeros and the tiniest scales among them).
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import jax
import pytest

from amsgrad_jax._native import _build, _interface

pytestmark = pytest.mark.native_cpu

CHECK = Path(__file__).with_name("native") / "vector_codes_check.cc"
NO_VECTOR_PATH = 77


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="an x86 path")
def test_vectorised_codes_equal_the_scalar_codes(tmp_path):
  cxx = _build.compiler()
  assert cxx is not None, "no C++ compiler"
  (tmp_path / _build.HEADER_NAME).write_text(_interface.header())
  program = tmp_path / "vector_codes_check"
  flags = [flag for flag in _build.FLAGS if flag not in ("-shared", "-fPIC")]
  command = [
    cxx,
    *flags,
    f"-I{tmp_path}",
    f"-I{_build.SOURCE.parent}",
    f"-I{jax.ffi.include_dir()}",
    str(CHECK),
    "-o",
    str(program),
  ]
  built = subprocess.run(command, capture_output=True, text=True, check=False)
  assert built.returncode == 0, built.stderr[-2000:]
  ran = subprocess.run([str(program)], capture_output=True, text=True, check=False)
  if ran.returncode == NO_VECTOR_PATH:
    pytest.skip(ran.stdout.strip())
  assert ran.returncode == 0, ran.stdout
  assert " 0 differ" in ran.stdout
