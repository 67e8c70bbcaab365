"""How the code is put together: the engine (`processor`) never imports its plug-ins (`handlers`), and Redis
trouble is caught in one way everywhere."""

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


def caught_names(path: Path) -> set[str]:
    """Every name an `except` clause or a `contextlib.suppress(...)` in the file catches."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ExceptHandler) and node.type is not None:
            found |= {n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("suppress", "contextlib.suppress"):
            found |= {n.id for arg in node.args for n in ast.walk(arg) if isinstance(n, ast.Name)}
    return found


def test_redis_trouble_is_caught_as_client_redis_errors() -> None:
    """A cluster with no node answering raises `RedisClusterException`, which is not a `RedisError`: code that
    catches `RedisError` alone lets it through (a poller failing until its worker
    gives up, a scrape failing instead of saying redis_up 0)."""
    offenders = [
        str(path.relative_to(ROOT))
        for package in ("processor", "handlers")
        for path in sorted((ROOT / package).rglob("*.py"))
        if "RedisError" in caught_names(path)
    ]
    assert offenders == []
