"""Each candidate is judged by its own caps, to the millisecond, as a single-campaign request is.

Choosing among candidates judges a candidate whose log holds one impression (the common log)
without reading that time as a number, candidates whose settings differ only in their caps
share one set of arguments, and a stored config wins over the settings', candidate by
candidate. These tests pin what a user sees of that, through HTTP, on every store, with the
asyncio store (Starlette) and the blocking one (Flask); a test clock stands in for Redis
TIME where the instant matters. The harness is test_candidates_frameworks.py's.
"""

# ruff: noqa: F811 - the fixtures imported from test_candidates_frameworks are used by name

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from test_candidates_frameworks import (  # noqa: F401 - fixtures, used by name
    ASGIServed,
    Serve,
    Served,
    WSGIServed,
    _no_xsp_environment,
    _xsp_of,
    admin,
    made,
    serve,
    store_kind,
)

from xsp_middleware import Campaign
from xsp_middleware.clock import ManualClock
from xsp_middleware.preferences import block_campaign
from xsp_middleware.store import Store

DRIVERS = ["starlette", "flask"]  # the asyncio and the blocking store
HOUR = 3_600_000

# Settings that differ only in their caps (one profile of arguments in a call).
SIBLINGS = [
    Campaign(id="one", caps=["1/1h"]),
    Campaign(id="two", caps=["2/1h"]),
    Campaign(id="uncapped", caps=[]),
]


def ms(text: str, tz: Any = UTC) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=tz).timestamp() * 1000)


def set_clock(app: Served, now: int) -> ManualClock:
    """A test clock for ``app``'s store (the scripts take it instead of Redis TIME)."""
    clock = ManualClock(now)
    if isinstance(app, WSGIServed):
        app.mw.store.clock = clock  # the blocking store shares its planner
    else:
        assert isinstance(app, ASGIServed)
        mw = _xsp_of(app.app)
        assert mw is not None
        mw.store.clock = clock
    return clock


async def verdict(app: Served, candidates: str, user: str = "u1") -> list[tuple[str, str]]:
    """Each evaluated candidate's outcome (what ``Decision.candidates`` says, or for a no-fill
    among several, what the debug header lists)."""
    reply = await app.get(f"/ad?campaign_id={candidates}", user=user)
    if reply.status == 200:
        return list(reply.decision["candidates"])
    reply.denied("no_eligible_campaign" if "," in candidates else reply.headers["x-xsp-decision"])
    listed = reply.headers["x-xsp-candidates"]
    return [tuple(entry.split("=")) for entry in listed.split(",")]  # type: ignore[misc]


@pytest.mark.parametrize("driver", DRIVERS)
async def test_candidates_that_share_their_settings_keep_their_own_caps(
    driver: str, serve: Serve
) -> None:
    app = await serve(driver, campaigns=SIBLINGS, debug_headers=True)  # to read a no-fill's list
    query = "one,two,uncapped"
    assert await verdict(app, query) == [("one", "served")]
    assert await verdict(app, query) == [("one", "frequency_capped"), ("two", "served")]
    assert await verdict(app, query) == [("one", "frequency_capped"), ("two", "served")]
    assert await verdict(app, query) == [
        ("one", "frequency_capped"),
        ("two", "frequency_capped"),
        ("uncapped", "served"),
    ]
    # Another user has seen none of them.
    assert await verdict(app, query, user="u2") == [("one", "served")]


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_rolling_cap_of_one_frees_the_candidate_exactly_when_its_window_ends(
    driver: str, serve: Serve
) -> None:
    app = await serve(driver, campaigns=SIBLINGS)
    t0 = ms("2027-03-01T12:00:00")
    clock = set_clock(app, t0)
    assert await verdict(app, "one,two") == [("one", "served")]
    clock.now = t0 + HOUR - 1  # the impression is still inside "any hour"
    assert await verdict(app, "one,two") == [("one", "frequency_capped"), ("two", "served")]
    single = await app.get("/ad?campaign_id=one")  # the single-campaign path agrees
    single.denied("frequency_capped")
    clock.now = t0 + HOUR  # an hour later, to the millisecond: it no longer counts
    assert await verdict(app, "one,two") == [("one", "served")]


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_lifetime_cap_of_one_holds_a_year_later(driver: str, serve: Serve) -> None:
    app = await serve(driver, campaigns=[Campaign(id="once", caps=["1/lifetime"])])
    clock = set_clock(app, ms("2027-03-01T12:00:00"))
    assert await verdict(app, "once,c") == [("once", "served")]
    clock.now = ms("2028-03-01T12:00:00")
    assert await verdict(app, "once,c") == [("once", "frequency_capped"), ("c", "served")]


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_daily_cap_of_one_frees_the_candidate_at_its_local_midnight(
    driver: str, serve: Serve
) -> None:
    paris = ZoneInfo("Europe/Paris")
    app = await serve(
        driver,
        campaigns=[
            Campaign(id="daily", caps=["1/day"], timezone="Europe/Paris"),
            Campaign(id="hourly", caps=["1/1h"], timezone="Europe/Paris"),
        ],
    )
    clock = set_clock(app, ms("2027-03-01T22:00:00", paris))
    assert await verdict(app, "daily,hourly,c") == [("daily", "served")]
    clock.now = ms("2027-03-01T23:59:59", paris)
    assert await verdict(app, "daily,hourly,c") == [
        ("daily", "frequency_capped"),
        ("hourly", "served"),
    ]
    clock.now = ms("2027-03-02T00:00:00", paris)  # a new day in Paris; "hourly" still capped
    assert await verdict(app, "hourly,daily,c") == [
        ("hourly", "frequency_capped"),
        ("daily", "served"),
    ]


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_stored_cap_applies_to_its_candidate_alone(
    driver: str, serve: Serve, admin: Store
) -> None:
    """``campaign set two --cap 1/1h``: two is capped after one impression; one, which shares
    two's settings, keeps its own caps, and so does a third that shares them."""
    app = await serve(
        driver, campaigns=[*SIBLINGS, Campaign(id="three", caps=["2/1h"])], debug_headers=True
    )
    await admin.set_campaign("two", caps=["1/1h"])  # what the CLI writes
    assert await verdict(app, "two,three") == [("two", "served")]
    assert await verdict(app, "two,three") == [("two", "frequency_capped"), ("three", "served")]
    assert await verdict(app, "three,two") == [("three", "served")]
    assert await verdict(app, "three,two") == [
        ("three", "frequency_capped"),
        ("two", "frequency_capped"),
    ]


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_user_blocked_or_opted_out_is_judged_before_the_caps(
    driver: str, serve: Serve, admin: Store
) -> None:
    """A capped candidate the user also blocked is denied for the block (the first check), as a
    single-campaign request would be."""
    app = await serve(driver, campaigns=SIBLINGS)
    assert await verdict(app, "one,two") == [("one", "served")]
    await block_campaign(admin, "u1", "one")
    assert await verdict(app, "one,two") == [("one", "user_blocked"), ("two", "served")]
    (await app.get("/ad?campaign_id=one")).denied("user_blocked")


@pytest.mark.parametrize("store_url", ["redis", "memory"], indirect=True)
async def test_after_campaign_delete_its_pending_holds_no_longer_count_on_one_server(
    serve: Serve, admin: Store
) -> None:
    """Under ``record_on="beacon"`` a served ad holds its cap slot until its beacon. ``campaign
    delete`` forgets the campaign's state, its pending reservations with it: on one server the
    next decision, of one campaign or among candidates, no longer counts their holds. (On a
    cluster the user's shard counts them until they expire, ``beacon_ttl`` + 60 s.)"""
    app = await serve("starlette", campaigns=SIBLINGS, record_on="beacon")  # the mode under test
    assert await verdict(app, "one,two") == [("one", "served")]
    (await app.get("/ad?campaign_id=one")).denied("frequency_capped")  # the hold counts
    assert await verdict(app, "one,two") == [("one", "frequency_capped"), ("two", "served")]
    assert await admin.delete_campaign("one")
    assert (await app.get("/ad?campaign_id=one")).decision["campaign_id"] == "one"
    # That new impression holds its slot again, among candidates too.
    assert await verdict(app, "one,two") == [("one", "frequency_capped"), ("two", "served")]
    assert await admin.delete_campaign("one")
    assert await verdict(app, "one,two") == [("one", "served")]
