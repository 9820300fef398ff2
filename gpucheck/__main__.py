"""``python -m gpucheck``: see :mod:`gpucheck.check`."""

import sys

from gpucheck.check import main

if __name__ == "__main__":
  sys.exit(main())
