"""Pipelined RESP round trips on a redis-py connection, packed and parsed in one pass each.

redis-py reads a pipeline's replies one `read_response` at a time, and each arms its own read timeout
(`socket_timeout`) and goes through the parser's layers: for a batch of EVALSHA writes that costs more than
the writes. `exchange` writes the packed commands, then feeds whatever bytes arrive to one `hiredis.Reader`
and takes every complete reply out of it, under one timeout for the whole batch. `pack` is hiredis' C
packer, with a Python fallback for what it does not take (and for a hiredis without one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Final

import hiredis
from redis._parsers.base import BaseParser  # its error table; a classmethod since redis-py 5.0
from redis.exceptions import AskError, ClusterDownError, ConnectionError, MovedError, ResponseError, TryAgainError

#: How much to read from the socket at once.
READ_BYTES: Final = 65536
#: hiredis' C packer (newer hiredis releases have it; without it, the Python loop of `pack` packs alike).
_HIREDIS_PACK: Final[Any] = getattr(hiredis, "pack_command", None)


def pack(args: Sequence[Any]) -> bytes:
    """One command in RESP (`*N`, then each argument as a bulk string); str() for what is not bytes.

    hiredis packs in C (about 3x faster than the loop below on an EVALSHA with a 1 KB record); it takes
    str, bytes, int and float, formatted as `str()` formats them. Anything else (a bool, a memoryview on an
    old hiredis) goes through the Python loop, so both give the same bytes for the same arguments.
    """
    if _HIREDIS_PACK is not None:
        try:
            return _HIREDIS_PACK(tuple(args))  # type: ignore[no-any-return]
        except TypeError:
            pass
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


def error(reply: ResponseError) -> Exception:
    """redis-py's exception for an error reply, mapped by redis-py's own table (NOSCRIPT → `NoScriptError`,
    ...) and, for a cluster's redirections (MOVED, ASK, TRYAGAIN, CLUSTERDOWN), by ours: redis-py before 6
    maps those only in its cluster client's parser. Callers test the same classes either way."""
    code, _, rest = str(reply).partition(" ")
    cluster = _CLUSTER_ERRORS.get(code)
    if cluster is not None:
        return cluster(rest)
    mapped: Exception = BaseParser.parse_error(str(reply))  # type: ignore[no-untyped-call,unused-ignore]
    return mapped


_CLUSTER_ERRORS: Final[dict[str, type[ResponseError]]] = {
    "MOVED": MovedError,
    "ASK": AskError,
    "TRYAGAIN": TryAgainError,
    "CLUSTERDOWN": ClusterDownError,
}


def parse_replies(reader: hiredis.Reader, data: bytes, replies: list[Any], n: int) -> None:
    """Feed `data` to `reader` and append to `replies` every reply it completes, up to `n` in all. Error
    replies are appended as exceptions (never raised): one call's error does not hide the others' answers."""
    reader.feed(data)
    while len(replies) < n:
        reply = reader.gets()
        if reply is False:
            return
        replies.append(error(reply) if isinstance(reply, ResponseError) else reply)


async def exchange(conn: Any, packed: bytes, n: int) -> list[Any]:
    """Send `packed` (`n` commands) on a connected redis-py asyncio connection and return its `n` replies.

    The connection must be idle (nothing unread) and is left idle when this returns. On any exception,
    cancellation included, the caller must disconnect it: replies may be half read. Every reply counts in
    `n`, a SCRIPT LOAD before the calls and a WAIT after them included; error replies come back as exceptions
    in their place, never raised (a caller that wants a SCRIPT LOAD or WAIT error raised checks its slot).
    """
    await conn.send_packed_command(packed, check_health=False)
    stream: asyncio.StreamReader = conn._reader  # the socket redis-py's own parser reads
    reader = hiredis.Reader(replyError=ResponseError)
    replies: list[Any] = []
    timeout_s = conn.socket_timeout
    async with asyncio.timeout(timeout_s):  # one for the batch; None: bounded by the caller's deadline
        while len(replies) < n:
            data = await stream.read(READ_BYTES)
            if not data:
                raise ConnectionError("Connection closed by server.")
            parse_replies(reader, data, replies, n)
    return replies
