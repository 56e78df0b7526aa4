"""The top-level packages import only downwards: the services need nothing of the tools around
them, and the benchmarks share the tests' client (client/) without importing the test tree."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {  # package -> top-level packages it must not import
    "services": {"tests", "bench", "client", "deploy"},
    "client": {"tests", "bench", "deploy"},
    "deploy": {"tests", "bench", "client"},
    "bench": {"tests"},
}


def imported_top_levels(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    return modules


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_downwards(package):
    offences = [
        f"{path.relative_to(ROOT)} imports {', '.join(sorted(imported_top_levels(path) & FORBIDDEN[package]))}"
        for path in sorted((ROOT / package).rglob("*.py"))
        if imported_top_levels(path) & FORBIDDEN[package]
    ]
    assert not offences, offences
