"""The producer's hand-packed EVALSHA path works on every redis-py the package allows.

redis-py before 5.3 requires a command name in `ConnectionPool.get_connection`; 5.3 and later take none and
warn when given one. The lowest-versions run in `.ci/run` runs the whole suite on the oldest allowed
redis-py; this test covers the other shape on whichever redis-py is installed.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import redis.asyncio as redis

from processor.client import Client
from processor.enqueue import Enqueuer, marker_entry_id
from processor.keys import Keys
from tests.clients import is_cluster


class PoolBefore53(redis.ConnectionPool):
    """A real pool whose `get_connection` requires a command name, as redis-py's did before 5.3."""

    async def get_connection(self, command_name: str, *keys: Any, **options: Any) -> Any:  # type: ignore[override]
        with warnings.catch_warnings():  # on redis-py >= 5.3 the name is deprecated; the parent ignores it
            warnings.simplefilter("ignore", DeprecationWarning)
            return await super().get_connection(command_name, *keys, **options)


async def test_enqueue_works_with_either_get_connection_signature_and_warns_on_neither(
    redis_url: str, prefix: str, rclient: Client
) -> None:
    if is_cluster(redis_url):
        pytest.skip("one-server pools only: the cluster client's own connection path is tests/test_cluster.py's")
    keys = Keys(prefix)
    pools = {
        "installed": redis.ConnectionPool.from_url(redis_url),
        "before-5.3": PoolBefore53.from_url(redis_url),
    }
    for name, pool in pools.items():
        client = redis.Redis(connection_pool=pool)
        try:
            enqueuer = Enqueuer(client, keys, ttl_s=3600)
            with warnings.catch_warnings():
                warnings.simplefilter("error", DeprecationWarning)
                first = await enqueuer.add(f"wh_{name}", {b"n": name.encode()})
                again = await enqueuer.add(f"wh_{name}", {b"n": b"again"})
        finally:
            await client.aclose()
            await pool.disconnect()
        assert first.new, name
        assert (again.new, again.entry_id) == (False, first.entry_id), name
    entries = await rclient.xrange(keys.quarantine)  # no event: the quarantine
    assert [fields[b"n"] for _, fields in entries] == [b"installed", b"before-5.3"]


async def test_the_dedupe_marker_holds_the_entry_id_as_a_number(prefix: str, rclient: Client) -> None:
    """`ms-seq` is stored as the integer `ms` followed by `seq` in three digits (an int-encoded string: 24-32
    bytes less per event than the text); a duplicate's answer is the entry id again. Markers written as text
    (by earlier releases, or for a sequence number beyond 999) still answer as they are."""
    keys = Keys(prefix)
    enqueuer = Enqueuer(rclient, keys, ttl_s=3600)
    first = await enqueuer.add("wh_a", {b"n": b"1"})
    seen = keys.quarantine_part.seen("wh_a")
    ms, seq = first.entry_id.split("-")
    assert await rclient.get(seen) == f"{ms}{int(seq):03d}".encode()
    assert marker_entry_id(await rclient.get(seen)) == first.entry_id
    assert await rclient.object("encoding", seen) == b"int"
    again = await enqueuer.add("wh_a", {b"n": b"2"})
    assert (again.new, again.entry_id) == (False, first.entry_id)
    for marker, entry_id in [
        ("1700000000000-1234", "1700000000000-1234"),
        ("1700000000000-7", "1700000000000-7"),
        ("1700000000000042", "1700000000000-42"),
        ("1700000000000999", "1700000000000-999"),
    ]:
        await rclient.set(keys.quarantine_part.seen(f"wh_{marker}"), marker)
        duplicate = await enqueuer.add(f"wh_{marker}", {b"n": b"3"})
        assert (duplicate.new, duplicate.entry_id) == (False, entry_id)
        assert marker_entry_id(marker.encode()) == entry_id  # how the dashboard reads a marker
    assert len(await rclient.xrange(keys.quarantine)) == 1


# The integer dedupe marker around sequence number 999, and a text marker of an older release (found by a review).
async def test_duplicates_answer_the_first_entry_id_for_every_sequence_number(prefix: str, rclient: Client) -> None:
    """Many entries in one millisecond: the stream's last id is put in the future at seq 995, so the script's
    own XADD '*' gives seq 996..1004 (integer markers up to 999, text beyond); every retry finds its entry."""
    keys = Keys(prefix)
    enqueuer = Enqueuer(rclient, keys, ttl_s=3600)
    ms = 9_999_999_999_999
    await rclient.xadd(keys.quarantine, {b"n": b"seed"}, id=f"{ms}-995")
    first = {f"wh_{i}": await enqueuer.add(f"wh_{i}", {b"n": str(i).encode()}) for i in range(9)}
    assert [e.entry_id for e in first.values()] == [f"{ms}-{seq}" for seq in range(996, 1005)]
    for webhook_id, entry in first.items():
        again = await enqueuer.add(webhook_id, {b"n": b"again"})
        assert (again.new, again.entry_id) == (False, entry.entry_id)
        marker = await rclient.get(keys.quarantine_part.seen(webhook_id))
        assert marker_entry_id(marker) == entry.entry_id
    assert await rclient.xlen(keys.quarantine) == 10


async def test_text_marker_of_an_older_release_answers_as_written(prefix: str, rclient: Client) -> None:
    keys = Keys(prefix)
    enqueuer = Enqueuer(rclient, keys, ttl_s=3600)
    for entry_id in ["1700000000000-0", "1700000000000-7", "1700000000000-1000", "0-1"]:
        await rclient.set(keys.quarantine_part.seen(f"old_{entry_id}"), entry_id)
        again = await enqueuer.add(f"old_{entry_id}", {b"n": b"x"})
        assert (again.new, again.entry_id) == (False, entry_id)
    assert await rclient.exists(keys.quarantine) == 0
