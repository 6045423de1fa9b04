"""One hot campaign on a 3-master Redis Cluster: how much of its shard it takes, with and without
budget leasing, and whether its budget stays exact.

Traffic: one campaign takes 100% of the requests, from ``--concurrency`` in-process workers
calling ``XSPMiddleware`` directly (no HTTP), each request from a new user. The users are picked
on the two shards that do not hold the campaign, so every script the campaign's shard runs is
the campaign's (in real traffic users spread evenly and each shard also runs its third of the
user halves). Two variants, interleaved over ``--rounds``:

* ``split``: no leasing: every decision runs the campaign's half on its shard;
* ``leasing``: ``Campaign(leasing=True)``: the process spends from budget leases and the
  campaign's shard only sees the grants, reports and returns.

Measured per run, from ``INFO commandstats`` deltas (EVALSHA + EVAL) on each master: the
campaign shard's script calls per request, requests per second, and the budget check after the
leases came back: ``served x cost == spent`` and ``leased == 0``.

Then the end of a budget, with leasing: three app instances (three "processes", one store each)
hammer a campaign of ``--budget`` impressions; requests beyond the budget are denied. Reported:
served in the first wave (leases held by the others can deny a request before they come back:
under-delivery, never an overspend), the spend check after every lease came back, and a second
wave that must bring the total to exactly the budget.

Run from the repository root::

    python benchmarks/hot_campaign.py
    python benchmarks/hot_campaign.py --seconds 5 --rounds 3 --json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from xsp_middleware import Campaign, XSPMiddleware

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from redis_topologies import RedisClusterNodes  # noqa: E402

sys.path.insert(0, str(HERE))
from cluster_compensation import call  # noqa: E402

SECRET_KEY = "bench-secret-key-0123456789"
COST_UNITS = 20_000  # CPM 2.00


async def ad(request: Request) -> Response:
    return Response("<VAST/>", media_type="application/xml")


def make_app(url: str, campaign: Campaign) -> XSPMiddleware:
    return XSPMiddleware(
        Starlette(routes=[Route("/ad", ad)]),
        redis_url=url,
        secret_key=SECRET_KEY,
        store_timeout=5,
        default_caps=["3/1h"],
        campaigns=[campaign],
    )


def script_calls(node: redis.Redis) -> int:
    stats = node.info("commandstats")
    return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("evalsha", "eval"))


class Users:
    """Fresh user ids whose keys live off the campaign's shard."""

    def __init__(self, cluster: RedisClusterNodes, app: XSPMiddleware, shard: int, tag: str):
        self._ids = (f"{tag}-{i}" for i in itertools.count())
        self._cluster, self._store, self._shard = cluster, app.store, shard

    def __next__(self) -> str:
        for uid in self._ids:
            if self._cluster.index_for_key(self._store.user_key(uid)) != self._shard:
                return uid
        raise StopIteration


async def steady(
    cluster: RedisClusterNodes, nodes: list[redis.Redis], leasing: bool, args: Any, run: int
) -> dict[str, Any]:
    cid = f"hot{run}"
    app = make_app(cluster.url, Campaign(id=cid, budget="1000000.00", cpm="2.00", leasing=leasing))
    shard = cluster.index_for_key(app.store.campaign_keys(cid)[0])
    users = Users(cluster, app, shard, f"r{run}")
    pool = [next(users) for _ in range(int(args.seconds * 20_000) + 5_000)]
    # Warm up: connections, scripts, the first lease.
    await asyncio.gather(*(call(app, cid, pool.pop()) for _ in range(200)))
    before = [script_calls(n) for n in nodes]
    served = denied = 0
    end = time.monotonic() + args.seconds
    started = time.monotonic()

    async def worker() -> None:
        nonlocal served, denied
        while time.monotonic() < end:
            if await call(app, cid, pool.pop()) == 200:
                served += 1
            else:
                denied += 1

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.monotonic() - started
    await app.store.return_leases()
    after = [script_calls(n) for n in nodes]
    per_shard = [(a - b) for a, b in zip(after, before, strict=True)]
    view = await app.store.get_campaign(cid)
    requests = served + denied
    await app.store.aclose()
    return {
        "requests_per_s": requests / elapsed,
        "campaign_shard_calls_per_request": per_shard[shard] / max(1, requests),
        "other_shards_calls_per_request": sum(per_shard) / max(1, requests)
        - per_shard[shard] / max(1, requests),
        "denied": denied,
        "exact": view.spent_units == view.impressions * COST_UNITS and view.leased_units == 0,
    }


async def end_of_budget(cluster: RedisClusterNodes, args: Any) -> dict[str, Any]:
    cid = "ending"
    campaign = Campaign(id=cid, budget=f"{args.budget * 0.002:.3f}", cpm="2.00", leasing=True)
    apps = [make_app(cluster.url, campaign) for _ in range(3)]
    ids = itertools.count()

    async def wave(n: int) -> int:
        served = 0

        async def worker(app: XSPMiddleware) -> None:
            nonlocal served
            for _ in range(n // (3 * 32)):
                if await call(app, cid, f"e{next(ids)}") == 200:
                    served += 1

        await asyncio.gather(*(worker(app) for app in apps for _ in range(32)))
        return served

    first = await wave(args.budget * 2)
    observer = apps[0].store
    during = await observer.get_campaign(cid)
    within = during.spent_units + during.leased_units <= args.budget * COST_UNITS
    for app in apps:
        await app.store.return_leases()
    view = await observer.get_campaign(cid)
    exact_after_first = view.spent_units == first * COST_UNITS and view.leased_units == 0
    second = await wave(args.budget * 2)
    for app in apps:
        await app.store.return_leases()
    view = await observer.get_campaign(cid)
    for app in apps:
        await app.store.aclose()
    return {
        "budget_impressions": args.budget,
        "served_first_wave": first,
        "served_total": first + second,
        "never_over_budget": within and first + second <= args.budget,
        "spend_exact_after_returns": exact_after_first
        and view.spent_units == (first + second) * COST_UNITS
        and view.leased_units == 0,
    }


async def run(args: argparse.Namespace, cluster: RedisClusterNodes) -> dict[str, Any]:
    nodes = [redis.Redis(port=port) for port in cluster.ports]
    results: dict[str, list[dict[str, Any]]] = {"split": [], "leasing": []}
    runs = itertools.count()
    for round_no in range(args.rounds):
        for name in results:
            cluster.flushall()
            r = await steady(cluster, nodes, name == "leasing", args, next(runs))
            results[name].append(r)
            print(
                f"round {round_no + 1} {name:<8} {r['requests_per_s']:>7.0f} req/s  campaign "
                f"shard {r['campaign_shard_calls_per_request']:.4f} calls/request  "
                f"exact {r['exact']}",
                file=sys.stderr,
            )
    cluster.flushall()
    ending = await end_of_budget(cluster, args)
    for node in nodes:
        node.close()
    summary = {
        name: {
            "requests_per_s": statistics.median(r["requests_per_s"] for r in runs),
            "campaign_shard_calls_per_request": statistics.median(
                r["campaign_shard_calls_per_request"] for r in runs
            ),
            "other_shards_calls_per_request": statistics.median(
                r["other_shards_calls_per_request"] for r in runs
            ),
            "always_exact": all(r["exact"] for r in runs),
        }
        for name, runs in results.items()
    }
    return {
        "config": {
            "seconds": args.seconds,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
        },
        "steady": summary,
        "end_of_budget": ending,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--budget", type=int, default=3000, help="end-of-budget impressions")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    cluster = RedisClusterNodes.started()
    try:
        report = asyncio.run(run(args, cluster))
    finally:
        cluster.stop()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"one campaign, 100% of traffic, 3-master cluster, {args.concurrency} in flight; "
        f"median of {args.rounds} rounds x {args.seconds} s"
    )
    print(f"{'variant':<10}{'req/s':>9}{'campaign shard calls/request':>31}{'exact':>8}")
    for name, r in report["steady"].items():
        print(
            f"{name:<10}{r['requests_per_s']:>9.0f}"
            f"{r['campaign_shard_calls_per_request']:>31.4f}{r['always_exact']!s:>8}"
        )
    split = report["steady"]["split"]["campaign_shard_calls_per_request"]
    leased = report["steady"]["leasing"]["campaign_shard_calls_per_request"]
    print(f"\ncampaign shard load, leasing/split: {leased / split:.4f}x")
    print(f"campaign shard calls per request with leasing: 1/{1 / max(leased, 1e-9):.0f}")
    e = report["end_of_budget"]
    print(
        f"\nend of a budget of {e['budget_impressions']} ads, 3 processes: first wave served "
        f"{e['served_first_wave']}, total {e['served_total']}; never over budget: "
        f"{e['never_over_budget']}; spend exact after leases returned: "
        f"{e['spend_exact_after_returns']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
