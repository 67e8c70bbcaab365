"""How the packages depend on each other: the engine (`processor`) never imports its plug-ins (`handlers`)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    """Every module named by an `import` or `from ... import` statement in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_processor_never_imports_handlers() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.split(".")[0] == "handlers")
        for path in sorted((ROOT / "processor").rglob("*.py"))
    }
    assert {path: mods for path, mods in offenders.items() if mods} == {}


def test_handler_contract_lives_in_processor() -> None:
    """Built-in handlers import the contract from its documented path, like any third-party handler."""
    from processor import handler, registry

    assert handler.Delivery.__module__ == "processor.handler"
    assert registry.load_type("log").__module__ == "handlers.log"
    for path in sorted((ROOT / "handlers").glob("*.py")):
        if path.name != "base.py":  # the re-export kept for old imports
            assert "handlers.base" not in imported_modules(path), path.name
