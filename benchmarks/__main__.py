"""``python -m benchmarks [--quick] [--out DOCS_DIR]``: run, print the tables, write the docs.

The full run takes about 8 minutes on 2 CPU cores; ``--quick`` takes well under a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from benchmarks import config, contenders, driver, plots, report


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks", description="AMSGrad update and training-loop benchmarks."
  )
  parser.add_argument(
    "--quick", action="store_true", help="tiny sizes, one round, one repetition (a smoke run)"
  )
  parser.add_argument(
    "--out",
    type=Path,
    default=driver.ROOT / "docs",
    help="docs folder: writes _static/bench_results.json, _static/bench_*.png and the "
    "tables in benchmarks.md (default: the repository's docs/)",
  )
  parser.add_argument("--rounds", type=int, default=None, help="rounds of alternating processes")
  parser.add_argument(
    "--only",
    default=None,
    help="comma-separated contender names to run (default: all); ratios need the names "
    f"{contenders.DEFAULT!r}, {contenders.OPTAX!r} and {contenders.TORCH_FUSED!r}",
  )
  args = parser.parse_args(argv)

  run_config = config.quick() if args.quick else config.full()
  if args.rounds is not None:
    run_config = dataclasses.replace(run_config, rounds=args.rounds)
  only = None if args.only is None else [name.strip() for name in args.only.split(",")]
  raw = driver.run(run_config, only=only, log=lambda line: print(line, flush=True))
  summary = report.summarise(raw)
  json_path, page = report.write(summary, args.out)
  pngs = plots.plot(summary, args.out / "_static")
  print()
  print(report.markdown(summary))
  print(f"wrote {json_path}, {page}, " + ", ".join(str(path) for path in pngs))
  for name, error in summary["failures"].items():
    print(f"\n{name} FAILED:\n{error}", file=sys.stderr)
  return 1 if summary["failures"] else 0


if __name__ == "__main__":
  sys.exit(main())
