"""The import graph: the core (pgbeat/) never imports the Celery side (workers/, tasks/), nor Celery at
module level, so it can be imported, called and tested without either (issue 12).

Every module under pgbeat/ is parsed (ast), so a new module is covered by itself.
"""

from __future__ import annotations

import ast

import pytest

from tests.support import ROOT

CORE = ROOT / "pgbeat"
SERVICE_SIDE = ("workers", "tasks", "beat_schedule")
CELERY = ("celery", "kombu", "redbeat")
MODULES = sorted(CORE.rglob("*.py"))


def imported(node: ast.AST) -> list[str]:
    """The absolute module names an import statement names (relative imports stay inside pgbeat)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module]
    return []


def top(name: str) -> str:
    return name.split(".")[0]


def module_level(tree: ast.Module):
    """The import statements run when the module is imported: at top level, or in its if/try blocks
    (not `if TYPE_CHECKING:`), never inside a function or class."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                pending += node.body + node.orelse
        elif isinstance(node, ast.Try):
            pending += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
        elif isinstance(node, ast.With):
            pending += node.body
        else:
            yield node


def test_every_core_module_is_found():
    assert len(MODULES) > 30 and CORE / "cli.py" in MODULES and CORE / "actions.py" in MODULES


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(CORE.parent)))
def test_the_core_never_imports_the_celery_side(path):
    """No import of workers/ or tasks/ anywhere in a core module, not even inside a function."""
    tree = ast.parse(path.read_text(), str(path))
    found = [(node.lineno, name) for node in ast.walk(tree) for name in imported(node) if top(name) in SERVICE_SIDE]
    assert not found, f"{path.name} imports the service side: {found}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(CORE.parent)))
def test_the_core_imports_celery_only_inside_functions(path):
    """Celery (and kombu, RedBeat) only where a function needs it, so importing the core loads none."""
    tree = ast.parse(path.read_text(), str(path))
    found = [(node.lineno, name) for node in module_level(tree) for name in imported(node) if top(name) in CELERY]
    assert not found, f"{path.name} imports Celery at module level: {found}"


def test_the_checks_can_fail():
    """The walkers see an import of the service side, nested or not, and a module-level Celery import."""
    source = "import celery\ndef f():\n    from workers.app import app\n    import tasks.restore\n"
    tree = ast.parse(source)
    assert [name for node in ast.walk(tree) for name in imported(node) if top(name) in SERVICE_SIDE] == [
        "workers.app", "tasks.restore"]
    assert [name for node in module_level(tree) for name in imported(node)] == ["celery"]
    guarded = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from celery import Celery\n")
    assert not [name for node in module_level(guarded) for name in imported(node) if top(name) in CELERY]
