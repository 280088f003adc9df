"""Imports run downwards only: a package never imports one that stands above it."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "dspark_jax"

# package -> packages it must never import (anywhere in the file, function-level imports included).
FORBIDDEN = {
    "sampling": {"models", "checkpoints", "data", "decoding", "evaluation", "training", "serving"},
    "sharding": {"models", "checkpoints", "data", "decoding", "evaluation", "training", "serving"},
    "models": {"checkpoints", "data", "decoding", "evaluation", "training", "serving"},
    "checkpoints": {"data", "decoding", "evaluation", "training", "serving"},
    "decoding": {"checkpoints", "data", "evaluation", "training", "serving"},
    "data": {"evaluation", "training", "serving"},
    "evaluation": {"training", "serving"},
}


def imported_packages(path: pathlib.Path) -> set[str]:
    """The dspark_jax subpackages (or top-level modules) a file imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "dspark_jax" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_no_import_runs_back_up():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        owner = rel.parts[0].removesuffix(".py")
        for package in imported_packages(path) & FORBIDDEN.get(owner, set()):
            violations.append(f"{rel} imports dspark_jax.{package}")
    assert violations == []


def test_the_check_sees_imports():
    """The walker finds module-level and function-level imports (so the test above can fail)."""
    assert {"models", "sampling"} <= imported_packages(PACKAGE / "decoding" / "speculative.py")
    assert "checkpoints" in imported_packages(PACKAGE / "training" / "trainer.py")
