"""The code's layout rules that a reader relies on, checked on the source itself."""

from __future__ import annotations

import ast

from conftest import ROOT


def _imports(path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_click_lives_only_in_the_cli_package():
    """A thin CLI over a library: the library is usable (and testable) without click."""
    package = ROOT / "smearscan"
    users = sorted(
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if "click" in _imports(path) and path.parent.name != "cli"
    )
    assert users == []
    assert "click" in _imports(package / "cli" / "commands.py")  # the check can see it


def test_the_suites_longest_files_exist():
    """``conftest.LONGEST_FIRST`` orders the workers' files; a renamed file would silently
    drop out of it and run last again."""
    from conftest import LONGEST_FIRST

    assert all((ROOT / "tests" / name).is_file() for name in LONGEST_FIRST)
