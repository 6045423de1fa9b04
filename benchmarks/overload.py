"""Overload through a real server: does the guarded app keep serving at peak traffic?

What runs: ``uvicorn examples.fastapi_app:app`` (one worker, every xsp setting at its default,
access log off) against a throwaway ``redis-server``, and the same app without the middleware
(``benchmarks/bare_fastapi_app.py``: the same handler) under a second uvicorn. A load generator
in a separate process (``tests/http_flood.py``) holds N keep-alive connections, each sending its
next request as soon as the last is answered, every request from a user never seen before, on
one campaign with a budget of 1,000,000.00 that never runs out.

Levels: 16, 64, 256 and 1024 connections, then 64 again (after the overload). At each level
the guarded and the bare app run back to back (which goes first alternates), ``--seconds``
each, after a warm-up. For each run it reports req/s, p50 and p99, the share of answers served
and the no-fill share by reason, and connection errors; every answer's status and
``X-XSP-Decision`` is counted, so a fast no-fill never passes for throughput. Then guarded/bare
req/s per level, and the verdicts:

* ``store_unavailable`` at most 0.1% at every level (a healthy store);
* served at least 99.9% at every level;
* guarded/bare req/s at least 0.8x at 256 connections.

``--candidates 8``: every request names 8 candidates (``campaign_id=c1,...,c8``), of which the
first 5 have no budget left (``budget_exhausted``, passed over) and the 6th serves: choosing
among candidates, through the same server.

Run from the repository root (``pip install -e ".[dev,examples]"``)::

    python benchmarks/overload.py              # about 1.5 minutes
    python benchmarks/overload.py --seconds 5 --json
    python benchmarks/overload.py --candidates 8
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
from http_flood import run_flood  # noqa: E402
from redis_server import RedisServer, free_port  # noqa: E402

LEVELS = (16, 64, 256, 1024, 64)
SECRET = "overload-secret-key-0123456789"
PATH = "/ad?campaign_id=c1&cpm=2.00"


class Server:
    """One uvicorn worker serving ``app``, its output kept in a file (never a full pipe)."""

    def __init__(self, app: str, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", app, "--port", str(self.port), "--no-access-log"],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while not _answers(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{app} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> float:
        """SIGTERM; seconds until it exited."""
        started = time.monotonic()
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._out.close()
        return time.monotonic() - started

    def log_lines(self) -> int:
        return len(self.log.read_text(errors="replace").splitlines())


def _answers(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def _row(name: str, report: dict[str, Any]) -> dict[str, Any]:
    answers = max(1, report["answers"])
    by = report["by_answer"]
    nofill = {key.split(" ", 1)[1]: n / answers for key, n in by.items() if key != "200 served"}
    return {
        "variant": name,
        "connections": report["connections"],
        "rps": report["rps"],
        "p50_ms": report["p50_ms"],
        "p99_ms": report["p99_ms"],
        "answers": report["answers"],
        "served": by.get("200 served", 0) / answers,
        "nofill": nofill,
        "errors": report["errors"],
        "connections_answered": report["connections_answered"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds per level and app")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--candidates",
        type=int,
        default=1,
        help="candidates per request (the first ones out of budget, the last 3 open)",
    )
    args = parser.parse_args()
    path, campaigns = PATH, [{"id": "c1", "budget": "1000000.00"}]
    if args.candidates > 1:
        ids = [f"c{i}" for i in range(1, args.candidates + 1)]
        closed = max(0, args.candidates - 3)
        campaigns = [
            {"id": cid, "budget": "0.00" if i < closed else "1000000.00"}
            for i, cid in enumerate(ids)
        ]
        path = f"/ad?campaign_id={','.join(ids)}&cpm=2.00"

    redis = RedisServer()
    logs = Path(redis.dir)
    env = {
        "XSP_REDIS_URL": redis.url,
        "XSP_SECRET_KEY": SECRET,
        "XSP_CAMPAIGNS": json.dumps(campaigns),
    }
    guarded = Server("examples.fastapi_app:app", env, logs / "guarded.log")
    bare = Server("benchmarks.bare_fastapi_app:app", env, logs / "bare.log")
    servers = {"guarded": guarded, "bare": bare}
    rows: list[dict[str, Any]] = []
    try:
        for server in servers.values():
            run_flood({"port": server.port, "path": path, "phases": [[64, args.warmup]]})
        for i, level in enumerate(LEVELS):
            order = ["guarded", "bare"] if i % 2 == 0 else ["bare", "guarded"]
            for name in order:
                cfg = {
                    "port": servers[name].port,
                    "path": path,
                    "prefix": f"{name}-{i}",
                    "phases": [[level, args.seconds]],
                }
                rows.append(_row(name, run_flood(cfg)[0]))
                if not args.json:
                    _print_row(rows[-1])
    finally:
        stopped = {name: server.stop() for name, server in servers.items()}
        lines = guarded.log_lines()
        redis.stop()

    ratios = []
    for i, level in enumerate(LEVELS):
        g, b = (next(r for r in rows[2 * i : 2 * i + 2] if r["variant"] == v) for v in servers)
        ratios.append((level, g["rps"] / b["rps"] if b["rps"] else 0.0))
    worst_unavailable = max(
        r["nofill"].get("store_unavailable", 0.0) for r in rows if r["variant"] == "guarded"
    )
    least_served = min(r["served"] for r in rows if r["variant"] == "guarded")
    at_256 = next(ratio for level, ratio in ratios if level == 256)
    verdicts = {
        "store_unavailable <= 0.1% at every level": worst_unavailable <= 0.001,
        "served >= 99.9% at every level": least_served >= 0.999,
        "guarded/bare >= 0.8x at 256 connections": at_256 >= 0.8,
    }
    result = {
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/overload.py " + " ".join(sys.argv[1:]),
        "rows": rows,
        "guarded_over_bare": [{"connections": lv, "ratio": round(r, 3)} for lv, r in ratios],
        "guarded_log_lines": lines,
        "seconds_to_stop_after_sigterm": {k: round(v, 2) for k, v in stopped.items()},
        "verdicts": verdicts,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print()
    print(f"{result['date']}: {result['command']}")
    print(
        "| connections | guarded req/s | bare req/s | guarded/bare | guarded p50 / p99 ms |"
        " served | no-fill by reason |"
    )
    print("|---|---|---|---|---|---|---|")
    for i, (level, ratio) in enumerate(ratios):
        g, b = (next(r for r in rows[2 * i : 2 * i + 2] if r["variant"] == v) for v in servers)
        label = f"{level}" + (" (again)" if i == len(LEVELS) - 1 else "")
        nofill = ", ".join(f"{k} {v:.2%}" for k, v in g["nofill"].items()) or "none"
        print(
            f"| {label} | {g['rps']:,.0f} | {b['rps']:,.0f} | {ratio:.2f}x | "
            f"{g['p50_ms']} / {g['p99_ms']} | {g['served']:.2%} | {nofill} |"
        )
    print(f"guarded server: {lines} log lines; stopped {stopped['guarded']:.2f} s after SIGTERM")
    for claim, ok in verdicts.items():
        print(f"{'PASS' if ok else 'FAIL'}  {claim}")


def _print_row(row: dict[str, Any]) -> None:
    nofill = ", ".join(f"{k} {v:.2%}" for k, v in row["nofill"].items()) or "-"
    errors = f" errors {row['errors']}" if row["errors"] else ""
    print(
        f"{row['variant']:>8} {row['connections']:>5} conns: {row['rps']:>8,.0f} req/s  "
        f"p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  served {row['served']:.2%}  "
        f"no-fill {nofill}{errors}",
        flush=True,
    )


if __name__ == "__main__":
    main()
