"""An ftjobs handler plug-in: appends one JSON line per routed event to a file (an audit trail).

Registered under the short name `audit` through the `ftjobs.handlers` entry point in `pyproject.toml`, so a
configuration says `type = "audit"` once this package is installed.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import msgspec

from processor.handler import ConfigError, Delivery, HandlerContext, PermanentFailure

__all__ = ["AuditHandler", "AuditOptions"]


class AuditOptions(msgspec.Struct, forbid_unknown_fields=True):
    """`path`: the JSON-lines file to append to (its folder must exist)."""

    path: str


class AuditHandler:
    """Writes `{"event", "job_id", "status", "model", "key"}` per delivery; `key` is the idempotency key, so a
    reader can drop the rare duplicate a crash between write and acknowledgement may leave."""

    Options = AuditOptions

    def __init__(self, name: str, options: AuditOptions) -> None:
        self.name = name
        self.path = Path(options.path)
        if not self.path.parent.is_dir():
            raise ConfigError(f"path: folder {self.path.parent} does not exist")
        self.timeout_s = 10.0

    async def setup(self, context: HandlerContext) -> None:
        self.timeout_s = context.timeout_s

    async def __call__(self, delivery: Delivery) -> None:
        event = delivery.event
        line = {
            "event": event.type,
            "job_id": event.job_id,
            "status": event.status,
            "model": event.job.model if event.job is not None else None,
            "key": delivery.idempotency_key,
        }
        try:
            await asyncio.wait_for(asyncio.to_thread(self._append, json.dumps(line)), self.timeout_s)
        except PermissionError as exc:
            raise PermanentFailure(f"cannot write {self.path}: {exc.strerror}") from None

    def _append(self, line: str) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
