"""What the operator dashboard costs: one sampler round (every campaign's minute sample), in
wall time and in Redis time per sample, and the time to render its pages, on a real Redis.

The setup: ``--campaigns`` campaigns (a daily budget, even pacing) from the settings, ten ad
requests each through ``XSPMiddleware`` (so every campaign has state), then the dashboard app
called in-process (``httpx.ASGITransport``), every status checked.

Run from the repository root (``redis-server`` on PATH)::

    python benchmarks/dashboard.py
    python benchmarks/dashboard.py --campaigns 1000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import httpx
import redis

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from redis_server import RedisServer  # noqa: E402

from xsp_middleware import Campaign, XSPMiddleware, dashboard_app  # noqa: E402
from xsp_middleware.dashboard import Sampler  # noqa: E402
from xsp_middleware.demo import vast_app  # noqa: E402

SECRET = "bench-secret-key-0123456789"
TOKEN = "bench-dashboard-token-0123"


async def run(url: str, count: int) -> None:
    campaigns = [Campaign(id=f"c{i}", daily_budget="50.00", pacing="even") for i in range(count)]
    settings = {"redis_url": url, "secret_key": SECRET, "campaigns": campaigns}
    ads = XSPMiddleware(vast_app, **settings)
    transport = httpx.ASGITransport(app=ads)
    async with httpx.AsyncClient(transport=transport, base_url="http://ads") as c:
        for i in range(10 * count):
            r = await c.get(f"/ad?campaign_id=c{i % count}", headers={"cookie": f"user_id=u{i}"})
            assert r.status_code == 200, r.status_code
    admin = redis.Redis.from_url(url)
    dashboard = dashboard_app(**settings, dashboard_token=TOKEN)
    sampler = Sampler(dashboard.store, [c.id for c in campaigns])
    admin.config_resetstat()
    start = time.perf_counter()
    written = await sampler.sample_once()
    wall = time.perf_counter() - start
    stats = admin.info("commandstats")
    scripts = [v for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval")]
    calls = sum(int(v["calls"]) for v in scripts)
    usec = sum(float(v["usec"]) for v in scripts)
    await sampler.aclose()
    assert written == count, (written, count)
    print(
        f"sampler round: {written} campaigns sampled in {wall * 1000:.0f} ms, "
        f"{usec / max(1, calls):.1f} us of Redis per script call ({calls} calls)"
    )
    headers = {"authorization": f"Bearer {TOKEN}"}
    transport = httpx.ASGITransport(app=dashboard, client=("127.0.0.1", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as d:
        for path in ("/", "/campaigns/c7"):
            times = []
            for _ in range(5):
                start = time.perf_counter()
                page = await d.get(path, headers=headers)
                times.append(time.perf_counter() - start)
                assert page.status_code == 200, page.status_code
            print(
                f"GET {path}: median {statistics.median(times) * 1000:.0f} ms over 5 "
                f"({len(page.content):,} bytes)"
            )
    await dashboard.aclose()
    await ads.store.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--campaigns", type=int, default=200, help="how many (default 200)")
    args = parser.parse_args(argv)
    server = RedisServer()
    try:
        asyncio.run(run(server.url, args.campaigns))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
