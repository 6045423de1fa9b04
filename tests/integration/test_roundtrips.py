"""One store round trip per guarded request, zero for the rest: counted on the wire, through a
loopback proxy between the app and a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import as_user, client
from redis_server import RedisServer


class CountingProxy:
    """Forwards TCP to Redis, parsing the client's RESP to count commands and writes."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.commands: Counter[str] = Counter()
        self.writes = 0  # client->server segments that carried at least one command
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)

    def reset(self) -> None:
        self.commands.clear()
        self.writes = 0

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def upstream_to_client() -> None:
            while data := await up_reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        pump = asyncio.create_task(upstream_to_client())
        buffer = b""
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            while data := await reader.read(65536):
                buffer += data
                buffer, names = _parse_commands(buffer)
                if names:
                    self.writes += 1
                    self.commands.update(names)
                up_writer.write(data)
                await up_writer.drain()
        up_writer.close()
        pump.cancel()


def _parse_commands(buffer: bytes) -> tuple[bytes, list[str]]:
    """Complete RESP arrays at the front of ``buffer``: their command names, and the rest."""
    names = []
    while buffer.startswith(b"*"):
        end = buffer.find(b"\r\n")
        if end < 0:
            break
        count, pos, parts = int(buffer[1:end]), end + 2, []
        for _ in range(count):
            end = buffer.find(b"\r\n", pos)
            if end < 0:
                return buffer, names
            size = int(buffer[pos + 1 : end])
            if len(buffer) < end + 2 + size + 2:
                return buffer, names
            parts.append(buffer[end + 2 : end + 2 + size])
            pos = end + 2 + size + 2
        names.append(parts[0].decode().upper())
        buffer = buffer[pos:]
    return buffer, names


@pytest.fixture
async def proxy(redis_server: RedisServer, redis_url: str) -> AsyncIterator[CountingProxy]:
    p = CountingProxy(redis_server.port)
    await p.start()
    yield p
    assert p.server is not None
    p.server.close()


async def test_one_round_trip_per_served_request_and_none_for_the_rest(
    proxy: CountingProxy, make_app: Any
) -> None:
    app = make_app(redis_url=proxy.url, paths=["/ad"], default_caps=["3/1h", "10/1d"])
    async with client(app) as c:
        await c.get("/ad?campaign_id=warm", headers=as_user("warm"))  # connection set-up
        proxy.reset()

        for i in range(20):  # sequential, so each command is its own round trip
            r = await c.get("/ad?campaign_id=c1&cpm=2.50", headers=as_user(f"u{i}"))
            assert r.status_code == 200
        assert proxy.commands == Counter({"EVALSHA": 20})
        assert proxy.writes == 20

        proxy.reset()
        for path in ("/other", "/ad", "/ad?cpm=2.00", "/other?campaign_id=c1", "/health"):
            await c.get(path, headers=as_user("u1"))
        assert proxy.commands == Counter()

        # A denial is one round trip too; a bad request makes none.
        await c.get("/ad?campaign_id=c2", headers=as_user("u1"))
        await c.get("/ad?campaign_id=c2", headers=as_user("u1"))
        await c.get("/ad?campaign_id=c2", headers=as_user("u1"))
        proxy.reset()
        r = await c.get("/ad?campaign_id=c2", headers=as_user("u1"))
        assert r.headers["x-xsp-decision"] == "frequency_capped"
        await c.get("/ad?campaign_id=c2&cpm=-1", headers=as_user("u1"))
        assert proxy.commands == Counter({"EVALSHA": 1})


async def test_a_failed_response_costs_exactly_one_more_round_trip_to_release(
    proxy: CountingProxy, make_app: Any
) -> None:
    app = make_app(redis_url=proxy.url)
    async with client(app) as c:
        await c.get("/ad?campaign_id=warm", headers=as_user("warm"))
        proxy.reset()
        r = await c.get("/status/503?campaign_id=c1", headers=as_user("u1"))
        assert r.status_code == 503
    assert proxy.commands == Counter({"EVALSHA": 2})  # reserve, then release


async def test_concurrent_decisions_share_pipeline_writes(
    proxy: CountingProxy, make_app: Any
) -> None:
    # The proxy runs on this test's event loop: 200 requests at once delay what it forwards.
    app = make_app(redis_url=proxy.url, store_timeout=5)
    async with client(app) as c:
        await c.get("/ad?campaign_id=warm", headers=as_user("warm"))
        proxy.reset()
        responses = await asyncio.gather(
            *(c.get("/ad?campaign_id=c1", headers=as_user(f"u{i}")) for i in range(200))
        )
    assert {r.status_code for r in responses} == {200}
    assert proxy.commands == Counter({"EVALSHA": 200})  # still one script per decision
    assert proxy.writes < 200  # but coalesced into fewer writes


async def test_stored_preferences_cost_no_extra_round_trip(
    proxy: CountingProxy, make_app: Any, redis_server: RedisServer
) -> None:
    app = make_app(redis_url=proxy.url)
    redis_server.command("HSET", app.store.user_key("u1"), "!b", "c1")
    redis_server.command("HSET", app.store.user_key("u2"), "!o", "1")
    async with client(app) as c:
        await c.get("/ad?campaign_id=warm", headers=as_user("warm"))
        proxy.reset()
        blocked = await c.get("/ad?campaign_id=c1", headers=as_user("u1"))
        opted_out = await c.get("/ad?campaign_id=c1", headers=as_user("u2"))
    assert blocked.headers["x-xsp-decision"] == "user_blocked"
    assert opted_out.status_code == 200  # stored opt-out under no_tracking: served, untracked
    assert proxy.commands == Counter({"EVALSHA": 2})
