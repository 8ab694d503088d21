"""Layering one way: services/ depends on rlhf_online/, never the reverse."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIBRARY = Path(__file__).resolve().parents[1] / "rlhf_online"


def imported_modules(tree: ast.AST) -> set[str]:
    """Every module an `import` or `from ... import` names (absolute imports; relative ones stay in the package)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def services_imports(source: str) -> set[str]:
    """The imports of `services` (or a module of it) in a module's source, wherever they are (functions too)."""
    return {m for m in imported_modules(ast.parse(source)) if m == "services" or m.startswith("services.")}


@pytest.mark.parametrize("source", [
    "import services.bootstrap",
    "from services import bootstrap",
    "def f():\n    from services.bootstrap import pick_dtype\n",
])
def test_the_check_sees_an_import_of_services(source):
    assert services_imports(source)


def test_the_check_ignores_lookalikes():
    assert not services_imports("import services_extra\nfrom rlhf_online import services\nx = 'services.cli'\n")


def test_no_library_module_imports_services():
    modules = sorted(LIBRARY.rglob("*.py"))
    assert len(modules) > 50  # the walk found the package
    offenders = {str(p.relative_to(LIBRARY.parent)): sorted(found) for p in modules
                 if (found := services_imports(p.read_text()))}
    assert not offenders, f"rlhf_online/ must not import services/ (move the code down or pass it in): {offenders}"
