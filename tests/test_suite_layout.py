"""The test suite's own rules: a test module never imports another test module, nor runs one in
a child process; what tests share lives in ``tests/support/``, each module listed there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SUPPORT = TESTS / "support"
MODULES = sorted(TESTS.glob("*.py")) + sorted(SUPPORT.glob("*.py"))
# What a test may not import: another test module, or a helper's old home beside the tests.
FORBIDDEN = re.compile(r"tests\.(test_\w+|fixtures_\w+|hardware)\b")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(TESTS)))
def test_no_test_module_imports_another(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            # `python -c "from tests.test_x import child"` and pytest_plugins entries count too
            imported += re.findall(r"(?:from|import)\s+([\w.]+)", node.value)
            imported += re.findall(r"^tests\.[\w.]+$", node.value)
    assert [name for name in imported if FORBIDDEN.match(name)] == []


def test_every_support_module_is_listed() -> None:
    doc = ast.get_docstring(ast.parse((SUPPORT / "__init__.py").read_text(encoding="utf-8")))
    listed = set(re.findall(r"^- ``(\w+)``", doc or "", re.M))
    assert listed == {p.stem for p in SUPPORT.glob("*.py")} - {"__init__"}
