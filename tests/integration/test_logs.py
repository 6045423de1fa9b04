"""Logs never grow with traffic and never block: under a failing store, or under overload, the
``xsp_middleware`` logger writes at most one record per kind of event per interval, with a count
of the events it stands for, and from a thread of its own."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aredis
from conftest import as_user, client
from redis_server import free_port

from xsp_middleware import Campaign, logs


@pytest.fixture(autouse=True)
def fresh_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every test starts with no kind inside its interval, and captures our INFO and up."""
    logs.reset()
    caplog.set_level(logging.INFO, logger="xsp_middleware")
    yield
    logs.reset()


def _ours(caplog: pytest.LogCaptureFixture, kind: str | None = None) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "xsp_middleware" and (kind is None or getattr(r, "xsp_event", None) == kind)
    ]


def _wait_for(caplog: pytest.LogCaptureFixture, kind: str) -> list[logging.LogRecord]:
    deadline = time.monotonic() + 2
    while not _ours(caplog, kind) and time.monotonic() < deadline:
        time.sleep(0.01)
    return _ours(caplog, kind)


def test_one_record_at_once_then_one_with_the_count(caplog: pytest.LogCaptureFixture) -> None:
    for i in range(1000):
        logs.event("release_failed", logging.WARNING, "release %d failed", i)
    first = _wait_for(caplog, "release_failed")
    assert len(first) == 1  # at once: the events counted by the time the writer woke
    assert first[0].getMessage().startswith("xsp_event=release_failed count=")
    logs.flush()  # the interval's end, brought forward
    records = _ours(caplog, "release_failed")
    assert len(records) <= 2  # the one at once, and the rest of the interval's if any
    assert sum(r.count for r in records) == 1000  # type: ignore[attr-defined]
    assert records[-1].getMessage().endswith("release 999 failed")  # the latest event
    logs.event("release_failed", logging.WARNING, "release %d failed", 1000)
    time.sleep(0.2)
    assert len(_ours(caplog, "release_failed")) == len(records)  # within the interval: counted


def test_a_blocked_log_handler_never_blocks_the_caller() -> None:
    """stderr a pipe that nobody reads: the handler blocks, the caller does not."""
    release = threading.Event()

    class Stuck(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            release.wait(10)

    handler = Stuck()
    logger = logging.getLogger("xsp_middleware")
    logger.addHandler(handler)
    try:
        started = time.perf_counter()
        for i in range(20_000):
            logs.event(f"kind_{i % 5}", logging.WARNING, "event %d", i)
        elapsed = time.perf_counter() - started
    finally:
        release.set()
        logger.removeHandler(handler)
    assert elapsed < 1.0, f"20,000 events took {elapsed:.2f} s with the handler blocked"


async def test_a_failing_release_logs_once_with_a_count(
    redis_url: str, make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(redis_url=redis_url)
    r = aredis.Redis.from_url(redis_url)
    inner = app.app

    async def corrupting(scope: Any, receive: Any, send: Any) -> None:
        # After the reserve, before the release: the release will hit WRONGTYPE.
        cookie = dict(scope["headers"])[b"cookie"].split(b"=", 1)[1]
        key = app.store.user_key(cookie)
        await r.delete(key)
        await r.set(key, "not a hash")
        await inner(scope, receive, send)

    app.app = corrupting
    async with client(app) as c:
        for i in range(200):
            response = await c.get("/status/503?campaign_id=c1", headers=as_user(f"u{i}"))
            assert response.status_code == 503  # the handler's status, never a 500
    await r.aclose()
    first = _wait_for(caplog, "release_failed")
    assert len(first) == 1
    logs.flush()
    records = _ours(caplog, "release_failed")
    assert len(records) == 2
    assert sum(rec.count for rec in records) == 200  # type: ignore[attr-defined]
    assert len(_ours(caplog)) == 2, [rec.getMessage() for rec in _ours(caplog)]


async def test_a_dead_store_logs_a_few_records_not_one_per_request(
    make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(redis_url=f"redis://127.0.0.1:{free_port()}/0")  # refused
    async with client(app) as c:
        answers = await asyncio.gather(
            *(c.get("/ad?campaign_id=c1", headers=as_user(f"u{i}")) for i in range(500))
        )
    assert {a.headers["x-xsp-decision"] for a in answers} == {"store_unavailable"}
    await asyncio.sleep(0.1)
    logs.flush()
    records = _ours(caplog)
    kinds = [getattr(rec, "xsp_event", None) for rec in records]
    assert all(kinds.count(kind) <= 2 for kind in kinds), kinds
    assert len(records) <= 4, [rec.getMessage() for rec in records]


async def test_overload_on_a_healthy_store_logs_nothing(
    redis_url: str, make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(redis_url=redis_url, campaigns=[Campaign(id="c1", budget="1000000.00")])
    in_flight = asyncio.Semaphore(256)
    async with client(app) as c:

        async def one(i: int) -> httpx.Response:
            async with in_flight:
                return await c.get("/status/503?campaign_id=c1", headers=as_user(f"u{i}"))

        answers = await asyncio.gather(*(one(i) for i in range(3000)))
    assert {a.status_code for a in answers} == {503}  # reserved, then released: 3000 releases
    logs.flush()
    assert _ours(caplog) == [], [rec.getMessage() for rec in _ours(caplog)]
    assert (await app.store.get_campaign("c1")).impressions == 0
