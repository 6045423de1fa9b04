"""Redis unreachable or hung: no 500s, the budget fails closed, answers come within the timeout."""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import as_user, client
from redis_server import RedisServer, free_port

from xsp_middleware import Settings

TIMEOUT = Settings().store_timeout  # every test here runs with the defaults


@pytest.fixture
def closed_port_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: connection refused


@pytest.fixture
def deaf_listener() -> Iterator[str]:
    """Accepts TCP (the kernel does) and never reads, with a small receive buffer: our first
    write (the script preload, about 100 KB) cannot all leave the process."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"


@pytest.fixture
def hung_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.signal(signal.SIGSTOP)  # accepts TCP (kernel backlog) but never answers
    yield server
    server.signal(signal.SIGCONT)
    server.stop()


async def _burst(app: Any, n: int = 60) -> list[tuple[int, str | None, float]]:
    # Late in a session this process holds a thousand tests' objects: a full collection of that
    # heap is a pause of pytest's, not the store's. Frozen, the collector still runs on the
    # objects the requests make, as in a server.
    gc.collect()
    gc.freeze()
    try:
        return await _timed_burst(app, n)
    finally:
        gc.unfreeze()


async def _timed_burst(app: Any, n: int) -> list[tuple[int, str | None, float]]:
    async with client(app) as c:

        async def one(i: int) -> tuple[int, str | None, float]:
            started = time.perf_counter()
            r = await c.get("/ad?campaign_id=c1&cpm=2.00", headers=as_user(f"u{i}"))
            return r.status_code, r.headers.get("x-xsp-decision"), time.perf_counter() - started

        return await asyncio.gather(*(one(i) for i in range(n)))


@pytest.mark.parametrize("where", ["refused", "hung", "deaf"])
async def test_unreachable_store_fails_closed_for_budget_within_the_timeout(
    where: str, make_app: Any, request: pytest.FixtureRequest
) -> None:
    if where == "refused":
        url = request.getfixturevalue("closed_port_url")
    elif where == "deaf":
        url = request.getfixturevalue("deaf_listener")
    else:
        url = request.getfixturevalue("hung_server").url
    app = make_app(redis_url=url)
    results = await _burst(app)
    assert {(status, reason) for status, reason, _ in results} == {(204, "store_unavailable")}
    # Each request answers within the timeout (plus scheduling slack for 60 in-process requests).
    assert max(seconds for _, _, seconds in results) < TIMEOUT + 0.15


async def test_budget_fail_open_serves_degraded_when_the_store_is_down(
    closed_port_url: str, make_app: Any
) -> None:
    app = make_app(redis_url=closed_port_url, budget_fail_open=True)
    async with client(app) as c:
        r = await c.get("/decision?campaign_id=c1", headers=as_user("u1"))
    assert r.status_code == 200
    allowed, reason, *_, degraded = r.text.split("|")
    assert (allowed, reason, degraded) == ("True", "served", "True")


async def test_non_ad_requests_still_pass_while_the_store_is_down(
    closed_port_url: str, make_app: Any
) -> None:
    app = make_app(redis_url=closed_port_url)
    async with client(app) as c:
        assert (await c.get("/other")).text == "other"


async def test_serving_resumes_when_redis_comes_back(make_app: Any) -> None:
    server = RedisServer()
    try:
        app = make_app(redis_url=server.url)
        assert {s for s, _, _ in await _burst(app, 5)} == {200}
        server.stop()
        assert {r for _, r, _ in await _burst(app, 5)} == {"store_unavailable"}
        server.start()  # same port, empty data, empty script cache
        # The circuit breaker may have opened (a probe 1 s later): serving resumes within 2 s.
        back_at = time.perf_counter()
        while {s for s, _, _ in await _burst(app, 5)} != {200}:
            assert time.perf_counter() - back_at < 2.0, "serving did not resume within 2 s"
            await asyncio.sleep(0.05)
    finally:
        server.stop()


async def test_an_open_circuit_answers_at_once_then_probes_and_closes(make_app: Any) -> None:
    server = RedisServer()
    try:
        app = make_app(redis_url=server.url)  # the default breaker: 50% of >= 20 calls in 1 s
        assert {s for s, _, _ in await _burst(app, 3)} == {200}
        server.signal(signal.SIGSTOP)  # hung: every call waits its full timeout
        async with client(app) as c:
            waited = 0
            while not app.store.breaker.is_open:
                started = time.perf_counter()
                r = await c.get("/ad?campaign_id=c1", headers=as_user("u"))
                assert r.headers["x-xsp-decision"] == "store_unavailable"
                assert time.perf_counter() - started >= TIMEOUT * 0.9
                waited += 1
                assert waited <= 20, "the circuit did not open after 20 failures in a row"
            # 3 successes and then failures only: it opens once the window holds 20 calls.
            assert waited >= 17
            for _ in range(20):
                started = time.perf_counter()
                r = await c.get("/ad?campaign_id=c1", headers=as_user("u"))
                assert r.headers["x-xsp-decision"] == "store_unavailable"
                assert time.perf_counter() - started < TIMEOUT / 2  # no waiting while open
        server.signal(signal.SIGCONT)
        await asyncio.sleep(1.05)
        assert {s for s, _, _ in await _burst(app, 1)} == {200}  # the probe succeeds
        assert not app.store.breaker.is_open
        assert {s for s, _, _ in await _burst(app, 5)} == {200}
    finally:
        server.signal(signal.SIGCONT)
        server.stop()


async def test_flushed_script_cache_costs_no_failed_decision(
    redis_url: str, redis_server: RedisServer, make_app: Any
) -> None:
    app = make_app(redis_url=redis_url)
    assert {s for s, _, _ in await _burst(app, 5)} == {200}
    redis_server.command("SCRIPT", "FLUSH")
    assert {s for s, _, _ in await _burst(app, 30)} == {200}


def test_closed_port_really_refuses() -> None:
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", free_port()), 0.5):
        pass


async def test_a_restart_between_requests_costs_no_failed_decision(make_app: Any) -> None:
    """Idle pooled connections go stale when Redis restarts; the next decision reconnects
    instead of failing (and the restarted server's empty script cache is refilled)."""
    server = RedisServer()
    try:
        app = make_app(redis_url=server.url)
        assert {s for s, _, _ in await _burst(app, 40)} == {200}
        server.stop()
        server.start()
        assert {s for s, _, _ in await _burst(app, 40)} == {200}
    finally:
        server.stop()


@pytest.mark.parametrize("connect_seconds", [0.0, 0.12])
async def test_a_store_hung_after_the_connect_costs_one_timeout(
    hung_server: RedisServer, make_app: Any, monkeypatch: pytest.MonkeyPatch, connect_seconds: float
) -> None:
    """The connect succeeds (the kernel accepts for a stopped server), the first write gets no
    answer: that lone decision fails store_timeout after the write, not after the socket's own
    timeout, also when the connect itself took longer than store_timeout (as a Sentinel lookup
    or a TLS handshake may)."""
    from redis.asyncio.connection import AbstractConnection

    connect = AbstractConnection.connect

    async def slow_connect(self: Any) -> None:
        await asyncio.sleep(connect_seconds)
        await connect(self)

    monkeypatch.setattr(AbstractConnection, "connect", slow_connect)
    app = make_app(redis_url=hung_server.url)
    async with client(app) as c:
        started = time.perf_counter()
        r = await c.get("/ad?campaign_id=c1", headers=as_user("u1"))
        elapsed = time.perf_counter() - started
    assert r.headers["x-xsp-decision"] == "store_unavailable"
    bound = connect_seconds + TIMEOUT
    assert bound * 0.9 <= elapsed < bound + 0.15, f"answered after {elapsed:.3f} s"


async def test_a_store_that_reads_nothing_costs_one_timeout(
    deaf_listener: str, make_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer that accepts and never reads fills the socket: the first write (its scripts
    preloaded, about 100 KB) stays partly in the process. Bytes that cannot leave are the
    store's doing, not the app's lag: the decision still fails after store_timeout."""
    from redis.asyncio.connection import AbstractConnection

    connect = AbstractConnection.connect

    async def small_buffers(self: Any) -> None:
        await connect(self)
        sock = self._writer.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # as under TCP memory pressure

    monkeypatch.setattr(AbstractConnection, "connect", small_buffers)
    app = make_app(redis_url=deaf_listener)
    async with client(app) as c:
        started = time.perf_counter()
        r = await asyncio.wait_for(c.get("/ad?campaign_id=c1", headers=as_user("u1")), 5)
        elapsed = time.perf_counter() - started
    assert r.headers["x-xsp-decision"] == "store_unavailable"
    assert elapsed < TIMEOUT + 0.15, f"answered after {elapsed:.3f} s"
