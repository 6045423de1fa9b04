"""An HTTP/1.1 load generator that runs in its own process: ``connections`` keep-alive
connections to one server, each sending its next request as soon as the last one is answered,
for ``seconds`` in one or more phases. Every request is from a user never seen before.

Every answer is checked and counted: its status and ``X-XSP-Decision`` (``served`` for a 200), per
phase, with latency percentiles, and per connection (how many answers it got, and any error: a
reset, a close, an answer that took longer than ``timeout``). A fast no-fill is not throughput.

Run as a script, it takes a JSON config on argv and prints one JSON report on stdout::

    python tests/http_flood.py '{"port": 8000, "path": "/ad?campaign_id=c1&cpm=2.00",
        "phases": [[512, 4.0], [16, 3.0]]}'

Used by ``tests/integration/test_overload.py`` and ``benchmarks/overload.py``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Phase:
    connections: int
    seconds: float
    answers: Counter[str] = field(default_factory=Counter)
    """``<status> <decision>`` -> count, e.g. ``200 served``, ``204 store_unavailable``."""
    latencies: list[float] = field(default_factory=list)
    per_connection: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0

    def report(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 2) if lat else None

        total = sum(self.answers.values())
        return {
            "connections": self.connections,
            "seconds": round(self.elapsed, 3),
            "answers": total,
            "rps": round(total / self.elapsed, 1) if self.elapsed else 0.0,
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "by_answer": dict(self.answers),
            "errors": dict(self.errors),
            "connections_answered": sum(1 for n in self.per_connection if n > 0),
            "fewest_answers_per_connection": min(self.per_connection, default=0),
        }


class _Connection(asyncio.Protocol):
    """One keep-alive connection: writes a request, parses the answer, writes the next."""

    def __init__(self, run: _Run, index: int) -> None:
        self.run = run
        self.index = index
        self.buffer = b""
        self.transport: Any = None
        self.need = -1  # body bytes still to come (-1: reading the head)
        self.started = 0.0
        self.status_key = ""
        self.lost: asyncio.Future[str] = run.loop.create_future()
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop's transports are not asyncio.Transport subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(type(exc).__name__ if exc else "closed")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("closed"))

    def send(self, user: str) -> asyncio.Future[None]:
        assert self.transport is not None
        self.waiter = self.run.loop.create_future()
        self.started = time.perf_counter()
        self.transport.write(
            f"GET {self.run.path} HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            f"cookie: user_id={user}\r\n\r\n".encode()
        )
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.need < 0:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head, self.buffer = self.buffer[:end].decode("latin-1"), self.buffer[end + 4 :]
                lines = head.split("\r\n")
                status = lines[0].split(" ", 2)[1]
                decision, length = "", 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    name = name.strip().lower()
                    if name == "content-length":
                        length = int(value)
                    elif name == "x-xsp-decision":
                        decision = value.strip()
                if status == "200" and not decision:
                    decision = "served"
                self.status_key = f"{status} {decision}".strip()
                self.need = length
            if len(self.buffer) < self.need:
                return
            self.buffer = self.buffer[self.need :]
            self.need = -1
            self.run.answered(self, time.perf_counter() - self.started)
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(None)


class _Run:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.loop = asyncio.get_running_loop()
        self.port = int(cfg["port"])
        self.path = str(cfg["path"])
        self.timeout = float(cfg.get("timeout", 10.0))
        self.prefix = str(cfg.get("prefix", "flood"))
        self.phase: Phase | None = None
        self.users = 0

    def answered(self, conn: _Connection, seconds: float) -> None:
        phase = self.phase
        if phase is not None:
            phase.answers[conn.status_key] += 1
            phase.latencies.append(seconds)
            phase.per_connection[conn.index] += 1

    async def _open(self, index: int) -> _Connection | None:
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: _Connection(self, index), "127.0.0.1", self.port
                ),
                self.timeout,
            )
        except (OSError, TimeoutError) as exc:
            assert self.phase is not None
            self.phase.errors[f"connect: {type(exc).__name__}"] += 1
            return None
        return conn

    async def _worker(self, index: int, deadline: float) -> None:
        phase = self.phase
        assert phase is not None
        conn = await self._open(index)
        while conn is not None and time.monotonic() < deadline:
            self.users += 1
            try:
                await asyncio.wait_for(
                    conn.send(f"{self.prefix}-{self.users}-{index}"), self.timeout
                )
            except (ConnectionError, TimeoutError) as exc:
                phase.errors[type(exc).__name__] += 1
                if conn.transport is not None:
                    conn.transport.abort()
                conn = await self._open(index)
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    async def phase_run(self, connections: int, seconds: float) -> Phase:
        phase = self.phase = Phase(connections, seconds, per_connection=[0] * connections)
        started = time.monotonic()
        await asyncio.gather(*(self._worker(i, started + seconds) for i in range(connections)))
        phase.elapsed = time.monotonic() - started
        self.phase = None
        return phase


async def flood(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Run every phase of ``cfg`` (``[[connections, seconds], ...]``) in order; a report each."""
    run = _Run(cfg)
    return [(await run.phase_run(int(n), float(s))).report() for n, s in cfg["phases"]]


def run_flood(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Run the load generator in a process of its own (the caller's event loop, if any, never
    slows it down) and return its reports."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), json.dumps(cfg)],
        capture_output=True,
        text=True,
        timeout=sum(float(s) for _, s in cfg["phases"]) + 120,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the load generator failed: {out.stderr[-3000:]}")
    reports: list[dict[str, Any]] = json.loads(out.stdout)
    return reports


def _main() -> None:
    cfg = json.loads(sys.argv[1])
    try:
        import uvloop  # the generator must not be the bottleneck

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    sys.stdout.write(json.dumps(runner(flood(cfg))) + "\n")


if __name__ == "__main__":
    _main()
