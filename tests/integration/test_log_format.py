"""The user's impression log as the store keeps it, and the upgrade from the older form.

A first impression is stored as a plain integer (its time, ms): Redis keeps such a hash value
in 9 bytes instead of 15. Every later write uses ``"<lifetime>|<t1>,<t2>,..."``, the only form
earlier releases wrote; logs they left behind keep counting, so a running deployment upgrades
without losing a cap. Runs on every topology (``store_url``), the embedded store included.
"""

from __future__ import annotations

import time
from typing import Any

from conftest import as_user, client

from xsp_middleware import Campaign, XSPMiddleware

AD = "/ad?campaign_id=c1&cpm=2.00"


def _ms() -> int:
    return time.time_ns() // 1_000_000


async def _log(app: XSPMiddleware, user: str) -> str | None:
    raw = await app.store.client.hget(app.store.user_key(user), "c1")
    return None if raw is None else raw.decode()


async def _decision(c: Any, user: str, path: str = AD) -> str:
    r = await c.get(path, headers=as_user(user))
    return "served" if r.status_code == 200 else str(r.headers["x-xsp-decision"])


async def test_a_first_impression_is_stored_as_one_integer_then_as_a_log(
    store_url: str, make_app: Any
) -> None:
    app: XSPMiddleware = make_app(redis_url=store_url, default_caps=["3/1h"])
    async with client(app) as c:
        before = _ms()
        assert await _decision(c, "u1") == "served"
        first = await _log(app, "u1")
        assert first is not None and first.isdigit(), first
        assert before - 1000 <= int(first) <= _ms() + 1000  # the server's clock, in ms
        assert await _decision(c, "u1") == "served"
        lifetime, _, times = (await _log(app, "u1") or "").partition("|")
        assert lifetime == "2" and times.split(",")[0] == first
        assert await _decision(c, "u1") == "served"
        assert await _decision(c, "u1") == "frequency_capped"
    [(_, [(_, count, frees_at)])] = await app.store.user_view("u1", "c1")
    assert count == 3 and frees_at is not None


async def test_logs_an_earlier_release_wrote_keep_counting(store_url: str, make_app: Any) -> None:
    app: XSPMiddleware = make_app(
        redis_url=store_url, campaigns=[Campaign(id="c1", caps=["3/1h", "4/lifetime"])]
    )
    now = _ms()
    store = app.store.client
    # As the previous release left them: two impressions this hour (of three ever), and one
    # impression, ever, in the one-time form it used for it too.
    await store.hset(app.store.user_key("old"), "c1", f"3|{now - 60_000},{now - 30_000}")
    await store.hset(app.store.user_key("single"), "c1", f"1|{now - 10_000}")
    async with client(app) as c:
        assert await _decision(c, "old") == "served"  # 3 of 3 this hour, 4 of 4 ever
        assert await _decision(c, "old") == "frequency_capped"
        lifetime, _, times = (await _log(app, "old") or "").partition("|")
        assert lifetime == "4" and times.split(",")[:2] == [str(now - 60_000), str(now - 30_000)]

        assert await _decision(c, "single") == "served"
        assert await _decision(c, "single") == "served"
        assert await _decision(c, "single") == "frequency_capped"
    view = await app.store.user_view("single", "c1")
    assert [count for _, count, _ in view[0][1]] == [3, 3]


async def test_releasing_a_first_impression_leaves_no_log(store_url: str, make_app: Any) -> None:
    app: XSPMiddleware = make_app(redis_url=store_url, default_caps=["1/1h"])
    async with client(app) as c:
        r = await c.get("/status/500?campaign_id=c1", headers=as_user("u1"))
        assert r.status_code == 500  # served, then released: the cap slot comes back
        assert await _log(app, "u1") is None
        assert await _decision(c, "u1") == "served"
        assert await _decision(c, "u1") == "frequency_capped"
