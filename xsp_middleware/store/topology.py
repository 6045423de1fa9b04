"""The redis-py clients a store URL means (see ``store_url.py`` for the URL grammar)."""

from __future__ import annotations

from typing import Any

from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..store_url import StoreURL
from .redis_compat import (
    NO_DRIVER_INFO,
    SlotMap,
    ask_any_master_for_commands,
    set_cluster_retry,
)


def async_client(topology: StoreURL, options: dict[str, Any]) -> Any:
    """A redis-py asyncio client for a standalone, Sentinel or Cluster URL, with ``options`` on
    every data-node connection. A cluster's slot map is read on first use."""
    import redis.asyncio as aredis

    if topology.kind == "cluster":
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        kwargs = topology.cluster_kwargs(asyncio=True)
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in topology.nodes],
            require_full_coverage=False,
            **kwargs,
            **options,
        )
        SlotMap(cluster)  # redis-py's internals we use are there, or a clear error now
        ask_any_master_for_commands(cluster)
        return cluster
    if topology.kind == "sentinel":
        return _sentinel_master(topology, options, asyncio=True)
    return aredis.Redis.from_url(topology.url, **options)


_BUILD_RETRIES = 3


def _sentinel_master(topology: StoreURL, options: dict[str, Any], *, asyncio: bool) -> Any:
    """A client of the master Sentinel names for the service (asyncio or sync): its
    connections ask the sentinels for the master again on every reconnect. The sentinels get
    the data nodes' timeouts and the URL's sentinel credentials."""
    from importlib import import_module

    clients: Any = import_module("redis.asyncio" if asyncio else "redis")
    sentinels: Any = import_module("redis.asyncio.sentinel" if asyncio else "redis.sentinel")
    kwargs = topology.sentinel_master_kwargs(
        sentinels.SentinelManagedSSLConnection, asyncio=asyncio
    )
    timeouts = {
        k: v for k, v in options.items() if k in ("socket_connect_timeout", "socket_timeout")
    }
    sentinel = sentinels.Sentinel(
        list(topology.nodes), sentinel_kwargs={**timeouts, **topology.sentinel_kwargs}
    )
    assert topology.service is not None
    return sentinel.master_for(topology.service, redis_class=clients.Redis, **kwargs, **options)


def sync_client(topology: StoreURL, options: dict[str, Any]) -> Any:
    """A redis-py sync client for a standalone, Sentinel or Cluster URL, with ``options``
    (timeouts, retries, protocol) on every data-node connection. A RedisCluster reads the slot
    map when built, so building one can raise redis-py's errors."""
    import redis

    if topology.kind == "cluster":
        from redis.cluster import ClusterNode, RedisCluster

        kwargs = topology.cluster_kwargs(asyncio=False)
        nodes = [ClusterNode(h, p) for h, p in topology.nodes]  # type: ignore[no-untyped-call]
        # redis-py asks COMMAND of the master that owns slot 0 while it is built, and with no
        # retries a dead one fails the whole client. Retries let it move to another master;
        # they are then switched off again for every connection.
        building = {**options, "retry": Retry(NoBackoff(), _BUILD_RETRIES)}
        cluster = RedisCluster(
            startup_nodes=nodes, require_full_coverage=False, **kwargs, **building
        )
        SlotMap(cluster)  # redis-py's internals we use are there, or a clear error now
        no_retry = options.get("retry")
        if no_retry is not None:
            set_cluster_retry(cluster, no_retry)
        return cluster
    if topology.kind == "sentinel":
        return _sentinel_master(topology, options, asyncio=False)
    return redis.Redis.from_url(topology.url, **options)


def connection_options(timeout: float, *, blocking: bool) -> dict[str, Any]:
    """What every connection to a data node gets, from either driver: no retries, no health
    checks, RESP2 and no CLIENT SETINFO (a new connection sends nothing before our first write,
    which carries SCRIPT LOADs and CLIENT SETNAME with the first decisions).

    The socket timeouts differ, on purpose, by how each driver keeps its deadline:

    * asyncio (``blocking=False``): decisions fail on their own deadlines, judged on evidence
      about the store (see pipeline.py). The socket timeouts only free a connection stuck on a
      hung server, or a connect to an unreachable one: as short as ``store_timeout``, they
      would count the event loop's lag against the store. So ``max(1 s, 10 x timeout)``.
    * blocking (``blocking=True``): a WSGI thread's read has no loop to lag behind it; the
      socket timeout *is* the decision's deadline, so it is ``store_timeout`` itself."""
    socket_timeout = timeout if blocking else max(1.0, timeout * 10)
    return {
        "socket_connect_timeout": socket_timeout,
        "socket_timeout": socket_timeout,
        "retry": Retry(NoBackoff(), 0) if blocking else AsyncRetry(NoBackoff(), 0),
        "health_check_interval": 0,
        "protocol": 2,
        **NO_DRIVER_INFO,
    }
