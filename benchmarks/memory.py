"""Redis memory per active (user, campaign) pair, from ``used_memory`` deltas.

Every user gets one impression of each of ``--campaigns`` campaigns capped ``3/1h`` (so each
pair holds one logged impression time), through the real reserve script, on a throwaway
``redis-server`` (a fresh one per size). Each impression's time is random within the last
hour (the scripts' clock is set per call), as for users active over the window, so stored
times have realistic lengths. The figure is (used_memory after - used_memory before) / pairs;
the campaigns' own keys are a handful and included. Run from the repository root::

    python benchmarks/memory.py                       # 20,000 then 200,000 users x 5
    python benchmarks/memory.py --users 20000 --json  # one size only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from redis_server import RedisServer  # noqa: E402

from xsp_middleware.settings import Rules, Settings  # noqa: E402
from xsp_middleware.store import Store  # noqa: E402

SECRET_KEY = "bench-secret-key-0123456789"
CHUNK = 4000


def used_memory(server: RedisServer) -> int:
    info = server.command("INFO", "memory").decode()
    for line in info.splitlines():
        if line.startswith("used_memory:"):
            return int(line.split(":", 1)[1])
    raise RuntimeError("INFO memory has no used_memory")


class ScatteredClock:
    """A store clock that reads a random instant of the hour after ``start`` on every call:
    each user's impression log holds times spread over the window, as in production."""

    def __init__(self, start: int, rng: random.Random) -> None:
        self.start, self.rng = start, rng

    def _ms(self) -> int:
        return self.start + self.rng.randrange(3_600_000)

    @property
    def arg(self) -> str:
        return str(self._ms())

    @property
    def wire(self) -> bytes:
        text = b"%d" % self._ms()
        return b"$%d\r\n%b\r\n" % (len(text), text)

    def now_ms(self) -> int:
        return self._ms()

    def lease_ms(self) -> float:
        return float(self._ms())

    def seen_ms(self, server_ms: int) -> int:
        return self._ms()


async def fill(store: Store, users: int, campaigns: list[str]) -> int:
    rules = {cid: store.rules.rule_for(cid) for cid in campaigns}
    rng = random.Random(7)
    start = int(time.time() * 1000) - 3_600_000
    store.clock = ScatteredClock(start, rng)
    served = 0
    for start in range(0, users, CHUNK):
        calls = [
            store.reserve(cid, store.user_key(f"user-{u}"), None, rules[cid])
            for u in range(start, min(users, start + CHUNK))
            for cid in campaigns
        ]
        for reservation in await asyncio.gather(*calls):
            served += reservation.reserved
    await store.aclose()
    return served


def measure(users: int, campaigns: list[str]) -> dict[str, Any]:
    """Fill a fresh server with ``users`` x ``campaigns`` pairs; the memory it took."""
    server = RedisServer()
    try:
        store = Store(
            Rules.from_settings(
                Settings(
                    redis_url=server.url,
                    secret_key=SECRET_KEY,
                    default_caps=("3/1h",),
                    default_budget="900000000.00",
                    store_timeout=30,  # a bulk fill, not serving: no request waits on it
                )
            )
        )
        server.command("FLUSHALL")
        before = used_memory(server)
        started = time.monotonic()
        served = asyncio.run(fill(store, users, campaigns))
        seconds = time.monotonic() - started
        after = used_memory(server)
        keys = int(server.command("DBSIZE").decode().strip().lstrip(":"))
    finally:
        server.stop()
    pairs = users * len(campaigns)
    return {
        "users": users,
        "campaigns_per_user": len(campaigns),
        "pairs": pairs,
        "impressions_served": served,
        "keys": keys,
        "used_memory_delta": after - before,
        "bytes_per_pair": (after - before) / pairs,
        "fill_seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--campaigns", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    campaigns = [f"c{i}" for i in range(args.campaigns)]
    reports = [measure(users, campaigns) for users in args.users]
    if args.json:
        print(json.dumps(reports if len(reports) > 1 else reports[0], indent=2))
        return 0
    for report in reports:
        print(
            f"{report['pairs']:,} pairs ({report['users']:,} users x {args.campaigns} campaigns, "
            f"cap 3/1h, {report['impressions_served']:,} impressions, {report['keys']:,} keys): "
            f"used_memory +{report['used_memory_delta']:,} bytes, "
            f"{report['bytes_per_pair']:.1f} bytes per pair "
            f"(filled in {report['fill_seconds']:.0f} s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
