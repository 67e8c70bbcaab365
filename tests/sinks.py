"""Handlers for tests: real side effects in Redis, so any process (and the test) can observe them.

`type = "tests.sinks:Sink"` in a config; each delivery RPUSHes the event record (`encode_event`) to `{key}` and
counts the side effect per idempotency key in `{key}:count` (a hash), so "exactly once" is checked by the counts.
"""

from __future__ import annotations

import asyncio

import msgspec

from processor.client import Client
from processor.eventrecord import encode_event
from processor.handler import Delivery, PermanentFailure, RetryLater
from tests.clients import async_client

_RECORD = """
if ARGV[4] == '1' and redis.call('HSETNX', KEYS[2], ARGV[1], 1) == 0 then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[2])
redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
return 1
"""


class SinkOptions(msgspec.Struct, forbid_unknown_fields=True):
    redis_url: str
    key: str
    #: Fail this many first attempts (RetryLater) before succeeding; -1 fails forever.
    fail_times: int = 0
    #: Raise PermanentFailure instead of RetryLater.
    permanent: bool = False
    #: Ask for a retry after this many seconds.
    retry_after: float | None = None
    #: Sleep this long inside the handler (after recording the start).
    sleep_s: float = 0.0
    #: Skip the side effect when this idempotency key was already done. Off by default: like a Slack webhook or
    #: an SMTP relay, the sink then counts every call, so a test sees each side effect done twice.
    idempotent: bool = False


class Sink:
    Options = SinkOptions

    def __init__(self, name: str, options: SinkOptions) -> None:
        self.name = name
        self.options = options
        self.client: Client | None = None

    async def setup(self, context: object) -> None:
        self.client = await async_client(self.options.redis_url)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    async def __call__(self, delivery: Delivery) -> None:
        assert self.client is not None
        key = self.options.key
        await self.client.rpush(f"{key}:starts", delivery.idempotency_key)
        if self.options.sleep_s:
            await asyncio.sleep(self.options.sleep_s)
        fail = self.options.fail_times
        if fail < 0 or delivery.attempt <= fail:
            if self.options.permanent:
                raise PermanentFailure(f"sink {self.name} refuses attempt {delivery.attempt}")
            raise RetryLater(f"sink {self.name} fails attempt {delivery.attempt}", after=self.options.retry_after)
        # The side effect and its idempotency marker are one atomic step, as a real sink's should be.
        await self.client.eval(
            _RECORD,
            3,
            key,
            f"{key}:done",
            f"{key}:count",
            delivery.idempotency_key,
            encode_event(delivery.event),
            delivery.event.id,
            int(self.options.idempotent),
        )
