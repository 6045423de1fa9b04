"""Regression tests for failure paths found in review: nothing the store does may overspend,
leak a reservation, or escape as a 500."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from typing import Any

import redis.asyncio as aredis
from conftest import SECRET, as_user, client
from redis_server import RedisServer

from xsp_middleware import Settings
from xsp_middleware.settings import Rules
from xsp_middleware.store import Store
from xsp_middleware.store import pipeline as pipeline_module


class CuttingProxy:
    """Forwards to Redis; when armed, forwards the next write, then cuts the client off before
    any reply (the server ran the commands, the client cannot know)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.armed = False
        self.cuts = 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        cut = False

        async def upstream() -> None:
            nonlocal cut
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()
                if self.armed:
                    self.armed, cut = False, True
                    await asyncio.sleep(0.05)  # let Redis run it
                    self.cuts += 1
                    writer.transport.abort()
                    up_writer.close()
                    return
            up_writer.close()

        async def downstream() -> None:
            while data := await up_reader.read(65536):
                if not cut and not writer.is_closing():
                    writer.write(data)
                    await writer.drain()

        with contextlib.suppress(Exception):
            await asyncio.gather(upstream(), downstream())


def _store(url: str, **settings: Any) -> Store:
    return Store(Rules.from_settings(Settings(redis_url=url, secret_key=SECRET, **settings)))


async def test_a_release_cut_off_mid_flight_is_never_run_twice(redis_server: RedisServer) -> None:
    redis_server.command("FLUSHALL")
    proxy = CuttingProxy(redis_server.port)
    store = _store(await proxy.start())
    await store.set_campaign("c1", budget="0.002", cpm="1.00")  # two impressions
    rule = store.rules.rule_for("c1")
    kept = await store.reserve("c1", None, None, rule)
    released = await store.reserve("c1", None, None, rule)
    assert kept.reserved and released.reserved
    proxy.armed = True
    with contextlib.suppress(Exception):
        await store.release(released)  # ran on the server; the reply never came back
    for _ in range(100):  # the proxy cuts the connection 50 ms after forwarding the release
        if proxy.cuts:
            break
        await asyncio.sleep(0.01)
    assert proxy.cuts == 1
    view = await store.get_campaign("c1")
    assert (view.spent_units, view.impressions) == (10000, 1)  # refunded once, not twice
    more = [await store.reserve("c1", None, None, rule) for _ in range(3)]
    assert sum(r.reserved for r in more) == 1
    view = await store.get_campaign("c1")
    assert view.spent_units <= view.budget_units


async def test_a_reply_that_lands_as_the_request_is_cancelled_is_released(
    redis_url: str, monkeypatch: Any
) -> None:
    store = _store(redis_url)
    await store.set_campaign("c1", budget="1.00", cpm="1.00")
    original = pipeline_module.AutoPipeline.call
    holder: dict[str, asyncio.Task[Any]] = {}

    def call(self: Any, script: Any, *args: Any, **kwargs: Any) -> Any:
        future = original(self, script, *args, **kwargs)
        if script.name == "reserve":
            # The cancellation lands in the same loop iteration as the reply.
            future.add_done_callback(lambda _: holder["task"].cancel())
        return future

    monkeypatch.setattr(pipeline_module.AutoPipeline, "call", call)
    rule = store.rules.rule_for("c1")
    holder["task"] = asyncio.create_task(store.reserve("c1", store.user_key("u"), None, rule))
    with contextlib.suppress(asyncio.CancelledError):
        await holder["task"]
    monkeypatch.setattr(pipeline_module.AutoPipeline, "call", original)
    await asyncio.sleep(0.2)
    view = await store.get_campaign("c1")
    assert (view.spent_units, view.impressions) == (0, 0)


async def test_a_failing_release_never_escapes_as_a_500(redis_url: str, make_app: Any) -> None:
    app = make_app(redis_url=redis_url)
    user_key = app.store.user_key("u1")
    r = aredis.Redis.from_url(redis_url)
    inner = app.app

    async def corrupting(scope: Any, receive: Any, send: Any) -> None:
        await r.delete(user_key)
        await r.set(user_key, "not a hash")  # the release will hit WRONGTYPE
        await inner(scope, receive, send)

    app.app = corrupting
    async with client(app) as c:
        response = await c.get("/status/503?campaign_id=c1", headers=as_user("u1"))
    assert response.status_code == 503  # the handler's status, not a 500 from us
    await r.aclose()


async def test_malformed_stored_numbers_fall_back_to_settings(
    redis_url: str, make_app: Any
) -> None:
    app = make_app(redis_url=redis_url, default_budget="0.004")  # two impressions at CPM 2.00
    cfg_key, _ = app.store.campaign_keys("c1")
    r = aredis.Redis.from_url(redis_url)
    await r.hset(cfg_key, mapping={"budget": "1e400", "cost": "1.5", "daily_budget": "inf"})
    async with client(app) as c:
        codes = [
            (await c.get("/ad?campaign_id=c1", headers=as_user(f"u{i}"))).status_code
            for i in range(3)
        ]
    assert codes == [200, 200, 204]  # the settings' budget and price, not an infinite budget
    await r.aclose()


def test_one_store_used_from_many_event_loops_keeps_few_connections() -> None:
    server = RedisServer()
    try:
        store = _store(server.url)
        rule = store.rules.rule_for("c1")

        async def once() -> None:
            await store.reserve("c1", None, None, rule)

        for _ in range(30):
            asyncio.run(once())
        gc.collect()
        clients = server.command("CLIENT", "LIST").decode().count("\n")
        assert len(store._loops) <= 1
        assert clients < 10, f"{clients} connections still open"
    finally:
        server.stop()
