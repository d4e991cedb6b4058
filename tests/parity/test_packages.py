"""parity's sub-packages import one way, and no two parity modules import each other.

Each program imports only the packages before it in ``ORDER``: ``sides`` (both sides of a case)
none of the others, ``check`` (``python -m parity``) ``sides``, ``bench`` (``python -m
parity.bench``) ``sides`` and the check's loss bound, ``gpu_check`` the bench's presets and
table. Imports inside functions count too.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
ORDER = ["sides", "check", "bench", "gpu_check"]


def module_name(path: pathlib.Path) -> str:
    """``parity/check/compare.py`` -> ``parity.check.compare`` (a package: its ``__init__``)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted((ROOT / "parity").rglob("*.py"))}


def parity_imports(path: pathlib.Path) -> set[str]:
    """The parity modules ``path`` imports anywhere (``from parity.bench import flops`` names
    ``parity.bench.flops``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in MODULES}
        elif isinstance(node, ast.ImportFrom) and node.module in MODULES:
            names = {f"{node.module}.{alias.name}" for alias in node.names}
            found |= (names & MODULES.keys()) or {node.module}
    return found


def package(module: str) -> str | None:
    """The sub-package of ``ORDER`` a module belongs to (None: ``parity`` itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ORDER else None


@pytest.mark.parametrize("name", ORDER)
def test_a_package_imports_only_the_packages_before_it(name):
    allowed = set(ORDER[: ORDER.index(name) + 1])
    offenders = {
        module: sorted(i for i in parity_imports(path) if package(i) not in allowed)
        for module, path in MODULES.items()
        if package(module) == name
    }
    assert {m: i for m, i in offenders.items() if i} == {}


def test_no_parity_module_imports_itself_through_others():
    graph = {module: parity_imports(path) - {module} for module, path in MODULES.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError(" -> ".join(path[path.index(module) :] + [module]))
        if module not in done:
            for other in sorted(graph[module]):
                visit(other, [*path, module])
            done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_the_old_cycle_is_seen(tmp_path, monkeypatch):
    """The check above catches compare <-> noise_floor as it was (each imported the other)."""
    compare, floor = tmp_path / "compare.py", tmp_path / "noise_floor.py"
    compare.write_text("def f():\n    from parity.check.noise_floor import NoiseFloor\n")
    floor.write_text("from parity.check.compare import difference\n")
    monkeypatch.setitem(MODULES, "parity.check.compare", compare)
    monkeypatch.setitem(MODULES, "parity.check.noise_floor", floor)
    with pytest.raises(AssertionError, match="compare -> parity.check.noise_floor"):
        test_no_parity_module_imports_itself_through_others()
