"""``python -m parity.gpu_check``: the GPU check; the program is ``parity.gpu_check.cli``."""

import sys

from parity.gpu_check.cli import main

if __name__ == "__main__":
    sys.exit(main())
