"""``UpstreamSession.request(context, candidates=[...])``: the first eligible candidate (or,
under ``selection="weighted"``, one drawn by weight) is reserved and handed to the upstream as
``params["campaign_id"]``; when none is eligible it raises ``NoEligibleCampaign``, and a bad
list is an ``InvalidParameter``. On every store ``store_url`` offers."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import SECRET
from test_candidates_frameworks import CAMPAIGNS

from xsp_middleware import (
    Campaign,
    FrequencyCapExceeded,
    InvalidParameter,
    NoEligibleCampaign,
    Settings,
    UpstreamSession,
    XSPError,
)
from xsp_middleware.settings import Rules
from xsp_middleware.store import Store


class Upstream:
    """Records what each fetch was asked for."""

    def __init__(self, fail: bool = False) -> None:
        self.params: list[dict[str, Any]] = []
        self.fail = fail

    async def fetch(self, *, context: Any = None, **kwargs: Any) -> str:
        self.params.append(dict(kwargs.get("params") or {}))
        if self.fail:
            raise ConnectionError("upstream down")
        return "<VAST/>"


@pytest.fixture
async def admin(store_url: str) -> AsyncIterator[Store]:
    store = Store(Rules.from_settings(Settings(redis_url=store_url, secret_key=SECRET)))
    yield store
    await store.aclose()


@pytest.fixture
async def session(store_url: str) -> AsyncIterator[Any]:
    """``session(upstream, **settings)``: an UpstreamSession on the store, closed after."""
    opened: list[UpstreamSession] = []

    def make(upstream: Upstream, **settings: Any) -> UpstreamSession:
        settings.setdefault("campaigns", CAMPAIGNS)
        made = UpstreamSession(upstream, redis_url=store_url, secret_key=SECRET, **settings)
        opened.append(made)
        return made

    yield make
    for made in opened:
        await made.aclose()


def user(name: str) -> dict[str, Any]:
    return {"cookies": {"user_id": name}}


async def denied_count(admin: Store, campaign: str, reason: str, expected: int) -> int:
    """A cluster counts a passed-over candidate's denial just after deciding."""
    for _ in range(150):
        count = (await admin.get_campaign(campaign)).denials[reason]
        if count >= expected:
            return count
        await asyncio.sleep(0.02)
    return count


async def test_the_first_eligible_candidate_is_reserved_and_given_to_the_upstream(
    session: Any, admin: Store
) -> None:
    upstream = Upstream()
    s = session(upstream)
    assert await s.request(user("u1"), candidates=["a"]) == "<VAST/>"  # a is capped for u1 now
    assert upstream.params[-1] == {"campaign_id": "a"}
    got = await s.request(user("u1"), candidates=["a", "b", "c"], params={"cpm": "3.00", "x": 1})
    assert got == "<VAST/>"
    assert upstream.params[-1] == {"campaign_id": "c", "cpm": "3.00", "x": 1}
    # The candidates win over a campaign the params name.
    await s.request(user("u1"), candidates=["b", "d"], params={"campaign_id": "a"})
    assert upstream.params[-1]["campaign_id"] == "d"

    c = await admin.get_campaign("c")
    assert (c.impressions, c.spent_units) == (1, 30_000)  # the request's price, 3.00 CPM
    assert await denied_count(admin, "a", "frequency_capped", 1) == 1
    assert await denied_count(admin, "b", "budget_exhausted", 2) == 2
    assert (await admin.get_campaign("d")).impressions == 1


async def test_none_eligible_raises_no_eligible_campaign_with_the_candidates(
    session: Any, admin: Store
) -> None:
    upstream = Upstream()
    s = session(upstream)
    await s.request(user("u1"), candidates=["a"])
    with pytest.raises(NoEligibleCampaign) as caught:
        await s.request(user("u1"), candidates=["a", "b", "off"])
    assert isinstance(caught.value, XSPError)
    assert caught.value.candidates == [
        ("a", "frequency_capped"),
        ("b", "budget_exhausted"),
        ("off", "campaign_paused"),
    ]
    assert len(upstream.params) == 1  # the upstream was not called
    # One candidate: the old exceptions.
    with pytest.raises(FrequencyCapExceeded):
        await s.request(user("u1"), candidates=["a"])
    assert await denied_count(admin, "off", "campaign_paused", 1) == 1


async def test_a_failing_upstream_releases_the_chosen_candidate(session: Any, admin: Store) -> None:
    s = session(Upstream(fail=True))
    await session(Upstream()).request(user("u1"), candidates=["a"])
    with pytest.raises(ConnectionError):
        await s.request(user("u1"), candidates=["a", "b", "c"])
    c = await admin.get_campaign("c")
    assert (c.impressions, c.spent_units) == (0, 0)  # released
    ok = Upstream()
    await session(ok).request(user("u1"), candidates=["a", "b", "c"])
    assert ok.params[-1]["campaign_id"] == "c"
    assert (await admin.get_campaign("c")).impressions == 1


@pytest.mark.parametrize(
    "bad",
    [
        "a,b",  # one string, not a list
        "a",
        b"a,b",
        [],
        ["a", "a"],
        ["a", "b", "a"],
        ["a", "b c"],
        ["a", ""],
        ["a", 1],
        [f"c{i}" for i in range(17)],
        42,
    ],
)
async def test_bad_candidates_raise_invalid_parameter(session: Any, admin: Store, bad: Any) -> None:
    upstream = Upstream()
    with pytest.raises(InvalidParameter):
        await session(upstream).request(user("u1"), candidates=bad)
    assert upstream.params == []
    for cid in ("a", "b", "c0"):
        assert (await admin.get_campaign(cid)).impressions == 0


async def test_max_candidates_bounds_a_sessions_list(session: Any) -> None:
    s = session(Upstream(), max_candidates=2)  # the setting under test
    with pytest.raises(InvalidParameter):
        await s.request(user("u1"), candidates=["c", "d", "e"])
    await s.request(user("u1"), candidates=["c", "d"])


async def test_a_weighted_session_draws_only_eligible_candidates(
    session: Any, store_url: str
) -> None:
    upstream = Upstream()
    s = session(
        upstream,
        selection="weighted",  # the setting under test
        campaigns=[Campaign(id="w5", weight=5), Campaign(id="wx", weight=50, status="paused")],
    )
    await asyncio.gather(
        *(s.request(user(f"u{i}"), candidates=["w1", "w5", "wx"]) for i in range(300))
    )
    chosen = Counter(p["campaign_id"] for p in upstream.params)
    assert set(chosen) == {"w1", "w5"}, chosen
    assert chosen["w5"] > 2 * chosen["w1"], chosen  # 5:1 over 300 draws
