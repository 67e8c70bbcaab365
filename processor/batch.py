"""A Lua script run for many calls at once: one pipelined round trip per Redis node, confirmed by WAIT.

The enqueuer's batch (`processor.enqueue`) goes through `Lua.run`: every call is EVALSHA (the script loaded
again when the server lost it), packed by hiredis and its replies parsed in one pass (`processor.resp`). On a
cluster each call goes to the node of its slot (all of a call's keys share it), and calls the cluster
redirected (MOVED/ASK/TRYAGAIN/CLUSTERDOWN) are sent again once its layout is known: they were not applied.
With `wait_command`, each node's exchange ends with WAIT or WAITAOF on the same connection, and a call whose
write is not confirmed fails with `NotReplicated`.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Final

import redis.asyncio as redis
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    RedisError,
    SlotNotCoveredError,
    TryAgainError,
)

from processor import resp
from processor.client import REDIS_ERRORS, Client

log = structlog.get_logger()


class NotReplicated(RedisError):
    """The write was applied but not confirmed by enough replicas (or AOFs) in time: the sender must retry."""


class Lua:
    """A Lua script sent by EVALSHA in pipelines, and loaded again when the server lost it (NOSCRIPT, e.g.
    after a restart or a failover). redis-py's `Script` asks SCRIPT EXISTS before every pipeline: a round trip
    we save. On a cluster, the calls are sent to the node of each call's slot (all of a call's keys share it),
    one pipelined exchange per node."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def run(
        self, client: Client, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]], wait: Sequence[Any] = ()
    ) -> list[Any]:
        """One pipelined round trip per node for `calls` of (keys, args); per-call errors come back as
        exceptions. `wait`: a WAIT/WAITAOF command sent after the calls on the same connection; when it
        reports too few copies, the calls that wrote get `NotReplicated`."""
        if not isinstance(client, RedisCluster):
            return await self._on(_Route(client), calls, wait)
        # A new cluster client knows no slot's node until its first command initializes it, and the enqueuer
        # may be that first user (a poller's, a script's): initialize it here (a flag check once it is).
        await client.initialize()
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for _ in range(_REDIRECTS):
            by_node: dict[str, list[int]] = defaultdict(list)
            for i in todo:
                by_node[_node_of(client, calls[i][0][0])].append(i)
            results = await asyncio.gather(
                *(self._on_node(client, node, [calls[i] for i in idx], wait) for node, idx in by_node.items()),
                return_exceptions=True,
            )
            moved = False
            for idx, result in zip(by_node.values(), results, strict=True):
                if isinstance(result, BaseException):  # the node is away (a failover?): learn the new layout
                    moved = True
                    result = [result] * len(idx)
                for i, reply in zip(idx, result, strict=True):
                    replies[i] = reply
                    moved = moved or isinstance(reply, _REDIRECTED)
            todo = [i for i in todo if isinstance(replies[i], _REDIRECTED)]
            if moved:
                await _refresh(client)
            if any(isinstance(replies[i], TryAgainError | ClusterDownError) for i in todo):
                await asyncio.sleep(_REDIRECT_PAUSE_S)  # a slot in migration, or a failover under way
            if not todo:
                break
        return replies

    async def _on_node(
        self, client: RedisCluster, node: str, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]], wait: Sequence[Any]
    ) -> list[Any]:
        return await self._on(_Route(client, node), calls, wait)

    async def _on(
        self, route: _Route, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]], wait: Sequence[Any]
    ) -> list[Any]:
        replies = await self._exchange(route, calls, wait, load=False)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            again = await self._exchange(route, [calls[i] for i in missing], wait, load=True)
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _exchange(
        self, route: _Route, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]], wait: Sequence[Any], load: bool
    ) -> list[Any]:
        # The commands are packed here (hiredis' packer) and written on one pooled connection, and the replies
        # parsed in one pass (`resp.exchange`): redis-py's pipeline packs each argument through several layers
        # and reads each reply on its own, which costs more than the Lua calls themselves.
        packed = b"".join(resp.pack((b"EVALSHA", self.sha, len(keys), *keys, *args)) for keys, args in calls)
        if load:
            packed = resp.pack((b"SCRIPT", b"LOAD", self.source)) + packed
        if wait:
            packed += resp.pack(wait)
        conn = await route.acquire()
        try:
            got = await resp.exchange(conn, packed, int(load) + len(calls) + int(bool(wait)))
            if load and isinstance(got[0], Exception):
                raise got[0]
            # One call's error (e.g. NOSCRIPT, MOVED) comes back in its place; the others still answer.
            replies = got[int(load) : int(load) + len(calls)]
            if wait:
                failure = _unconfirmed(wait, got[-1])
                if failure is not None:
                    # A duplicate too: its first write may be the one no replica has yet (a retry after a 503).
                    replies = [r if isinstance(r, Exception) else failure for r in replies]
            return replies
        except BaseException:
            await conn.disconnect()  # a half-read connection must not go back to the pool
            raise
        finally:
            await route.release(conn)


#: MOVED/ASK/TRYAGAIN/CLUSTERDOWN: the call was not applied; it is sent again once the layout is known.
_REDIRECTED: Final = (MovedError, AskError, TryAgainError, ClusterDownError)
#: How many times calls redirected by the cluster are sent again before the error reaches the caller, and the
#: pause before sending again what the cluster asked to try later.
_REDIRECTS: Final = 3
_REDIRECT_PAUSE_S: Final = 0.05


def wait_command(replicas: int, aof: bool, timeout_ms: int) -> tuple[Any, ...]:
    """The command that confirms a batch's writes: WAIT for `replicas`, or WAITAOF (the local AOF and
    `replicas` replicas' AOFs); empty when nothing is to be confirmed."""
    if aof:
        return (b"WAITAOF", 1, replicas, timeout_ms)
    return (b"WAIT", replicas, timeout_ms) if replicas else ()


def _unconfirmed(wait: Sequence[Any], confirmed: Any) -> NotReplicated | None:
    """Why a batch's writes are not confirmed by the `wait` command's answer, or None when they are. The
    writes were applied even when the command itself failed (WAITAOF with the AOF turned off since the start
    check): unconfirmed, never "not stored"."""
    if isinstance(confirmed, Exception):
        return NotReplicated(f"the write could not be confirmed by {_wanted(wait)}: {confirmed}")
    if not _enough(wait, confirmed):
        return NotReplicated(f"the write was not confirmed by {_wanted(wait)} within {wait[-1]} ms (got {confirmed!r})")
    return None


def _enough(wait: Sequence[Any], confirmed: Any) -> bool:
    if wait[0] == b"WAITAOF":
        return isinstance(confirmed, list) and confirmed[0] >= 1 and confirmed[1] >= wait[2]
    return isinstance(confirmed, int) and confirmed >= wait[1]


def _wanted(wait: Sequence[Any]) -> str:
    if wait[0] == b"WAITAOF":
        return f"the append-only file here and on {wait[2]} replica(s)"
    return f"{wait[1]} replica(s)"


class _Route:
    """Where a batch goes: the one server's pool, or one cluster node's connections."""

    def __init__(self, client: Client, node: str | None = None) -> None:
        self.client = client
        self.node: Any = None
        if isinstance(client, RedisCluster):
            self.node = client.get_node(node_name=node) if node else None
            if self.node is None:
                raise ClusterDownError("no node serves this slot now (a failover?)")

    async def acquire(self) -> Any:
        if self.node is not None:
            return self.node.acquire_connection()
        assert isinstance(self.client, redis.Redis)
        return await _get_connection(self.client.connection_pool)

    async def release(self, conn: Any) -> None:
        if self.node is not None:
            if hasattr(self.node, "release"):
                self.node.release(conn)
            else:  # redis-py before 5.1: a node's free connections are a deque, returned to as its own code does
                self.node._free.append(conn)
        else:
            assert isinstance(self.client, redis.Redis)
            await self.client.connection_pool.release(conn)


def _node_of(client: RedisCluster, key: str) -> str:
    """The name of the master serving `key`'s slot ("" when the layout does not know it yet)."""
    try:
        node = client.get_node_from_key(key)
    except SlotNotCoveredError:
        return ""
    return node.name if node is not None else ""


async def _refresh(client: RedisCluster) -> None:
    """Ask the cluster for its layout again (after a failover, or a slot that moved)."""
    try:
        await client.nodes_manager.initialize()
    except (*REDIS_ERRORS, OSError) as exc:
        log.warning("redis_cluster_layout_unknown", error=str(exc))


async def _get_connection(pool: redis.ConnectionPool) -> Any:
    """A connected connection from `pool`, asked the way this redis-py wants it: before 5.3 the pool
    requires a command name (which one does not matter: it is not used); from 5.3 on it takes none and
    warns when given one."""
    if _wants_command_name(type(pool)):
        return await pool.get_connection("EVALSHA")  # type: ignore[no-untyped-call,unused-ignore]
    return await pool.get_connection()  # type: ignore[no-untyped-call,unused-ignore]


@functools.cache
def _wants_command_name(pool_class: type[redis.ConnectionPool]) -> bool:
    """Whether `pool_class.get_connection` has a required `command_name` (redis-py < 5.3), looked up once
    per pool class."""
    parameter = inspect.signature(pool_class.get_connection).parameters.get("command_name")
    return parameter is not None and parameter.default is inspect.Parameter.empty
