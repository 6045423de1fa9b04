"""``selection="weighted"``: one eligible candidate at random, in proportion to its campaign's
``weight``, through HTTP. The distribution is checked with a chi-square bound over 10,000
decisions on the embedded store, a real Redis and a 3-master cluster; the route argument
``@ad_route(selection=...)`` in every integration with a decorator.

The campaigns: ``w1`` (weight 1, the default), ``w2`` (``Campaign(weight=2)``), ``w5`` (weight
5, set in the store as ``campaign set w5 --weight 5`` does) and ``wx``, paused, whose weight of
100 must never make it chosen.
"""

# ruff: noqa: F811 - the fixtures imported from test_candidates_frameworks are used by name

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from test_candidates_frameworks import (  # noqa: F401 - fixtures, used by name
    Serve,
    _no_xsp_environment,
    admin,
    denials,
    made,
    routed_kind,
    serve,
    store_kind,
)

from xsp_middleware import Campaign
from xsp_middleware.store import Store

WEIGHTED = [
    Campaign(id="w2", weight=2),
    Campaign(id="wx", weight=100, status="paused"),
]
WEIGHTS = {"w1": 1, "w2": 2, "w5": 5}
CANDIDATES = "w1,w2,w5,wx"
N = 10_000
CHI2_2DF_999 = 13.816  # the 0.999 quantile of chi-square with 2 degrees of freedom


async def weighted_admin(admin: Store) -> None:
    await admin.set_campaign("w5", weight=5)  # what ``campaign set w5 --weight 5`` writes
    assert (await admin.get_campaign("w5")).weight == 5


def listing(chosen: str) -> list[tuple[str, str]]:
    """Decision.candidates of a weighted decision over CANDIDATES that chose ``chosen``: every
    candidate evaluated, in order; the paused one's reason, the drawn one served, the other
    eligible ones not_selected."""
    return [
        (cid, "campaign_paused" if cid == "wx" else "served" if cid == chosen else "not_selected")
        for cid in CANDIDATES.split(",")
    ]


def listed_choice(listed: tuple[tuple[str, str], ...]) -> str:
    served = [cid for cid, reason in listed if reason == "served"]
    assert len(served) == 1, listed
    return served[0]


def chi_square(counts: Counter[str], total: int) -> float:
    weight_sum = sum(WEIGHTS.values())
    return sum(
        (counts[cid] - total * w / weight_sum) ** 2 / (total * w / weight_sum)
        for cid, w in WEIGHTS.items()
    )


@pytest.mark.parametrize("store_url", ["redis", "memory", "cluster"], indirect=True)
async def test_the_weighted_choice_follows_the_weights_over_10000_decisions(
    store_kind: str, serve: Serve, admin: Store
) -> None:
    await weighted_admin(admin)
    app = await serve("starlette", selection="weighted", campaigns=WEIGHTED)
    chosen: Counter[str] = Counter()
    lists: Counter[tuple[tuple[str, str], ...]] = Counter()
    batch = 100  # as concurrent browsers would: distinct users, no cap in the way
    for start in range(0, N, batch):
        replies = await asyncio.gather(
            *(
                app.get(f"/ad?campaign_id={CANDIDATES}", user=f"u{i}")
                for i in range(start, start + batch)
            )
        )
        for reply in replies:
            seen = reply.decision
            chosen[seen["campaign_id"]] += 1
            lists[tuple(seen["candidates"])] += 1
    assert sum(chosen.values()) == N
    assert set(chosen) == set(WEIGHTS), chosen  # wx (paused) never
    stat = chi_square(chosen, N)
    assert stat < CHI2_2DF_999, (stat, chosen)

    for listed, count in lists.items():
        assert list(listed) == listing(listed_choice(listed)), (listed, count)
    assert len(lists) == 3

    # Each decision evaluated wx and counted its denial; the chosen ones were counted served.
    assert await denials(admin, "wx", "campaign_paused", N) == N
    for cid, count in chosen.items():
        view = await admin.get_campaign(cid)
        assert view.impressions == count, cid
        assert sum(view.denials.values()) == 0, (cid, view.denials)  # not_selected is no denial


@pytest.mark.parametrize("store_url", ["memory", "redis"], indirect=True)
async def test_the_route_argument_chooses_weighted_or_first(
    routed_kind: str, store_kind: str, serve: Serve, admin: Store
) -> None:
    await weighted_admin(admin)
    app = await serve(routed_kind, campaigns=WEIGHTED)  # the setting: "first", the default
    replies = await asyncio.gather(*(app.get("/weighted", user=f"u{i}") for i in range(300)))
    chosen = Counter(r.decision["campaign_id"] for r in replies)
    assert set(chosen) == set(WEIGHTS), chosen  # each eligible one drawn, wx never
    assert chosen["w5"] > chosen["w1"], chosen  # 5:1 over 300 draws: never the other way
    for r in replies:
        assert r.decision["candidates"] == listing(r.decision["campaign_id"]), r.decision

    # selection="first" on the route wins over the setting "weighted".
    app = await serve(routed_kind, campaigns=WEIGHTED, selection="weighted")
    for i in range(20):
        seen = (await app.get("/first", user=f"v{i}")).decision
        assert (seen["campaign_id"], seen["candidates"]) == ("w1", [("w1", "served")])
    # and the query names candidates under the weighted setting.
    replies = await asyncio.gather(
        *(app.get(f"/ad?campaign_id={CANDIDATES}", user=f"x{i}") for i in range(100))
    )
    chosen = Counter(r.decision["campaign_id"] for r in replies)
    assert set(chosen) <= set(WEIGHTS) and len(chosen) > 1, chosen
    for r in replies:
        assert r.decision["candidates"] == listing(r.decision["campaign_id"]), r.decision


@pytest.mark.parametrize("store_url", ["memory", "cluster"], indirect=True)
async def test_a_weighted_no_fill_lists_every_candidate(
    routed_kind: str, store_kind: str, serve: Serve
) -> None:
    # debug_headers: the X-XSP-Candidates header exists only under it.
    app = await serve(
        routed_kind,
        debug_headers=True,
        selection="weighted",
        campaigns=[
            Campaign(id="w1", status="paused"),
            Campaign(id="w2", budget="0.001"),
            Campaign(id="wx", status="paused"),
        ],
    )
    none = await app.get(f"/ad?campaign_id={CANDIDATES}&cpm=2.00", user="u1")
    assert none.status == 200  # w5 is eligible
    assert none.decision["candidates"] == [
        ("w1", "campaign_paused"),
        ("w2", "budget_exhausted"),
        ("w5", "served"),
        ("wx", "campaign_paused"),
    ]
    assert none.headers["x-xsp-candidates"] == (
        "w1=campaign_paused,w2=budget_exhausted,w5=served,wx=campaign_paused"
    )
    none = await app.get("/ad?campaign_id=w1,w2,wx")
    none.denied("no_eligible_campaign")
    assert none.headers["x-xsp-candidates"] == (
        "w1=campaign_paused,w2=budget_exhausted,wx=campaign_paused"
    )
