"""The seam into redis-py's internals (``xsp_middleware/store/redis_compat.py``) holds on the
installed redis-py, on a real ``redis-server`` and a real cluster: every accessor finds a
working object, and a guarded decision takes the fast path (its replies parsed from the
connection's own hiredis reader). Were the seam to miss, the store would still be right, but
silently slower, with weaker deadline evidence; these tests make that loud. CI runs them on the
lowest and the highest redis-py that ``pyproject.toml`` allows."""

from __future__ import annotations

import asyncio
import warnings
from typing import Any
from urllib.parse import urlsplit

import fakeredis
import hiredis
import pytest
import redis
import redis.asyncio as aredis
from conftest import as_user, client
from redis.backoff import NoBackoff
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis_topologies import RedisClusterNodes

from xsp_middleware import XSPMiddleware
from xsp_middleware.store import redis_compat
from xsp_middleware.store.redis_compat import (
    NO_DRIVER_INFO,
    NOT_ENOUGH_DATA,
    REDIS_VERSION,
    RedisCompatError,
    SlotMap,
    ask_any_master_for_commands,
    checkout,
    fast_path_available,
    hiredis_streams,
    node_connection_factory,
    peer,
    read_reply_within,
    server_address,
    set_cluster_retry,
    waiting_on_us,
)
from xsp_middleware.store.topology import async_client, sync_client
from xsp_middleware.store_url import parse_store_url

PING = b"*1\r\n$4\r\nPING\r\n"


def test_the_installed_redis_py_is_supported_and_offers_the_fast_path() -> None:
    assert (5, 0) <= REDIS_VERSION < (9,), redis.__version__
    assert fast_path_available(), "no hiredis parser: every reply would go through read_response"


async def _ping_through_the_reader(conn: Any) -> None:
    """PING written and its reply parsed the way the auto-pipeline does it."""
    streams = hiredis_streams(conn)
    assert streams is not None, "redis-py's hiredis parser moved: the pipeline would fall back"
    writer, stream, reader, read_size = streams
    assert isinstance(reader, hiredis.Reader)
    assert read_size > 0
    writer.write(PING)
    await writer.drain()
    reply = reader.gets()
    while reply is NOT_ENOUGH_DATA or reply is False:
        reader.feed(await stream.read(read_size))
        reply = reader.gets()
    assert reply == b"PONG"


async def test_a_stock_connection_exposes_its_streams_and_what_waits_on_it(redis_url: str) -> None:
    client = aredis.Redis.from_url(redis_url, protocol=2)
    conn = client.connection_pool.make_connection()
    assert hiredis_streams(conn) is None  # not connected yet: nothing to read from
    await conn.connect()
    try:
        streams = hiredis_streams(conn)
        assert streams is not None, "redis-py's hiredis parser moved: the pipeline would fall back"
        writer, stream, reader, read_size = streams
        assert read_size > 0
        assert waiting_on_us(conn) is False  # idle: nothing owed, nothing unread
        writer.write(PING)
        await writer.drain()
        for _ in range(100):  # the reply reaches the kernel; nobody has read it yet
            if waiting_on_us(conn):
                break
            await asyncio.sleep(0.005)
        assert waiting_on_us(conn) is True
        reader.feed(await stream.read(read_size))
        assert reader.gets() == b"PONG"
        assert reader.gets() is NOT_ENOUGH_DATA or reader.gets() is False
        assert waiting_on_us(conn) is False
        assert str(urlsplit(redis_url).port) in peer(conn)  # redis-py's own name for the server
    finally:
        await conn.disconnect()
        await client.aclose()


async def test_a_connection_of_another_class_gives_no_evidence() -> None:
    client = fakeredis.FakeAsyncRedis()
    conn = client.connection_pool.make_connection()
    assert hiredis_streams(conn) is None
    assert waiting_on_us(conn) is None
    assert peer(object()) == "the store"
    await client.aclose()


def test_connection_options_send_no_driver_info_without_a_deprecation(redis_url: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # lib_name on redis-py >= 7.1 would warn
        sync = redis.Redis.from_url(redis_url, protocol=2, **NO_DRIVER_INFO)
        assert sync.ping() is True
        sync.close()


def test_a_sync_pool_hands_out_a_connection_and_a_reply_waits_as_long_as_asked(
    redis_url: str,
) -> None:
    sync = redis.Redis.from_url(redis_url, protocol=2, socket_timeout=5, **NO_DRIVER_INFO)
    pool = sync.connection_pool
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no deprecated get_connection arguments
            conn = checkout(pool)
        try:
            conn.send_packed_command([PING])
            assert read_reply_within(conn, 1.0) == b"PONG"
            with pytest.raises(RedisTimeoutError):  # nothing owed: a short wait, not 5 s
                read_reply_within(conn, 0.05)
            # A reply that comes after the wait can still be read, if the connection was kept.
            conn.send_packed_command([b"*3\r\n$5\r\nBLPOP\r\n$6\r\nnokey!\r\n$3\r\n0.3\r\n"])
            with pytest.raises(RedisTimeoutError):
                read_reply_within(conn, 0.05, disconnect_on_error=False)
            assert read_reply_within(conn, 2.0) is None  # BLPOP's own timeout: a nil reply
        finally:
            pool.release(conn)
        url = urlsplit(redis_url)
        assert server_address(sync) == f"{url.hostname}:{url.port}"
        assert server_address(object()) == "the store"
    finally:
        sync.close()


async def test_a_guarded_decision_takes_the_fast_path(
    redis_url: str, make_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _decisions_take_the_fast_path(redis_url, make_app, monkeypatch)


async def test_a_guarded_decision_on_a_cluster_takes_the_fast_path(
    cluster_url: str, make_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _decisions_take_the_fast_path(cluster_url, make_app, monkeypatch)


async def _decisions_take_the_fast_path(
    url: str, make_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    found: list[Any] = []
    stock = redis_compat.hiredis_streams

    def counting(conn: Any) -> Any:
        streams = stock(conn)
        found.append(streams)
        return streams

    monkeypatch.setattr(redis_compat, "hiredis_streams", counting)
    app: XSPMiddleware = make_app(redis_url=url)
    async with client(app) as c:
        for i in range(3):
            response = await c.get("/decision?campaign_id=c1&cpm=2.50", headers=as_user(f"u{i}"))
            assert response.status_code == 200
            assert response.text.startswith("True|"), response.text
    assert found, "the auto-pipeline never looked for the hiredis reader"
    assert all(s is not None for s in found), "a batch was read through read_response"
    assert all(isinstance(s[2], hiredis.Reader) for s in found)


async def test_a_clusters_slot_map_nodes_and_connections(cluster: RedisClusterNodes) -> None:
    topology = parse_store_url(cluster.url)
    options = {"protocol": 2, "retry": Retry(NoBackoff(), 0), **NO_DRIVER_INFO}
    cluster_client = async_client(topology, options)
    try:
        slots = SlotMap(cluster_client)
        await slots.read()
        names = set()
        for slot in (0, 8000, 16383):
            node = slots.master_of(slot)
            assert slots.node(node.name) is node
            names.add(node.name)
        assert len(names) == 3  # three masters, one per third of the slots
        conn = node_connection_factory(slots.master_of(0))()
        await conn.connect()
        try:
            await _ping_through_the_reader(conn)
        finally:
            await conn.disconnect()
        # The COMMAND lookup asks any master that answers (async_client installed it); it
        # works with every master alive, and a keyless command then goes to its default node.
        await cluster_client.initialize()
        assert await cluster_client.ping() is True
    finally:
        await cluster_client.aclose()


def test_a_sync_clusters_slot_map_and_retries(cluster: RedisClusterNodes) -> None:
    topology = parse_store_url(cluster.url)
    no_retry = Retry(NoBackoff(), 0)
    sync_cluster = sync_client(topology, {"protocol": 2, "retry": no_retry, **NO_DRIVER_INFO})
    try:
        slots = SlotMap(sync_cluster)
        slots.read_blocking()
        node = slots.master_of(0)
        assert slots.node(node.name) is node
        pool = sync_cluster.get_redis_connection(node).connection_pool
        conn = checkout(pool)
        try:
            conn.send_packed_command([PING])
            assert read_reply_within(conn, 1.0) == b"PONG"
        finally:
            pool.release(conn)
        nodes = [n for n in sync_cluster.get_nodes() if n.redis_connection is not None]
        assert nodes
        assert all(n.redis_connection.get_retry() is no_retry for n in nodes)
    finally:
        sync_cluster.close()


def test_what_the_seam_cannot_find_is_a_clear_error_or_left_alone() -> None:
    plain = fakeredis.FakeRedis()
    with pytest.raises(RedisCompatError, match="nodes_manager"):
        SlotMap(plain)
    with pytest.raises(RedisCompatError, match="ClusterNode"):
        node_connection_factory(object())
    with pytest.raises(RedisCompatError, match="connection_kwargs"):
        set_cluster_retry(plain, Retry(NoBackoff(), 0))
    ask_any_master_for_commands(plain)  # no COMMAND lookup to spread: nothing changes
