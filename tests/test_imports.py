"""Every module of the three packages imports (catches syntax errors and import cycles)."""

import importlib
import pkgutil

import pytest

PACKAGES = ["dpo_core", "training", "parity"]


def _modules():
    for name in PACKAGES:
        pkg = importlib.import_module(name)
        yield name
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{name}."):
            yield info.name


@pytest.mark.parametrize("module", sorted(_modules()))
def test_module_imports(module):
    importlib.import_module(module)


def test_dpo_core_does_not_import_upper_layers():
    """dpo_core stands alone: it never imports training, parity, lightning or trl."""
    import pathlib
    import re

    root = pathlib.Path(importlib.import_module("dpo_core").__file__).parent
    pattern = re.compile(r"^\s*(from|import)\s+(training|parity|lightning|trl)\b", re.M)
    offenders = [p.name for p in root.rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
