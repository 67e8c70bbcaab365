"""Logging, configured in one function: JSON lines when not on a terminal, console output on one.

Modules do `log = structlog.get_logger()` and bind `webhook_id`, `job_id`, `handler` on the lines about an
event. Secrets are never passed to a logger; `redact` masks a URL's credentials for lines that name a server.
"""

from __future__ import annotations

import logging
import sys
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import structlog


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Set up structlog (and the stdlib root logger, for aiohttp's own lines) once per process."""
    console = sys.stderr.isatty() if fmt == "auto" else fmt == "console"
    renderer: Any = structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if not console else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(logging.WARNING, logging.getLevelNamesMapping()[level.upper()]), stream=sys.stderr)


def redact(url: str) -> str:
    """`redis://user:secret@host:6379/0` → `redis://user:***@host:6379/0` (for log lines naming a server)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit(parts._replace(netloc=f"{user}***@{netloc}"))
