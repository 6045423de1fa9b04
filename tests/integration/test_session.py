"""UpstreamSession: the tutorial's API (check_frequency_cap, track_budget,
get_remaining_budget, request) done atomically."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
from conftest import SECRET

from xsp_middleware import (
    BudgetExceeded,
    Campaign,
    FrequencyCapExceeded,
    InvalidParameter,
    UpstreamSession,
)


@dataclass
class SessionContext:
    cookies: dict[str, str] = field(default_factory=dict)


class Vast:
    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    async def fetch(self, *, context: Any = None, **kwargs: Any) -> str:
        self.calls += 1
        if self.fail:
            raise ConnectionError("upstream down")
        return "<VAST/>"


_open: list[UpstreamSession] = []


def make(store_url: str, upstream: Vast | None = None, **kw: Any) -> UpstreamSession:
    # Behaviour tests, not latency tests: a busy CI box must not turn a session's first
    # decision (connect, ask Sentinel, load scripts) into a timeout.
    if os.environ.get("XSP_TEST_LEASING") == "1":
        kw.setdefault("leasing", True)
    session = UpstreamSession(upstream or Vast(), redis_url=store_url, secret_key=SECRET, **kw)
    _open.append(session)
    return session


@pytest.fixture(autouse=True)
async def _close_sessions() -> AsyncIterator[None]:
    yield
    while _open:
        await _open.pop().aclose()


async def test_a_session_used_as_a_context_manager_returns_its_leases(store_url: str) -> None:
    campaign = Campaign(id="c1", budget="1.00", leasing=True)
    async with UpstreamSession(
        Vast(), redis_url=store_url, secret_key=SECRET, campaigns=[campaign]
    ) as session:
        for i in range(3):
            await session.request({"cookies": {"user_id": f"u{i}"}}, params={"campaign_id": "c1"})
    async with UpstreamSession(
        Vast(), redis_url=store_url, secret_key=SECRET, campaigns=[campaign]
    ) as other:
        # Another process sees only the three impressions spent, not the unspent lease.
        assert await other.get_remaining_budget("c1") == Decimal("0.994")


async def test_request_serves_then_raises_frequency_cap_exceeded(store_url: str) -> None:
    vast = Vast()
    session = make(store_url, vast)
    ctx = SessionContext(cookies={"user_id": "u1"})
    for _ in range(3):
        assert await session.request(ctx, params={"campaign_id": "c1", "cpm": "5.00"}) == "<VAST/>"
    assert await session.check_frequency_cap("u1", "c1") is False
    assert await session.check_frequency_cap("u2", "c1") is True
    with pytest.raises(FrequencyCapExceeded):
        await session.request(ctx, params={"campaign_id": "c1", "cpm": "5.00"})
    assert vast.calls == 3
    assert await session.get_remaining_budget("c1") == Decimal("999.985")


async def test_request_raises_budget_exceeded_exactly_at_the_budget(store_url: str) -> None:
    session = make(store_url, campaigns=[Campaign(id="c1", budget="0.01")])
    results = await asyncio.gather(
        *(
            session.request({"cookies": {"user_id": f"u{i}"}}, params={"campaign_id": "c1"})
            for i in range(20)
        ),
        return_exceptions=True,
    )
    assert sum(r == "<VAST/>" for r in results) == 5  # 0.01 / 0.002
    assert all(isinstance(r, BudgetExceeded) for r in results if r != "<VAST/>")
    assert await session.get_remaining_budget("c1") == 0


async def test_a_failing_upstream_releases_the_reservation(store_url: str) -> None:
    session = make(store_url, Vast(fail=True), default_caps=["1/1h"])
    with pytest.raises(ConnectionError):
        await session.request({"cookies": {"user_id": "u1"}}, params={"campaign_id": "c1"})
    assert await session.get_remaining_budget("c1") == Decimal("1000.00")
    assert await session.check_frequency_cap("u1", "c1") is True


async def test_track_budget_is_atomic_and_never_overspends(store_url: str) -> None:
    session = make(store_url, campaigns=[Campaign(id="c1", budget="1.00")])
    results = await asyncio.gather(
        *(session.track_budget("c1", Decimal("0.03")) for _ in range(100))
    )
    assert results.count(True) == 33
    assert await session.get_remaining_budget("c1") == Decimal("0.01")
    assert await session.track_budget("c1", "0.01") is True
    assert await session.track_budget("c1", "0.0000001") is False


async def test_money_arguments_must_be_exact(store_url: str) -> None:
    session = make(store_url)
    with pytest.raises(TypeError):
        await session.track_budget("c1", 0.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidParameter):
        await session.track_budget("c1", Decimal("0.000000001"))
    with pytest.raises(InvalidParameter):
        await session.request({}, params={"campaign_id": "bad id"})
    with pytest.raises(InvalidParameter):
        await session.request({}, params={"campaign_id": "c1", "cpm": "NaN"})


async def test_anonymous_context_is_budgeted_but_not_capped(store_url: str) -> None:
    session = make(store_url, default_caps=["1/1h"])
    for _ in range(5):
        assert await session.request(object(), params={"campaign_id": "c1"}) == "<VAST/>"
    assert await session.get_remaining_budget("c1") == Decimal("999.99")


async def test_under_beacons_a_session_counts_what_its_upstream_answered(store_url: str) -> None:
    # record_on="beacon" is about responses a player renders; a session's upstream answer is
    # the impression itself, so it counts at once and nothing stays pending.
    session = make(store_url, record_on="beacon")
    await session.request(SessionContext({"user_id": "u1"}), params={"campaign_id": "c1"})
    with pytest.raises(ConnectionError):
        await make(store_url, Vast(fail=True), record_on="beacon").request(
            SessionContext({"user_id": "u2"}), params={"campaign_id": "c1"}
        )
    view = await session.store.get_campaign("c1")
    assert (view.impressions, view.pending, view.spent_units) == (1, 0, 20_000)


async def test_a_session_refuses_a_price_above_the_campaign_ceiling(store_url: str) -> None:
    session = make(store_url, campaigns=[Campaign(id="c1", max_cpm="5.00")])
    with pytest.raises(InvalidParameter):
        await session.request(
            SessionContext({"user_id": "u1"}), params={"campaign_id": "c1", "cpm": "5.01"}
        )
    assert await session.request(
        SessionContext({"user_id": "u1"}), params={"campaign_id": "c1", "cpm": "5.00"}
    )
