"""The product trains without trl: trl is only what ``parity`` compares against (an optional
extra, ``.[parity]``)."""

import subprocess
import sys

import pytest

from tests.training.conftest import REPO_ROOT, base_args, child_env

BLOCK_TRL = """
import sys
sys.modules["trl"] = None  # `import trl` now raises ImportError, as on a machine without it
from training.fit import main
code = main(sys.argv[1:])
assert "trl" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
sys.exit(code)
"""


@pytest.mark.slow
def test_training_runs_with_trl_absent(tiny_assets, tmp_path):
    argv = base_args(tiny_assets, tmp_path, max_steps=1, lora=True)
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_TRL, *map(str, argv)],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "model" / "adapter_config.json").exists()
