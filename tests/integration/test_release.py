"""Reserve -> confirm/release, as a user of the middleware sees it.

Every test runs on real Redis and on the embedded store (``store_url`` is parametrised).
A response that COMPLETES with a 2xx status keeps the reservation (spend, impression and the
user's cap slot); anything else gives all three back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import STREAM_CHUNKS, VAST, client

from xsp_middleware import XSPMiddleware

CAMPAIGN = "c1"
AD = f"/ad?campaign_id={CAMPAIGN}&cpm=2.00"
COST = Decimal("0.002")  # one impression at a CPM of 2.00
U1 = {"cookie": "user_id=u1"}
DENIAL_REASONS = {"frequency_capped", "budget_exhausted", "campaign_paused", "store_unavailable"}

# Generous, so a slow CI box never turns a decision into a degraded "store_unavailable" one
# (and never lets a release time out): these tests are about release semantics, not timeouts.


@pytest.fixture
async def build(
    make_app: Callable[..., XSPMiddleware], store_url: str
) -> AsyncIterator[Callable[..., XSPMiddleware]]:
    """``build(**settings)``: an app on ``store_url`` with a 1/1h cap; closed after the test."""
    apps: list[XSPMiddleware] = []

    def factory(**settings: Any) -> XSPMiddleware:
        settings.setdefault("default_caps", ["1/1h"])
        app = make_app(redis_url=store_url, **settings)
        apps.append(app)
        return app

    yield factory
    for app in apps:
        await app.store.aclose()


# -- helpers ----------------------------------------------------------------------------------


def http_scope(
    path: str, query: bytes, headers: list[tuple[bytes, bytes]], *, spec_version: str | None
) -> dict[str, Any]:
    asgi: dict[str, str] = {"version": "3.0"}
    if spec_version is not None:
        asgi["spec_version"] = spec_version
    return {
        "type": "http",
        "asgi": asgi,
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


async def assert_nothing_reserved(app: XSPMiddleware) -> None:
    view = await app.store.get_campaign(CAMPAIGN)
    assert view.spent_units == 0
    assert view.spent == 0
    assert view.impressions == 0


async def assert_served_again(app: XSPMiddleware) -> None:
    """With a 1/1h cap, u1 is served only if the earlier reservation gave its slot back."""
    async with client(app) as c:
        r = await c.get(AD, headers=U1)
    assert r.status_code == 200, r.headers.get("x-xsp-decision")
    assert "x-xsp-decision" not in r.headers
    assert r.text == VAST


async def assert_released(app: XSPMiddleware) -> None:
    await assert_nothing_reserved(app)
    await assert_served_again(app)
    view = await app.store.get_campaign(CAMPAIGN)  # and the new one counts normally
    assert (view.spent, view.impressions) == (COST, 1)


# -- a completed 2xx keeps the reservation ----------------------------------------------------


async def test_served_2xx_keeps_spend_impression_and_cap_slot(build: Any) -> None:
    app = build()
    async with client(app) as c:
        first = await c.get(AD, headers=U1)
        assert first.status_code == 200
        assert first.text == VAST

        view = await app.store.get_campaign(CAMPAIGN)
        assert view.spent == COST
        assert view.spent_units == 20_000
        assert view.impressions == 1

        second = await c.get(AD, headers=U1)
    assert second.status_code == 204
    assert second.headers["x-xsp-decision"] == "frequency_capped"
    assert second.content == b""
    # The denial reserved nothing.
    view = await app.store.get_campaign(CAMPAIGN)
    assert (view.spent, view.impressions) == (COST, 1)


@pytest.mark.parametrize("code", [201, 204, 299])
async def test_any_completed_2xx_status_keeps_the_reservation(build: Any, code: int) -> None:
    app = build()
    async with client(app) as c:
        r = await c.get(f"/status/{code}?campaign_id={CAMPAIGN}&cpm=2.00", headers=U1)
        assert r.status_code == code
        view = await app.store.get_campaign(CAMPAIGN)
        assert (view.spent, view.impressions) == (COST, 1)
        again = await c.get(AD, headers=U1)
    assert again.status_code == 204
    assert again.headers["x-xsp-decision"] == "frequency_capped"


# -- anything else releases cap slot and money ------------------------------------------------


@pytest.mark.parametrize("code", [500, 503])
async def test_5xx_response_releases_cap_and_money(build: Any, code: int) -> None:
    app = build()
    async with client(app) as c:
        r = await c.get(f"/status/{code}?campaign_id={CAMPAIGN}&cpm=2.00", headers=U1)
    assert r.status_code == code
    assert r.text == "status"  # the handler ran, so the impression had been reserved
    await assert_released(app)


@pytest.mark.parametrize("code", [300, 302, 304, 400, 404, 410])
async def test_3xx_and_4xx_response_releases_cap_and_money(build: Any, code: int) -> None:
    app = build()
    async with client(app) as c:
        r = await c.get(f"/status/{code}?campaign_id={CAMPAIGN}&cpm=2.00", headers=U1)
    assert r.status_code == code
    await assert_released(app)


async def test_handler_exception_releases_cap_and_money(build: Any) -> None:
    app = build()
    async with client(app) as c:
        r = await c.get(f"/boom?campaign_id={CAMPAIGN}&cpm=2.00", headers=U1)
    assert r.status_code == 500  # Starlette's ServerErrorMiddleware, inside the middleware
    await assert_released(app)


async def test_stream_that_dies_after_first_chunk_releases_cap_and_money(build: Any) -> None:
    app = build()
    async with client(app) as c:
        r = await c.get(f"/stream-fails?campaign_id={CAMPAIGN}&cpm=2.00", headers=U1)
    # The status line had already gone out as 200: only the body is truncated.
    assert r.status_code == 200
    assert r.content == STREAM_CHUNKS[0]
    await assert_released(app)


async def test_client_disconnect_during_slow_stream_releases_cap_and_money(build: Any) -> None:
    """ASGI < 2.4: Starlette listens on receive() and cancels the stream on http.disconnect."""
    app = build()
    first_chunk_sent = asyncio.Event()
    sent: list[dict[str, Any]] = []
    request_delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal request_delivered
        if not request_delivered:
            request_delivered = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await first_chunk_sent.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            first_chunk_sent.set()

    scope = http_scope(
        "/slow-stream",
        f"campaign_id={CAMPAIGN}&cpm=2.00".encode(),
        [(b"cookie", b"user_id=u1")],
        spec_version=None,
    )
    # The stream sleeps 5 s after its first chunk: finishing well before proves the cancel.
    await asyncio.wait_for(app(scope, receive, send), timeout=3)

    assert sent[0]["type"] == "http.response.start"
    assert sent[0]["status"] == 200
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert [m.get("body") for m in bodies] == [STREAM_CHUNKS[0]]
    assert bodies[-1].get("more_body") is True  # never completed
    await assert_released(app)


async def test_client_gone_on_send_asgi_2_4_releases_cap_and_money(build: Any) -> None:
    """ASGI 2.4: send() raises OSError once the client has gone; the 200 never completed."""
    app = build()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            raise OSError("client went away")

    scope = http_scope(
        "/ad",
        f"campaign_id={CAMPAIGN}&cpm=2.00".encode(),
        [(b"cookie", b"user_id=u1")],
        spec_version="2.4",
    )
    with contextlib.suppress(OSError):  # re-raising it to the server is allowed
        await asyncio.wait_for(app(scope, receive, send), timeout=3)

    assert sent[0]["type"] == "http.response.start"
    assert sent[0]["status"] == 200
    await assert_released(app)


async def test_client_gone_mid_stream_asgi_2_4_releases_cap_and_money(build: Any) -> None:
    """ASGI 2.4 streaming: send() raises OSError on the third chunk."""
    app = build()
    chunks = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal chunks
        if message["type"] == "http.response.body":
            chunks += 1
            if chunks == 3:
                raise OSError("client went away")

    scope = http_scope(
        "/stream",
        f"campaign_id={CAMPAIGN}&cpm=2.00".encode(),
        [(b"cookie", b"user_id=u1")],
        spec_version="2.4",
    )
    # Starlette turns the OSError into ClientDisconnect; the middleware may let it through.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(app(scope, receive, send), timeout=3)
    assert chunks == 3
    await assert_released(app)


async def test_request_task_cancelled_mid_stream_releases_cap_and_money(build: Any) -> None:
    """Servers that cancel the app on disconnect: the release is shielded from it."""
    app = build()
    first_chunk_sent = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # never a disconnect message: the server cancels instead
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            first_chunk_sent.set()

    scope = http_scope(
        "/slow-stream",
        f"campaign_id={CAMPAIGN}&cpm=2.00".encode(),
        [(b"cookie", b"user_id=u1")],
        spec_version="2.4",
    )
    task = asyncio.create_task(app(scope, receive, send))
    await asyncio.wait_for(first_chunk_sent.wait(), timeout=3)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await assert_released(app)


# -- streamed and file bodies pass through intact and are kept --------------------------------


async def test_streaming_response_passes_through_byte_identical_and_keeps_reservation(
    build: Any,
) -> None:
    app = build()
    async with client(app) as c:
        r = await c.get(f"/stream?campaign_id={CAMPAIGN}&cpm=2.00", headers=U1)
        assert r.status_code == 200
        assert r.content == b"".join(STREAM_CHUNKS)
        view = await app.store.get_campaign(CAMPAIGN)
        assert (view.spent, view.impressions) == (COST, 1)
        again = await c.get(AD, headers=U1)
    assert again.status_code == 204
    assert again.headers["x-xsp-decision"] == "frequency_capped"


async def test_file_response_passes_through_byte_identical_and_keeps_reservation(
    build: Any, payload_file: Path
) -> None:
    app = build()
    async with client(app) as c:
        r = await c.get(f"/file?campaign_id={CAMPAIGN}&cpm=2.00", headers=U1)
        assert r.status_code == 200
        assert r.content == payload_file.read_bytes()
        assert int(r.headers["content-length"]) == payload_file.stat().st_size
        view = await app.store.get_campaign(CAMPAIGN)
        assert (view.spent, view.impressions) == (COST, 1)
        again = await c.get(AD, headers=U1)
    assert again.status_code == 204
    assert again.headers["x-xsp-decision"] == "frequency_capped"


async def test_file_response_via_pathsend_keeps_reservation(build: Any, payload_file: Path) -> None:
    """A server offering the http.response.pathsend extension: the file is never a body
    message, and the pathsend message completes the response."""
    app = build()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = http_scope(
        "/file",
        f"campaign_id={CAMPAIGN}&cpm=2.00".encode(),
        [(b"cookie", b"user_id=u1")],
        spec_version="2.4",
    )
    scope["extensions"] = {"http.response.pathsend": {}}
    await asyncio.wait_for(app(scope, receive, send), timeout=3)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.pathsend"]
    assert sent[1]["path"] == str(payload_file)
    view = await app.store.get_campaign(CAMPAIGN)
    assert (view.spent, view.impressions) == (COST, 1)


# -- on_denied="pass" -------------------------------------------------------------------------


def decision_fields(text: str) -> dict[str, str]:
    names = (
        "allowed",
        "reason",
        "campaign_id",
        "cost",
        "remaining_impressions",
        "remaining_budget",
        "anonymous",
        "degraded",
    )
    values = text.split("|")
    assert len(values) == len(names), text
    return dict(zip(names, values, strict=True))


async def test_on_denied_pass_runs_handler_with_frequency_capped_decision(build: Any) -> None:
    app = build(on_denied="pass")
    url = f"/decision?campaign_id={CAMPAIGN}&cpm=2.00"
    async with client(app) as c:
        served = await c.get(url, headers=U1)
        denied = await c.get(url, headers=U1)
    assert served.status_code == 200
    first = decision_fields(served.text)
    assert (first["allowed"], first["reason"], first["campaign_id"]) == ("True", "served", "c1")
    assert Decimal(first["cost"]) == COST
    assert first["anonymous"] == "False"

    assert denied.status_code == 200
    assert "x-xsp-decision" not in denied.headers
    second = decision_fields(denied.text)
    assert (second["allowed"], second["reason"]) == ("False", "frequency_capped")
    assert second["campaign_id"] == "c1"
    assert second["degraded"] == "False"
    # The denied request that ran the handler reserved nothing.
    view = await app.store.get_campaign(CAMPAIGN)
    assert (view.spent, view.impressions) == (COST, 1)


async def test_on_denied_pass_runs_handler_with_budget_exhausted_decision(build: Any) -> None:
    # Budget for exactly one impression at CPM 2.00; anonymous requests, so no cap applies.
    app = build(on_denied="pass", default_budget="0.002")
    url = f"/decision?campaign_id={CAMPAIGN}&cpm=2.00"
    async with client(app) as c:
        served = await c.get(url)
        denied = await c.get(url)
    first = decision_fields(served.text)
    assert (first["allowed"], first["reason"], first["anonymous"]) == ("True", "served", "True")
    assert Decimal(first["remaining_budget"]) == 0
    assert denied.status_code == 200
    second = decision_fields(denied.text)
    assert (second["allowed"], second["reason"]) == ("False", "budget_exhausted")
    view = await app.store.get_campaign(CAMPAIGN)
    assert (view.spent, view.impressions) == (COST, 1)


async def test_on_denied_nofill_answers_204_without_running_handler(build: Any) -> None:
    app = build(default_budget="0.002")
    url = f"/decision?campaign_id={CAMPAIGN}&cpm=2.00"
    async with client(app) as c:
        assert (await c.get(url)).status_code == 200
        denied = await c.get(url)
    assert denied.status_code == 204
    assert denied.headers["x-xsp-decision"] in DENIAL_REASONS
    assert denied.headers["x-xsp-decision"] == "budget_exhausted"
    assert denied.content == b""


async def test_a_release_after_the_exhaustion_flip_reactivates_and_refires(
    build: Callable[..., XSPMiddleware],
) -> None:
    """The impression that took the last of the budget is released after a later request
    flipped the campaign to exhausted: the campaign is active again and serves that budget,
    and the exhaustion that really ends it fires the hook again."""
    from xsp_middleware import Campaign

    fired: list[str] = []
    app = build(
        campaigns=[Campaign(id="c8", budget="0.002", cpm="2.00")],
        default_caps=["5/1h"],
        on_budget_exhausted=lambda cid, kind: fired.append(kind),
    )
    store = app.store
    rule = store.rules.rule_for("c8")
    held = await store.reserve("c8", store.user_key("u1"), None, rule)
    assert held.reserved
    assert (await store.reserve("c8", store.user_key("u2"), None, rule)).reason == (
        "budget_exhausted"
    )
    assert (await store.get_campaign("c8")).status == "exhausted"
    await store.release(held)  # e.g. the response was not a 2xx
    assert (await store.get_campaign("c8")).status == "active"
    assert (await store.reserve("c8", store.user_key("u3"), None, rule)).reserved
    assert (await store.reserve("c8", store.user_key("u4"), None, rule)).reason == (
        "budget_exhausted"
    )
    for _ in range(50):
        if len(fired) == 2:
            break
        await asyncio.sleep(0.02)
    assert fired == ["lifetime", "lifetime"]
    view = await store.get_campaign("c8")
    assert (view.status, view.spent_units, view.impressions) == ("exhausted", 20_000, 1)
