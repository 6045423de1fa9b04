"""Fault injection against the real thing: the example app under uvicorn, a real redis-server
that the test kills, hangs and flushes, and 64 concurrent clients (distinct users) driven from a
separate load process so that the client's own event loop never inflates a measured latency.

The contract (README, failure policy), all with the default settings: a healthy store serves
every request (no ``store_unavailable`` before a fault), a decision waits at most
``store_timeout`` (0.05 s), the budget fails closed (204 ``store_unavailable``), nothing becomes a
500, the circuit breaker (half of at least 20 calls in a second) stops requests from waiting on
a dead store and closes on the first probe that succeeds, NOSCRIPT costs no failed decision, and
a crash never overspends.

The load process (this file run as a script) keeps ``CONCURRENCY`` keep-alive connections and
sends every request as a user never seen before. It first warms the app up for ``WARMUP``
seconds on another campaign, then prints READY and runs the measured load, in one of two modes:

* paced (the latency tests): each connection sends a request, reads the reply, pauses ``THINK``
  seconds. About 300 requests/s, a third of one worker's capacity here: at saturation the
  worker's own queue (concurrency / throughput) would be the latency, which is not what these
  tests measure;
* waves (the crash tests): every connection sends at once every ``WAVE`` seconds, so a crash
  finds 64 requests in flight.

Latency is the time from writing the request to reading the whole reply, on the load process's
monotonic clock, which is the test's CLOCK_MONOTONIC too, so fault times and request times
compare directly. The app runs with ``debug_headers`` on, so each reply also says why a no-fill
had no store (``X-XSP-Degraded``) and how long the decision took in the app (``Server-Timing``).
A failed latency bound reports how much CPU each process used and how long it waited for one
(``/proc/<pid>/schedstat``), to tell a slow app from a starved machine.

Known threat to the latency bound: a full (generation 2) garbage collection stops the worker
for 55-80 ms on the 2-core development VM; a decision waiting on the store across one can take
store_timeout + that. At 300 requests/s a fresh worker's first one comes about 6 s into the
load, after these tests' 5 s (warm-up included); ``gc.freeze()`` after start-up cut it to
15-35 ms there.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONCURRENCY = 64
THINK = 0.2  # seconds each connection pauses between requests (about 300 requests/s offered)
WARMUP = 0.5  # seconds of load before the measured run: a fresh worker's first decisions are slow
STORE_TIMEOUT = 0.05  # the default; the example app runs with it
BOUND = STORE_TIMEOUT + 0.05  # every response, including those in flight at the fault
COST_UNITS = 20_000  # one impression at the default CPM 2.00, in 10^-7 units
BUDGET_137 = json.dumps([{"id": "c1", "budget": "0.274"}])  # exactly 137 impressions
WAVE = 0.4  # crash tests: all connections send together every WAVE seconds; the crash comes
# as the store records the second wave's first reservation


# -- the load process -----------------------------------------------------------------------


async def _read_reply(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers


async def _load(cfg: dict[str, Any]) -> dict[str, list[list[Any]]]:
    """Warm up for ``warmup`` seconds, print READY, then run the load for ``seconds``. Every
    request is one sample: [start, latency, status (0: no reply), x-xsp-decision or the
    exception's name, x-xsp-degraded, server-timing]."""
    port, think, wave = cfg["port"], cfg["think"], cfg["wave"]
    loop = asyncio.get_running_loop()

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
        except (OSError, TimeoutError):
            return None

    async def worker(w: int, conn: Any, start: float, deadline: float, run: dict[str, Any]) -> Any:
        path, prefix, samples = run["path"], run["prefix"], run["samples"]
        n = 0
        if not wave:  # spread the first requests over one pause: steady from the start
            await asyncio.sleep(think * w / cfg["concurrency"])
        while loop.time() < deadline:
            if wave:  # every connection sends at start + k * wave: bursts of simultaneous requests
                k = int((loop.time() - start) / wave) + (1 if n else 0)
                await asyncio.sleep(max(0.0, start + k * wave - loop.time()))
                if loop.time() >= deadline:
                    break
            if conn is None:
                conn = await connect()
                if conn is None:
                    await asyncio.sleep(0.01)
                    continue
            reader, writer = conn
            user = f"{prefix}-{w}-{n}"  # a distinct user for every request
            n += 1
            request = f"GET {path} HTTP/1.1\r\nhost: x\r\ncookie: user_id={user}\r\n\r\n"
            started = loop.time()
            try:
                writer.write(request.encode())
                status, headers = await asyncio.wait_for(_read_reply(reader), 5.0)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                samples.append([started, loop.time() - started, 0, type(exc).__name__, "", ""])
                writer.close()
                conn = None
                continue
            samples.append(
                [
                    started,
                    loop.time() - started,
                    status,
                    headers.get("x-xsp-decision", ""),
                    headers.get("x-xsp-degraded", ""),
                    headers.get("server-timing", ""),
                ]
            )
            if headers.get("connection") == "close":
                writer.close()
                conn = None
            if not wave:
                await asyncio.sleep(think)
        return conn

    async def run(conns: list[Any], seconds: float, path: str, prefix: str) -> list[list[Any]]:
        this = {"path": path, "prefix": prefix, "samples": []}
        start = loop.time()  # asyncio's clock is time.monotonic(): the test's clock too
        if prefix == cfg["prefix"]:
            sys.stdout.write(f"READY {start!r}\n")
            sys.stdout.flush()
        conns[:] = await asyncio.gather(
            *(worker(w, c, start, start + seconds, this) for w, c in enumerate(conns))
        )
        return this["samples"]  # type: ignore[no-any-return]

    conns = [await connect() for _ in range(cfg["concurrency"])]
    # The warm-up spends nothing of the campaign under test: it asks for another one.
    warm_path = "/ad?campaign_id=warmup&cpm=2.00"
    warm = await run(conns, cfg["warmup"], warm_path, "warm") if cfg["warmup"] else []
    samples = await run(conns, cfg["seconds"], cfg["path"], cfg["prefix"])
    for conn in conns:
        if conn is not None:
            conn[1].close()
    return {"warmup": warm, "samples": samples}


def _load_main(cfg_json: str) -> None:
    samples = asyncio.run(_load(json.loads(cfg_json)))
    sys.stdout.write(json.dumps(samples) + "\n")


if __name__ == "__main__":
    _load_main(sys.argv[1])
    sys.exit(0)


# -- the tests --------------------------------------------------------------------------------

import httpx  # noqa: E402
import psutil  # noqa: E402
import pytest  # noqa: E402
import redis  # noqa: E402
from conftest import SECRET  # noqa: E402
from processes import uvicorn  # noqa: E402
from redis_server import RedisServer, tmpfs  # noqa: E402

from xsp_middleware import Settings  # noqa: E402
from xsp_middleware.settings import Rules  # noqa: E402
from xsp_middleware.store import Store  # noqa: E402


@dataclass
class Sample:
    start: float
    latency: float
    status: int  # 0: the connection failed or closed without a reply
    decision: str  # x-xsp-decision ("served" on a 200), or the exception's name when status is 0
    degraded: str  # why the decision was taken without the store (debug_headers)
    timing: str  # server-timing: "xsp;dur=<ms>", the decision's time in the app

    @property
    def decision_ms(self) -> float:
        return float(self.timing.split("dur=")[1]) if "dur=" in self.timing else -1.0

    @property
    def end(self) -> float:
        return self.start + self.latency

    def in_flight_at(self, t: float) -> bool:
        return self.start <= t <= self.end


class Load:
    """The load process: ``t0`` is when it started sending; ``at(s)`` sleeps until t0 + s."""

    def __init__(
        self,
        base: str,
        seconds: float,
        *,
        campaign: str = "c1",
        prefix: str = "u",
        wave: float | None = None,
        warmup: float = WARMUP,
        watch: dict[str, int] | None = None,
    ) -> None:
        cfg = {
            "wave": wave,
            "port": int(base.rsplit(":", 1)[1]),
            "path": f"/ad?campaign_id={campaign}&cpm=2.00",
            "prefix": prefix,
            "seconds": seconds,
            "concurrency": CONCURRENCY,
            "think": THINK,
            "warmup": warmup,
        }
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__)), json.dumps(cfg)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("READY "), f"the load process did not start: {line!r}"
        self.t0 = float(line.split()[1])
        self.seconds = seconds
        # CPU use of the processes under test, to tell a slow app from a starved one.
        self.watch = {**(watch or {}), "load generator": self.proc.pid}
        self.cpu_before = {name: _schedstat(pid) for name, pid in self.watch.items()}
        self.cpu_after: dict[str, tuple[float, float] | None] = {}

    def at(self, offset: float) -> float:
        delay = self.t0 + offset - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        return time.monotonic()

    def samples(self) -> list[Sample]:
        self.at(self.seconds - 0.05)
        self.cpu_after = {name: _schedstat(pid) for name, pid in self.watch.items()}
        out, _ = self.proc.communicate(timeout=self.seconds + 30)
        assert self.proc.returncode == 0, "the load process failed"
        result = json.loads(out)
        self.warmup = [Sample(*row) for row in result["warmup"]]
        return [Sample(*row) for row in result["samples"]]

    def cpu_report(self) -> str:
        """How busy, and how starved, each process was over the measured run."""
        seconds = self.seconds - 0.05
        parts = []
        for name in self.watch:
            before, after = self.cpu_before.get(name), self.cpu_after.get(name)
            if before is None or after is None:
                parts.append(f"{name}: gone")
                continue
            cpu, wait = ((a - b) / seconds * 100 for a, b in zip(after, before, strict=True))
            parts.append(f"{name} {cpu:.0f}% CPU, {wait:.0f}% of the time waiting for a CPU")
        load1 = os.getloadavg()[0]
        return "; ".join(parts) + f"; load average {load1:.1f} on {os.cpu_count()} CPUs"


def _schedstat(pid: int) -> tuple[float, float] | None:
    """(seconds on a CPU, seconds runnable but waiting for one) of a process (Linux)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            on_cpu, waiting = f.read().split()[:2]
    except (OSError, ValueError):
        return None
    return int(on_cpu) / 1e9, int(waiting) / 1e9


@contextmanager
def app(server: RedisServer, *extra: str, **env: str) -> Iterator[tuple[str, dict[str, int]]]:
    """The example app under uvicorn on ``server``: its base URL and the pids to watch."""
    # debug_headers: X-XSP-Degraded says why a no-fill had no store, and Server-Timing how long
    # the decision took inside the app.
    env = {
        "XSP_REDIS_URL": server.url,
        "XSP_SECRET_KEY": SECRET,
        "XSP_DEBUG_HEADERS": "true",
        **env,
    }
    with uvicorn(env, *extra) as base:
        port = int(base.rsplit(":", 1)[1])
        master = _uvicorn_master(port)
        watch = {"uvicorn": master.pid, "redis": server.proc.pid}  # type: ignore[union-attr]
        for i, worker in enumerate(_uvicorn_workers(master)):
            watch[f"worker {i + 1}"] = worker.pid
        yield base, watch


def _uvicorn_master(port: int) -> psutil.Process:
    masters = [
        p
        for p in psutil.Process().children()
        if "uvicorn" in p.cmdline() and str(port) in p.cmdline()
    ]
    assert len(masters) == 1, masters
    return masters[0]


def _uvicorn_workers(master: psutil.Process) -> list[psutil.Process]:
    """The worker processes of a uvicorn master started with --workers (none without)."""
    return [
        p for p in master.children() if not any("resource_tracker" in part for part in p.cmdline())
    ]


@pytest.fixture
def servers() -> Iterator[list[RedisServer]]:
    """Redis servers this test owns (killed, hung, restarted): always resumed and removed."""
    owned: list[RedisServer] = []
    yield owned
    for server in owned:
        if server.proc is not None and server.proc.poll() is None:
            server.signal(signal.SIGCONT)
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


def _campaign_state(
    server: RedisServer, campaign: str = "c1", client: redis.Redis | None = None
) -> tuple[int, int]:
    """(spent units, impressions) as the store recorded them."""
    own = client is None
    client = client or redis.Redis(port=server.port)
    try:
        spent, impressions = client.hmget(f"xsp:c:{{{campaign}}}:st", "spent", "impressions")
    finally:
        if own:
            client.close()
    return int(spent or 0), int(impressions or 0)


def _summary(samples: list[Sample]) -> str:
    counts: dict[tuple[int, str], int] = {}
    for s in samples:
        counts[s.status, s.decision] = counts.get((s.status, s.decision), 0) + 1
    worst = max(samples, key=lambda s: s.latency)
    return (
        f"{len(samples)} requests {counts}; slowest {worst.latency * 1000:.1f} ms "
        f"({worst.status} {worst.decision} {worst.degraded!r}, decided in "
        f"{worst.decision_ms:.1f} ms)"
    )


def _assert_latency_bound(samples: list[Sample], load: Load) -> None:
    slow = [s for s in samples if s.latency > BOUND]
    assert not slow, (
        f"{len(slow)} of {len(samples)} responses slower than store_timeout + 50 ms: "
        + ", ".join(
            f"{s.latency * 1000:.0f} ms ({s.status} {s.decision} at +{s.start - load.t0:.3f} s, "
            f"decided in {s.decision_ms:.0f} ms)"
            for s in slow[:8]
        )
        + f"; {_summary(samples)}; {load.cpu_report()}"
    )


def _first_served_after(samples: list[Sample], t: float) -> float:
    """Seconds from t until the first 200 that started at or after t completed."""
    ends = [s.end for s in samples if s.status == 200 and s.start >= t]
    assert ends, f"nothing was served after the store came back; {_summary(samples)}"
    return min(ends) - t


def _assert_served_until(samples: list[Sample], t: float, load: Load) -> None:
    """A healthy store serves every request, the warm-up on a fresh worker included: no
    ``store_unavailable`` (nor anything else) before the fault at ``t``."""
    before = [s for s in load.warmup + samples if s.end < t]
    assert before, "no request completed before the fault"
    odd = [s for s in before if (s.status, s.decision) != (200, "served")]
    assert not odd, f"{len(odd)} not served before the fault: {_summary(odd)}"


def _assert_failed_closed(samples: list[Sample]) -> None:
    """Only served ads and budget-closed no-fills: no 500, no other answer, no lost reply."""
    statuses = {(s.status, s.decision) for s in samples}
    assert statuses <= {(200, "served"), (204, "store_unavailable")}, _summary(samples)


def test_sigkill_of_redis_mid_load_costs_no_500_and_no_wait(servers: list[RedisServer]) -> None:
    server = RedisServer()
    servers.append(server)
    with app(server) as (base, watch):
        load = Load(base, 4.5, watch=watch)
        try:
            killed = load.at(0.8)
            server.signal(signal.SIGKILL)
            # Just after the breaker's first probe (about 1 s after it opened) failed: the
            # next one is almost a second away, the slowest recovery there is.
            load.at(1.9)
            server.stop()  # reaps it
            server.start()  # the same port, every key lost
            back = time.monotonic()
        finally:
            samples = load.samples()
    print(f"{_summary(samples)}; {load.cpu_report()}; warm-up: {_summary(load.warmup)}")
    _assert_served_until(samples, killed, load)
    _assert_failed_closed(samples)
    _assert_latency_bound(samples, load)
    down = [s for s in samples if killed + 0.01 <= s.start <= back - 0.01]
    assert down and all(s.status == 204 for s in down), "served while Redis was dead"
    # Both failure paths were taken: requests that met the dead store (in flight at the kill or
    # just after it), then the open circuit.
    failed = [s for s in samples if s.end >= killed and s.start <= back and s.status == 204]
    assert any("circuit is open" not in s.degraded for s in failed), _summary(failed)
    assert any("circuit is open" in s.degraded for s in failed), _summary(failed)
    # After the restart the next probe (at most 1 s away) closes the circuit.
    recovered = _first_served_after(samples, back)
    print(f"served again {recovered:.2f} s after Redis was back")
    assert recovered <= 2.0, _summary(samples)
    assert all(s.status == 200 for s in samples if s.start >= back + 2.0), _summary(samples)


def test_redis_back_with_its_data_keeps_caps_and_budget_exact(
    servers: list[RedisServer],
) -> None:
    # The kill must land while requests are in flight, or the crash bound is not exercised; on
    # a busy box the moment is sometimes missed, and then the whole scenario runs again.
    for attempt in range(3):
        if _redis_back_with_its_data(servers, last=attempt == 2):
            return


def _redis_back_with_its_data(servers: list[RedisServer], *, last: bool) -> bool:
    """One run of the scenario; False (to run it again) if the kill hit no request in flight."""
    # appendfsync always: every write is in the file before its reply, so a SIGKILL loses
    # nothing. The file is on tmpfs: a SIGKILL kills the process, not the kernel, so that is
    # enough, and an fsync to a shared disk stalls for up to 500 ms on a busy CI box, which is a
    # slow store that our 50 ms store_timeout rightly reports, not the healthy one this test needs.
    server = RedisServer("--appendonly", "yes", "--appendfsync", "always", under=tmpfs())
    servers.append(server)
    campaigns = json.dumps([{"id": "c1", "budget": "0.274"}, {"id": "c2", "caps": ["3/1h"]}])
    store = Store(Rules.from_settings(Settings(redis_url=server.url, secret_key=SECRET)))
    loyal = [f"loyal-{i}" for i in range(4)]
    with app(server, XSP_CAMPAIGNS=campaigns) as (base, watch):

        def ask(user: str) -> tuple[int, str | None]:
            r = httpx.get(f"{base}/ad?campaign_id=c2&cpm=2.00", cookies={"user_id": user})
            return r.status_code, r.headers.get("x-xsp-decision")

        def histories() -> dict[str, bytes | None]:
            client = redis.Redis(port=server.port)
            try:
                return {u: client.hget(store.user_key(u), "c2") for u in loyal}
            finally:
                client.close()

        for user in loyal:
            assert [ask(user) for _ in range(4)] == [(200, "served")] * 3 + [
                (204, "frequency_capped")
            ]
        before = histories()

        # Waves of 64 simultaneous requests (distinct users) on c1, whose budget buys 137: the
        # first wave serves 64, Redis is killed while the second is being decided, and the waves
        # after the restart run the budget out.
        load = Load(base, 4.0, wave=WAVE, watch=watch)
        try:
            # Somewhere in the wave: every outcome must hold the bound, so a random moment
            # only varies which one a run checks (replies lost on the way, or none).
            killed = _as_the_second_wave_reserves(server, load, then=random.uniform(0, 0.004))
            server.signal(signal.SIGKILL)
            load.at(1.3)
            server.stop()
            server.start()  # the same port and dir: the AOF brings every key back
            back = time.monotonic()
        finally:
            samples = load.samples()

        assert histories() == before, "a user's cap history changed across the restart"
        for user in loyal:
            assert ask(user) == (204, "frequency_capped")
        assert ask("newcomer") == (200, "served")

    served = sum(1 for s in samples if s.status == 200)
    in_flight = sum(1 for s in samples if s.in_flight_at(killed))
    spent, impressions = _campaign_state(server)
    detail = (
        f"served {served} ({_served_by(samples, killed)} before the kill), recorded "
        f"{impressions} impressions / {spent} units ({impressions - served} reserved, never "
        f"served), {in_flight} in flight at the kill; {_summary(samples)}"
    )
    print(detail)
    _assert_served_until(samples, killed, load)
    assert {s.status for s in samples} <= {200, 204}, detail
    assert 0 < _served_by(samples, killed) < 137, detail
    if in_flight == 0 and not last:
        return False
    assert in_flight > 0, detail
    assert any(s.status == 200 and s.start > back for s in samples), detail
    assert served <= 137, detail
    assert spent <= 137 * COST_UNITS, detail  # never an overspend
    assert spent == impressions * COST_UNITS, detail
    # The crash bound: reservations that ran but whose reply the kill lost are spend without an
    # impression served (under-delivery); there can be no more of them than requests in flight.
    assert 0 <= impressions - served <= in_flight <= CONCURRENCY, detail
    # The waves after the restart ran the budget out: exactly 137 impressions were recorded.
    assert impressions == 137, detail
    return True


def _as_the_second_wave_reserves(server: RedisServer, load: Load, then: float = 0.0) -> float:
    """Wait until the second wave's first reservation is recorded (the store counts one more
    impression than the first wave left), and ``then`` seconds more, so that a crash then finds
    that wave half-decided."""
    client = redis.Redis(port=server.port)
    try:
        load.at(WAVE - 0.1)
        first = _campaign_state(server, client=client)[1]
        give_up = load.t0 + WAVE + 1.0
        while _campaign_state(server, client=client)[1] == first and time.monotonic() < give_up:
            pass
    finally:
        client.close()
    if then:
        time.sleep(then)
    return time.monotonic()


def _served_by(samples: list[Sample], t: float) -> int:
    return sum(1 for s in samples if s.status == 200 and s.end < t)


def test_sigstop_of_redis_opens_the_circuit_and_sigcont_closes_it(
    servers: list[RedisServer],
) -> None:
    server = RedisServer()
    servers.append(server)
    with app(server) as (base, watch):
        load = Load(base, 4.5, watch=watch)
        try:
            stopped = load.at(0.8)
            server.signal(signal.SIGSTOP)  # hung, not refused: TCP still connects, nobody answers
            resumed = load.at(2.3)
        finally:
            server.signal(signal.SIGCONT)
            samples = load.samples()
    print(f"{_summary(samples)}; {load.cpu_report()}; warm-up: {_summary(load.warmup)}")
    _assert_served_until(samples, stopped, load)
    _assert_failed_closed(samples)
    _assert_latency_bound(samples, load)
    hung = [s for s in samples if stopped + 0.01 <= s.start <= resumed - 0.01]
    assert hung and all(s.status == 204 for s in hung), _summary(hung)
    # The first requests waited for their timeout; then the breaker opened (half of the last
    # second's calls failed, so within the 1 s window) and the hung store cost nobody a wait,
    # but for the one probe a second.
    timed_out = [s for s in samples if s.end >= stopped and "did not answer" in s.degraded]
    assert timed_out, _summary(hung)
    refused = [s for s in hung if "circuit is open" in s.degraded]
    assert refused, f"the circuit did not open; {_summary(hung)}"
    opened = min(s.start for s in refused)
    assert opened - stopped <= 1.0 + 0.1 + STORE_TIMEOUT, (
        f"the circuit opened {opened - stopped:.2f} s into the stall; {_summary(hung)}"
    )
    after = [s for s in hung if s.start > opened]
    fast = [s for s in after if "circuit is open" in s.degraded and s.latency < 0.02]
    assert len(fast) >= 0.9 * len(after), f"the circuit did not stay open; {_summary(after)}"
    waited = [s for s in after if s.latency >= STORE_TIMEOUT]
    assert len(waited) <= 3, f"{len(waited)} requests waited on the open circuit; {_summary(after)}"
    # After SIGCONT the next probe succeeds and closes the circuit.
    recovered = _first_served_after(samples, resumed)
    served = sum(1 for s in samples + load.warmup if s.status == 200)
    _, impressions = _campaign_state(server)
    _, warm = _campaign_state(server, "warmup")
    print(
        f"{len(timed_out)} timed out, the circuit opened {opened - stopped:.2f} s into the stall, "
        f"then {len(fast)} of {len(after)} answered at once by the "
        f"open circuit, {len(waited)} waited; served again {recovered:.2f} s after SIGCONT; "
        f"{impressions + warm - served} reservations ran after SIGCONT for requests that had "
        "given up (under-delivery)"
    )
    assert recovered <= 2.0, _summary(samples)
    assert all(s.status == 200 for s in samples if s.start >= resumed + 2.0), _summary(samples)


def test_script_flush_mid_load_costs_no_failed_decision(servers: list[RedisServer]) -> None:
    server = RedisServer()
    servers.append(server)
    with app(server) as (base, watch):
        load = Load(base, 3.0, watch=watch)
        try:
            for k in range(6):
                load.at(0.4 + 0.4 * k)
                assert server.command("SCRIPT", "FLUSH") == b"+OK\r\n"
        finally:
            samples = load.samples()
    errors = server.command("INFO", "errorstats").decode()
    print(f"{_summary(samples)}; {load.cpu_report()}; warm-up: {_summary(load.warmup)}")
    assert "errorstat_NOSCRIPT" in errors, "no decision ever met the flushed script cache"
    assert {(s.status, s.decision) for s in samples} == {(200, "served")}, _summary(samples)
    _assert_served_until(samples, math.inf, load)


def test_sigkill_of_an_app_worker_mid_load_never_overspends(servers: list[RedisServer]) -> None:
    # The kill must cut requests off in flight, or the crash bound is not exercised; on a busy
    # box the moment is sometimes missed, and then the whole scenario runs again.
    for attempt in range(3):
        if _app_worker_killed(servers, last=attempt == 2):
            return


def _app_worker_killed(servers: list[RedisServer], *, last: bool) -> bool:
    """One run of the scenario; False (to run it again) if the kill cut off no request."""
    server = RedisServer()
    servers.append(server)
    with app(server, "--workers", "2", XSP_CAMPAIGNS=BUDGET_137) as (base, watch):
        port = int(base.rsplit(":", 1)[1])
        workers = [psutil.Process(pid) for name, pid in watch.items() if name.startswith("worker")]
        assert len(workers) == 2, watch
        load = Load(base, 3.5, wave=WAVE, watch=watch)
        try:
            # The worker holding more of the load's connections dies during the second wave.
            def held(p: psutil.Process) -> int:
                return sum(1 for c in p.net_connections("tcp") if c.laddr.port == port)

            victim = max(workers, key=held)
            killed = _as_the_second_wave_reserves(server, load)
            victim.send_signal(signal.SIGKILL)
        finally:
            samples = load.samples()
    served = sum(1 for s in samples if s.status == 200)
    cut = sum(1 for s in samples if s.status == 0 and s.in_flight_at(killed))
    spent, impressions = _campaign_state(server)
    detail = (
        f"served {served} ({_served_by(samples, killed)} before the kill), recorded "
        f"{impressions} impressions / {spent} units ({impressions - served} reserved, never "
        f"served), {cut} requests cut off by the kill; {_summary(samples)}"
    )
    print(detail)
    _assert_served_until(samples, killed, load)
    assert {s.status for s in samples} <= {0, 200, 204}, detail  # no 500
    if cut == 0 and not last:
        return False
    assert cut > 0, f"the kill hit no request in flight; {detail}"
    assert 0 < _served_by(samples, killed) < 137, detail
    assert served <= 137, detail
    assert spent <= 137 * COST_UNITS, detail  # never an overspend
    assert spent == impressions * COST_UNITS, detail
    # Reservations made by the dead worker whose response never went out: spend without an
    # impression served, at most one per request it had in flight.
    assert 0 <= impressions - served <= cut <= CONCURRENCY, detail
    assert impressions == 137, detail  # the surviving worker ran the budget out
    return True
