"""Redis clients for tests: the cluster client when the URL is a node of a Redis/Valkey Cluster, else the
one-server client, so the same tests run against one server (`REDIS_URL` or the embedded Valkey) and against
a cluster (`REDIS_URL` of any node).

The async factory is the product's own `processor.client.open_client`, so the tests connect the way ftjobs
does; the sync one asks the server the same question (`INFO cluster`) once per URL.
"""

from __future__ import annotations

import functools
from typing import Any, TypeAlias

import redis
from redis.cluster import RedisCluster

from processor.client import Client, open_client

SyncClient: TypeAlias = "redis.Redis | RedisCluster"


@functools.cache
def is_cluster(url: str) -> bool:
    """Whether the server at `url` is a node of a cluster (asked once per URL; a test URL does not change)."""
    with redis.Redis.from_url(url, socket_timeout=5.0) as client:
        info: Any = client.info("cluster")
    return bool(int(info.get("cluster_enabled", 0)))


def sync_client(url: str) -> SyncClient:
    """A blocking client for `url`: `redis.cluster.RedisCluster` on a cluster, else `redis.Redis`."""
    if is_cluster(url):
        return RedisCluster.from_url(url)
    return redis.Redis.from_url(url)


async def async_client(url: str) -> Client:
    """An asyncio client for `url`, chosen as ftjobs chooses it (`processor.client.open_client`)."""
    return await open_client(url)
