"""Client CPU of one pipelined batch of EVALSHA writes: redis-py's way (`read_response` per reply, the packer
in `processor.enqueue`) against `processor.resp` (hiredis' packer, one pass over the replies).

    python -m bench.pipeline [--redis-url URL] [--batches 2000]

The script returns what the enqueue script returns ({1, id, verdict}) for the same arguments (5 keys,
10 values, a ~1 KB record), so packing and parsing cost what they cost in the receiver; the server does
next to nothing. Prints client CPU µs per write, median of 3 alternating rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import redis.asyncio as redis

from processor import resp
from processor.enqueue import Lua, _get_connection, _pack

SCRIPT = "return {1, ARGV[10], ''}"


def calls(n: int) -> list[tuple[list[Any], list[Any]]]:
    keys = ["b:seen:wh_1", "b:events", "b:job:ftjob-1", "b:timeline:ftjob-1", "b:jobs"]
    args = [86400, "succeeded", 1700000000.0, "api", 7, "push", "ftjob-1", 604800, "wh_1", "1700000000.123"]
    return [(keys, [*args, b"e", b"x" * 1000]) for _ in range(n)]


async def old_way(client: redis.Redis, lua: Lua, batch: list[tuple[list[Any], list[Any]]]) -> list[Any]:
    return await lua.run(client, batch)


async def new_way(client: redis.Redis, lua: Lua, batch: list[tuple[list[Any], list[Any]]]) -> list[Any]:
    packed = b"".join(resp.pack((b"EVALSHA", lua.sha, len(k), *k, *a)) for k, a in batch)
    pool = client.connection_pool
    conn = await _get_connection(pool)
    try:
        return await resp.exchange(conn, packed, len(batch))
    except BaseException:
        await conn.disconnect()
        raise
    finally:
        await pool.release(conn)


async def measure(url: str, batches: int, sizes: list[int]) -> None:
    client = redis.Redis.from_url(url)
    lua = Lua(SCRIPT)
    await client.script_load(SCRIPT)
    assert _pack(b"X", 1.5, b"y") == resp.pack((b"X", 1.5, b"y"))
    for size in sizes:
        batch = calls(size)
        a, b = await old_way(client, lua, batch), await new_way(client, lua, batch)
        assert a == b, (a[:1], b[:1])
        figures: dict[str, list[float]] = {"read_response": [], "resp.exchange": []}
        for _ in range(3):
            for name, way in (("read_response", old_way), ("resp.exchange", new_way)):
                started = time.process_time()
                for _ in range(max(1, batches // size)):
                    await way(client, lua, batch)
                figures[name].append((time.process_time() - started) / (max(1, batches // size) * size) * 1e6)
        for name, values in figures.items():
            print(
                f"batch {size:3}  {name:14} {statistics.median(values):6.1f} µs/write "
                f"(min {min(values):.1f}, max {max(values):.1f})"
            )
    await client.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--batches", type=int, default=4000, help="writes per round and size")
    parser.add_argument("--sizes", default="1,8,32,128")
    args = parser.parse_args()
    from processor.service import run_async

    run_async(measure(args.redis_url, args.batches, [int(s) for s in args.sizes.split(",")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
