"""The I/O-free protocol: every script reply is decoded in one place, into named fields, and a
reply of the wrong shape is a StoreUnavailable (a failed call), never a crash. No Redis here;
the integration tests drive the same decoders through every topology."""

from __future__ import annotations

import asyncio
from typing import Any

import fakeredis
import pytest

from xsp_middleware import StoreUnavailable
from xsp_middleware.metrics import _DENIAL_REASONS
from xsp_middleware.store.protocol import (
    REASONS,
    Reason,
    campaign_reply,
    config_reply,
    lease_reply,
    peek_reply,
    prefs_reply,
    reservation_from,
    user_reply,
)
from xsp_middleware.store.scripts import PREFS, RESERVE, RESERVE_USER


def test_reason_names_are_the_decision_header_values() -> None:
    assert REASONS[Reason.SERVED] == "served"
    assert REASONS[Reason.FREQUENCY_CAPPED] == "frequency_capped"
    assert REASONS[Reason.USER_BLOCKED] == "user_blocked"
    # Every denial a script can give has its metric series from the start.
    assert set(REASONS[1:]) <= set(_DENIAL_REASONS)
    assert Reason.TZ_RETRY not in range(len(REASONS))


@pytest.mark.parametrize(
    "decode, size",
    [
        (campaign_reply, 12),
        (user_reply, 8),
        (lease_reply, 11),
        (peek_reply, 2),
        (config_reply, 2),
        (prefs_reply, 3),
    ],
)
@pytest.mark.parametrize(
    "bad",
    [None, b"OK", 1, [], "x", {"a": 1}, Exception("ERR")],
)
def test_a_reply_of_another_shape_is_a_store_failure(decode: Any, size: int, bad: Any) -> None:
    with pytest.raises(StoreUnavailable, match="unexpected reply"):
        decode(bad)
    with pytest.raises(StoreUnavailable):
        decode([0] * (size + 1))
    decode([0] * size)


def test_a_reserve_reply_becomes_a_reservation() -> None:
    raw = [1, 0, 2500, 97500, 2, 1_700_000_000_000, 0, 0, 3, b"", 1, b""]
    r = reservation_from(("c1", "u:{k}", True), raw)
    assert r.reserved and r.reason == "served"
    assert (r.cost_units, r.remaining_budget_units, r.remaining_impressions) == (2500, 97500, 2)
    assert (r.at_ms, r.logs, r.personalized, r.campaign_id) == (1_700_000_000_000, 3, True, "c1")
    denied = reservation_from(("c1", None, True), [0, 1, 2500, -5, -1, 1, 0, 0, 0, b"", 0, b""])
    assert not denied.reserved and denied.reason == "frequency_capped"
    assert denied.remaining_budget_units == 0 and denied.remaining_impressions is None
    assert not denied.personalized
    with pytest.raises(StoreUnavailable):
        reservation_from(("c1", None, True), [0, 42, 0, 0, -1, 0, 0, 0, 0, b"", 1, b""])


def _run(script: Any, keys: list[str], args: list[Any]) -> Any:
    async def go() -> Any:
        client = fakeredis.FakeAsyncRedis()
        try:
            return await client.eval(script.text, len(keys), *keys, *args)
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_the_scripts_replies_have_the_decoders_shapes() -> None:
    """The decoders' sizes are the scripts' own: run the scripts (embedded store) and decode."""
    caps = "3:3600000"
    reserve_args = ["c1", *[""] * 9, "UTC", "", "", "", "0", "", "", "1", "no_tracking"]
    raw = _run(RESERVE, ["p:c:{c1}:cfg", "p:c:{c1}:st", "p:u:{k}"], reserve_args)
    assert campaign_reply(raw).reason in (Reason.SERVED, Reason.BUDGET_EXHAUSTED)
    user_args = ["c1", caps, "", "", "", "", "no_tracking"]
    reply = user_reply(_run(RESERVE_USER, ["p:u:{k}"], user_args))
    assert reply.passed == 1 and reply.left == 2
    assert prefs_reply(_run(PREFS, ["p:u:{k}"], ["block", "c1", 60000, 100])).status == 1
