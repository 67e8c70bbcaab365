"""The handler contract: a small Protocol, and the values a handler is given.

This is the public import path for handler authors: `from processor.handler import Delivery, HandlerContext,
NoOptions, PermanentFailure, RetryLater` (built-in and third-party handlers alike import from here; the
engine never imports a handler's package, it loads handler classes by name through `processor.registry`).

A handler is a class with an `Options` struct (its own TOML keys, unknown keys rejected), built as
`Handler(name, options)`, with optional async `setup(context)`/`close()` and an async `__call__(delivery)`.
It returns on success, or raises `RetryLater` / `PermanentFailure` (any other exception counts as
`RetryLater`). The worker owns retries, timeouts and dead letters; handlers never import it.

A handler whose side effect must not repeat (a chat message, an email, a pipeline run) sets the class
attribute `effectively_once = True`: the worker then records each success under the delivery's
idempotency key and skips a redelivery of the same event.

The optional parts are Protocols of their own (`NeedsSetup`, `NeedsClose`, `EffectivelyOnce`), checked with
`isinstance`, so the engine reads them in a way mypy can follow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import redis.asyncio as redis
from msgspec import Struct
from redis.asyncio.cluster import RedisCluster

from processor.errors import ConfigError, PermanentFailure, RetryLater
from processor.models import Event

__all__ = [
    "ConfigError",
    "Delivery",
    "EffectivelyOnce",
    "Handler",
    "HandlerContext",
    "NeedsClose",
    "NeedsSetup",
    "NoOptions",
    "PermanentFailure",
    "RetryLater",
    "is_effectively_once",
]


class Delivery(Struct, frozen=True, kw_only=True):
    """One attempt to hand one event to one handler."""

    event: Event
    handler: str
    #: 1 on the first try.
    attempt: int
    #: Stable across retries and redeliveries of this event to this handler: send it downstream
    #: (`Idempotency-Key`) or use it to skip a side effect already done.
    idempotency_key: str


@dataclass(frozen=True)
class HandlerContext:
    """What `setup` gets: a Redis client, a key prefix of the handler's own (for state such as threads), and
    how long one outgoing request may take."""

    #: The one-server client, or the cluster client on a Redis Cluster (keep a key's commands single-key).
    redis: redis.Redis | RedisCluster
    #: `{prefix}:h:{handler name}`: keys under it belong to this handler.
    key_prefix: str
    #: The `[[handlers]]` table's `timeout_s`: the limit for the handler's outgoing request (HTTP, SMTP).
    #: The worker cuts the whole call off a little after it.
    timeout_s: float = 10.0


class NoOptions(Struct, forbid_unknown_fields=True):
    """For handlers that take no options of their own."""


class Handler(Protocol):
    """What the worker calls. `setup`, `close` and `effectively_once` are optional (see below)."""

    Options: ClassVar[type[Any]]
    name: str

    async def __call__(self, delivery: Delivery) -> None: ...


@runtime_checkable
class NeedsSetup(Protocol):
    """A handler with an async `setup`, called once before the first delivery."""

    async def setup(self, context: HandlerContext) -> None: ...


@runtime_checkable
class NeedsClose(Protocol):
    """A handler with an async `close`, called once after the last delivery."""

    async def close(self) -> None: ...


@runtime_checkable
class EffectivelyOnce(Protocol):
    """A handler that declares (with `effectively_once = True`) whether a success must not be repeated."""

    effectively_once: bool


def is_effectively_once(handler: object) -> bool:
    """True when the handler asked for its successes to be recorded (and redeliveries skipped)."""
    return isinstance(handler, EffectivelyOnce) and bool(handler.effectively_once)
