"""``python -m parity.bench``: the benchmark; the program is ``parity.bench.cli``."""

import sys

from parity.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
