"""Find handler types by name and build configured handlers (the engine's side of the plug-in contract).

`type = "slack"` is looked up in the `ftjobs.handlers` entry-point group, where built-ins and third-party
packages register alike; `type = "package.module:Class"` imports a class directly (handy for a handler that
lives in your own repository). Options are validated against the type's `Options` struct, with errors that
name the key (`handlers[2].webhook_url: ...`).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
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
        raise ConfigError(f"handler type {type_name!r}: cannot load {target}: {exc}") from None
    if not isinstance(obj, type) or not hasattr(obj, "Options"):
        raise ConfigError(f"handler type {type_name!r}: {target} is not a handler class with an Options struct")
    return obj


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
