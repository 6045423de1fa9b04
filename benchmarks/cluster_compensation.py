"""How much a Redis Cluster under-delivers through compensation, by contention.

On a cluster, a decision's campaign half (budget) and user half (caps) run concurrently on two
shards. When one passes and the other denies, the passed half is given back. Until then it
holds a cap slot or a slice of budget that a concurrent request may be denied: under-delivery,
never an overspend and never a cap exceeded. This measures it.

Traffic: ``--campaigns`` campaigns, each with a budget of ``--budget`` impressions at CPM 2.00
and a 1/1h cap; ``--users`` users per campaign (more than the budget) each ask twice, so half of
all requests are capped duplicates whose campaign half must be given back. The requests are
shuffled and sent by ``C`` concurrent in-process workers, for each ``C`` in ``--concurrency``.
The same traffic runs on a standalone Redis (one atomic script: exact in both directions) and on
a 3-master cluster, interleaved, ``--rounds`` times. Reported: impressions served of the ideal
(every budget spent), the shortfall, and checks that no budget was overspent and no cap
exceeded.

Run from the repository root::

    python benchmarks/cluster_compensation.py
    python benchmarks/cluster_compensation.py --concurrency 1 64 512 --rounds 3 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from xsp_middleware import Campaign, XSPMiddleware

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from redis_server import RedisServer  # noqa: E402
from redis_topologies import RedisClusterNodes  # noqa: E402

SECRET_KEY = "bench-secret-key-0123456789"
COST_UNITS = 20_000  # CPM 2.00


async def ad(request: Request) -> Response:
    return Response("<VAST/>", media_type="application/xml")


async def call(app: Any, cid: str, uid: str) -> int:
    status = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/ad",
        "raw_path": b"/ad",
        "root_path": "",
        "query_string": f"campaign_id={cid}".encode(),
        "headers": [(b"host", b"bench"), (b"cookie", f"user_id={uid}".encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    await app(scope, receive, send)
    return status


async def one_run(
    url: str, args: argparse.Namespace, concurrency: int, seed: int
) -> dict[str, Any]:
    campaigns = [f"k{seed}c{i}" for i in range(args.campaigns)]
    app = XSPMiddleware(
        Starlette(routes=[Route("/ad", ad)]),
        redis_url=url,
        secret_key=SECRET_KEY,
        store_timeout=5,
        campaigns=[
            Campaign(id=cid, budget=f"{args.budget * 0.002:.3f}", cpm="2.00", caps=["1/1h"])
            for cid in campaigns
        ],
    )
    requests = [
        (cid, f"k{seed}u{i}-{cid}") for cid in campaigns for i in range(args.users) for _ in (0, 1)
    ]
    random.Random(seed).shuffle(requests)
    queue = iter(requests)
    served: Counter[tuple[str, str]] = Counter()
    statuses: Counter[int] = Counter()

    async def worker() -> None:
        for cid, uid in queue:
            status = await call(app, cid, uid)
            statuses[status] += 1
            if status == 200:
                served[(cid, uid)] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    spent_ok = True
    for cid in campaigns:
        view = await app.store.get_campaign(cid)
        in_campaign = sum(n for (c, _), n in served.items() if c == cid)
        spent_ok &= view.spent_units == in_campaign * COST_UNITS <= args.budget * COST_UNITS
    await app.store.aclose()
    ideal = args.campaigns * args.budget
    total = sum(served.values())
    return {
        "served": total,
        "ideal": ideal,
        "shortfall_pct": 100 * (ideal - total) / ideal,
        "cap_exceeded": max(served.values(), default=0) > 1,
        "spend_exact_and_within_budget": spent_ok,
        "non_2xx": {str(k): v for k, v in statuses.items() if k not in (200, 204)},
    }


async def run(args: argparse.Namespace, urls: dict[str, str], reset: Any) -> dict[str, Any]:
    results: dict[str, dict[int, list[dict[str, Any]]]] = {
        name: {c: [] for c in args.concurrency} for name in urls
    }
    seed = 0
    for round_no in range(args.rounds):
        for concurrency in args.concurrency:
            for name, url in urls.items():
                reset()
                seed += 1
                r = await one_run(url, args, concurrency, seed)
                results[name][concurrency].append(r)
                print(
                    f"round {round_no + 1} {name:<10} concurrency {concurrency:>4}: served "
                    f"{r['served']}/{r['ideal']} (shortfall {r['shortfall_pct']:.1f}%)",
                    file=sys.stderr,
                )
    table = {}
    for name, by_c in results.items():
        table[name] = {
            str(c): {
                "shortfall_pct_median": statistics.median(r["shortfall_pct"] for r in runs),
                "shortfall_pct_max": max(r["shortfall_pct"] for r in runs),
                "cap_ever_exceeded": any(r["cap_exceeded"] for r in runs),
                "spend_always_exact": all(r["spend_exact_and_within_budget"] for r in runs),
                "non_2xx": sum(sum(r["non_2xx"].values()) for r in runs),
            }
            for c, runs in by_c.items()
        }
    return {
        "config": {
            "campaigns": args.campaigns,
            "budget_impressions": args.budget,
            "users_per_campaign": args.users,
            "rounds": args.rounds,
        },
        "results": table,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--campaigns", type=int, default=10)
    parser.add_argument("--budget", type=int, default=50, help="impressions per campaign")
    parser.add_argument("--users", type=int, default=80, help="users per campaign, 2 asks each")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64, 512])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    server = RedisServer()
    cluster = RedisClusterNodes.started()
    try:

        def reset() -> None:
            server.command("FLUSHALL")
            cluster.flushall()

        report = asyncio.run(run(args, {"standalone": server.url, "cluster": cluster.url}, reset))
    finally:
        server.stop()
        cluster.stop()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    cfg = report["config"]
    print(
        f"{cfg['campaigns']} campaigns x {cfg['budget_impressions']} impressions, "
        f"{cfg['users_per_campaign']} users per campaign asking twice (cap 1/1h); "
        f"median (max) shortfall over {cfg['rounds']} rounds"
    )
    print(f"{'concurrency':>12}" + "".join(f"{name:>22}" for name in report["results"]))
    for c in map(str, args.concurrency):
        cells = []
        for by_c in report["results"].values():
            r = by_c[c]
            flag = "" if r["spend_always_exact"] and not r["cap_ever_exceeded"] else " UNSAFE"
            cells.append(
                f"{r['shortfall_pct_median']:>9.1f}% ({r['shortfall_pct_max']:.1f}%){flag}"
            )
        print(f"{c:>12}" + "".join(f"{cell:>22}" for cell in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
