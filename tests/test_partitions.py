"""Partition plans and leases: every partition has exactly one worker in the plan, and a lease has one holder."""

from __future__ import annotations

import redis.asyncio as redis
from hypothesis import given
from hypothesis import strategies as st

from processor.keys import Keys
from processor.partitions import Leases, holders, plan
from tests.conftest import eventually


@given(st.integers(min_value=1, max_value=64), st.sets(st.text(min_size=1, max_size=8), min_size=1, max_size=9))
def test_the_plans_of_all_workers_cover_each_partition_exactly_once(partitions: int, workers: set[str]) -> None:
    shares = [plan(partitions, workers, me) for me in workers]
    assert sorted(p for share in shares for p in share) == list(range(partitions))
    # Shares differ by at most one partition: the work is spread evenly.
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_a_worker_not_yet_in_the_heartbeats_plans_with_itself() -> None:
    assert plan(4, ["b"], "a") == {0, 2} and plan(4, [], "a") == {0, 1, 2, 3}


def test_keys_of_one_partition_share_its_hash_tag_and_jobs_spread_over_partitions() -> None:
    keys = Keys("ftjobs", 16)
    part = keys.part("ftjob-abc")
    tagged = [part.events, part.seen("wh_1"), part.job("ftjob-abc"), part.timeline("ftjob-abc"), part.jobs]
    tagged += [part.retry("slack"), part.attempts("slack"), part.done("slack", "wh_1")]
    assert {key.split("{")[1].split("}")[0] for key in tagged} == {part.tag}
    assert keys.partition_of("ftjob-abc") == keys.partition_of("ftjob-abc")  # stable
    assert len({keys.partition_of(f"ftjob-{i}") for i in range(1000)}) == 16
    assert Keys("ftjobs").partition_of("ftjob-abc") == 0


async def test_a_lease_has_one_holder_until_it_is_dropped(rclient: redis.Redis, prefix: str) -> None:
    keys = Keys(prefix, 4)
    a, b = Leases(rclient, keys, "worker-a", 30.0), Leases(rclient, keys, "worker-b", 30.0)
    assert await a.take("slack", [0, 1]) == {0, 1}
    assert await b.take("slack", [1, 2]) == {2}  # 1 is a's
    assert await a.take("slack", [0, 1]) == {0, 1}  # renewed
    await b.drop("slack", 1)  # not b's: nothing happens
    assert await holders(rclient, keys, "slack") == {0: "worker-a", 1: "worker-a", 2: "worker-b"}
    await a.drop("slack", 1)
    assert await b.take("slack", [1]) == {1}
    assert await holders(rclient, keys, "other") == {}


async def test_a_lease_expires_when_its_holder_stops_renewing(rclient: redis.Redis, prefix: str) -> None:
    keys = Keys(prefix, 2)
    gone = Leases(rclient, keys, "worker-gone", 0.05)
    assert await gone.take("slack", [0]) == {0}
    alive = Leases(rclient, keys, "worker-alive", 30.0)
    assert await alive.take("slack", [0]) == set()

    async def taken() -> bool:  # the lease lasts 50 ms
        return await alive.take("slack", [0]) == {0}

    await eventually(taken)
