"""The seam into redis-py's private connection internals (``xsp_middleware/seam.py``) still
holds on the installed redis-py: the auto-pipeline's reads and its deadline evidence depend on
it, and would silently fall back (slower reads, weaker evidence) if it did not."""

from __future__ import annotations

import asyncio

import fakeredis
import redis.asyncio as aredis

from xsp_middleware.store.redis_compat import NOT_ENOUGH_DATA, hiredis_streams, waiting_on_us


async def test_a_stock_connection_exposes_its_streams_and_what_waits_on_it(redis_url: str) -> None:
    client = aredis.Redis.from_url(redis_url, protocol=2)
    conn = client.connection_pool.make_connection()
    await conn.connect()
    try:
        streams = hiredis_streams(conn)
        assert streams is not None, "redis-py's hiredis parser moved: the pipeline would fall back"
        writer, stream, reader, read_size = streams
        assert read_size > 0
        assert waiting_on_us(conn) is False  # idle: nothing owed, nothing unread
        writer.write(b"*1\r\n$4\r\nPING\r\n")
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
    finally:
        await conn.disconnect()
        await client.aclose()


async def test_a_connection_of_another_class_gives_no_evidence() -> None:
    client = fakeredis.FakeAsyncRedis()
    conn = client.connection_pool.make_connection()
    assert hiredis_streams(conn) is None
    assert waiting_on_us(conn) is None
    await client.aclose()
