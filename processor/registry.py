"""Find handler types by name and build configured handlers (the engine's side of the plug-in contract).

`type = "slack"` is looked up in the `ftjobs.handlers` entry-point group, where built-ins and third-party
packages register alike; `type = "package.module:Class"` imports a class directly (handy for a handler that
lives in your own repository; `use_local_modules` makes the configuration file's folder and the current
directory importable for it). Options are validated against the type's `Options` struct, with errors that
name the key (`handlers[2].webhook_url: ...`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Final

from processor.errors import ConfigError
from processor.handler import Handler
from processor.settings import HandlerSpec, convert

GROUP: Final = "ftjobs.handlers"
#: Built-ins, so a source checkout works before it is installed (installed, they come via entry points too).
#: Named, not imported: the engine loads its plug-ins by name only.
BUILTINS: Final = {
    "log": "handlers.log:LogHandler",
    "slack": "handlers.slack:SlackHandler",
    "email": "handlers.email:EmailHandler",
    "http": "handlers.http:HttpHandler",
}

#: Top-level names ftjobs itself uses: a user module or package of the same name is hidden by ours.
RESERVED: Final = ("processor", "handlers")


def use_local_modules(config_source: str) -> None:
    """Let `type = "my_handlers:Audit"` find `my_handlers.py` next to the configuration file or in the current
    directory, without `PYTHONPATH`. Appended, so installed packages (ours included) keep precedence."""
    folders = [Path(config_source).resolve().parent] if config_source else []
    for folder in [*folders, Path.cwd()]:
        if str(folder) not in sys.path:
            sys.path.append(str(folder))


def available() -> dict[str, str]:
    """Every registered handler type: name → `module:attr`."""
    found = dict(BUILTINS)
    found.update({ep.name: ep.value for ep in entry_points(group=GROUP)})
    return found


def load_type(type_name: str) -> type[Any]:
    """The handler class for `type_name` (a registered name or `module:attr`)."""
    target = available().get(type_name) or (type_name if ":" in type_name else None)
    if target is None:
        known = ", ".join(sorted(available()))
        raise ConfigError(f"unknown handler type {type_name!r} (known: {known}; or use 'package.module:Class')")
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"handler type {type_name!r}: cannot load {target}: {exc}{_collision(module_name)}") from None
    if not isinstance(obj, type) or not hasattr(obj, "Options"):
        raise ConfigError(f"handler type {type_name!r}: {target} is not a handler class with an Options struct")
    return obj


def _collision(module_name: str) -> str:
    """When `module_name` starts with one of ftjobs' own package names, a sentence saying so (and which local
    file ours hides), since the import error alone would point at the wrong module."""
    top = module_name.partition(".")[0]
    if top not in RESERVED:
        return ""
    spec = importlib.util.find_spec(top)
    ours = Path(spec.origin).parent if spec and spec.origin else None
    hidden = [
        str(candidate)
        for folder in dict.fromkeys(Path(entry or os.curdir).resolve() for entry in sys.path)
        for candidate in (folder / top, folder / f"{top}.py")
        if candidate.exists() and candidate.resolve() not in (ours, ours and ours / "__init__.py")
    ]
    where = f" ({', '.join(hidden)} is hidden by it)" if hidden else ""
    return f"; {top!r} is the name of ftjobs' own package{where}: rename your module or package"


def build(specs: list[HandlerSpec]) -> list[Handler]:
    """Instantiate every configured handler (not set up yet)."""
    handlers: list[Handler] = []
    for index, spec in enumerate(specs):
        cls = load_type(spec.type)
        options = convert(spec.options, cls.Options, root=f"handlers[{index}]")
        try:
            handler = cls(spec.name, options)
        except ConfigError as exc:  # a handler checks its options (and templates) when it is built
            raise ConfigError(f"handlers[{index}] ({spec.name}): {exc}") from None
        handlers.append(handler)
    return handlers
