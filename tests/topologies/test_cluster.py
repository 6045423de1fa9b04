"""Redis Cluster: the same exact guarantees, with the user's and the campaign's halves of each
reservation on their own shards (a real 3-master cluster from the ``cluster`` fixture)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

from conftest import as_user, client
from redis_topologies import RedisClusterNodes

from xsp_middleware import Campaign, XSPMiddleware

COST_UNITS = 20_000  # CPM 2.00


def _key_counts(cluster: RedisClusterNodes, prefix: str) -> list[int]:
    """How many keys starting with ``prefix`` each master holds."""
    counts = []
    for port in cluster.ports:
        import redis

        with redis.Redis(port=port) as r:
            counts.append(sum(1 for _ in r.scan_iter(match=f"{prefix}*", count=1000)))
    return counts


def _ids_on(cluster: RedisClusterNodes, key_of: Any, prefix: str, per_node: int) -> list[list[str]]:
    """``per_node`` ids for each master whose key (``key_of(id)``) lives there."""
    found: list[list[str]] = [[] for _ in cluster.nodes]
    i = 0
    while min(len(ids) for ids in found) < per_node:
        candidate = f"{prefix}{i}"
        index = cluster.index_for_key(key_of(candidate))
        if len(found[index]) < per_node:
            found[index].append(candidate)
        i += 1
    return found


async def test_2000_concurrent_requests_over_50_campaigns_and_500_users_are_exact(
    cluster: RedisClusterNodes, make_app: Any
) -> None:
    # Each user asks twice for each of two campaigns, capped at one impression per user and
    # campaign; every campaign's budget pays for fewer impressions than its users ask for.
    budgets = {f"camp{i}": 12 + i % 5 for i in range(50)}  # in impressions
    campaigns = [
        Campaign(id=cid, budget=f"{n * 0.002:.3f}", cpm="2.00", caps=["1/1h"])
        for cid, n in budgets.items()
    ]
    app: XSPMiddleware = make_app(redis_url=cluster.url, campaigns=campaigns)
    requests = []
    for u in range(500):
        for cid in (f"camp{u % 50}", f"camp{(u * 7 + 3) % 50}"):
            requests += [(f"user{u}", cid)] * 2
    random.Random(7).shuffle(requests)
    assert len(requests) == 2000
    async with client(app) as c:
        responses = await asyncio.gather(
            *(c.get(f"/ad?campaign_id={cid}", headers=as_user(uid)) for uid, cid in requests)
        )
    assert {r.status_code for r in responses} <= {200, 204}
    assert {r.headers["x-xsp-decision"] for r in responses if r.status_code == 204} <= {
        "frequency_capped",
        "budget_exhausted",
    }
    served = Counter(
        pair for pair, r in zip(requests, responses, strict=True) if r.status_code == 200
    )
    # Caps: never more than one impression per (user, campaign), whatever the interleaving.
    assert max(served.values()) == 1
    per_campaign = Counter(cid for _, cid in served.elements())
    asked = Counter(cid for _, cid in set(requests))
    shortfall = 0
    for cid, budget in budgets.items():
        view = await app.store.get_campaign(cid)
        # Budgets: what was served is exactly what was spent, and never more than the budget.
        assert view.spent_units == per_campaign[cid] * COST_UNITS, cid
        assert view.impressions == per_campaign[cid], cid
        assert per_campaign[cid] <= budget, cid
        shortfall += min(budget, asked[cid]) - per_campaign[cid]
    ideal = sum(min(budget, asked[cid]) for cid, budget in budgets.items())
    print(f"\nburst: served {sum(per_campaign.values())} of an ideal {ideal}")
    # Compensation can only under-deliver: a capped duplicate's campaign half held budget that
    # a concurrent request was denied, then gave it back (README: "Redis Cluster"). In this
    # burst every request is in flight at once and half are capped duplicates: a worst case.
    assert shortfall <= ideal * 0.25
    # The shortfall is transient: once the burst is over, fresh users spend every budget to
    # the last unit, and not one unit more.
    wave = [(f"late{cid}-{i}", cid) for cid, budget in budgets.items() for i in range(budget)]
    async with client(app) as c:
        late = await asyncio.gather(
            *(c.get(f"/ad?campaign_id={cid}", headers=as_user(uid)) for uid, cid in wave)
        )
    assert {r.status_code for r in late} <= {200, 204}
    for cid, budget in budgets.items():
        view = await app.store.get_campaign(cid)
        assert view.spent_units == budget * COST_UNITS, cid
        assert view.impressions == budget, cid
    assert sum(r.status_code == 200 for r in late) == shortfall + sum(
        budget - min(budget, asked[cid]) for cid, budget in budgets.items()
    )
    # The keys spread over all three masters: campaigns and users alike.
    assert all(n > 0 for n in _key_counts(cluster, "xsp:c:")), _key_counts(cluster, "xsp:c:")
    assert all(n > 0 for n in _key_counts(cluster, "xsp:u:")), _key_counts(cluster, "xsp:u:")


async def test_a_capped_request_gives_its_campaign_half_back_and_counts_as_capped(
    cluster_url: str, make_app: Any
) -> None:
    app: XSPMiddleware = make_app(redis_url=cluster_url, default_caps=["1/1h"])
    async with client(app) as c:
        assert (
            await c.get("/ad?campaign_id=c1&cpm=2.00", headers=as_user("u1"))
        ).status_code == 200
        r = await c.get("/ad?campaign_id=c1&cpm=2.00", headers=as_user("u1"))
        assert (r.status_code, r.headers["x-xsp-decision"]) == (204, "frequency_capped")
    view = await app.store.get_campaign("c1")
    assert (view.spent_units, view.impressions) == (COST_UNITS, 1)
    assert view.denials["frequency_capped"] == 1
    assert view.released == 0  # a compensation is not a release of a served impression


async def test_a_budget_denial_gives_the_users_half_back(cluster_url: str, make_app: Any) -> None:
    app: XSPMiddleware = make_app(
        redis_url=cluster_url,
        default_caps=["2/1h"],
        campaigns=[Campaign(id="c1", budget="0.002", cpm="2.00")],
    )
    async with client(app) as c:
        assert (await c.get("/ad?campaign_id=c1", headers=as_user("u1"))).status_code == 200
        r = await c.get("/ad?campaign_id=c1", headers=as_user("u2"))
        assert r.headers["x-xsp-decision"] == "budget_exhausted"
    # u2's cap slot was given back: their log holds nothing.
    assert await app.store.user_view("u2", "c1") == [
        ("c1", [(app.store.rules.rule_for("c1").caps[0], 0, None)])
    ]
    assert (await app.store.user_view("u1", "c1"))[0][1][0][1] == 1


async def test_stored_caps_changed_by_another_process_apply_at_once(
    cluster_url: str, make_app: Any
) -> None:
    """The user's half cannot read the campaign's slot: it runs with the caps this process
    last saw, and the campaign's half sends it back to retry when they changed."""
    app: XSPMiddleware = make_app(redis_url=cluster_url, default_caps=["3/1h"])
    other: XSPMiddleware = make_app(redis_url=cluster_url)
    async with client(app) as c:
        assert (await c.get("/ad?campaign_id=c1&cpm=1", headers=as_user("u1"))).status_code == 200
        await other.store.set_campaign("c1", caps=["1/1h"])
        r = await c.get("/ad?campaign_id=c1&cpm=1", headers=as_user("u1"))
        assert r.headers.get("x-xsp-decision") == "frequency_capped"
        await other.store.set_campaign("c1", caps=["5/1h"])
        codes = [
            (await c.get("/ad?campaign_id=c1&cpm=1", headers=as_user("u1"))).status_code
            for _ in range(5)
        ]
    assert codes == [200, 200, 200, 200, 204]


async def test_a_dead_master_degrades_only_requests_whose_slots_live_there(
    cluster: RedisClusterNodes, make_app: Any
) -> None:
    app: XSPMiddleware = make_app(redis_url=cluster.url)
    store = app.store
    campaigns = _ids_on(cluster, lambda cid: store.campaign_keys(cid)[0], "camp", 1)
    users = _ids_on(cluster, store.user_key, "user", 6)
    dead = 1
    async with client(app) as c:
        # Warm: every shard has served (connections open, scripts loaded).
        for on in range(3):
            r = await c.get(
                f"/decision?campaign_id={campaigns[on][0]}", headers=as_user(users[on][0])
            )
            assert r.text.startswith("True|served"), r.text
        cluster.kill(dead)
        outcomes = []
        for round_ in range(1, 6):
            for u_on in range(3):
                for c_on in range(3):
                    uid, cid = users[u_on][round_], campaigns[c_on][0]
                    r = await c.get(f"/decision?campaign_id={cid}", headers=as_user(uid))
                    outcomes.append(
                        (u_on, c_on, r.status_code, r.headers.get("x-xsp-decision"), r.text)
                    )
    for u_on, c_on, status, header, text in outcomes:
        where = f"user on {u_on}, campaign on {c_on}: {status} {header} {text}"
        if c_on == dead:
            # The budget cannot be checked: it fails closed (no-fill), never a 500.
            assert (status, header) == (204, "store_unavailable"), where
        elif u_on == dead:
            # The caps cannot be checked: they fail open; the budget was still enforced.
            assert status == 200 and text.startswith("True|served") and text.endswith("|True")
        else:
            assert status == 200 and text.startswith("True|served") and text.endswith("|False"), (
                where
            )
    # The live shards recorded exactly what they served; nothing leaked from the dead one.
    for c_on in range(3):
        if c_on != dead:
            view = await store.get_campaign(campaigns[c_on][0])
            served = sum(1 for u, c, s, _, _ in outcomes if c == c_on and s == 200)
            assert view.impressions == served + 1  # + the warm-up


async def test_serving_resumes_when_the_dead_master_comes_back(
    cluster: RedisClusterNodes, make_app: Any
) -> None:
    app: XSPMiddleware = make_app(redis_url=cluster.url)
    campaigns = _ids_on(cluster, lambda cid: app.store.campaign_keys(cid)[0], "camp", 1)
    cid = campaigns[0][0]
    async with client(app) as c:
        assert (await c.get(f"/ad?campaign_id={cid}", headers=as_user("a"))).status_code == 200
        cluster.kill(0)
        for i in range(3):
            r = await c.get(f"/ad?campaign_id={cid}", headers=as_user(f"b{i}"))
            assert r.headers["x-xsp-decision"] == "store_unavailable"
        cluster.restart(0)
        for _ in range(50):
            r = await c.get(f"/ad?campaign_id={cid}", headers=as_user("c"))
            if r.status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert r.status_code == 200, r.headers


async def test_anonymous_requests_touch_only_the_campaign_shard(
    cluster_url: str, make_app: Any
) -> None:
    app: XSPMiddleware = make_app(redis_url=cluster_url, anonymous="allow")
    async with client(app) as c:
        r = await c.get("/decision?campaign_id=c1&cpm=2.00")
    allowed, reason, cid, cost, left, _, anonymous, degraded = r.text.split("|")
    assert (allowed, reason, cid, cost, left, anonymous, degraded) == (
        "True",
        "served",
        "c1",
        "0.0020000",
        "None",
        "True",
        "False",
    )
    assert (await app.store.get_campaign("c1")).impressions == 1


def test_a_dead_master_degrades_only_its_slots_under_wsgi_too(cluster: RedisClusterNodes) -> None:
    """The sync path (Flask, Django under WSGI): both halves are sent before either is read,
    and a dead shard degrades only the requests whose user or campaign lives there."""
    from conftest import SECRET
    from test_wsgi import plain_app
    from werkzeug.test import Client

    from xsp_middleware.wsgi import XSPWSGIMiddleware

    mw = XSPWSGIMiddleware(plain_app, redis_url=cluster.url, secret_key=SECRET)
    web = Client(mw, use_cookies=False)
    store = mw.store
    campaigns = _ids_on(cluster, lambda cid: store.campaign_keys(cid)[0], "camp", 1)
    users = _ids_on(cluster, store.user_key, "user", 3)

    def decide(uid: str, cid: str) -> tuple[int, str | None, str]:
        r = web.get(f"/decision?campaign_id={cid}", headers={"Cookie": f"user_id={uid}"})
        return r.status_code, r.headers.get("X-XSP-Decision"), r.get_data(as_text=True)

    for on in range(3):
        assert decide(users[on][0], campaigns[on][0])[2].startswith("True|served")
    dead = 2
    cluster.kill(dead)
    for round_ in (1, 2):
        for u_on in range(3):
            for c_on in range(3):
                status, header, text = decide(users[u_on][round_], campaigns[c_on][0])
                where = f"user on {u_on}, campaign on {c_on}: {status} {header} {text}"
                if c_on == dead:
                    assert (status, header) == (204, "store_unavailable"), where
                elif u_on == dead:
                    assert text.startswith("True|served") and text.endswith("|True"), where
                else:
                    assert text.startswith("True|served") and text.endswith("|False"), where


async def test_a_fresh_process_with_stale_caps_never_lets_a_user_past_the_stored_cap(
    cluster_url: str,
) -> None:
    """The user's half trims the log with the caps this process last saw. A fresh process only
    knows the settings' caps (1/1m) while the store says 3/1d: its first decision for the
    campaign retries with the stored caps, and the times its stale write trimmed are put back."""
    from xsp_middleware.clock import ManualClock
    from xsp_middleware.settings import Rules, Settings
    from xsp_middleware.store import Store

    rules = Rules.from_settings(
        Settings(
            redis_url=cluster_url,
            secret_key="test-secret-key-0123456789",
            campaigns=[Campaign(id="c1", budget="100", cpm="1.00", caps=["1/1m"])],
        )
    )
    rule = rules.rule_for("c1")
    now = 1_800_000_000_000
    admin = Store(rules)
    await admin.set_campaign("c1", caps=["3/1d"])
    user = admin.user_key("alice")
    first = Store(rules)
    for at in (now - 2 * 3_600_000, now - 3_600_000):
        first.clock = ManualClock(at)
        assert (await first.reserve("c1", user, None, rule)).reserved
    fresh = Store(rules)
    outcomes = []
    for minutes in (0, 1, 2, 3):
        fresh.clock = ManualClock(now + minutes * 60_000)
        outcomes.append((await fresh.reserve("c1", user, None, rule)).reason)
    assert outcomes == ["served", "frequency_capped", "frequency_capped", "frequency_capped"]
    for store in (admin, first, fresh):
        await store.aclose()
