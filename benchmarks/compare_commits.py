"""Two commits of this package side by side, in one run: in-process throughput, Python CPU per
request above the bare app, and Redis CPU per decision.

Each commit is checked out in a throwaway git worktree; every measurement runs in its own
Python process with that worktree first on ``PYTHONPATH``, so each side imports its own
``xsp_middleware`` (through the public API only: ``XSPMiddleware``, ``Settings``,
``Campaign``). Runs alternate (old, new, old, new, ...) on one throwaway ``redis-server``, so
machine noise hits both alike; the figures are medians over ``--rounds``.

One run: a Starlette app whose route returns a small VAST document, wrapped in the commit's
``XSPMiddleware`` with the default settings (caps ``3/1h``, ten campaigns with budgets far too
large to run out), called directly as ASGI by 64 concurrent workers for ``--seconds``, each
request with a new ``user_id`` cookie. Only 200s count; any other status fails the run. The
same workers also run the bare app (no middleware) in the same process, for the CPU above it.
Redis CPU per decision is ``INFO commandstats`` (``evalsha`` + ``eval`` usec, reset before the
measured phase) divided by the decisions made. Each run also times a 3-command script (TIME,
HINCRBY, HGET) on the same server, the comparator whose ratio holds on a noisy machine.

``--config`` picks the campaigns: ``one-cap`` (the default settings: one rolling ``3/1h``
cap and a budget) or ``rich`` (caps ``3/1h``, ``10/day`` and ``50/lifetime``, a daily budget
and even pacing, with a 100% allowance so the pacing curve is computed on every call without
turning requests away).

Run from the repository root::

    python benchmarks/compare_commits.py ce5ba2d HEAD
    python benchmarks/compare_commits.py ce5ba2d HEAD --seconds 3 --rounds 5 --json
    python benchmarks/compare_commits.py 47ceac5 HEAD --config rich
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONCURRENCY = 64
CAMPAIGNS = 10
WARMUP_SECONDS = 0.5
VAST = b'<?xml version="1.0"?><VAST version="4.2"><Ad id="x"><InLine/></Ad></VAST>'


# -- the worker: one side, one run (runs with the commit's tree on PYTHONPATH) ---------------


async def _bare(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": VAST})


def _scope(n: int) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/ad",
        "raw_path": b"/ad",
        "root_path": "",
        "query_string": b"campaign_id=c%d&cpm=2.50" % (n % CAMPAIGNS),
        "headers": [(b"host", b"bench"), (b"cookie", b"user_id=user-%d" % n)],
        "client": ("127.0.0.1", 1),
        "server": ("bench", 80),
    }


async def _drive(app: Any, seconds: float, start: int) -> tuple[int, dict[int, int], float]:
    """(requests, statuses, CPU seconds) of ``app`` under 64 concurrent workers."""
    counter = iter(range(start, 1 << 62))
    statuses: dict[int, int] = {}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def worker(until: float) -> int:
        done = 0
        while time.monotonic() < until:
            status = 0

            async def send(message: dict[str, Any]) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]

            await app(_scope(next(counter)), receive, send)
            statuses[status] = statuses.get(status, 0) + 1
            done += 1
        return done

    cpu = time.process_time()
    until = time.monotonic() + seconds
    done = sum(await asyncio.gather(*(worker(until) for _ in range(CONCURRENCY))))
    return done, statuses, time.process_time() - cpu


def _commandstats(url: str) -> tuple[int, float]:
    import redis

    client = redis.Redis.from_url(url)
    stats = client.info("commandstats")
    calls = usec = 0.0
    for name in ("cmdstat_evalsha", "cmdstat_eval"):
        if name in stats:
            calls += stats[name]["calls"]
            usec += stats[name]["usec"]
    client.close()
    return int(calls), usec


THREE_COMMANDS = (
    "redis.call('TIME') redis.call('HINCRBY', KEYS[1], 'n', 1) "
    "return redis.call('HGET', KEYS[1], 'n')"
)


def _three_commands_us(url: str, calls: int = 20_000) -> float:
    """Server us per call of a 3-command script, pipelined 64 at a time."""
    import redis

    client = redis.Redis.from_url(url)
    sha = client.script_load(THREE_COMMANDS)
    client.config_resetstat()
    for start in range(0, calls, CONCURRENCY):
        pipe = client.pipeline(transaction=False)
        for i in range(start, start + CONCURRENCY):
            pipe.evalsha(sha, 1, f"three:{i % 1000}")
        pipe.execute()
    n, usec = _commandstats(url)
    client.close()
    return usec / n


def worker(url: str, seconds: float, config: str) -> dict[str, Any]:
    import redis

    from xsp_middleware import Campaign, Settings, XSPMiddleware

    budget = "900000000.00"
    if config == "rich":
        campaigns = [
            Campaign(
                id=f"c{i}",
                caps=["3/1h", "10/day", "50/lifetime"],
                budget=budget,
                daily_budget=budget,
                pacing="even",
            )
            for i in range(CAMPAIGNS)
        ]
        extra: dict[str, Any] = {"pacing_allowance": "1.00"}
    else:
        campaigns = [Campaign(id=f"c{i}", budget=budget) for i in range(CAMPAIGNS)]
        extra = {}
    secret = "bench-secret-key-0123456789"
    settings = Settings(redis_url=url, secret_key=secret, campaigns=campaigns, **extra)
    app = XSPMiddleware(_bare, settings=settings)

    redis.Redis.from_url(url).flushall()  # every run starts from an empty store

    async def main() -> dict[str, Any]:
        await _drive(_bare, WARMUP_SECONDS, 0)
        bare_n, bare_statuses, bare_cpu = await _drive(_bare, seconds, 0)
        await _drive(app, WARMUP_SECONDS, 10**9)
        redis.Redis.from_url(url).config_resetstat()
        calls_before, usec_before = _commandstats(url)
        n, statuses, cpu = await _drive(app, seconds, 2 * 10**9)
        calls, usec = _commandstats(url)
        if set(statuses) != {200} or set(bare_statuses) != {200}:
            raise SystemExit(f"statuses other than 200: xsp {statuses}, bare {bare_statuses}")
        three = _three_commands_us(url)
        return {
            "xsp_rps": n / seconds,
            "bare_rps": bare_n / seconds,
            "xsp_cpu_us": cpu / n * 1e6,
            "bare_cpu_us": bare_cpu / bare_n * 1e6,
            "above_bare_us": cpu / n * 1e6 - bare_cpu / bare_n * 1e6,
            "server_us_per_decision": (usec - usec_before) / n,
            "script_calls_per_decision": (calls - calls_before) / n,
            "three_command_us": three,
            "server_x_three_commands": (usec - usec_before) / n / three,
        }

    return asyncio.run(main())


# -- the comparison ---------------------------------------------------------------------------


def _worktree(rev: str, where: Path) -> Path:
    path = where / rev.replace("/", "_")
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), rev], check=True
    )
    return path


def _run(tree: Path, url: str, seconds: float, config: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", url, str(seconds), config],
        env=env,
        cwd=tree,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if out.returncode != 0:
        raise SystemExit(f"{tree}: worker failed:\n{out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--config", choices=("one-cap", "rich"), default="one-cap")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    from redis_server import RedisServer

    server = RedisServer()
    where = Path(tempfile.mkdtemp(prefix="xsp-compare-"))
    trees = {"old": _worktree(args.old, where), "new": _worktree(args.new, where)}
    runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    try:
        for i in range(args.rounds):
            for side in ("old", "new") if i % 2 == 0 else ("new", "old"):
                result = _run(trees[side], server.url, args.seconds, args.config)
                runs[side].append(result)
                print(f"round {i + 1} {side}: {json.dumps(result)}", file=sys.stderr)
    finally:
        server.stop()
        for tree in trees.values():
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False
            )
    keys = list(runs["old"][0])
    medians = {
        side: {k: statistics.median(r[k] for r in results) for k in keys}
        for side, results in runs.items()
    }
    report = {
        "old": args.old,
        "new": args.new,
        "rounds": args.rounds,
        "seconds": args.seconds,
        "config": args.config,
        "median": medians,
        "new/old": {k: medians["new"][k] / medians["old"][k] for k in keys if medians["old"][k]},
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{'figure':<28} {'old ' + args.old:>16} {'new ' + args.new:>16} {'new/old':>8}")
        for k in keys:
            old, new = medians["old"][k], medians["new"][k]
            ratio = f"{new / old:.3f}" if old else "-"
            print(f"{k:<28} {old:>16.2f} {new:>16.2f} {ratio:>8}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], float(sys.argv[3]), sys.argv[4])))
        raise SystemExit(0)
    raise SystemExit(main())
