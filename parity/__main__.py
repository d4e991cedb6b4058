"""``python -m parity``: the parity check; the program is ``parity.check.cli``."""

import sys

from parity.check.cli import main

if __name__ == "__main__":
    sys.exit(main())
