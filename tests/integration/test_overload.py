"""A busy app is not a failed store: with every setting at its default, a process under more
load than it can take, or with its event loop blocked, keeps deciding every request whose store
reply is on time. Nothing here raises ``store_timeout`` or touches the breaker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from conftest import SECRET, as_user, client
from http_flood import run_flood
from redis_server import RedisServer, free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from xsp_middleware import Campaign, Settings, XSPMiddleware

ROOT = Path(__file__).resolve().parents[2]
BIG_BUDGET = [Campaign(id="c1", budget="1000000.00")]


def _answers(responses: list[httpx.Response]) -> Counter[str]:
    return Counter(
        f"{r.status_code} {r.headers.get('x-xsp-decision', 'served')}" for r in responses
    )


async def test_2000_requests_200_in_flight_serve_exactly_the_budget(
    store_url: str, make_app: Any
) -> None:
    # CPM 2.00 -> 0.002 per impression; 0.274 buys exactly 137.
    app: XSPMiddleware = make_app(
        redis_url=store_url, campaigns=[Campaign(id="c1", budget="0.274", cpm="2.00")]
    )
    in_flight = asyncio.Semaphore(200)
    async with client(app) as c:

        async def one(i: int) -> httpx.Response:
            async with in_flight:
                return await c.get("/ad?campaign_id=c1", headers=as_user(f"user-{i}"))

        responses = await asyncio.gather(*(one(i) for i in range(2000)))
    assert _answers(responses) == {"200 served": 137, "204 budget_exhausted": 1863}
    view = await app.store.get_campaign("c1")
    assert (view.spent_units, view.impressions) == (137 * 20000, 137)


async def test_5000_tasks_behind_a_semaphore_of_64_are_all_decided(
    redis_url: str, make_app: Any
) -> None:
    app: XSPMiddleware = make_app(redis_url=redis_url, campaigns=BIG_BUDGET)
    in_flight = asyncio.Semaphore(64)
    async with client(app) as c:

        async def one(i: int) -> httpx.Response:
            async with in_flight:
                return await c.get("/ad?campaign_id=c1", headers=as_user(f"user-{i}"))

        responses = await asyncio.gather(*(one(i) for i in range(5000)))
    assert _answers(responses) == {"200 served": 5000}
    assert (await app.store.get_campaign("c1")).impressions == 5000


async def test_a_route_blocking_the_event_loop_never_turns_into_store_unavailable(
    redis_url: str,
) -> None:
    """32 workers ask for ads for 3 s while another route blocks the event loop for 120 ms
    every 200 ms (``time.sleep`` in an async handler, the classic mistake): the store answers
    on time, so every ad is decided, however late the loop gets to the reply."""

    async def ad(request: Request) -> Response:
        return PlainTextResponse("ad")

    async def blocking(request: Request) -> Response:
        time.sleep(0.12)  # blocks the whole event loop, on purpose
        return PlainTextResponse("done")

    app = XSPMiddleware(
        Starlette(routes=[Route("/ad", ad), Route("/block", blocking)]),
        redis_url=redis_url,
        secret_key=SECRET,
        campaigns=BIG_BUDGET,
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3.0
    blocks = 0
    async with client(app) as c:

        async def blocker() -> None:
            nonlocal blocks
            while loop.time() < deadline:
                await c.get("/block")
                blocks += 1
                await asyncio.sleep(0.08)  # 120 ms blocked, then 80 ms free

        async def worker(w: int) -> list[httpx.Response]:
            answers = []
            n = 0
            while loop.time() < deadline:
                n += 1
                answers.append(await c.get("/ad?campaign_id=c1", headers=as_user(f"{w}-{n}")))
            return answers

        results = await asyncio.gather(blocker(), *(worker(w) for w in range(32)))
    responses = [r for answers in results[1:] for r in answers]  # type: ignore[union-attr]
    assert blocks >= 10, f"the loop was blocked only {blocks} times"
    assert len(responses) > 100
    assert _answers(responses) == {"200 served": len(responses)}


def test_uvicorn_under_512_connections_keeps_serving_logs_little_and_stops() -> None:
    """The example app under uvicorn (one worker, defaults), 512 connections from a separate
    process for 4 s, then 16 for 3 s. Its output goes to a pipe that nobody reads until it has
    exited: a server that logged per request would block on it."""
    server = RedisServer()
    port = free_port()
    env = {
        **os.environ,
        "XSP_REDIS_URL": server.url,
        "XSP_SECRET_KEY": SECRET,
        "XSP_CAMPAIGNS": json.dumps([{"id": "c1", "budget": "1000000.00"}]),
    }
    # --no-access-log: uvicorn's access log is one line per request by design; the claim is
    # about what the middleware writes.
    command = [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--no-access-log"]
    proc = subprocess.Popen(
        [*command, "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.1)
        path = "/ad?campaign_id=c1&cpm=2.00"
        overload, after = run_flood(
            {"port": port, "path": path, "phases": [[512, 4.0], [16, 3.0]], "timeout": 30}
        )
    finally:
        stopping = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        stopped_in = time.monotonic() - stopping
        server.stop()
    lines = output.decode(errors="replace").splitlines()
    detail = f"overload {overload}; after {after}; {len(lines)} log lines: {lines[-30:]}"
    print(detail)
    for phase in (overload, after):
        answers = phase["by_answer"]
        assert set(answers) <= {"200 served", "204 store_unavailable"}, detail
        assert phase["errors"] == {}, detail
        assert phase["connections_answered"] == phase["connections"], detail
    unavailable = overload["by_answer"].get("204 store_unavailable", 0)
    assert unavailable <= 0.005 * overload["answers"], detail
    assert after["by_answer"].get("204 store_unavailable", 0) == 0, detail
    assert after["answers"] > 0, detail
    assert len(lines) <= 20, detail
    assert stopped_in <= 15, f"uvicorn took {stopped_in:.1f} s to stop after SIGTERM; {detail}"


async def test_a_guarded_request_leaves_no_reference_cycle(redis_url: str) -> None:
    """Servers hold the scope in the object whose ``send`` the app gets (uvicorn's request
    cycle does): nothing the middleware puts in the scope may close a loop back to it, or every
    request leaves its scope and all it holds to the garbage collector, whose full passes then
    stall the event loop under load."""
    import gc

    from fastapi import FastAPI

    api = FastAPI()
    api.add_middleware(
        XSPMiddleware,
        settings=Settings.from_env(redis_url=redis_url, secret_key=SECRET, campaigns=BIG_BUDGET),
    )

    @api.get("/ad")
    async def ad(request: Request) -> Response:
        return PlainTextResponse(request.state.xsp.reason)

    class ServerCycle:  # what a server keeps per request
        def __init__(self, scope: dict[str, Any]) -> None:
            self.scope = scope
            self.statuses: list[int] = []

        async def receive(self) -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(self, message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.statuses.append(message["status"])

    async def request(i: int) -> int:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/ad",
            "raw_path": b"/ad",
            "query_string": b"campaign_id=c1&cpm=2.00",
            "root_path": "",
            "headers": [(b"host", b"x"), (b"cookie", b"user_id=u%d" % i)],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }
        cycle = ServerCycle(scope)
        await api(scope, cycle.receive, cycle.send)
        return cycle.statuses[0]

    for i in range(50):  # warm up: routes wrapped, connections open
        assert await request(i) == 200
    gc.collect()
    gc.disable()
    try:
        statuses = [await request(i) for i in range(50, 250)]
        unreachable = gc.collect()
    finally:
        gc.enable()
    assert statuses == [200] * 200
    assert unreachable < 20, f"{unreachable} objects in reference cycles after 200 requests"
