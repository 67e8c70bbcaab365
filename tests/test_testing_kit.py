"""The handler author's test kit (`processor.testing`): deliveries from samples and files, a context, routing."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as redis

from processor.errors import ConfigError
from processor.handler import Delivery, HandlerContext, NoOptions, PermanentFailure
from processor.routing import Rule
from processor.settings import HandlerSpec
from processor.testing import (
    delivery_from_json,
    delivery_from_sample,
    fake_context,
    run_through_routing,
    sample_job,
)
from tests.conftest import ROOT

SAMPLES = ROOT / "processor" / "samples"


class Counter:
    """A handler that keeps state in Redis, as a real one keeps threads: counts deliveries per job."""

    Options = NoOptions

    def __init__(self, name: str, options: NoOptions) -> None:
        self.name = name
        self.seen: list[Delivery] = []
        self.closed = False

    async def setup(self, context: HandlerContext) -> None:
        self.redis, self.key = context.redis, f"{context.key_prefix}:count"

    async def __call__(self, delivery: Delivery) -> None:
        if delivery.event.job is not None and delivery.event.job.metadata == {"poison": "1"}:
            raise PermanentFailure("poisoned")
        self.seen.append(delivery)
        await self.redis.hincrby(self.key, delivery.event.job_id, 1)

    async def close(self) -> None:
        self.closed = True


def test_delivery_from_sample_builds_the_status_and_changes_asked_for() -> None:
    delivery = delivery_from_sample("cancelled", handler="audit", metadata={"owner": "ana"})
    event = delivery.event
    assert event.type == "fine_tuning.job.cancelled" and event.status == "cancelled"
    assert event.job is not None and event.job.metadata == {"owner": "ana"}
    assert delivery.handler == "audit" and delivery.attempt == 1
    assert delivery.idempotency_key == f"audit:{event.id}"
    assert sample_job("failed").failed_error is not None


def test_delivery_from_json_reads_a_job_or_a_thin_envelope(tmp_path: Path) -> None:
    pushed = delivery_from_json(SAMPLES / "fine_tuning_job.failed.json")
    assert pushed.event.source == "push" and pushed.event.status == "failed" and pushed.event.job is not None
    thin = delivery_from_json(SAMPLES / "webhook_event.fine_tuning.job.succeeded.json")
    assert thin.event.source == "webhook" and thin.event.job is None and thin.event.status == "succeeded"
    bad = tmp_path / "bad.json"
    bad.write_text('{"object": "nonsense"}')
    with pytest.raises(ConfigError, match=r"bad\.json"):
        delivery_from_json(bad)


async def test_routing_skips_with_the_reason_and_delivers_a_match(rclient: redis.Redis, prefix: str) -> None:
    handler = Counter("count", NoOptions())
    context = fake_context(rclient, handler="count", prefix=prefix)
    skipped = await run_through_routing(
        handler, {"status": "failed"}, delivery_from_sample("succeeded"), context=context
    )
    assert not skipped.delivered and "status 'succeeded' is not one of ['failed']" in skipped.skipped
    assert handler.seen == []
    failed = delivery_from_sample("failed")
    routed = await run_through_routing(handler, Rule(status="failed"), failed, context=context)
    assert routed.delivered and handler.seen == [failed] and handler.closed
    assert await rclient.hget(f"{prefix}:h:count:count", failed.event.job_id) == b"1"


async def test_routing_needs_the_job_for_job_conditions_and_accepts_a_spec() -> None:
    spec = msgspec.convert({"name": "n", "type": "log", "when": {"model": "gpt-4*"}}, HandlerSpec)
    thin = delivery_from_json(SAMPLES / "webhook_event.fine_tuning.job.succeeded.json")
    outcome = await run_through_routing(Counter("n", NoOptions()), spec, thin.event)
    assert not outcome.delivered and "carries none" in outcome.skipped
    with pytest.raises(ConfigError, match=r"when: Object contains unknown field `statu`"):
        await run_through_routing(Counter("n", NoOptions()), {"statu": "failed"}, thin)


async def test_handler_errors_reach_the_test_and_close_still_runs(rclient: redis.Redis) -> None:
    handler = Counter("count", NoOptions())
    with pytest.raises(PermanentFailure, match="poisoned"):
        await run_through_routing(
            handler, None, delivery_from_sample("failed", metadata={"poison": "1"}), context=fake_context(rclient)
        )
    assert handler.closed


async def test_a_context_without_redis_says_so_when_used(rclient: redis.Redis) -> None:
    handler = Counter("count", NoOptions())
    with pytest.raises(RuntimeError, match=r"no Redis \(the handler used \.hincrby\)") as refused:
        await run_through_routing(handler, None, delivery_from_sample("succeeded"))
    # The call it suggests is one that works.
    suggested = re.search(r"pass fake_context\((\w+)=client\)", str(refused.value))
    assert suggested is not None, refused.value
    context = fake_context(**{suggested.group(1): rclient})
    assert isinstance(context, HandlerContext) and context.redis is rclient
