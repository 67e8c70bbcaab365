"""Logging, configured in one function: JSON lines when not on a terminal, console output on one.

Modules do `log = structlog.get_logger()` and bind `webhook_id`, `job_id`, `handler` on the lines about an
event. Secrets are never passed to a logger; `redact` masks a URL's credentials for lines that name a server.

The records of the standard library's loggers (aiohttp's, asyncio's, redis-py's) are rendered by the same
renderer (`structlog.stdlib.ProcessorFormatter` on the root logger), so a JSON stream stays one JSON object a
line, tracebacks included. The keys an operator looks for (`event`, `handler`, `job_id`, `status`) come first.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from contextvars import ContextVar, Token
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import structlog
from structlog.typing import EventDict, Processor

from processor.humanize import terminal_safe

#: The keys shown first on a line, in this order; the others follow in the order they were bound.
FIRST_KEYS: Final = ("event", "handler", "job_id", "status")
_HANDLER_NAME: Final = "ftjobs"


#: The fields naming the delivery the current task works on (handler, webhook_id, job_id, ...), added to every
#: line logged meanwhile, the handler's own included. One ContextVar set per delivery: binding five fields
#: with `structlog.contextvars` costs five, and was a tenth of a no-op handler's dispatch.
_DELIVERY: Final[ContextVar[Mapping[str, Any] | None]] = ContextVar("ftjobs_delivery", default=None)


def bind_delivery(fields: Mapping[str, Any]) -> Token[Mapping[str, Any] | None]:
    """Name the delivery the current task works on in its log lines, until `unbind_delivery(token)`."""
    return _DELIVERY.set(fields)


def unbind_delivery(token: Token[Mapping[str, Any] | None]) -> None:
    _DELIVERY.reset(token)


def merge_delivery(logger: Any, method: str, event_dict: EventDict) -> EventDict:
    """A processor adding the current delivery's fields (`bind_delivery`); a line's own keys win."""
    fields = _DELIVERY.get()
    return {**fields, **event_dict} if fields else event_dict


def first_keys(logger: Any, method: str, event_dict: EventDict) -> EventDict:
    """A processor putting `FIRST_KEYS` first, so the useful part of a long line is where the eye starts."""
    ordered = {k: event_dict[k] for k in FIRST_KEYS if k in event_dict}
    ordered.update(event_dict)
    return ordered


def terminal_safe_values(logger: Any, method: str, event_dict: EventDict) -> EventDict:
    """On a terminal, text values with their control characters escaped (a sender's status or error must not
    drive the operator's terminal); JSON lines escape them already."""
    return {k: terminal_safe(v) if isinstance(v, str) else v for k, v in event_dict.items()}


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Set up structlog, and the stdlib root logger for other libraries' lines, once per process."""
    console = sys.stderr.isatty() if fmt == "auto" else fmt == "console"
    renderer: Any = structlog.dev.ConsoleRenderer(sort_keys=False) if console else structlog.processors.JSONRenderer()
    shared: list[Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info if not console else structlog.dev.set_exc_info,
        first_keys,
        *([terminal_safe_values] if console else []),
    ]
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, merge_delivery, *shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if h.get_name() != _HANDLER_NAME] + [handler]  # ours, once
    root.setLevel(max(logging.WARNING, logging.getLevelNamesMapping()[level.upper()]))


def redact(url: str) -> str:
    """`redis://user:secret@host:6379/0` → `redis://user:***@host:6379/0` (for log lines naming a server)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit(parts._replace(netloc=f"{user}***@{netloc}"))
