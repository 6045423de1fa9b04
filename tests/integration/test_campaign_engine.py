"""The campaign model inside the reserve script: daily budgets across DST, flights, calendar
and rolling caps, user caps across campaigns, even and frontloaded pacing. A test clock
(``store.clock``, a ManualClock) stands in for Redis TIME, so a day takes a second."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from conftest import SECRET, as_user, client

from xsp_middleware import Campaign, Settings
from xsp_middleware.clock import ManualClock as Clock
from xsp_middleware.settings import Rules
from xsp_middleware.store import Store

NEW_YORK = ZoneInfo("America/New_York")


def ms(text: str, tz: Any = UTC) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=tz).timestamp() * 1000)


async def _ask(c: Any, campaign: str, user: str = "u1") -> str:
    r = await c.get(f"/ad?campaign_id={campaign}", headers=as_user(user))
    return "served" if r.status_code == 200 else r.headers["x-xsp-decision"]


@pytest.mark.parametrize(
    ("spent_at", "still_same_day", "next_day"),
    [
        # Spring forward: 8 March 2026 has 23 hours; the next local midnight is 04:00 UTC.
        ("2026-03-08T17:00:00", "2026-03-09T03:59:59", "2026-03-09T04:00:01"),
        # Fall back: 1 November 2026 has 25 hours; the next local midnight is 05:00 UTC.
        ("2026-11-01T17:00:00", "2026-11-02T04:59:59", "2026-11-02T05:00:01"),
    ],
)
async def test_daily_budget_resets_at_local_midnight_across_dst(
    store_url: str, make_app: Any, spent_at: str, still_same_day: str, next_day: str
) -> None:
    app = make_app(
        redis_url=store_url,
        default_caps=[],
        campaigns=[
            Campaign(id="d1", daily_budget="0.004", cpm="2.00", timezone="America/New_York")
        ],
    )
    clock = app.store.clock = Clock(ms(spent_at))
    async with client(app) as c:
        assert [await _ask(c, "d1", f"u{i}") for i in range(3)] == [
            "served",
            "served",
            "budget_exhausted",
        ]
        clock.now = ms(still_same_day)
        assert await _ask(c, "d1", "late") == "budget_exhausted"
        clock.now = ms(next_day)
        assert await _ask(c, "d1", "early") == "served"
    view = await app.store.get_campaign("d1")
    assert (view.daily_spent_units, view.spent_units) == (20000, 60000)


async def test_flight_dates_deny_outside_with_campaign_inactive(
    store_url: str, make_app: Any
) -> None:
    app = make_app(
        redis_url=store_url,
        campaigns=[
            Campaign(id="f1", start="2027-01-10", end="2027-01-12", timezone="Europe/Paris")
        ],
    )
    clock = app.store.clock = Clock(ms("2027-01-09T22:59:59"))  # 23:59:59 in Paris
    async with client(app) as c:
        assert await _ask(c, "f1") == "campaign_inactive"
        clock.now = ms("2027-01-09T23:00:00")
        assert await _ask(c, "f1") == "served"
        clock.now = ms("2027-01-12T22:59:59")  # the end date is included
        assert await _ask(c, "f1", "u2") == "served"
        clock.now = ms("2027-01-12T23:00:00")
        assert await _ask(c, "f1", "u3") == "campaign_inactive"
    view = await app.store.get_campaign("f1")
    assert view.denials["campaign_inactive"] == 2


async def test_calendar_and_rolling_caps_both_hold(store_url: str, make_app: Any) -> None:
    app = make_app(
        redis_url=store_url,
        campaigns=[Campaign(id="k1", caps=["2/1h", "3/day", "4/week", "5/month", "8/lifetime"])],
    )
    clock = app.store.clock = Clock(ms("2027-01-01T10:00:00"))  # a Friday

    async def at(when: str) -> str:
        clock.now = ms(when)
        return await _ask(c, "k1")

    async with client(app) as c:
        assert await at("2027-01-01T10:00:00") == "served"
        assert await at("2027-01-01T10:01:00") == "served"
        assert await at("2027-01-01T10:02:00") == "frequency_capped"  # rolling 2/1h
        assert await at("2027-01-01T11:00:30") == "served"  # the 10:00 one left the hour
        assert await at("2027-01-01T12:30:00") == "frequency_capped"  # 3/day
        assert await at("2027-01-01T23:59:59") == "frequency_capped"
        assert await at("2027-01-02T00:00:00") == "served"  # Saturday: a new day
        assert await at("2027-01-02T02:00:00") == "frequency_capped"  # 4/week (Mon-Sun)
        assert await at("2027-01-04T00:00:01") == "served"  # Monday: a new week
        assert await at("2027-01-05T00:00:01") == "frequency_capped"  # 5/month
        assert await at("2027-02-01T00:00:01") == "served"  # February
        assert await at("2027-02-02T00:00:01") == "served"
        assert await at("2027-02-03T00:00:01") == "served"
        assert await at("2027-02-04T00:00:01") == "frequency_capped"  # 8/lifetime


async def test_ten_caps_on_one_campaign(store_url: str, make_app: Any) -> None:
    caps = [f"{n}/{n}h" for n in range(2, 12)]
    app = make_app(redis_url=store_url, campaigns=[Campaign(id="t1", caps=caps)])
    async with client(app) as c:
        assert [await _ask(c, "t1") for _ in range(3)] == ["served", "served", "frequency_capped"]


async def test_user_caps_span_campaigns(store_url: str, make_app: Any) -> None:
    app = make_app(redis_url=store_url, default_caps=["5/1h"], user_caps=["3/day"])
    async with client(app) as c:
        got = [await _ask(c, campaign) for campaign in ("a", "b", "c", "d", "a")]
        assert got == ["served", "served", "served", "frequency_capped", "frequency_capped"]
        assert await _ask(c, "d", "someone-else") == "served"


def _store(redis_url: str, **settings: Any) -> Store:
    return Store(Rules.from_settings(Settings(redis_url=redis_url, secret_key=SECRET, **settings)))


async def _simulate_day(store: Store, campaign: str, per_minute: int) -> list[int]:
    """Uniform traffic over a simulated UTC day; returns the day's spend after each hour."""
    day = ms("2027-03-01T00:00:00")
    clock = store.clock = Clock(day)
    rule = store.rules.rule_for(campaign)
    hourly = []
    for minute in range(24 * 60):
        clock.now = day + minute * 60_000 + 30_000
        for _ in range(per_minute):
            await store.reserve(campaign, None, None, rule)
        if minute % 60 == 59:
            hourly.append((await store.get_campaign(campaign)).daily_spent_units)
    return hourly


async def test_even_pacing_tracks_the_ideal_curve_over_a_simulated_day(redis_url: str) -> None:
    store = _store(
        redis_url,
        campaigns=[Campaign(id="e1", daily_budget="10.00", cpm="2.00", caps=[], pacing="even")],
    )
    budget = 10 * 10**7
    hourly = await _simulate_day(store, "e1", per_minute=7)  # 10080 requests; budget buys 5000
    for hour, spent in enumerate(hourly, start=1):
        ideal = budget * hour // 24
        assert abs(spent - ideal) <= budget * 5 // 100, (hour, spent, ideal)
    assert hourly[-1] >= budget * 99 // 100
    assert hourly[-1] <= budget
    view = await store.get_campaign("e1")
    assert view.denials["paced"] > 4000


async def test_frontloaded_pacing_starts_ahead_and_converges(redis_url: str) -> None:
    store = _store(
        redis_url,
        campaigns=[
            Campaign(id="fl", daily_budget="10.00", cpm="2.00", caps=[], pacing="frontloaded")
        ],
    )
    budget = 10 * 10**7
    hourly = await _simulate_day(store, "fl", per_minute=14)  # 4x what the budget buys
    # Hour 1: the ~40% allowance lets all 840 requests through (even would stop near 9%).
    assert hourly[0] == 840 * 20000
    # Hour 6: the ceiling is 25% + (40% - 35% x 0.25) = 56.25% of the budget; even: 30%.
    assert budget * 50 // 100 < hourly[5] <= budget * 5625 // 10000
    assert hourly[-1] >= budget * 99 // 100
    assert max(hourly) <= budget


async def test_pacing_target_is_shown_for_even_campaigns(redis_url: str) -> None:
    store = _store(redis_url)
    store.clock = Clock(ms("2027-03-01T06:00:00"))
    view = await store.set_campaign("p1", daily_budget="24.00", pacing="even", caps=[])
    # 6 h of 24: 6.00, plus 5% of 24.00 = 1.20.
    assert view.pacing_target_units == 72_000_000
    assert (await store.set_campaign("p2", budget="5")).pacing_target_units is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"pacing": "even"}, "needs a daily_budget"),
        ({"timezone": "Mars/Olympus"}, "IANA"),
        ({"start": "2027-02-01", "end": "2027-01-01"}, "after start"),
        ({"start": "yesterday"}, "ISO 8601"),
        ({"cpm": "1000.01"}, "max_cpm"),
        ({"caps": ["3/fortnight"]}, "N/<window>"),
        ({"budget": "-1"}, "budget"),
    ],
)
async def test_invalid_campaign_changes_are_refused(
    redis_url: str, changes: dict[str, Any], message: str
) -> None:
    from xsp_middleware import ConfigError

    store = _store(redis_url)
    with pytest.raises(ConfigError, match=message):
        await store.set_campaign("bad", **changes)


async def test_a_time_zone_changed_in_the_store_applies_to_the_next_decision(
    redis_url: str, make_app: Any
) -> None:
    app = make_app(
        redis_url=redis_url, default_caps=[], campaigns=[Campaign(id="z", daily_budget="0.002")]
    )
    clock = app.store.clock = Clock(ms("2027-06-01T23:30:00"))  # UTC day June 1
    async with client(app) as c:
        assert await _ask(c, "z", "a") == "served"
        assert await _ask(c, "z", "b") == "budget_exhausted"
        # In Tokyo it is already June 2 08:30: a new local day with a fresh daily budget.
        await app.store.set_campaign("z", timezone="Asia/Tokyo")
        assert await _ask(c, "z", "c") == "served"
        clock.now = ms("2027-06-01T23:31:00")
        assert await _ask(c, "z", "d") == "budget_exhausted"
