"""The handler contract: a small Protocol, and the one value a handler is called with.

A handler is a class with an `Options` struct (its own TOML keys, unknown keys rejected), built as
`Handler(name, options)`, with optional async `setup()`/`close()` and an async `__call__(delivery)`.
It returns on success, or raises `RetryLater` / `PermanentFailure` (any other exception counts as
`RetryLater`). The worker owns retries, timeouts and dead letters; handlers never import it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

from msgspec import Struct

from processor.errors import PermanentFailure, RetryLater
from processor.models import Event

__all__ = ["Delivery", "Handler", "NoOptions", "PermanentFailure", "RetryLater"]


class Delivery(Struct, frozen=True, kw_only=True):
    """One attempt to hand one event to one handler."""

    event: Event
    handler: str
    #: 1 on the first try.
    attempt: int
    #: Stable across retries and redeliveries of this event to this handler: send it downstream
    #: (`Idempotency-Key`) or use it to skip a side effect already done.
    idempotency_key: str


class NoOptions(Struct, forbid_unknown_fields=True):
    """For handlers that take no options of their own."""


@runtime_checkable
class Handler(Protocol):
    """What the worker calls. `setup` and `close` are optional (see `processor.registry`)."""

    Options: ClassVar[type[Any]]
    name: str

    async def __call__(self, delivery: Delivery) -> None: ...
