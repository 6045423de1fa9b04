"""Redis's own instructions per decision, counted by valgrind: the steady companion of
``overhead.py``'s server-cost rows, whose microseconds drift with this noisy machine.

``redis-server`` runs under ``valgrind --tool=callgrind``, collecting only inside its EVALSHA
command (``--toggle-collect=evalShaCommand``), so the count is what the scripts cost, as
``INFO commandstats`` times them. Each configuration of ``overhead.py``'s server-cost rounds
(the same apps, campaigns and users: ``one cap``, ``8 candidates``...) is driven through the
real middleware, 64 requests in flight, every status checked: a warm-up, then the counters are
zeroed, N decisions, and a dump. Instructions per decision = the dump's total / N.

For the ``8 candidates`` row, the cost of each further candidate evaluated is
(8 candidates - one cap) / 5, which ``overhead.py`` reports in microseconds.

Run from the repository root (``redis-server`` and ``valgrind`` on PATH)::

    python benchmarks/server_instructions.py
    python benchmarks/server_instructions.py --decisions 1000 --config "one cap"
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import overhead  # noqa: E402
import redis  # noqa: E402
import redis.asyncio as aredis  # noqa: E402
from redis_server import free_port  # noqa: E402

import xsp_middleware.store.choice as choice  # noqa: E402
import xsp_middleware.store.choosing as choosing  # noqa: E402

CONFIGS = ("one cap", "8 candidates")

# valgrind runs redis-server about 50 times slower: the apps get a deadline it can meet (it
# changes no instruction the server runs), and no breaker.
SLOW_SERVER = {"store_timeout": 30.0, "circuit_breaker": "off"}


def _callgrind(what: str, pid: int) -> None:
    subprocess.run(["callgrind_control", what, str(pid)], check=True, capture_output=True)


async def _count(name: str, url: str, pid: int, out: Path, decisions: int) -> dict[str, Any]:
    admin = aredis.Redis.from_url(url)
    await admin.flushdb()
    overhead.CANDIDATE_USERS = 2 * decisions  # every user seen at most once in the count
    apps = overhead.server_cost_apps(overhead.make_app(), url, **SLOW_SERVER)
    app, scope_of = apps[name]
    for other, _ in apps.values():
        if other is not app:
            await other.store.aclose()
    users: Any = itertools.count()
    if name == "8 candidates":
        await overhead.seed_candidate_users(app)
        users = itertools.cycle(range(overhead.CANDIDATE_USERS))

    async def run(n: int) -> dict[str, int]:
        todo = iter(range(n))
        statuses: dict[str, int] = {}

        async def worker() -> None:
            for _ in todo:
                status = 0

                async def send(message: dict[str, Any]) -> None:
                    nonlocal status
                    if message["type"] == "http.response.start":
                        status = message["status"]

                await app(scope_of(next(users)), overhead.receive, send)
                statuses[str(status)] = statuses.get(str(status), 0) + 1

        await asyncio.gather(*(worker() for _ in range(overhead.CONCURRENCY)))
        return statuses

    await run(100)
    await admin.config_resetstat()
    _callgrind("-z", pid)
    statuses = await run(decisions)
    calls = int((await admin.info("commandstats"))["cmdstat_evalsha"]["calls"])
    _callgrind("-d", pid)
    await app.store.aclose()
    await admin.aclose()
    if set(statuses) != {"200"}:
        raise SystemExit(f"{name}: statuses other than 200: {statuses}")
    dumps = sorted(out.parent.glob(out.name + ".*"), key=lambda p: int(p.suffix[1:]))
    total = next(
        int(line.split()[1]) for line in dumps[-1].read_text().splitlines() if line[:7] == "totals:"
    )
    return {"per_decision": total / decisions, "decisions": decisions, "evalsha": calls}


def count(name: str, decisions: int) -> dict[str, Any]:
    """Instructions per decision of one configuration, on its own redis-server under valgrind."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="xsp-callgrind-") as tmp:
        out = Path(tmp) / "callgrind.out"
        server = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                "--toggle-collect=evalShaCommand",
                f"--callgrind-out-file={out}",
                "redis-server",
                *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            probe = redis.Redis(port=port)
            deadline = time.monotonic() + 60
            while True:
                try:
                    probe.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            url = f"redis://127.0.0.1:{port}/0"
            return asyncio.run(_count(name, url, server.pid, out, decisions))
        finally:
            server.terminate()
            server.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decisions", type=int, default=600, help="decisions counted per row")
    parser.add_argument("--config", action="append", choices=CONFIGS, help="(default: all)")
    args = parser.parse_args(argv)
    # The denial counts of passed-over candidates are written every quarter of a second: a
    # share of a write per decision at a real server's rate, but a hundred times that under
    # valgrind's. Written at the end instead, they stay out of the count, as they nearly are
    # at full speed (overhead.py's calls per decision show them).
    choice.COUNT_INTERVAL = choosing.COUNT_INTERVAL = 1e9
    rows = {name: count(name, args.decisions) for name in args.config or CONFIGS}
    print("Redis instructions per decision (EVALSHA, callgrind):")
    for name, row in rows.items():
        print(
            f"  {name:<14}{row['per_decision'] / 1000:>8.1f}k  "
            f"({row['decisions']} decisions, {row['evalsha']} script calls)"
        )
    if {"one cap", "8 candidates"} <= rows.keys():
        further = (rows["8 candidates"]["per_decision"] - rows["one cap"]["per_decision"]) / 5
        share = further / rows["one cap"]["per_decision"]
        print(
            f"  per further candidate evaluated: {further / 1000:.1f}k, {share:.1%} of one cap "
            "(at one cap's 20-30 us on this machine: "
            f"{share * 20:.1f}-{share * 30:.1f} us; target 3)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
