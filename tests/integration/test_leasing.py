"""Budget leasing for hot campaigns: exact spend, no overspend, leases that renew, expire,
come back on shutdown, and keep the campaign's shard quiet."""

from __future__ import annotations

import asyncio
import json
import signal
from decimal import Decimal
from typing import Any

import pytest
import redis
from conftest import SECRET, as_user, client
from http_load import fire
from processes import example_env, uvicorn
from redis_server import RedisServer
from redis_topologies import RedisClusterNodes

from xsp_middleware import Campaign, ConfigError, Settings, XSPMiddleware
from xsp_middleware.clock import ManualClock
from xsp_middleware.errors import StoreUnavailable
from xsp_middleware.settings import Rules
from xsp_middleware.store import Store

COST = 20_000  # CPM 2.00 in units (1e-7)


def _observer(url: str) -> Store:
    """Another process's view of the store (it holds no lease)."""
    return Store(Rules.from_settings(Settings(redis_url=url, secret_key=SECRET)))


async def _burst(app: XSPMiddleware, n: int, path: str = "/ad?campaign_id=hot") -> list[int]:
    async with client(app) as c:
        responses = await asyncio.gather(
            *(c.get(path, headers=as_user(f"user-{i}")) for i in range(n))
        )
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 204}, set(codes)
    return codes


@pytest.mark.parametrize("store_url", ["redis", "cluster", "memory"], indirect=True)
async def test_one_process_spends_a_leased_budget_exactly(store_url: str, make_app: Any) -> None:
    # 0.274 at CPM 2.00 buys exactly 137: every one of them is served, none more.
    app = make_app(
        redis_url=store_url,
        campaigns=[Campaign(id="hot", budget="0.274", cpm="2.00", leasing=True)],
    )
    codes = await _burst(app, 2000)
    assert codes.count(200) == 137
    view = await app.store.get_campaign("hot")
    assert (view.spent_units, view.impressions) == (137 * COST, 137)
    await app.store.return_leases()
    view = await app.store.get_campaign("hot")
    assert (view.spent_units, view.leased_units, view.impressions) == (137 * COST, 0, 137)


@pytest.mark.parametrize("store_url", ["redis", "cluster"], indirect=True)
async def test_two_processes_never_overspend_and_returned_leases_are_spent_exactly(
    store_url: str, make_app: Any
) -> None:
    settings = {
        "redis_url": store_url,
        "campaigns": [Campaign(id="hot", budget="2.00", cpm="2.00", leasing=True)],
    }  # 1000 impressions
    a, b = make_app(**settings), make_app(**settings)
    first = await asyncio.gather(_burst(a, 700), _burst(b, 700))
    served = sum(codes.count(200) for codes in first)
    assert served <= 1000
    # While leases are out, the store counts them as spent: budget = spent + leased + left.
    observer = _observer(store_url)
    view = await observer.get_campaign("hot")
    assert view.spent_units + view.leased_units <= 1000 * COST
    # Both processes give their leases back: spend on impressions is exactly what was served.
    await a.store.return_leases()
    await b.store.return_leases()
    view = await observer.get_campaign("hot")
    assert (view.spent_units, view.leased_units, view.impressions) == (served * COST, 0, served)
    # What the leases held is spendable again: a second wave spends the budget to the cent.
    again = await asyncio.gather(_burst(a, 700), _burst(b, 700))
    served += sum(codes.count(200) for codes in again)
    assert served == 1000
    await a.store.return_leases()
    await b.store.return_leases()
    view = await observer.get_campaign("hot")
    assert (view.spent, view.leased_units, view.impressions) == (Decimal("2.00"), 0, 1000)
    assert view.status == "exhausted"


async def test_released_responses_give_their_units_back_to_the_lease(
    redis_url: str, make_app: Any
) -> None:
    app = make_app(
        redis_url=redis_url,
        campaigns=[Campaign(id="hot", budget="1.00", cpm="2.00", leasing=True)],
    )
    async with client(app) as c:
        for i in range(20):
            path = "/ad?campaign_id=hot" if i % 2 else "/status/500?campaign_id=hot"
            await c.get(path, headers=as_user(f"u{i}"))
    await app.store.return_leases()
    view = await _observer(redis_url).get_campaign("hot")
    assert (view.spent_units, view.impressions, view.leased_units) == (10 * COST, 10, 0)
    assert view.released == 10


async def test_an_idle_lease_expires_back_into_the_budget(redis_url: str, make_app: Any) -> None:
    app = make_app(
        redis_url=redis_url,
        lease_seconds=0.3,
        campaigns=[Campaign(id="hot", budget="1000.00", cpm="2.00", leasing=True)],
    )
    codes = await _burst(app, 100)
    assert codes.count(200) == 100
    observer = _observer(redis_url)
    # Another process sees the leased units as held, then, once the lease lapses unused,
    # exactly the spend of the ads served.
    held = await observer.get_campaign("hot")
    assert held.leased_units > 0
    for _ in range(40):
        view = await observer.get_campaign("hot")
        if view.leased_units == 0:
            break
        await asyncio.sleep(0.05)
    assert (view.spent_units, view.impressions, view.leased_units) == (100 * COST, 100, 0)


async def test_caps_still_hold_for_every_request_of_a_leased_campaign(
    store_url: str, make_app: Any
) -> None:
    app = make_app(redis_url=store_url, default_caps=["3/1h"], leasing=True)
    async with client(app) as c:
        responses = await asyncio.gather(
            *(c.get("/ad?campaign_id=c1&cpm=2.50", headers=as_user("u1")) for _ in range(300))
        )
    assert [r.status_code for r in responses].count(200) == 3
    denied = {r.headers["x-xsp-decision"] for r in responses if r.status_code == 204}
    assert denied == {"frequency_capped"}
    view = await app.store.get_campaign("c1")
    assert (view.impressions, view.spent, view.denials["frequency_capped"]) == (
        3,
        Decimal("0.0075"),
        297,
    )


async def test_pacing_caps_the_lease(redis_url: str, make_app: Any) -> None:
    """Even pacing at a tenth of the day allows 10% + 5% of the daily budget: a lease never
    holds more than that, so a burst spends exactly that and no more."""
    import datetime

    app = make_app(
        redis_url=redis_url,
        campaigns=[
            Campaign(id="hot", daily_budget="2.00", cpm="2.00", pacing="even", leasing=True)
        ],
    )
    midnight = datetime.datetime(2027, 3, 1, tzinfo=datetime.UTC).timestamp() * 1000
    app.store.clock = ManualClock(int(midnight + 86_400_000 // 10))
    codes = await _burst(app, 1000)
    # daily 1000 ads; the curve allows 100 + 50 at 10% of the day.
    assert codes.count(200) == 150
    await app.store.return_leases()
    view = await app.store.get_campaign("hot")
    assert (view.daily_spent_units, view.leased_units) == (150 * COST, 0)


async def test_a_pause_by_another_process_stops_a_leasing_process_within_lease_seconds(
    redis_url: str, make_app: Any
) -> None:
    app = make_app(
        redis_url=redis_url,
        lease_seconds=0.5,
        campaigns=[Campaign(id="hot", budget="1000.00", cpm="2.00", leasing=True)],
    )
    async with client(app) as c:
        for i in range(50):
            assert (await c.get("/ad?campaign_id=hot", headers=as_user(f"u{i}"))).status_code == 200
        await _observer(redis_url).set_campaign("hot", status="paused")
        await asyncio.sleep(0.6)
        r = await c.get("/ad?campaign_id=hot", headers=as_user("late"))
        assert (r.status_code, r.headers["x-xsp-decision"]) == (204, "campaign_paused")
    view = await _observer(redis_url).get_campaign("hot")
    assert (view.spent_units, view.impressions, view.leased_units) == (50 * COST, 50, 0)


async def test_leasing_set_in_the_store_reaches_a_running_app(
    redis_url: str, make_app: Any
) -> None:
    app = make_app(redis_url=redis_url, campaigns=[Campaign(id="hot", budget="1000.00")])
    observer = _observer(redis_url)
    view = await observer.set_campaign("hot", leasing=True)
    assert view.config.leasing
    async with client(app) as c:
        for i in range(40):
            assert (await c.get("/ad?campaign_id=hot", headers=as_user(f"u{i}"))).status_code == 200
        assert (await observer.get_campaign("hot")).leased_units > 0  # it leased
        await observer.set_campaign("hot", leasing=False)
        await asyncio.sleep(1.2)  # the lease lapses and is not renewed
        for i in range(10):
            assert (await c.get("/ad?campaign_id=hot", headers=as_user(f"v{i}"))).status_code == 200
    view = await observer.get_campaign("hot")
    assert (view.leased_units, view.impressions, view.spent_units) == (0, 50, 50 * COST)
    assert not view.config.leasing


async def test_automatic_leasing_above_a_request_rate(redis_url: str, make_app: Any) -> None:
    app = make_app(redis_url=redis_url, lease_above_rps=100, default_budget="1000.00")
    observer = _observer(redis_url)
    async with client(app) as c:
        for i in range(20):  # 20 a second: below the threshold, no lease
            await c.get("/ad?campaign_id=slow", headers=as_user(f"u{i}"))
            await asyncio.sleep(0.05)
        assert (await observer.get_campaign("slow")).leased_units == 0
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.5
        n = 0
        while loop.time() < end:  # well above 100 a second: it leases
            await asyncio.gather(
                *(c.get("/ad?campaign_id=slow", headers=as_user(f"v{n}-{k}")) for k in range(20))
            )
            n += 1
        assert (await observer.get_campaign("slow")).leased_units > 0


def test_lease_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="lease_seconds"):
        Settings(lease_seconds=0)
    with pytest.raises(ConfigError, match="lease_above_rps"):
        Settings(lease_above_rps=0)
    with pytest.raises(ConfigError, match="leasing"):
        Campaign(id="c1", leasing="yes")  # type: ignore[arg-type]


def test_leasing_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XSP_LEASING", "true")
    monkeypatch.setenv("XSP_LEASE_ABOVE_RPS", "500")
    monkeypatch.setenv("XSP_LEASE_SECONDS", "0.5")
    s = Settings.from_env()
    assert (s.leasing, s.lease_above_rps, s.lease_seconds) == (True, 500, 0.5)
    assert Rules.from_settings(s).default_rule.leasing


async def test_hot_campaign_on_a_cluster_costs_its_shard_under_a_twentieth(
    cluster: RedisClusterNodes, make_app: Any
) -> None:
    """One campaign takes all the traffic. Its shard runs the campaign's scripts: with leasing
    they are the grants and reports, at most 1/20 of the requests. (Users are picked on the
    other shards so the count is the campaign's alone; users spread evenly over all shards in
    real traffic.)"""
    app = make_app(
        redis_url=cluster.url,
        campaigns=[Campaign(id="hot", budget="100000.00", cpm="2.00", leasing=True)],
    )
    store = app.store
    shard = cluster.index_for_key(store.campaign_keys("hot")[0])
    users = [
        u
        for u in (f"user-{i}" for i in range(6000))
        if cluster.index_for_key(store.user_key(u)) != shard
    ][:3000]
    node = redis.Redis(port=cluster.ports[shard])

    def scripts_run() -> int:
        stats = node.info("commandstats")
        return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("evalsha", "eval"))

    before = scripts_run()
    async with client(app) as c:
        sem = asyncio.Semaphore(64)

        async def one(user: str) -> int:
            async with sem:
                r = await c.get("/ad?campaign_id=hot", headers=as_user(user))
                return r.status_code

        codes = await asyncio.gather(*(one(u) for u in users))
    await store.return_leases()
    on_shard = scripts_run() - before
    node.close()
    assert codes.count(200) == len(users)
    assert on_shard <= len(users) / 20, on_shard
    view = await store.get_campaign("hot")
    assert (view.spent_units, view.impressions, view.leased_units) == (
        len(users) * COST,
        len(users),
        0,
    )


async def test_two_uvicorn_processes_return_their_leases_when_they_shut_down(
    redis_url: str,
) -> None:
    campaigns = json.dumps([{"id": "c1", "budget": "2.00", "leasing": True}])  # 1000 ads
    env = example_env(redis_url, XSP_CAMPAIGNS=campaigns)
    with uvicorn(env) as a, uvicorn(env) as b:
        ports = [int(base.rsplit(":", 1)[1]) for base in (a, b)]
        replies = await fire(
            [
                (ports[i % 2], "/ad?campaign_id=c1&cpm=2.00", as_user(f"user-{i}"))
                for i in range(600)
            ],
            concurrency=100,
        )
        served = [r.status for r in replies].count(200)
        assert served == 600
        during = await _observer(redis_url).get_campaign("c1")
        assert during.spent_units + during.leased_units <= 1000 * COST
    # Both servers shut down (SIGTERM, lifespan shutdown): every lease came back.
    view = await _observer(redis_url).get_campaign("c1")
    assert (view.spent_units, view.leased_units, view.impressions) == (600 * COST, 0, 600)


async def test_a_grant_whose_reply_was_lost_is_neither_lost_nor_applied_twice() -> None:
    """The store stalls past the timeout while granting: the grant runs late, its reply is lost
    to the caller. The same call, sent again, gets the same answer and applies nothing twice,
    so the units come back at shutdown."""
    server = RedisServer()
    try:
        campaigns = [Campaign(id="hot", budget="2.00", cpm="2.00", leasing=True)]
        store = Store(
            Rules.from_settings(
                Settings(
                    redis_url=server.url,
                    secret_key=SECRET,
                    store_timeout=0.2,
                    circuit_breaker="off",
                    campaigns=campaigns,
                )
            )
        )
        rule = store.rules.rule_for("hot")
        await store.ping()
        await store.get_campaign("hot")  # connected
        server.signal(signal.SIGSTOP)
        try:
            with pytest.raises(StoreUnavailable):
                await store.reserve("hot", None, COST, rule)
            await asyncio.sleep(0.3)  # the grant's deadline passes too
        finally:
            server.signal(signal.SIGCONT)
        await asyncio.sleep(0.3)  # the late grant runs
        served = 0
        for _ in range(5):
            served += (await store.reserve("hot", None, COST, rule)).reserved
        await store.return_leases()
        view = await _observer(server.url).get_campaign("hot")
        assert (view.spent_units, view.impressions, view.leased_units) == (
            served * COST,
            served,
            0,
        )
    finally:
        server.stop()


async def test_leases_come_back_when_the_connections_were_dropped(
    redis_server: RedisServer, redis_url: str
) -> None:
    """Leased decisions make no campaign call, so the connections sit idle; a restart or a
    proxy's idle timeout drops them. The return at shutdown is sent again and lands once."""
    campaigns = [Campaign(id="hot", budget="2.00", cpm="2.00", leasing=True)]
    store = Store(
        Rules.from_settings(
            Settings(redis_url=redis_url, secret_key=SECRET, lease_seconds=30, campaigns=campaigns)
        )
    )
    rule = store.rules.rule_for("hot")
    served = 0
    for _ in range(40):  # anonymous: mostly from the lease, no round trip
        served += (await store.reserve("hot", None, COST, rule)).reserved
    redis_server.command("CLIENT", "KILL", "TYPE", "normal")
    await store.return_leases()
    view = await _observer(redis_url).get_campaign("hot")
    assert (view.spent_units, view.impressions, view.leased_units) == (served * COST, served, 0)


def _leasing_store(url: str, **settings: Any) -> Store:
    campaigns = settings.pop("campaigns", None) or [
        Campaign(id="hot", budget="2.00", cpm="2.00", leasing=True)
    ]
    return Store(
        Rules.from_settings(
            Settings(redis_url=url, secret_key=SECRET, campaigns=campaigns, **settings)
        )
    )


async def _assert_exact(url: str, served: int) -> None:
    view = await _observer(url).get_campaign("hot")
    assert (view.spent_units, view.impressions, view.leased_units) == (served * COST, served, 0)


async def test_a_return_that_fails_behind_an_unanswered_call_is_not_lost() -> None:
    """A renewal's reply is lost (the store stalls past the timeout); the lease is returned
    while the store is still stalled, so the renewal, sent again first, fails again. The units
    being returned stay with the lease and go back once the store answers."""
    server = RedisServer()
    try:
        store = _leasing_store(
            server.url, store_timeout=0.2, circuit_breaker="off", lease_seconds=30
        )
        rule = store.rules.rule_for("hot")
        served = 0
        for _ in range(3):
            served += (await store.reserve("hot", None, COST, rule)).reserved
        await asyncio.sleep(0.05)
        lease = store.leasing.lease("hot")
        server.signal(signal.SIGSTOP)
        try:
            while lease.balance * 2 >= lease.last_grant:  # spend until a renewal is due
                served += (await store.reserve("hot", None, COST, rule)).reserved
            served += (await store.reserve("hot", None, COST, rule)).reserved  # asks, times out
            await asyncio.sleep(0.5)
            await store.return_leases()  # its resend of the renewal fails too
        finally:
            server.signal(signal.SIGCONT)
        await asyncio.sleep(0.3)
        await store.return_leases()
        await _assert_exact(server.url, served)
    finally:
        server.stop()


async def test_a_request_denied_while_its_lease_is_returned_is_not_counted_as_served(
    redis_url: str,
) -> None:
    """A capped user's request takes its units from the lease, then the lease is returned while
    the user's script runs: the denial still gives the units back and counts as a denial."""
    campaigns = [Campaign(id="hot", budget="2.00", cpm="2.00", caps=["1/1h"], leasing=True)]
    store = _leasing_store(redis_url, campaigns=campaigns, lease_seconds=30)
    rule = store.rules.rule_for("hot")
    served = 0
    for _ in range(5):
        served += (await store.reserve("hot", None, COST, rule)).reserved
    u1 = store.user_key("u1")
    served += (await store.reserve("hot", u1, COST, rule)).reserved
    denied, _ = await asyncio.gather(store.reserve("hot", u1, COST, rule), store.return_leases())
    assert (denied.reserved, denied.reason) == (False, "frequency_capped")
    await store.return_leases()
    await _assert_exact(redis_url, served)
    view = await _observer(redis_url).get_campaign("hot")
    assert view.denials["frequency_capped"] == 1


async def test_a_release_never_overtakes_the_report_of_what_it_releases() -> None:
    """Leased reservations are released after their lease lapsed, while the lease's report of
    them waits behind a renewal in flight: the releases go after the report, so the store ends
    with nothing served, nothing spent and nothing leased."""
    server = RedisServer()
    try:
        store = _leasing_store(
            server.url, lease_seconds=0.6, store_timeout=5, circuit_breaker="off"
        )
        rule = store.rules.rule_for("hot")
        first = await store.reserve("hot", None, COST, rule)  # the ordinary path; asks a grant
        await asyncio.sleep(0.05)
        await store.release(first)
        lease = store.leasing.lease("hot")
        await asyncio.sleep(max(0.0, (lease.expires - store.leasing.now()) / 1000 - 0.15))
        server.signal(signal.SIGSTOP)
        try:
            taken = [await store.reserve("hot", None, COST, rule)]  # asks for a renewal
            await asyncio.sleep(0.01)
            taken += [await store.reserve("hot", None, COST, rule) for _ in range(4)]
            assert all(r.lease is not None for r in taken)
            await asyncio.sleep(0.25)  # the lease lapses while the renewal waits
            releases = [asyncio.ensure_future(store.release(r)) for r in taken]
            await asyncio.sleep(0.1)
        finally:
            server.signal(signal.SIGCONT)
        await asyncio.gather(*releases)
        await store.return_leases()
        await _assert_exact(server.url, 0)
    finally:
        server.stop()


async def test_a_lease_dropped_from_memory_and_made_again_has_its_calls_applied(
    redis_url: str,
) -> None:
    """With automatic leasing every campaign gets a lease object; past 10,000 of them the idle
    ones are dropped. The hot campaign's lease, made again, must number its calls above the old
    one's: the store takes a number it has seen for a resend and applies nothing."""
    campaigns = [Campaign(id="hot", budget="0.274", cpm="2.00", leasing=True)]  # 137 ads
    store = _leasing_store(
        redis_url, campaigns=campaigns, lease_above_rps=1_000_000, lease_seconds=30
    )
    rule = store.rules.rule_for("hot")
    served = 0
    for _ in range(40):
        served += (await store.reserve("hot", None, COST, rule)).reserved
    await store.return_leases()  # idle now
    other = store.rules.rule_for("cold")
    for i in range(10_001):  # anonymous, one each: a lease object per campaign, none leasing
        await store.reserve(f"cold{i}", None, None, other)
    assert store.leasing.lease("hot") is None
    served += (await store.reserve("hot", None, COST, rule)).reserved  # asks for a grant
    await asyncio.sleep(0.1)
    assert (await _observer(redis_url).get_campaign("hot")).leased_units > 0  # applied
    for _ in range(300):
        served += (await store.reserve("hot", None, COST, rule)).reserved
    assert served == 137
    await store.return_leases()
    await _assert_exact(redis_url, 137)


async def test_a_release_from_a_lease_dropped_from_memory_is_undone_in_the_store(
    redis_url: str,
) -> None:
    """Automatic leasing: the hot campaign's lease is dropped from memory (idle, past 10,000
    leases) while one of its reservations is still out, and made again by a request below the
    rate threshold. Releasing that reservation still gives its units and impression back."""
    campaigns = [Campaign(id="hot", budget="2.00", cpm="2.00")]
    store = _leasing_store(redis_url, campaigns=campaigns, lease_above_rps=1, lease_seconds=30)
    rule = store.rules.rule_for("hot")
    served = 0
    for _ in range(5):
        served += (await store.reserve("hot", None, COST, rule)).reserved
    await asyncio.sleep(1.05)
    served += (await store.reserve("hot", None, COST, rule)).reserved  # rate >= 1: asks a grant
    await asyncio.sleep(0.1)
    out = await store.reserve("hot", None, COST, rule)
    assert out.reserved and out.lease is not None
    await store.return_leases()  # the lease is idle; `out` is still out
    other = store.rules.rule_for("cold")
    for i in range(10_001):
        await store.reserve(f"cold{i}", None, None, other)
    assert store.leasing.lease("hot") is None
    served += (await store.reserve("hot", None, COST, rule)).reserved  # made again, rate 0
    await store.release(out)
    await store.return_leases()
    await _assert_exact(redis_url, served)
