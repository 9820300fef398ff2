"""``python -m benchmarks [--quick] [--rounds N] [--only NAME]... [--out DIR]``.

Runs the contenders, prints the table, and writes ``bench_results.json`` and
``bench_table.md`` into ``DIR`` (default: ``docs/_static``). The full run takes about 11
minutes on 2 idle CPU cores; ``--quick`` about 30 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from benchmarks import cases, driver, results
from benchmarks.contenders import CONTENDERS, by_name


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
  parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke run")
  parser.add_argument("--rounds", type=int, help="rounds of alternating processes")
  parser.add_argument("--only", action="append", metavar="NAME", help="run this contender only")
  parser.add_argument("--out", type=Path, default=driver.ROOT / "docs" / "_static")
  args = parser.parse_args(argv)
  plan = cases.quick() if args.quick else cases.full()
  if args.rounds:
    plan = dataclasses.replace(plan, rounds=args.rounds)
  names = args.only or [c.name for c in CONTENDERS]
  for name in names:
    by_name(name)  # An unknown name fails here, with the known ones, before any process.
  raw = driver.run(plan, names, log=lambda line: print(line, flush=True))
  summary = results.summarise(raw, plan)
  paths = results.write(summary, args.out)
  print("\n" + results.table(summary) + "\nwrote " + ", ".join(map(str, paths)))
  for name, error in summary["failures"].items():
    print(f"\n{name} FAILED:\n{error}", file=sys.stderr)
  return 1 if summary["failures"] else 0


if __name__ == "__main__":
  sys.exit(main())
