"""The test suite's own layout: test modules share code only through tests/support, and
conftest.py holds only fixtures."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support.processes import ROOT

TESTS = ROOT / "tests"
TEST_MODULES = sorted(p for p in TESTS.rglob("test_*.py") if "bench" not in p.parts)


def imported_modules(path: Path) -> list[str]:
    """Every `tests.*` module `path` imports, at any depth of its code."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append("." * node.level + (node.module or ""))
    return [m for m in found if m.startswith(("tests", "."))]


def allowed(module: str, path: Path) -> bool:
    """tests.support, or a helper module (not a test module) of the test's own suite folder,
    such as tests/fuzz/harness.py."""
    if module == "tests.support" or module.startswith("tests.support."):
        return True
    parts = module.split(".")
    own_suite = path.relative_to(ROOT).parts[:2]  # ("tests", "fuzz")
    return tuple(parts[:2]) == own_suite and not parts[-1].startswith(("test_", "conftest"))


def test_no_test_module_imports_another() -> None:
    wrong = {
        str(path.relative_to(TESTS)): bad
        for path in TEST_MODULES
        if (bad := [m for m in imported_modules(path) if not allowed(m, path)])
    }
    assert len(TEST_MODULES) > 100
    assert not wrong, f"share code through tests/support instead: {wrong}"


def test_conftest_holds_only_fixtures() -> None:
    tree = ast.parse((TESTS / "conftest.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            decorators = [ast.unparse(d) for d in node.decorator_list]
            assert any("fixture" in d for d in decorators), f"{node.name} is no fixture"
        else:
            assert isinstance(node, ast.Import | ast.ImportFrom | ast.Expr), ast.unparse(node)[:80]
    assert [p.relative_to(TESTS) for p in TESTS.rglob("conftest.py")] == [
        Path("conftest.py"),
        Path("property/conftest.py"),
    ]
