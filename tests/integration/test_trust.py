"""Prices a client cannot forge, over HTTP: ``price_source`` (``request``, ``campaign``,
``signed``), per-campaign bid ceilings, the drain warning, and ``on_denied="vast"``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

import pytest
from conftest import as_user, client
from redis_server import RedisServer
from test_roundtrips import CountingProxy

from xsp_middleware import Campaign, XSPMiddleware, sign_price
from xsp_middleware.clock import ManualClock
from xsp_middleware.core import guard as guard_module

PRICE_KEY = "trust-tests-price-key-0123456789"


def _statuses(responses: list[Any]) -> Counter[int]:
    return Counter(r.status_code for r in responses)


async def test_the_drain_a_new_user_can_do_today_and_what_stops_it(
    store_url: str, make_app: Any
) -> None:
    # price_source=request (the default): 1,000 cookie-less requests at cpm=1000 drain the
    # default 1,000.00 budget, and an honest request is refused afterwards.
    victim: XSPMiddleware = make_app(redis_url=store_url)
    async with client(victim) as c:
        drain = await asyncio.gather(
            *(c.get("/ad?campaign_id=victim&cpm=1000") for _ in range(1000))
        )
        assert _statuses(drain) == {200: 1000}
        honest = await c.get("/ad?campaign_id=victim&cpm=2.00", headers=as_user("u1"))
        assert honest.headers["x-xsp-decision"] == "budget_exhausted"

    # price_source=campaign: the same requests pay the campaign's own 2.00 CPM; the forged
    # price moves the spend by nothing.
    fixed: XSPMiddleware = make_app(redis_url=store_url, price_source="campaign")
    async with client(fixed) as c:
        drain = await asyncio.gather(
            *(c.get("/ad?campaign_id=fixed&cpm=1000") for _ in range(1000))
        )
        assert _statuses(drain) == {200: 1000}
        assert (await c.get("/ad?campaign_id=fixed", headers=as_user("u1"))).status_code == 200
    view = await fixed.store.get_campaign("fixed")
    assert view.spent_units == 1001 * 20_000  # 1,001 impressions at the campaign's price

    # price_source=signed: every one of them is refused, and nothing is spent.
    signed: XSPMiddleware = make_app(
        redis_url=store_url, price_source="signed", price_key=PRICE_KEY
    )
    async with client(signed) as c:
        forged = [c.get("/ad?campaign_id=signed&cpm=1000") for _ in range(500)]
        forged += [c.get(f"/ad?campaign_id=signed&cpm=1000&sig=1.{i}.AAAA") for i in range(500)]
        answers = await asyncio.gather(*forged)
    assert _statuses(answers) == {400: 1000}
    assert {r.json()["field"] for r in answers} == {"sig"}
    assert (await signed.store.get_campaign("signed")).spent_units == 0


async def test_campaign_prices_with_beacons_let_forged_traffic_spend_nothing(
    redis_url: str, make_app: Any
) -> None:
    app: XSPMiddleware = make_app(redis_url=redis_url, price_source="campaign", record_on="beacon")
    clock = ManualClock(int(time.time() * 1000))
    app.store.clock = clock
    async with client(app) as c:
        drain = await asyncio.gather(*(c.get("/ad?campaign_id=c1&cpm=1000") for _ in range(1000)))
        assert _statuses(drain) == {200: 1000}
        clock.now += 900_000 + 1  # nobody rendered them: past beacon_ttl they go back
        await c.get("/ad?campaign_id=c1", headers=as_user("u1"))
    view = await app.store.get_campaign("c1")
    # 1,000 settled over the next reserve calls (64 per call): one call settled 64 here.
    assert view.pending == 1000 - 64 + 1
    async with client(app) as c:
        for i in range(20):
            await c.get("/ad?campaign_id=c1", headers=as_user(f"w{i}"))
    view = await app.store.get_campaign("c1")
    assert view.spent_units == 0  # nothing confirmed, nothing spent
    assert view.pending == 21 and view.beacons_expired == 1000


async def test_a_signed_price_is_accepted_once(store_url: str, make_app: Any) -> None:
    app: XSPMiddleware = make_app(redis_url=store_url, price_source="signed", price_key=PRICE_KEY)
    params = sign_price("c1", "3.50", secret_key=PRICE_KEY)
    async with client(app) as c:
        first = await c.get("/decision", params=params, headers=as_user("u1"))
        assert first.status_code == 200
        assert first.text.split("|")[3] == "0.0035000"  # the signed price is the price
        again = await c.get("/decision", params=params, headers=as_user("u2"))
        assert again.status_code == 400
        assert again.json()["field"] == "sig" and "used before" in again.json()["detail"]
        # Concurrent replays: exactly one of 50 copies of a fresh signature is served.
        fresh = sign_price("c1", "3.50", secret_key=PRICE_KEY)
        copies = await asyncio.gather(
            *(c.get("/ad", params=fresh, headers=as_user(f"v{i}")) for i in range(50))
        )
        assert _statuses(copies) == {200: 1, 400: 49}
        # Another price, campaign or key under the same signature: refused.
        for changed in ({"cpm": "3.51"}, {"campaign_id": "c2"}):
            r = await c.get(
                "/ad", params={**sign_price("c1", "3.50", secret_key=PRICE_KEY), **changed}
            )
            assert r.status_code == 400 and r.json()["field"] == "sig"
        other_key = sign_price("c1", "3.50", secret_key=PRICE_KEY[::-1])
        assert (await c.get("/ad", params=other_key)).json()["field"] == "sig"
        # No price at all: the campaign's own, nothing to sign.
        assert (await c.get("/ad?campaign_id=c1", headers=as_user("u3"))).status_code == 200
    view = await app.store.get_campaign("c1")
    assert view.impressions == 3
    assert view.spent_units == 2 * 35_000 + 20_000


async def test_an_expired_signature_is_refused(redis_url: str, make_app: Any) -> None:
    app: XSPMiddleware = make_app(redis_url=redis_url, price_source="signed", price_key=PRICE_KEY)
    old = sign_price("c1", "2.00", secret_key=PRICE_KEY, ttl=60, now=time.time() - 61)
    async with client(app) as c:
        r = await c.get("/ad", params=old)
    assert r.status_code == 400
    assert r.json()["field"] == "sig" and "expired" in r.json()["detail"]


@pytest.mark.parametrize("junk", ["", "x", "1.2", "9" * 400, "1.a.b.c", "é.é.é", "%00"])
async def test_a_garbage_signature_is_a_400_never_a_500(
    redis_url: str, make_app: Any, junk: str
) -> None:
    app: XSPMiddleware = make_app(redis_url=redis_url, price_source="signed", price_key=PRICE_KEY)
    async with client(app) as c:
        r = await c.get("/ad", params={"campaign_id": "c1", "cpm": "2.00", "sig": junk})
    assert r.status_code == 400 and r.json()["field"] == "sig"


async def test_the_nonce_check_costs_no_extra_round_trip(
    redis_server: RedisServer, make_app: Any
) -> None:
    proxy = CountingProxy(redis_server.port)
    await proxy.start()
    try:
        app = make_app(
            redis_url=proxy.url, price_source="signed", price_key=PRICE_KEY, record_on="beacon"
        )
        async with client(app) as c:
            await c.get("/ad?campaign_id=warm", headers=as_user("warm"))
            proxy.reset()
            for i in range(10):
                params = sign_price("c1", "2.00", secret_key=PRICE_KEY)
                assert (
                    await c.get("/ad", params=params, headers=as_user(f"u{i}"))
                ).status_code == 200
            assert proxy.commands == Counter({"EVALSHA": 10})  # one script call per decision
            replay = await c.get("/ad", params=params, headers=as_user("u0"))
            assert replay.status_code == 400
            assert proxy.commands == Counter({"EVALSHA": 11})
    finally:
        assert proxy.server is not None
        proxy.server.close()


async def test_a_campaign_bid_ceiling_refuses_every_price_above_it(
    store_url: str, make_app: Any
) -> None:
    app: XSPMiddleware = make_app(
        redis_url=store_url,
        campaigns=[Campaign(id="c1", max_cpm="5.00")],
        default_caps=[],
    )
    async with client(app) as c:
        above = await asyncio.gather(
            *(c.get(f"/ad?campaign_id=c1&cpm={p}") for p in ("5.0000001", "5.01", "6", "1000"))
        )
        at = await c.get("/ad?campaign_id=c1&cpm=5.00")
        other = await c.get("/ad?campaign_id=c2&cpm=50")  # another campaign: no ceiling
    assert [r.status_code for r in above] == [400, 400, 400, 400]
    assert {r.json()["field"] for r in above} == {"cpm"}
    assert at.status_code == 200 and other.status_code == 200
    view = await app.store.get_campaign("c1")
    assert view.spent_units == 50_000 and sum(view.denials.values()) == 0

    # The stored ceiling wins (every process sees it on its next decision), and it holds
    # under signed prices too.
    await app.store.set_campaign("c2", max_cpm="3.00")
    signed: XSPMiddleware = make_app(
        redis_url=store_url, price_source="signed", price_key=PRICE_KEY
    )
    async with client(signed) as c:
        high = await c.get("/ad", params=sign_price("c2", "3.01", secret_key=PRICE_KEY))
        ok = await c.get("/ad", params=sign_price("c2", "3.00", secret_key=PRICE_KEY))
    assert high.status_code == 400 and high.json()["field"] == "cpm"
    assert ok.status_code == 200
    await app.store.set_campaign("c2", max_cpm="none")
    async with client(app) as c:
        assert (await c.get("/ad?campaign_id=c2&cpm=50")).status_code == 200


async def test_the_drain_warning_at_start_up(
    make_app: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guard_module, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="xsp_middleware"):
        make_app(redis_url="memory://warn")
    warned = [
        r.getMessage()
        for r in caplog.records
        if "drain" in r.getMessage() or "curl" in r.getMessage()
    ]
    assert len(warned) == 1 and "price_source" in warned[0]
    caplog.clear()
    monkeypatch.setattr(guard_module, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="xsp_middleware"):
        make_app(redis_url="memory://warn", price_source="campaign")
        make_app(redis_url="memory://warn", anonymous="deny")
    assert not [r for r in caplog.records if "price_source" in r.getMessage()]


async def test_a_vast_no_fill_is_an_empty_vast_document(store_url: str, make_app: Any) -> None:
    app: XSPMiddleware = make_app(redis_url=store_url, on_denied="vast")
    await app.store.set_campaign("c1", status="paused")
    async with client(app) as c:
        denied = await c.get("/ad?campaign_id=c1", headers=as_user("u1"))
        bad = await c.get("/ad?campaign_id=c1&cpm=-1", headers=as_user("u1"))
    assert denied.status_code == 200
    assert denied.headers["content-type"] == "application/xml"
    assert denied.headers["x-xsp-decision"] == "campaign_paused"
    assert denied.text.strip().endswith('<VAST version="4.2"/>')
    assert bad.status_code == 400 and bad.headers["content-type"] == "application/problem+json"

    old: XSPMiddleware = make_app(redis_url=store_url, on_denied="vast", vast_version="3.0")
    async with client(old) as c:
        r = await c.get("/ad?campaign_id=c1")
    assert '<VAST version="3.0"/>' in r.text


async def test_a_stored_bid_ceiling_binds_leased_decisions_too(
    store_url: str, make_app: Any
) -> None:
    app: XSPMiddleware = make_app(
        redis_url=store_url, campaigns=[Campaign(id="c1", leasing=True)], default_caps=[]
    )
    await app.store.set_campaign("c1", max_cpm="5.00")
    async with client(app) as c:
        served = [await c.get("/ad?campaign_id=c1&cpm=5.00") for _ in range(20)]
        above = [await c.get("/ad?campaign_id=c1&cpm=6.00") for _ in range(20)]
    assert _statuses(served) == {200: 20}
    assert _statuses(above) == {400: 20} and {r.json()["field"] for r in above} == {"cpm"}
    await app.store.return_leases()
    view = await app.store.get_campaign("c1")
    assert view.impressions == 20 and view.spent_units == 20 * 50_000
