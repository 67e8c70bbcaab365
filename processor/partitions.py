"""Which worker consumes which partition of the events stream, per handler: a plan, and leases in Redis.

Each handler's partitions are shared out among the live workers that run it (their heartbeats): `plan` gives
a worker its share, the same answer in every worker for the same set of workers. A worker takes a lease on
each partition of its share (`Leases.take`: SET NX PX) and renews those it holds, and hands over the others:
its runner on the partition stops, lets the calls in flight finish (starting none), gives back what it still
holds, and only then lets go of the lease. So one partition is consumed by one worker per handler at a time —
a job's events reach a handler in order, never concurrently — and a partition never waits for more than one
lease: a dead worker's leases expire, and a worker that joins gets its share as soon as the others let go of it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any, Final

from processor.client import Client, Script
from processor.keys import Keys

#: Take a free lease, or extend one this consumer holds. KEYS: the lease. ARGV: consumer, ttl ms.
_TAKE: Final = Script("""
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
""")
#: Let go of a lease, only if this consumer holds it. KEYS: the lease. ARGV: consumer.
_DROP: Final = Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")


#: The part of a lease this worker counts on (the rest is a margin for clocks and a slow reply).
_SURE: Final = 0.8


def plan(partitions: int, workers: Iterable[str], me: str) -> set[int]:
    """The partitions `me` should consume among `workers` (the live ones running the handler; `me` counts
    even before its first heartbeat): round robin over the workers sorted by name."""
    names = sorted({*workers, me})
    mine = names.index(me)
    return {p for p in range(partitions) if p % len(names) == mine}


class Leases:
    """One consumer's leases on partitions, per handler (`{p}:lease:{handler}:{partition}`)."""

    def __init__(self, client: Client, keys: Keys, consumer: str, lease_s: float) -> None:
        self.client = client
        self.keys = keys
        self.consumer = consumer
        self.lease_s = lease_s
        self.ttl_ms = max(1, int(lease_s * 1000))
        #: (handler, partition) → until when (monotonic) the lease surely holds: it was set no earlier than
        #: the request was sent, so it lasts at least `lease_s` from then; a fifth of it is kept as a margin.
        self._until: dict[tuple[str, int], float] = {}

    async def take(self, group: str, partitions: Iterable[int]) -> set[int]:
        """Take or extend the leases on `partitions`; returns those this consumer holds now."""
        held = set()
        for p in partitions:
            sent = time.monotonic()
            if await _TAKE(self.client, [self.keys.lease(group, p)], [self.consumer, self.ttl_ms]):
                held.add(p)
                self._until[(group, p)] = sent + self.lease_s * _SURE
            else:
                self._until.pop((group, p), None)
        return held

    def left(self, group: str, partition: int) -> float:
        """How long the lease surely holds still (by this process's clock, without asking Redis); <= 0: it may
        have lapsed."""
        return self._until.get((group, partition), 0.0) - time.monotonic()

    async def drop(self, group: str, partition: int) -> None:
        self._until.pop((group, partition), None)
        await _DROP(self.client, [self.keys.lease(group, partition)], [self.consumer])


async def holders(client: Client, keys: Keys, group: str) -> dict[int, str]:
    """Who holds each partition's lease for `group` (`ftjobs status`)."""
    names: Sequence[str] = [keys.lease(group, p) for p in range(keys.partitions)]
    out: dict[int, str] = {}
    for p, name in enumerate(names):
        value: Any = await client.get(name)
        if value:
            out[p] = value.decode() if isinstance(value, bytes) else str(value)
    return out
