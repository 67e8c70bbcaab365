"""Helpers for unit-testing a handler without a queue: build a `Delivery`, a context, and route an event.

Shipped in the package so handler authors can test the way the worker would call them, with no Redis and
no worker process:

    from processor.testing import delivery_from_sample, run_through_routing

    async def test_audit_sees_failures() -> None:
        handler = Audit("audit", Audit.Options(url="http://127.0.0.1:9/"))
        outcome = await run_through_routing(handler, {"status": "failed"}, delivery_from_sample("failed"))
        assert outcome.delivered

`run_through_routing` applies the `when` rule exactly as the worker does (`processor.routing.Rule`), then
calls `setup`, the handler, and `close`. Whatever the handler raises (`RetryLater`, `PermanentFailure`, any
other error) reaches the test unchanged: retries and dead letters are the worker's business, not the
handler's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol, cast

import msgspec
import redis.asyncio as redis

from processor import models
from processor.errors import ConfigError
from processor.handler import Delivery, HandlerContext, NeedsClose, NeedsSetup
from processor.models import Envelope, Event, FineTuningJob, decode_body
from processor.routing import Rule
from processor.settings import HandlerSpec, convert

__all__ = [
    "Routed",
    "delivery_for",
    "delivery_from_json",
    "delivery_from_sample",
    "fake_context",
    "run_through_routing",
    "sample_job",
]


def sample_job(status: str = "succeeded", **changes: Any) -> FineTuningJob:
    """A realistic fine-tuning job in `status` (from the packaged samples), with any field replaced.

    `sample_job("failed", metadata={"owner": "ana@example.com"})` is a failed job carrying that metadata.
    """
    return msgspec.structs.replace(models.sample_job(status), **changes)


def delivery_for(event: Event, *, handler: str = "test", attempt: int = 1) -> Delivery:
    """The `Delivery` the worker would build for `event` (same idempotency key shape: `{handler}:{event id}`)."""
    return Delivery(event=event, handler=handler, attempt=attempt, idempotency_key=f"{handler}:{event.id}")


def delivery_from_sample(
    status: str = "succeeded", *, handler: str = "test", attempt: int = 1, **changes: Any
) -> Delivery:
    """A delivery of a pushed job event in `status`; `changes` replace fields of the job (see `sample_job`)."""
    job = sample_job(status, **changes)
    event = Event.from_body(job, webhook_id=f"test:{job.id}:{status}", received_at=time.time())
    return delivery_for(event, handler=handler, attempt=attempt)


def delivery_from_json(path: str | Path, *, handler: str = "test", attempt: int = 1) -> Delivery:
    """A delivery of the event in a JSON file: a fine-tuning job object, or a thin webhook envelope (whose
    event carries no job, as before hydration). Raises `ConfigError` naming the file when it is neither."""
    try:
        body = decode_body(Path(path).read_bytes())
    except (OSError, msgspec.DecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    webhook_id = body.id if isinstance(body, Envelope) else f"test:{body.id}:{body.status}"
    event = Event.from_body(body, webhook_id=webhook_id, received_at=time.time())
    return delivery_for(event, handler=handler, attempt=attempt)


class _NoRedis:
    """Stands in for the Redis client when a test gives none: any use says so, instead of a confusing
    `AttributeError` on None."""

    def __getattr__(self, name: str) -> NoReturn:
        raise RuntimeError(
            f"this test context has no Redis (the handler used .{name}): pass fake_context(redis_client=client)"
        )


def fake_context(
    redis_client: redis.Redis | None = None,
    *,
    handler: str = "test",
    prefix: str = "ftjobs-test",
    timeout_s: float = 10.0,
) -> HandlerContext:
    """A `HandlerContext` for `setup`: your own Redis client (a test database), or none for a handler that keeps
    no state. The key prefix is `{prefix}:h:{handler}`, as the worker builds it."""
    client = redis_client if redis_client is not None else cast(redis.Redis, _NoRedis())
    return HandlerContext(redis=client, key_prefix=f"{prefix}:h:{handler}", timeout_s=timeout_s)


class Callable(Protocol):
    """The part of a handler the test kit needs: its name and `__call__` (`Options` is not needed here, and a
    class attribute `Options = MyOptions` reads to mypy as a type alias, not as the Protocol's variable)."""

    name: str

    async def __call__(self, delivery: Delivery) -> None: ...


@dataclass(frozen=True)
class Routed:
    """What `run_through_routing` did: `delivered` is True when the rule matched and the handler returned;
    otherwise `skipped` says which condition the event failed (the same sentence `check-config --event` prints)."""

    delivered: bool
    skipped: str = ""


async def run_through_routing(
    handler: Callable,
    when: Rule | HandlerSpec | dict[str, Any] | None,
    delivery: Delivery | Event,
    *,
    context: HandlerContext | None = None,
) -> Routed:
    """Route `delivery` by `when` (a `Rule`, a `[[handlers]]` spec, or the `when` table as a dict), and when it
    matches, call the handler as the worker does: `setup(context)` first and `close()` after, if it has them.

    Exceptions from the handler propagate, so a test can assert `RetryLater` or `PermanentFailure`."""
    rule = _rule(when)
    if isinstance(delivery, Event):
        delivery = delivery_for(delivery, handler=handler.name)
    why = rule.mismatch(delivery.event)
    if why:
        return Routed(delivered=False, skipped=why)
    if isinstance(handler, NeedsSetup):
        await handler.setup(context or fake_context(handler=handler.name))
    try:
        await handler(delivery)
    finally:
        if isinstance(handler, NeedsClose):
            await handler.close()
    return Routed(delivered=True)


def _rule(when: Rule | HandlerSpec | dict[str, Any] | None) -> Rule:
    if when is None:
        return Rule()
    if isinstance(when, Rule):
        return when
    if isinstance(when, HandlerSpec):
        return when.when
    rule: Rule = convert(when, Rule, root="when")
    return rule
