"""``training/``'s sub-packages import one way, and each layer imports only what it may.

The order, lowest first (``../shared/ARCHITECTURE.md``)::

    base      config, command line, errors, precision table, the config as dpo_core settings
    embedded  the embedded default's task, tokenizer and warm-up
    inputs    rows, the data module, model loading, the reference precomputation
    eval      before vs after: scoring, sampling, judges, report, plots
    run       the Lightning module, callbacks, resume, outputs (which evaluates a finished run)
    entry     training/fit.py, evaluate.py, sweep.py (and training/__init__.py)

A module may import its own layer and those below it, never one above, at module level or
inside a function. An import inside a function is kept only for a heavy import few runs need,
with a ``# why:`` comment on its line or the line before. ``training`` never imports trl or
parity; ``dpo_core`` never imports training, parity, lightning or trl. Every failure names the
file, the line and the import.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENTRY = "entry"  # the modules directly in training/
LAYERS = ("base", "embedded", "inputs", "eval", "run", ENTRY)
WHY = "# why:"


@dataclass
class Import:
    """One imported module, where it is imported and how."""

    path: Path  # the importing file
    line: int
    text: str  # the statement, on one line
    module: str  # the absolute dotted name imported (``training.run.module``)
    in_function: bool


def _absolute(node: ast.ImportFrom, path: Path, root: Path) -> str:
    """The absolute module a (possibly relative) ``from ... import`` names."""
    if node.level == 0:
        return node.module or ""
    package = path.relative_to(root).parts[:-1]  # the package the file is in
    base = list(package[: len(package) - (node.level - 1)])
    return ".".join([*base, node.module] if node.module else base)


def imports(path: Path, root: Path = ROOT) -> list[Import]:
    """Every import in ``path``, module level and function level; ``from pkg import name``
    yields ``pkg.name`` (``name`` may be a sub-module)."""
    source = path.read_text()
    tree = ast.parse(source, str(path))
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import | ast.ImportFrom):
                text = " ".join((ast.get_source_segment(source, child) or "").split())
                if isinstance(child, ast.Import):
                    names = [alias.name for alias in child.names]
                else:
                    module = _absolute(child, path, root)
                    names = [f"{module}.{alias.name}" for alias in child.names]
                for name in names:
                    found.append(Import(path, child.lineno, text, name, in_function))
            visit(child, inside)

    visit(tree, False)
    return found


def python_files(root: Path, package: str) -> list[Path]:
    return sorted((root / package).rglob("*.py"))


def layer_of_file(path: Path, root: Path = ROOT) -> str:
    """``training/run/module.py`` -> ``run``; ``training/fit.py`` -> ``entry``."""
    parts = path.relative_to(root / "training").parts
    return ENTRY if len(parts) == 1 else parts[0]


def layer_of_module(name: str, root: Path = ROOT) -> str | None:
    """``training.run.module`` -> ``run``; ``training.fit`` -> ``entry``; None outside training."""
    parts = name.split(".")
    if parts[0] != "training":
        return None
    if len(parts) > 1 and (root / "training" / parts[1]).is_dir():
        return parts[1]
    return ENTRY


def upward_imports(root: Path = ROOT) -> list[str]:
    """Each import of a training layer above the importing module's, as ``file:line: import``."""
    problems = []
    for path in python_files(root, "training"):
        here = layer_of_file(path, root)
        for imp in imports(path, root):
            there = layer_of_module(imp.module, root)
            if there is None or there not in LAYERS or here not in LAYERS:
                continue
            if LAYERS.index(there) > LAYERS.index(here):
                problems.append(
                    f"{path.relative_to(root)}:{imp.line}: {imp.text}  "
                    f"({here} imports {there}, which lies above it: {' < '.join(LAYERS)})"
                )
    return problems


def unplaced_packages(root: Path = ROOT) -> list[str]:
    """Sub-packages of training/ that the order does not name."""
    return [
        str(d.relative_to(root))
        for d in sorted((root / "training").iterdir())
        if (d / "__init__.py").is_file() and d.name not in LAYERS
    ]


def unexplained_function_imports(root: Path = ROOT) -> list[str]:
    """Function-level imports in training/ with no ``# why:`` on their line or the line before."""
    problems = []
    for path in python_files(root, "training"):
        lines = path.read_text().splitlines()
        seen = set()
        for imp in imports(path, root):
            if not imp.in_function or imp.line in seen:
                continue
            seen.add(imp.line)
            nearby = lines[imp.line - 1] + (lines[imp.line - 2] if imp.line > 1 else "")
            if WHY not in nearby:
                problems.append(
                    f"{path.relative_to(root)}:{imp.line}: {imp.text}  (an import inside a "
                    f"function: move it to the top of the module, or say '{WHY} ...')"
                )
    return problems


def forbidden_imports(root: Path, package: str, forbidden: set[str]) -> list[str]:
    """Imports in ``package`` of any top-level package in ``forbidden``."""
    return [
        f"{path.relative_to(root)}:{imp.line}: {imp.text}  ({package} must not import "
        f"{imp.module.split('.')[0]})"
        for path in python_files(root, package)
        for imp in imports(path, root)
        if imp.module.split(".")[0] in forbidden
    ]


def test_every_training_sub_package_has_a_place_in_the_order():
    assert unplaced_packages() == [], f"add them to LAYERS in {Path(__file__).name}"


def test_training_imports_point_down_only():
    problems = upward_imports()
    assert not problems, "\n".join(problems)


def test_function_level_imports_in_training_say_why():
    problems = unexplained_function_imports()
    assert not problems, "\n".join(problems)


def test_training_never_imports_trl_or_parity():
    problems = forbidden_imports(ROOT, "training", {"trl", "parity"})
    assert not problems, "\n".join(problems)


def test_dpo_core_never_imports_training_parity_lightning_or_trl():
    problems = forbidden_imports(ROOT, "dpo_core", {"training", "parity", "lightning", "trl"})
    assert not problems, "\n".join(problems)


def _tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checks_catch_planted_violations(tmp_path):
    _tree(
        tmp_path,
        {
            "training/__init__.py": "",
            "training/fit.py": "from training.run.module import step\n",
            "training/base/__init__.py": "",
            "training/base/config.py": "def f():\n    from training.run import module\n",
            "training/run/__init__.py": "",
            "training/run/module.py": (
                "from training.base.config import f\nfrom . import outputs\nimport trl\n"
            ),
            "training/run/outputs.py": "from ..eval import plots\n",
            "training/eval/__init__.py": "",
            "training/eval/plots.py": (
                "def g():\n    # why: heavy\n    import matplotlib\n    from ..run import module\n"
            ),
            "training/extra/__init__.py": "",
            "dpo_core/losses.py": "import lightning as L\n",
        },
    )
    assert upward_imports(tmp_path) == [
        "training/base/config.py:2: from training.run import module  (base imports run, which "
        "lies above it: base < embedded < inputs < eval < run < entry)",
        "training/eval/plots.py:4: from ..run import module  (eval imports run, which lies "
        "above it: base < embedded < inputs < eval < run < entry)",
    ]
    assert [p.split("  (")[0] for p in unexplained_function_imports(tmp_path)] == [
        "training/base/config.py:2: from training.run import module",
        "training/eval/plots.py:4: from ..run import module",
    ]
    assert unplaced_packages(tmp_path) == ["training/extra"]
    assert forbidden_imports(tmp_path, "training", {"trl"}) == [
        "training/run/module.py:3: import trl  (training must not import trl)"
    ]
    assert forbidden_imports(tmp_path, "dpo_core", {"lightning"}) == [
        "dpo_core/losses.py:1: import lightning as L  (dpo_core must not import lightning)"
    ]
