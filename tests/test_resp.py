"""processor.resp: packing and one-pass reply parsing give what redis-py's own path gives, on a real server."""

from __future__ import annotations

from typing import Any

import hiredis
import pytest
import redis.asyncio as redis
from hypothesis import given
from hypothesis import strategies as st
from redis.exceptions import MovedError, NoScriptError, ResponseError

from processor import resp
from processor.batch import Lua, _get_connection
from tests.clients import is_cluster

_ARGS = st.lists(
    st.one_of(
        st.binary(max_size=200),
        st.text(max_size=50),
        st.integers(min_value=-(2**80), max_value=2**80),
        st.floats(allow_nan=False),
        st.booleans(),
    ),
    min_size=1,
    max_size=20,
)


@given(args=_ARGS)
def test_pack_matches_the_python_packer(args: list[Any]) -> None:
    """hiredis' packer, or the fallback for what it refuses, gives the bytes `str()` of each argument gives."""
    expected = b"*%d\r\n" % len(args)
    for arg in args:  # RESP, written out: each argument a bulk string of its str() (bytes as they are)
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        expected += b"$%d\r\n%b\r\n" % (len(data), data)
    assert resp.pack(args) == expected


@given(sizes=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30))
def test_replies_split_anywhere_parse_the_same(sizes: list[int]) -> None:
    """However the bytes are cut into reads, the same replies come out, errors as exceptions in place."""
    data = (
        b"*3\r\n:1\r\n$15\r\n1700000000000-0\r\n$0\r\n\r\n-NOSCRIPT No matching script\r\n-ERR nope\r\n"
        b"-MOVED 3999 127.0.0.1:6381\r\n:7\r\n"
    )
    reader, replies, at, turn = hiredis.Reader(replyError=ResponseError), [], 0, 0
    while at < len(data):
        size = sizes[turn % len(sizes)]
        resp.parse_replies(reader, data[at : at + size], replies, 5)
        at, turn = at + size, turn + 1
    assert replies[0] == [1, b"1700000000000-0", b""]
    assert type(replies[1]) is NoScriptError and str(replies[1]) == "No matching script"
    assert type(replies[2]) is ResponseError and str(replies[2]) == "nope"  # as redis-py words it
    assert type(replies[3]) is MovedError and (replies[3].slot_id, replies[3].port) == (3999, 6381)
    assert replies[4] == 7


async def test_exchange_answers_as_read_response_does(redis_url: str, prefix: str, rclient: redis.Redis) -> None:
    """A batch with a script the server lacks: the same replies, NoScriptError included, and the connection
    is idle afterwards (the next command on it reads its own answer)."""
    if is_cluster(redis_url):
        pytest.skip("one server's pool; on a cluster, every enqueue test goes through resp.exchange per node")
    lua = Lua(f"return {{1, ARGV[1], KEYS[1]}} -- {prefix}")
    calls = [([f"{prefix}:k{i}"], [f"v{i}", b"x" * 3000]) for i in range(50)]
    packed = b"".join(resp.pack((b"EVALSHA", lua.sha, 1, *k, *a)) for k, a in calls)
    pool = rclient.connection_pool
    conn = await _get_connection(pool)
    try:
        missing = await resp.exchange(conn, packed, len(calls))
        assert all(isinstance(r, NoScriptError) for r in missing)
        await rclient.script_load(lua.source)
        replies = await resp.exchange(conn, packed, len(calls))
        assert replies == await lua.run(rclient, calls)
        assert replies[3] == [1, b"v3", f"{prefix}:k3".encode()]
        assert await resp.exchange(conn, resp.pack((b"PING",)), 1) == [b"PONG"]
    finally:
        await pool.release(conn)
