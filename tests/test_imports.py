"""Every module imports, and every layer rule of ``../shared/ARCHITECTURE.md`` holds.

Layers, imports pointing down only::

    parity/    may import training, dpo_core, trl
    training/  may import dpo_core, lightning, peft, bitsandbytes, transformers, datasets
    dpo_core/  may import torch and transformers (tokenizers), nothing of ours above it

trl is imported only in parity/ (and tests that compare against it): the product trains
without it, which ``tests/training/test_without_trl.py`` checks by running a job with trl
made unimportable.
"""

import ast
import importlib
import pathlib
import pkgutil
import sys

import pytest

PACKAGES = ["dpo_core", "training", "parity"]
ROOT = pathlib.Path(__file__).resolve().parents[1]

# Top-level names a layer must never import (a function-level import counts too).
FORBIDDEN = {
    "dpo_core": {"training", "parity", "lightning", "trl", "peft", "bitsandbytes", "datasets"},
    "training": {"parity", "trl"},
    "parity": set(),
}


def _modules():
    for name in PACKAGES:
        pkg = importlib.import_module(name)
        yield name
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{name}."):
            yield info.name


@pytest.mark.parametrize("module", sorted(_modules()))
def test_module_imports(module):
    importlib.import_module(module)


def imported_roots(path: pathlib.Path) -> set[str]:
    """Top-level package names ``path`` imports anywhere (module or function level)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_imported_roots_sees_function_level_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\ndef f():\n    from trl.trainer import DPOTrainer\n")
    assert imported_roots(source) == {"os", "trl"}


@pytest.mark.parametrize("package", PACKAGES)
def test_layer_imports_point_down_only(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path) & FORBIDDEN[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_dpo_core_imports_only_torch_transformers_and_the_standard_library():
    allowed = {"torch", "transformers", "tokenizers", "dpo_core", "__future__"}
    stdlib = set(sys.stdlib_module_names)
    extra = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path) - allowed - stdlib)
        for path in sorted((ROOT / "dpo_core").rglob("*.py"))
    }
    assert {k: v for k, v in extra.items() if v} == {}
