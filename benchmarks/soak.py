"""Soak: the example app under steady load for a minute; does its memory or Redis keep growing?

What runs: ``uvicorn examples.fastapi_app:app`` (one worker, the default ``store_timeout``)
against a throwaway ``redis-server``, driven from this process by ``--concurrency`` keep-alive
connections. Each connection sends one ad request, reads the reply, and pauses ``--think``
seconds: a steady load, well under the worker's capacity. Requests spread over ``--campaigns``
campaigns (budgets far too large to run out, caps ``--caps``). A share ``--repeat`` of the
requests come from a pool of ``--pool`` returning users, who soon meet their frequency cap;
every other request is a user never seen before. So the store sees a stream of new user keys
and keys that are reused, and the cap windows make old ones expire.

Every ``--interval`` seconds it samples:

* the RSS of the app process (psutil);
* the keys in Redis, against what the caps' windows predict. A user's hash lives for the
  longest cap window after the user's last impression, so the store should hold one key per
  user served within that window (counted from the 200s this load received, give or take
  ``--expiry-slack`` seconds for clocks), at most two keys per campaign (config and state), and
  nothing else. The live keys are counted with SCAN, which skips expired keys; ``DBSIZE`` is
  shown too, and may also count expired keys Redis has not reclaimed yet (its active expiry
  lets up to about a tenth of the keys with a TTL go stale before it works harder).

The verdict: RSS growth from the first sample after ``--warmup`` to the last is under
``--rss-target`` (5%), and every sample's key counts match the prediction.

Run from the repository root::

    python benchmarks/soak.py                      # 60 s; needs redis-server on PATH
    python benchmarks/soak.py --seconds 600 --json

The default caps (``3/20s``) are short on purpose: a 60 s run then sees user keys expire and the
key count level off, which the tutorial's ``3/1h`` would not show in under an hour.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis

from xsp_middleware.caps import parse_caps

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECRET_KEY = "soak-secret-key-0123456789"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class App:
    """The example app under uvicorn, in its own process."""

    def __init__(self, redis_url: str, env: dict[str, str], workers: int) -> None:
        self.port = free_port()
        extra = ["--workers", str(workers)] if workers > 1 else []
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "examples.fastapi_app:app",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                *extra,
            ],
            cwd=ROOT,
            env={**os.environ, "XSP_REDIS_URL": redis_url, "XSP_SECRET_KEY": SECRET_KEY, **env},
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).is_success:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.1)
        master = psutil.Process(self.proc.pid)
        # With --workers the requests are served by the children; their RSS is what grows.
        self.processes = [master]
        if workers > 1:
            self.processes = [
                p for p in master.children() if "resource_tracker" not in " ".join(p.cmdline())
            ]

    def rss(self) -> int:
        return sum(p.memory_info().rss for p in self.processes)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def _read_reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    """(status, X-XSP-Decision) of one response (the example app sends Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length, decision = 0, ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "x-xsp-decision":
            decision = value.strip()
    await reader.readexactly(length)
    return int(lines[0].split()[1]), decision


class Load:
    """Paced keep-alive connections; remembers when each user was last served."""

    def __init__(self, args: argparse.Namespace, port: int) -> None:
        self.args = args
        self.port = port
        self.statuses: dict[str, int] = {}
        self.requests = 0
        self.last_served: dict[str, float] = {}
        self.latencies: list[float] = []
        self.new_users = itertools.count()
        self.stopping = False
        self.start = 0.0
        self.unavailable: list[tuple[float, float]] = []  # (s into the run, ms it took)

    def pick(self) -> tuple[str, str]:
        a = self.args
        user = (
            f"returning-{random.randrange(a.pool)}"
            if random.random() < a.repeat
            else f"new-{next(self.new_users)}"
        )
        return user, f"c{random.randrange(a.campaigns)}"

    async def connection(self, w: int) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(self.args.think * w / self.args.concurrency)
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while not self.stopping:
            if conn is None:
                try:
                    conn = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    self.statuses["connect error"] = self.statuses.get("connect error", 0) + 1
                    await asyncio.sleep(0.1)
                    continue
            reader, writer = conn
            user, campaign = self.pick()
            request = (
                f"GET /ad?campaign_id={campaign}&cpm=2.00 HTTP/1.1\r\nhost: soak\r\n"
                f"cookie: user_id={user}\r\n\r\n"
            )
            started = loop.time()
            try:
                writer.write(request.encode())
                status, decision = await asyncio.wait_for(_read_reply(reader), 10)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                key = type(exc).__name__
                writer.close()
                conn = None
            else:
                key = f"{status} {decision}".strip()
                if decision == "store_unavailable":
                    self.unavailable.append(
                        (round(started - self.start, 3), round((loop.time() - started) * 1000, 1))
                    )
                if status == 200:
                    self.last_served[user] = loop.time()
            self.latencies.append(loop.time() - started)
            self.requests += 1
            self.statuses[key] = self.statuses.get(key, 0) + 1
            await asyncio.sleep(self.args.think)
        if conn is not None:
            conn[1].close()

    def served_between(self, since: float, until: float) -> int:
        return sum(1 for t in self.last_served.values() if since <= t <= until)


async def soak(args: argparse.Namespace, app: App, redis_url: str) -> dict[str, Any]:
    caps = parse_caps(args.caps)
    windows = [c.window_seconds for c in caps if c.window_seconds is not None]
    if len(windows) != len(caps):
        raise SystemExit("--caps: use rolling windows (N/<window>), so keys can expire")
    window = max(windows)
    load = Load(args, app.port)
    store = redis.Redis.from_url(redis_url)
    loop = asyncio.get_running_loop()
    start = load.start = loop.time()
    tasks = [asyncio.create_task(load.connection(w)) for w in range(args.concurrency)]
    samples: list[dict[str, Any]] = []
    last_requests, last_t = 0, start
    try:
        for k in itertools.count():
            at = start + min(k * args.interval, args.seconds)
            await asyncio.sleep(max(0.0, at - loop.time()))
            now = loop.time()
            # Blocking calls (a few ms each): run them off the event loop.
            dbsize, live, memory = await loop.run_in_executor(None, _count_keys, store)
            counted = loop.time()
            samples.append(
                {
                    "t": round(now - start, 1),
                    "requests": load.requests,
                    "rps": round((load.requests - last_requests) / max(now - last_t, 1e-9)),
                    "rss_mb": round(app.rss() / 2**20, 2),
                    "dbsize": dbsize,
                    "user_keys": live["user"],
                    "campaign_keys": live["campaign"],
                    "other_keys": live["other"],
                    # The users served within the longest window, give or take the slack: at
                    # least those served well inside it before the count began, at most those
                    # served in it until the count ended.
                    "users_min": load.served_between(now - window + args.expiry_slack, now),
                    "users_max": load.served_between(counted - window - args.expiry_slack, counted),
                    "redis_used_mb": round(memory / 2**20, 2),
                }
            )
            last_requests, last_t = load.requests, now
            if args.progress:
                print(_row(samples[-1]), file=sys.stderr, flush=True)
            if at >= start + args.seconds:
                break
    finally:
        load.stopping = True
        await asyncio.gather(*tasks, return_exceptions=True)
        latency_events = _redis_latency(store)
        store.close()

    measured = [s for s in samples if s["t"] >= args.warmup]
    first, last = measured[0], measured[-1]
    growth = (last["rss_mb"] - first["rss_mb"]) / first["rss_mb"] * 100
    checked = [s for s in samples if s["t"] >= window + args.expiry_slack]
    outside = [
        s
        for s in samples
        if not s["users_min"] <= s["user_keys"] <= s["users_max"]
        or s["campaign_keys"] > 2 * args.campaigns
        or s["other_keys"]
    ]
    latencies = sorted(load.latencies)

    def pct(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 1)

    rss_ok = growth < args.rss_target
    keys_ok = bool(checked) and not outside
    lingering = max(s["dbsize"] - s["user_keys"] - s["campaign_keys"] for s in samples)
    return {
        "settings": {
            "seconds": args.seconds,
            "warmup": args.warmup,
            "interval": args.interval,
            "concurrency": args.concurrency,
            "think": args.think,
            "campaigns": args.campaigns,
            "caps": args.caps,
            "longest_window_s": window,
            "repeat": args.repeat,
            "pool": args.pool,
            "workers": args.workers,
            "expiry_slack_s": args.expiry_slack,
        },
        "samples": samples,
        "requests": load.requests,
        "statuses": load.statuses,
        "distinct_users_served": len(load.last_served),
        "latency_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)},
        "store_unavailable_at": load.unavailable,
        "redis_latency_events": latency_events,
        "rss_first_mb": first["rss_mb"],
        "rss_first_t": first["t"],
        "rss_last_mb": last["rss_mb"],
        "rss_growth_pct": round(growth, 2),
        "rss_target_pct": args.rss_target,
        "keys_checked_samples": len(samples),
        "keys_samples_after_first_window": len(checked),
        "keys_outside_prediction": outside,
        "max_expired_not_yet_reclaimed": lingering,
        "verdict": {
            "rss": rss_ok,
            "keys": keys_ok,
            "ok": rss_ok and keys_ok,
        },
    }


def _count_keys(store: redis.Redis) -> tuple[int, dict[str, int], int]:
    """DBSIZE as Redis holds it, then the live keys by kind. SCAN returns no expired key (and
    reclaims those it meets), so its count is what the TTLs say the store holds; DBSIZE may
    also count expired keys that Redis has not reclaimed yet (its active expiry tolerates up to
    about a tenth of the keys with a TTL being stale)."""
    dbsize = int(store.dbsize())
    names = {bytes(k) for k in store.scan_iter(count=1000)}
    live = {"user": 0, "campaign": 0, "other": 0}
    for name in names:
        kind = "user" if name.startswith(b"xsp:u:") else "campaign"
        live[kind if name.startswith((b"xsp:u:", b"xsp:c:")) else "other"] += 1
    return dbsize, live, int(store.info("memory")["used_memory"])


def _redis_latency(store: redis.Redis) -> dict[str, int]:
    """The worst stall per Redis event (ms), from its latency monitor (``LATENCY LATEST``)."""
    try:
        rows = store.execute_command("LATENCY", "LATEST")
    except redis.RedisError:
        return {}
    return {_text(row[0]): int(row[3]) for row in rows}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


HEADER = (
    f"{'t (s)':>6} {'requests':>9} {'req/s':>6} {'app RSS MB':>11} {'DBSIZE':>7} "
    f"{'live user keys':>15} {'users in window':>16} {'campaign keys':>14} {'redis MB':>9}"
)


def _row(s: dict[str, Any]) -> str:
    predicted = f"{s['users_min']}..{s['users_max']}"
    return (
        f"{s['t']:>6.1f} {s['requests']:>9} {s['rps']:>6} {s['rss_mb']:>11.2f} "
        f"{s['dbsize']:>7} {s['user_keys']:>15} {predicted:>16} {s['campaign_keys']:>14} "
        f"{s['redis_used_mb']:>9.2f}"
    )


def print_report(report: dict[str, Any]) -> None:
    st = report["settings"]
    print(
        f"soak: {st['seconds']:g} s, {st['concurrency']} connections pausing {st['think']:g} s, "
        f"{st['campaigns']} campaigns capped {st['caps']}, {st['repeat']:.0%} of requests from "
        f"{st['pool']} returning users, the rest new"
    )
    print(HEADER)
    for s in report["samples"]:
        print(_row(s))
    print()
    print(f"requests: {report['requests']}  statuses: {report['statuses']}")
    lat = report["latency_ms"]
    print(f"latency: p50 {lat['p50']} ms, p99 {lat['p99']} ms, max {lat['max']} ms")
    print(f"distinct users served: {report['distinct_users_served']}")
    unavailable = report["store_unavailable_at"]
    if unavailable:
        shown = ", ".join(f"{t:g} s ({ms:g} ms)" for t, ms in unavailable[:12])
        more = f" and {len(unavailable) - 12} more" if len(unavailable) > 12 else ""
        print(f"store_unavailable no-fills at: {shown}{more}")
    print(f"Redis stalls over 5 ms (worst, by event): {report['redis_latency_events'] or 'none'}")
    print(
        f"app RSS: {report['rss_first_mb']:.2f} MB at {report['rss_first_t']:g} s (after warm-up)"
        f" -> {report['rss_last_mb']:.2f} MB at the end: {report['rss_growth_pct']:+.2f}% "
        f"(target < {report['rss_target_pct']:g}%)"
    )
    outside = report["keys_outside_prediction"]
    print(
        f"key count: {report['keys_checked_samples']} samples "
        f"({report['keys_samples_after_first_window']} after the first "
        f"{st['longest_window_s']} s window), {len(outside)} outside the prediction (live user "
        f"keys = users served within the window +- {st['expiry_slack_s']:g} s; campaign keys "
        f"<= 2 per campaign; no other keys); DBSIZE counted up to "
        f"{report['max_expired_not_yet_reclaimed']} expired keys Redis had not reclaimed yet"
    )
    v = report["verdict"]
    print(
        ("PASS" if v["ok"] else "FAIL")
        + f": RSS {'stable' if v['rss'] else 'GREW'} ({report['rss_growth_pct']:+.2f}%), "
        + f"key count {'as the windows predict' if v['keys'] else 'NOT as the windows predict'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the run")
    parser.add_argument("--warmup", type=float, default=10.0, help="RSS growth counts from here")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--concurrency", type=int, default=64, help="keep-alive connections")
    parser.add_argument("--think", type=float, default=0.1, help="pause after each reply (s)")
    parser.add_argument("--campaigns", type=int, default=4)
    parser.add_argument("--caps", default="3/20s", help="caps of every campaign, comma-separated")
    parser.add_argument("--repeat", type=float, default=0.5, help="share of returning users")
    parser.add_argument("--pool", type=int, default=500, help="number of returning users")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers")
    parser.add_argument("--expiry-slack", type=float, default=1.0, help="seconds (see above)")
    parser.add_argument("--rss-target", type=float, default=5.0, help="max RSS growth, percent")
    parser.add_argument("--redis-url", help="use this Redis (its database is flushed)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--progress", action="store_true", help="print each sample to stderr")
    args = parser.parse_args(argv)
    if args.warmup >= args.seconds:
        parser.error("--warmup must be shorter than --seconds")
    random.seed(args.seed)

    server = None
    redis_url = args.redis_url
    if redis_url is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from redis_server import RedisServer

        # The latency monitor records every server-side stall over 5 ms (expiry cycles...).
        server = RedisServer("--latency-monitor-threshold", "5")
        redis_url = server.url
    redis.Redis.from_url(redis_url).flushdb()
    campaigns = [
        {"id": f"c{i}", "budget": "900000000.00", "caps": args.caps.split(",")}
        for i in range(args.campaigns)
    ]
    app = App(redis_url, {"XSP_CAMPAIGNS": json.dumps(campaigns)}, args.workers)
    try:
        report = asyncio.run(soak(args, app, redis_url))
    finally:
        app.stop()
        if server is not None:
            server.stop()
            shutil.rmtree(server.dir, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if report["verdict"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
