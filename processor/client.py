"""The Redis client ftjobs uses, one server or a cluster, and the Lua scripts it sends.

`open_client` detects a Redis/Valkey Cluster from any node's URL and returns redis-py's cluster client, else
the one-server client; neither re-sends a command after a connection error (a re-sent EVAL that had been
applied would run twice: ftjobs' own retries are the ones that know what is safe). Atomic steps are
`Script`s on keys of one slot: a cluster has no MULTI across slots, and redis-py's cluster client has none.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib.metadata import version
from typing import Any, Final, TypeAlias

import redis.asyncio as redis
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError
from redis.retry import Retry

#: What the client raises when Redis cannot be used right now. The cluster client raises its own
#: `RedisClusterException`, which is not a `RedisError`, when no node answers at all (every node down).
REDIS_ERRORS: Final = (RedisError, RedisClusterException)

log = structlog.get_logger()

#: A client of one server or of a cluster: the commands ftjobs sends are the same on both.
Client: TypeAlias = "redis.Redis | RedisCluster"


class Script:
    """A Lua script run by EVALSHA, and sent whole (EVAL) when the server does not have it: after a restart,
    or on a replica promoted by a failover (scripts are not replicated). Its keys must share one slot."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, client: Client, keys: Sequence[Any], args: Sequence[Any] = ()) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(self.source, len(keys), *keys, *args)


def connect(url: str, *, socket_timeout: float = 5.0) -> redis.Redis:
    """A client of the one server at `url` (`redis://`, `rediss://`, `unix://`) that fails fast when the
    server is away. Blocking reads need `socket_timeout` above their BLOCK time; the worker passes more."""
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=2.0,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


#: No command is sent twice. redis-py's cluster client sends a command again after a timeout or a lost
#: connection (10 times in 8.1; in 5.x 3 times per connection, then 3 times across the cluster), though the
#: server may have applied it. In 8.1 such an error also closes the node's idle connections while other tasks
#: may just have taken them, so their commands fail after being sent and are sent again too. Not all of
#: ftjobs' commands may be applied twice (XREADGROUP '>', INCR, a handler's side effect): the caller decides,
#: as with one server (`connect`). `retry` covers it all from 6.0 on (where the attempts argument is
#: deprecated); before, it is the connections' retry, and the attempts are the cluster's.
# Before 6.0 the cluster's pipelines (and the multi-key commands split into them) need one attempt, which
# lets a single command go once more after a connection error: use redis-py 6 or later on a cluster.
_SEND_ONCE: Final[dict[str, Any]] = {"retry": Retry(NoBackoff(), 0)}
REDIS_PY_MAJOR: Final = int(version("redis").split(".")[0])
if REDIS_PY_MAJOR < 6:
    _SEND_ONCE["cluster_error_retry_attempts"] = 1


async def open_client(
    url: str, *, socket_timeout: float = 5.0, cluster: bool | None = None, quiet: bool = False
) -> Client:
    """A client for `url`: redis-py's cluster client when the server there is a node of a Redis/Valkey Cluster
    (any node's URL will do), else the one-server client. `cluster` None asks the server (`INFO cluster`); a
    server that does not answer is taken for a single one, with a warning unless `quiet` (an operator command
    then fails on its first command anyway); set `[redis] cluster = "yes"` where a cluster may be away when
    ftjobs starts."""
    single = connect(url, socket_timeout=socket_timeout)
    if cluster is None:
        try:
            info: Any = await single.info("cluster")
            cluster = bool(int(info.get("cluster_enabled", 0)))
        except (*REDIS_ERRORS, OSError) as exc:
            if not quiet:
                log.warning(
                    "redis_cluster_unknown",
                    error=type(exc).__name__,
                    assuming="a single server",
                    hint='if it is a cluster node, set [redis] cluster = "yes"',
                )
            cluster = False
    if not cluster:
        return single
    await single.aclose()
    client = RedisCluster.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=2.0, **_SEND_ONCE)
    try:
        await client.initialize()  # learn the slots now: the enqueuer routes by them before any command ran
    except (*REDIS_ERRORS, OSError) as exc:  # away again: the first command tries once more
        log.warning("redis_cluster_layout_unknown", error=str(exc))
    return client


def text(value: Any) -> str:
    """A Redis reply value as text (bytes decoded, invalid UTF-8 replaced; None as "")."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "" if value is None else str(value)
