"""Count on render (``record_on="beacon"``), driven over HTTP as a player would: the ad response
leaves its reservation pending, ``GET /xsp/impression?t=...`` confirms it once, and a pending
reservation nobody confirms expires back into the budget and the cap. On every topology."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from xsp_middleware import Campaign, XSPMiddleware
from xsp_middleware.clock import ManualClock

SECRET = "beacon-tests-secret-key-0123456789"
PRICE_KEY = "beacon-tests-price-key-0123456789"
TTL_MS = 900_000  # the default beacon_ttl
GRACE_MS = 60_000  # a pending cap slot is held this much longer (lib.lua XSP_HOLD_GRACE_MS)
PRICE_UNITS = 20_000  # CPM 2.00


async def ad(request: Request) -> Response:
    """The handler's side: it puts the impression URL where a VAST <Impression> would go."""
    decision = request.state.xsp
    return PlainTextResponse(decision.impression_url or "")


def beacon_app(store_url: str, **settings: Any) -> XSPMiddleware:
    settings.setdefault("secret_key", SECRET)
    settings.setdefault("record_on", "beacon")
    return XSPMiddleware(Starlette(routes=[Route("/ad", ad)]), redis_url=store_url, **settings)


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://ads.test",
    )


def user(name: str) -> dict[str, str]:
    return {"cookie": f"user_id={name}"}


def fake_clock(app: XSPMiddleware) -> ManualClock:
    clock = ManualClock(int(time.time() * 1000))
    app.store.clock = clock
    return clock


async def test_an_impression_counts_when_its_beacon_comes_not_when_the_response_does(
    store_url: str,
) -> None:
    app = beacon_app(store_url, campaigns=[Campaign(id="c1", budget="10.00")])
    async with client(app) as c:
        r = await c.get("/ad?campaign_id=c1", headers=user("u1"))
        assert r.status_code == 200
        url = r.text
        parts = urlsplit(url)
        assert (parts.scheme, parts.netloc, parts.path) == ("http", "ads.test", "/xsp/impression")
        view = await app.store.get_campaign("c1")
        assert (view.impressions, view.pending, view.pending_units) == (0, 1, PRICE_UNITS)
        assert view.spent_units == 0 and view.remaining_units == 100_000_000 - PRICE_UNITS

        beacon = await c.get(url)
        assert beacon.status_code == 204 and "x-xsp-beacon" not in beacon.headers
        assert beacon.headers["cache-control"] == "no-store"
        pixel = await c.get(url, headers={"accept": "image/avif,image/webp,image/*,*/*;q=0.8"})
        assert pixel.status_code == 200 and pixel.headers["content-type"] == "image/gif"
        assert pixel.content.startswith(b"GIF89a")

    view = await app.store.get_campaign("c1")
    assert (view.impressions, view.pending, view.spent_units) == (1, 0, PRICE_UNITS)
    assert view.render_rate == 1.0


async def test_the_same_beacon_fired_50_times_at_once_counts_once(store_url: str) -> None:
    app = beacon_app(store_url)
    async with client(app) as c:
        url = (await c.get("/ad?campaign_id=c1", headers=user("u1"))).text
        answers = await asyncio.gather(*(c.get(url) for _ in range(50)))
    assert {a.status_code for a in answers} == {204}
    assert not any("x-xsp-beacon" in a.headers for a in answers)
    view = await app.store.get_campaign("c1")
    assert (view.impressions, view.pending, view.spent_units) == (1, 0, PRICE_UNITS)


async def test_exact_under_2000_requests_and_beacons_for_a_random_70_percent(
    store_url: str,
) -> None:
    # 0.30 buys exactly 150 impressions at CPM 2.00; 500 users ask 4 times each under 2/1h.
    app = beacon_app(
        store_url, campaigns=[Campaign(id="c1", budget="0.30", cpm="2.00", caps=["2/1h"])]
    )
    clock = fake_clock(app)
    rng = random.Random(16)
    askers = [f"u{i}" for i in range(500)] * 4
    rng.shuffle(askers)
    async with client(app) as c:
        responses = await asyncio.gather(
            *(c.get("/ad?campaign_id=c1", headers=user(name)) for name in askers)
        )
        assert {r.status_code for r in responses} <= {200, 204}
        served = [
            (name, r.text)
            for name, r in zip(askers, responses, strict=True)
            if r.status_code == 200
        ]
        # Pending reservations hold the budget and the cap slots: never more than either allows.
        # (On a cluster, a request whose user half denies holds the campaign's spend until its
        # compensation lands: a few concurrent requests may be refused meanwhile.)
        assert len(served) == 150 or ("cluster" in store_url and 140 <= len(served) < 150)
        assert max(Counter(name for name, _ in served).values()) <= 2
        denied = Counter(r.headers["x-xsp-decision"] for r in responses if r.status_code == 204)
        assert set(denied) <= {"budget_exhausted", "frequency_capped"}

        fired = rng.sample(served, len(served) * 7 // 10)
        twice = rng.sample(fired, len(fired) // 3)
        shots = [url for _, url in fired + twice]
        rng.shuffle(shots)
        beacons = await asyncio.gather(*(c.get(url) for url in shots))
        assert {b.status_code for b in beacons} == {204}
        view = await app.store.get_campaign("c1")
        assert (view.impressions, view.pending) == (len(fired), len(served) - len(fired))
        assert view.spent_units + view.pending_units == len(served) * PRICE_UNITS

        # Those never confirmed expire: their spend and cap slots come back, and a second wave
        # of new users can spend exactly what is left.
        clock.now += TTL_MS + GRACE_MS + 1
        late = [url for _, url in served if url not in {u for _, u in fired}][:5]
        for url in late:  # a beacon after its reservation expired counts nothing
            answer = await c.get(url)
            assert answer.status_code == 204 and answer.headers["x-xsp-beacon"] == "rejected"
        second = await asyncio.gather(
            *(c.get("/ad?campaign_id=c1", headers=user(f"v{i}")) for i in range(300))
        )
        again = [r.text for r in second if r.status_code == 200]
        assert len(again) == 150 - len(fired)
        assert {b.status_code for b in await asyncio.gather(*(c.get(u) for u in again))} == {204}

    view = await app.store.get_campaign("c1")
    assert view.pending == 0
    assert view.impressions == 150
    assert view.spent_units == view.impressions * PRICE_UNITS == 150 * PRICE_UNITS
    assert view.remaining_units == 0


async def test_a_pending_reservation_expires_back_into_budget_and_cap(store_url: str) -> None:
    # Two impressions' budget, and one impression per user and hour.
    app = beacon_app(
        store_url, campaigns=[Campaign(id="c1", budget="0.004", cpm="2.00", caps=["1/1h"])]
    )
    clock = fake_clock(app)
    async with client(app) as c:
        first = await c.get("/ad?campaign_id=c1", headers=user("u1"))
        assert first.status_code == 200
        capped = await c.get("/ad?campaign_id=c1", headers=user("u1"))
        assert capped.headers["x-xsp-decision"] == "frequency_capped"
        assert (await c.get("/ad?campaign_id=c1", headers=user("u2"))).status_code == 200
        spent = await c.get("/ad?campaign_id=c1", headers=user("u3"))
        assert spent.headers["x-xsp-decision"] == "budget_exhausted"

        # Just before beacon_ttl, both still hold; just after, the next reserve settles them.
        clock.now += TTL_MS - 1
        r = await c.get("/ad?campaign_id=c1", headers=user("u3"))
        assert r.headers["x-xsp-decision"] == "budget_exhausted"
        clock.now += 2
        r = await c.get("/ad?campaign_id=c1", headers=user("u3"))
        assert r.status_code == 200  # the budget came back
        view = await app.store.get_campaign("c1")
        assert (view.spent_units, view.pending, view.beacons_expired) == (0, 1, 2)
        # The cap slot is held a grace minute longer (a beacon the campaign confirmed just in
        # time must find it), then frees.
        held = await c.get("/ad?campaign_id=c1", headers=user("u1"))
        assert held.headers["x-xsp-decision"] == "frequency_capped"
        assert (await c.get(first.text)).headers["x-xsp-beacon"] == "rejected"  # expired
        clock.now += GRACE_MS
        confirmed = await c.get(r.text)  # u3's own pending one confirms
        assert confirmed.status_code == 204 and "x-xsp-beacon" not in confirmed.headers
        r = await c.get("/ad?campaign_id=c1", headers=user("u1"))
        assert r.status_code == 200  # its slot is free, and one impression's budget is left
    view = await app.store.get_campaign("c1")
    assert (view.impressions, view.pending, view.spent_units) == (1, 1, PRICE_UNITS)
    assert view.remaining_units == 0


async def test_a_failed_response_releases_a_pending_reservation_at_once(store_url: str) -> None:
    async def fails(request: Request) -> Response:
        return PlainTextResponse("upstream error", status_code=502)

    app = XSPMiddleware(
        Starlette(routes=[Route("/ad", ad), Route("/fails", fails)]),
        redis_url=store_url,
        secret_key=SECRET,
        record_on="beacon",
        campaigns=[Campaign(id="c1", caps=["1/1h"])],
    )
    async with client(app) as c:
        assert (await c.get("/fails?campaign_id=c1", headers=user("u1"))).status_code == 502
        view = await app.store.get_campaign("c1")
        assert (view.pending, view.pending_units, view.spent_units, view.released) == (0, 0, 0, 1)
        # The cap slot went back too.
        assert (await c.get("/ad?campaign_id=c1", headers=user("u1"))).status_code == 200


@pytest.mark.parametrize(
    "tamper",
    ["garbage", "empty", "forged_mac", "other_campaign", "rotated_key", "deleted_campaign"],
)
async def test_a_bad_token_counts_nothing_and_never_fails(store_url: str, tamper: str) -> None:
    app = beacon_app(store_url, price_key=PRICE_KEY)
    async with client(app) as c:
        url = (await c.get("/ad?campaign_id=c1", headers=user("u1"))).text
        token = dict(parse_qsl(urlsplit(url).query))["t"]
        target, rejected = url, True
        if tamper == "garbage":
            target = "/xsp/impression?t=%00%ff%7B%7D..." + "x" * 5000
        elif tamper == "empty":
            target = "/xsp/impression"
        elif tamper == "forged_mac":
            target = "/xsp/impression?t=" + token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
        elif tamper == "other_campaign":
            target = url + "&campaign_id=c2"
        elif tamper == "rotated_key":
            rotated = beacon_app(store_url, price_key=PRICE_KEY[::-1])
            async with client(rotated) as other:
                answer = await other.get(url)
            assert answer.status_code == 204 and answer.headers["x-xsp-beacon"] == "rejected"
            target = None
        elif tamper == "deleted_campaign":
            await app.store.delete_campaign("c1")
            rejected = False  # nothing pending any more: a duplicate, as far as anyone can tell
        if target is not None:
            answer = await c.get(target)
            assert answer.status_code == 204
            assert answer.headers.get("x-xsp-beacon") == ("rejected" if rejected else None)
    view = await app.store.get_campaign("c1")
    assert view.impressions == 0


async def test_beacons_are_counted_in_the_metrics(redis_url: str) -> None:
    from prometheus_client import CollectorRegistry

    from xsp_middleware.metrics import enable_metrics

    registry = CollectorRegistry()
    enable_metrics(registry=registry)
    try:
        app = beacon_app(redis_url)
        clock = fake_clock(app)
        async with client(app) as c:
            first = (await c.get("/ad?campaign_id=c1", headers=user("u1"))).text
            second = (await c.get("/ad?campaign_id=c1", headers=user("u2"))).text
            await c.get(first)
            await c.get(first)
            await c.get("/xsp/impression?t=nope")
            clock.now += TTL_MS + 1
            await c.get(second)
    finally:
        from xsp_middleware import observe

        observe.install(None)

    def count(result: str) -> float:
        value = registry.get_sample_value("xsp_beacons_total", {"result": result})
        return value or 0.0

    assert [count(r) for r in ("confirmed", "duplicate", "rejected", "expired", "error")] == [
        1,
        1,
        1,
        1,
        0,
    ]


async def test_a_switch_back_to_response_mode_still_settles_what_was_pending(
    store_url: str,
) -> None:
    beacons = beacon_app(store_url, campaigns=[Campaign(id="c1", budget="0.002")])
    clock = fake_clock(beacons)
    async with client(beacons) as c:
        assert (await c.get("/ad?campaign_id=c1", headers=user("u1"))).status_code == 200
    responses = beacon_app(
        store_url, record_on="response", campaigns=[Campaign(id="c1", budget="0.002")]
    )
    responses.store.clock = clock
    async with client(responses) as c:
        held = await c.get("/ad?campaign_id=c1", headers=user("u2"))
        assert held.headers["x-xsp-decision"] == "budget_exhausted"
        clock.now += TTL_MS + 1
        assert (await c.get("/ad?campaign_id=c1", headers=user("u2"))).status_code == 200
    view = await responses.store.get_campaign("c1")
    assert (view.pending, view.impressions, view.spent_units) == (0, 1, PRICE_UNITS)


async def test_user_show_counts_pending_impressions_and_reset_forgets_them(
    store_url: str,
) -> None:
    app = beacon_app(store_url, campaigns=[Campaign(id="c1", caps=["2/1h"])])
    async with client(app) as c:
        assert (await c.get("/ad?campaign_id=c1", headers=user("u1"))).status_code == 200
        assert (await c.get("/ad?campaign_id=c1", headers=user("u1"))).status_code == 200
        (field, windows), *rest = await app.store.user_view("u1")
        assert (field, rest) == ("c1", [])  # one campaign, not its pending field as another
        ((cap, used, frees),) = windows
        assert str(cap) == "2/1h" and used == 2 and frees is not None
        capped = await c.get("/ad?campaign_id=c1", headers=user("u1"))
        assert capped.headers["x-xsp-decision"] == "frequency_capped"
        assert await app.store.reset_user("u1", "c1")
        assert (await c.get("/ad?campaign_id=c1", headers=user("u1"))).status_code == 200
