"""What XLA says about a compiled step: bytes accessed, loops over memory, buffers.

``cost_analysis()`` counts, for every instruction of the optimised HLO, the bytes of its
operands and results: for a fused loop that is exactly what it reads and writes, so its
total is the traffic the compiled step makes. ``memory_analysis()`` gives the buffers the
executable needs: arguments, outputs, what of them aliases (donation) and scratch.
"""

from __future__ import annotations

import math
import re
from typing import Any

# Instructions that move no data of their own.
_FREE = {"parameter", "tuple", "get-tuple-element", "constant", "bitcast", "copy-start"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.+?)\s+([\w-]+)\(")
_DIMENSIONS = re.compile(r"\[([\d,]+)\]")
# Results this small are the step's scalars (bias corrections, stacked coefficients).
_SMALLEST_ARRAY = 33


def cost_summary(compiled: Any, parameter_count: int) -> dict[str, float | None]:
  """Bytes accessed and flops per parameter, from ``compiled.cost_analysis()``."""
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):
    cost = cost[0] if cost else {}
  cost = cost or {}
  per_param = max(parameter_count, 1)
  accessed = cost.get("bytes accessed")
  flops = cost.get("flops")
  return {
    "xla_bytes_per_param": None if accessed is None else float(accessed) / per_param,
    "xla_flops_per_param": None if flops is None else float(flops) / per_param,
  }


def memory_summary(compiled: Any) -> dict[str, int | None]:
  """The buffers of ``compiled.memory_analysis()``, in bytes."""
  memory = compiled.memory_analysis()
  names = ("argument", "output", "alias", "temp", "generated_code")
  return {
    f"{name}_bytes": None if memory is None else int(getattr(memory, f"{name}_size_in_bytes"))
    for name in names
  }


def array_loops(hlo_text: str) -> int:
  """The loops over arrays in the entry computation: its instructions with an array
  result (fusions, elementwise ops, custom calls), not counting the arithmetic on the
  step's scalars.

  On XLA:CPU each such instruction is one pass over the memory of its operands and its
  result, since the CPU backend fuses elementwise work into one loop per output.
  """
  entry = hlo_text[hlo_text.index("ENTRY") :] if "ENTRY" in hlo_text else hlo_text
  entry = entry.split("\n}\n", 1)[0]
  loops = 0
  for line in entry.splitlines()[1:]:
    match = _INSTRUCTION.match(line)
    if match is None:
      continue
    shape, opcode = match.group(1), match.group(2)
    if opcode in _FREE or not any(
      math.prod(int(d) for d in dims.split(",")) >= _SMALLEST_ARRAY
      for dims in _DIMENSIONS.findall(shape)
    ):
      continue
    loops += 1
  return loops
