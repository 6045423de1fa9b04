"""Instructions per guarded request, counted by valgrind: a deterministic figure for comparing
two commits of the hot path, where wall-clock CPU on a noisy machine varies by ±20%.

The workload is ``compare_commits.py``'s (the commit's ``XSPMiddleware`` around a bare ASGI
app, default settings, ten campaigns, 64 concurrent workers, a new user per request, every
status checked), run twice under ``valgrind --tool=callgrind`` with N and 4N requests; the
difference divided by 3N is the cost of one request, start-up excluded.

Run from the repository root (``redis-server`` and ``valgrind`` on PATH)::

    python benchmarks/instructions.py                 # this tree
    python benchmarks/instructions.py --tree /path/to/another/checkout
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _workload(url: str, n: int) -> None:
    import compare_commits as cc
    import redis

    from xsp_middleware import Campaign, Settings, XSPMiddleware

    redis.Redis.from_url(url).flushall()
    campaigns = [Campaign(id=f"c{i}", budget="900000000.00") for i in range(cc.CAMPAIGNS)]
    secret = "bench-secret-key-0123456789"
    settings = Settings(redis_url=url, secret_key=secret, campaigns=campaigns)
    app = XSPMiddleware(cc._bare, settings=settings)

    async def main() -> None:
        counter = iter(range(1 << 40))
        statuses: dict[int, int] = {}

        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def worker(k: int) -> None:
            for _ in range(k):
                status = 0

                async def send(message: dict[str, object]) -> None:
                    nonlocal status
                    if message["type"] == "http.response.start":
                        status = int(message["status"])  # type: ignore[call-overload]

                await app(cc._scope(next(counter)), receive, send)
                statuses[status] = statuses.get(status, 0) + 1

        await asyncio.gather(*(worker(n // cc.CONCURRENCY) for _ in range(cc.CONCURRENCY)))
        if set(statuses) != {200}:
            raise SystemExit(f"statuses other than 200: {statuses}")

    asyncio.run(main())


def _instructions(tree: Path, url: str, n: int) -> int:
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{HERE}"}
    out = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            url,
            str(n),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=1200,
    )
    found = re.search(r"Collected : (\d+)", out.stderr)
    if out.returncode != 0 or found is None:
        raise SystemExit(f"the run under valgrind failed:\n{out.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout to measure")
    parser.add_argument("--requests", type=int, default=640, help="N (the runs make N and 4N)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    from redis_server import RedisServer

    server = RedisServer()
    try:
        small = _instructions(args.tree, server.url, args.requests)
        large = _instructions(args.tree, server.url, 4 * args.requests)
    finally:
        server.stop()
    per_request = (large - small) / (3 * args.requests)
    print(f"{args.tree}: {per_request / 1000:.1f}k instructions per guarded request")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _workload(sys.argv[2], int(sys.argv[3]))
        raise SystemExit(0)
    raise SystemExit(main())
