"""Prometheus metrics (``xsp_middleware.metrics``): after real traffic through XSPMiddleware
on real Redis, every counter equals what the responses showed, exactly.

Each test uses a fresh ``CollectorRegistry`` and uninstalls the observer afterwards.
"""

from __future__ import annotations

import asyncio
import doctest
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import SECRET, client
from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from redis_server import RedisServer, free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from xsp_middleware import Campaign, XSPMiddleware, observe
from xsp_middleware.errors import ConfigError
from xsp_middleware.metrics import (
    CONTENT_TYPE,
    LATENCY_BUCKETS,
    MetricsUnavailable,
    PrometheusObserver,
    enable_metrics,
    metrics_app,
    mount_metrics,
)

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    yield CollectorRegistry()
    observe.install(None)


@pytest.fixture
async def build(make_app: Callable[..., XSPMiddleware]) -> AsyncIterator[Callable[..., Any]]:
    """``build(**settings)``: the conftest ad server (plus ``/unfinished``); closed afterwards."""
    apps: list[XSPMiddleware] = []

    def factory(**settings: Any) -> XSPMiddleware:
        app = make_app(**settings)
        starlette: Any = app.app
        starlette.router.routes.append(Route("/unfinished", Unfinished()))
        apps.append(app)
        return app

    yield factory
    for app in apps:
        await app.store.aclose()


class Unfinished:
    """An ASGI endpoint that starts a 200 and returns without finishing the body."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})


def samples(registry: CollectorRegistry, name: str, *labels: str) -> dict[Any, float]:
    """The non-zero samples called ``name``, keyed by their label values (one label: bare)."""
    found: dict[Any, float] = {}
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == name and sample.value:
                assert set(sample.labels) == set(labels), sample.labels
                key = tuple(sample.labels[label] for label in labels)
                found[key[0] if len(key) == 1 else key] = sample.value
    return found


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    assert found is not None, (name, labels)
    return found


def latency_count(registry: CollectorRegistry) -> float:
    return value(registry, "xsp_store_latency_seconds_count")


async def raw_get(app: XSPMiddleware, path: str, user: str, *, disconnect: bool = False) -> int:
    """GET ``path`` as an ASGI server would, for what httpx cannot do: a response that never
    completes, or (``disconnect``) a client that sends ``http.disconnect`` after the first
    chunk (ASGI < 2.4: Starlette then cancels the stream). Returns the status the app started.
    """
    first_chunk = asyncio.Event()
    statuses: list[int] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if not disconnect:
            await asyncio.Event().wait()
        await first_chunk.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])
        if message["type"] == "http.response.body" and message.get("body"):
            first_chunk.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"campaign_id=c1&cpm=2.00",
        "headers": [(b"host", b"testserver"), (b"cookie", f"user_id={user}".encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=3)
    return statuses[0]


# -- a mixed run: the counters equal the responses ---------------------------------------------


async def test_counters_match_the_responses_of_a_mixed_run_exactly(
    redis_url: str, build: Any, registry: CollectorRegistry
) -> None:
    enable_metrics(registry=registry)
    app = build(
        redis_url=redis_url,
        default_caps=["1/1h"],
        consent_policy={"gpc": "deny"},
        campaigns=[
            Campaign(id="tiny", budget="0.004"),  # two impressions at a CPM of 2.00
            Campaign(id="off", status="paused"),
        ],
    )
    # (path, headers, why the reservation is released if it is served: None = kept)
    plan: list[tuple[str, dict[str, str], str | None]] = []
    plan += [
        ("/ad?campaign_id=c1&cpm=2.00", {"cookie": f"user_id=u{i % 10}"}, None) for i in range(30)
    ]
    plan += [("/ad?campaign_id=tiny&cpm=2.00", {}, None)] * 5  # anonymous: the budget decides
    plan += [("/ad?campaign_id=off", {"cookie": "user_id=p"}, None)] * 2
    plan += [("/ad?campaign_id=c1", {"cookie": "user_id=g", "sec-gpc": "1"}, None)] * 2
    for query in (
        "campaign_id=c1&cpm=abc",
        "campaign_id=c1&cpm=-1",
        "campaign_id=c1&cpm=1e3",
        "campaign_id=bad!",
        "campaign_id=",
        "campaign_id=c1&campaign_id=c2",
    ):
        plan.append((f"/ad?{query}", {"cookie": "user_id=v"}, None))
    releases = [
        ("/status/503", "status"),
        ("/status/404", "status"),
        ("/status/302", "status"),
        ("/status/201", None),
        ("/stream", None),
        ("/boom", "exception"),
        ("/stream-fails", "exception"),  # the stream raises: the exception is why
    ]
    for n, (path, why) in enumerate(releases):
        plan.append((f"{path}?campaign_id=c1&cpm=2.00", {"cookie": f"user_id=r{n}"}, why))
    unguarded = ["/other", "/ad", "/ad?cpm=2.00", "/status/200?campaign=c1"]

    async with client(app) as c:
        responses = await asyncio.gather(*(c.get(p, headers=h) for p, h, _ in plan))
        for path in unguarded:
            assert (await c.get(path)).status_code == 200
        assert (await c.head("/ad?campaign_id=c1", headers={"cookie": "user_id=h"})).is_success
    assert await raw_get(app, "/slow-stream", "d1", disconnect=True) == 200
    assert await raw_get(app, "/unfinished", "i1") == 200  # returns with the body unfinished

    decisions: Counter[tuple[str, str]] = Counter()
    released: Counter[str] = Counter()
    refused = 0  # denied before any store call
    for (path, _, why), r in zip(plan, responses, strict=True):
        if r.status_code == 400:
            assert r.headers["content-type"] == "application/problem+json"
            decisions["invalid", r.json()["field"]] += 1
        elif "x-xsp-decision" in r.headers:
            assert r.status_code == 204
            reason = r.headers["x-xsp-decision"]
            decisions["denied", reason] += 1
            refused += reason == "no_consent"
        else:
            decisions["served", "served"] += 1
            if why is not None:
                released[why] += 1
            if why == "status":
                assert not 200 <= r.status_code < 300, path
            if why is None:
                assert 200 <= r.status_code < 300, path
    decisions["served", "served"] += 2  # the two raw requests
    released["disconnect"] += 1
    released["incomplete"] += 1

    # The run exercised what it meant to (so the equalities below say something).
    assert decisions["served", "served"] == 10 + 2 + 7 + 2
    assert decisions["denied", "frequency_capped"] == 20
    assert decisions["denied", "budget_exhausted"] == 3
    assert decisions["denied", "campaign_paused"] == 2
    assert decisions["denied", "no_consent"] == 2
    assert decisions["invalid", "cpm"] == 3 and decisions["invalid", "campaign_id"] == 3
    assert set(released) == {"status", "exception", "incomplete", "disconnect"}
    assert (await app.store.get_campaign("c1")).impressions == 10 + 2  # 200s on /ad, 201, /stream

    assert samples(registry, "xsp_decisions_total", "outcome", "reason") == decisions
    assert samples(registry, "xsp_reservations_released_total", "why") == released
    assert latency_count(registry) == decisions.total() - refused - 6  # 6 invalid
    assert value(registry, "xsp_store_latency_seconds_bucket", le="+Inf") == latency_count(registry)
    assert samples(registry, "xsp_store_errors_total", "kind") == {}
    assert samples(registry, "xsp_degraded_decisions_total", "check") == {}
    assert value(registry, "xsp_circuit_open") == 0


def test_latency_buckets_span_sub_millisecond_to_100_ms(registry: CollectorRegistry) -> None:
    enable_metrics(registry=registry)
    assert LATENCY_BUCKETS[0] <= 0.0001 and LATENCY_BUCKETS[-1] == 0.1
    bounds = {s.labels["le"] for m in registry.collect() for s in m.samples if "le" in s.labels}
    assert {"0.0001", "0.0005", "0.001", "0.01", "0.1", "+Inf"} <= bounds


# -- an unreachable store: errors, degraded decisions, the circuit -----------------------------


async def test_unreachable_store_counts_errors_and_degraded_decisions(
    build: Any, registry: CollectorRegistry
) -> None:
    enable_metrics(registry=registry)
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens
    closed = build(redis_url=url)
    open_ = build(redis_url=url, budget_fail_open=True)
    async with client(closed) as c:
        denied = [
            await c.get("/ad?campaign_id=c1", headers={"cookie": "user_id=u"}) for _ in range(22)
        ]
    async with client(open_) as c:
        served = [await c.get("/ad?campaign_id=c1", headers={"cookie": "user_id=u"}) for _ in "123"]
        anonymous = await c.get("/ad?campaign_id=c1")

    assert {(r.status_code, r.headers.get("x-xsp-decision")) for r in denied} == {
        (204, "store_unavailable")
    }
    assert {r.status_code for r in [*served, anonymous]} == {200}
    assert samples(registry, "xsp_decisions_total", "outcome", "reason") == {
        ("denied", "store_unavailable"): 22,
        ("served", "served"): 4,
    }
    # Twenty refused connections in a row open the default breaker (half of at least 20 calls
    # in a second); the next two are not tried. The other app's four calls are too few.
    assert samples(registry, "xsp_store_errors_total", "kind") == {
        "connection": 20 + 4,
        "circuit_open": 2,
    }
    # Every degraded decision had the budget check decided by the policy; the served ones of a
    # known user also skipped the frequency check.
    assert samples(registry, "xsp_degraded_decisions_total", "check") == {
        "budget": 26,
        "frequency": 3,
    }
    assert value(registry, "xsp_circuit_open") == 1  # the first app's circuit
    assert latency_count(registry) == 0
    assert samples(registry, "xsp_reservations_released_total", "why") == {}


async def test_a_hung_store_counts_timeouts(build: Any, registry: CollectorRegistry) -> None:
    enable_metrics(registry=registry)
    server = RedisServer()
    try:
        server.signal(19)  # SIGSTOP: accepts TCP but never answers
        app = build(redis_url=server.url)
        async with client(app) as c:
            for _ in range(2):
                r = await c.get("/ad?campaign_id=c1", headers={"cookie": "user_id=u"})
                assert r.headers["x-xsp-decision"] == "store_unavailable"
    finally:
        server.signal(18)  # SIGCONT
        server.stop()
    assert samples(registry, "xsp_store_errors_total", "kind") == {"timeout": 2}


async def test_circuit_gauge_opens_at_half_of_twenty_calls_and_closes_after_a_good_probe(
    build: Any, registry: CollectorRegistry
) -> None:
    enable_metrics(registry=registry)
    server = RedisServer()
    try:
        app = build(redis_url=server.url)  # the default breaker: 50% of >= 20 calls in 1 s
        async with client(app) as c:

            async def ad(user: str) -> httpx.Response:
                return await c.get("/ad?campaign_id=c1", headers={"cookie": f"user_id={user}"})

            assert (await ad("a")).status_code == 200
            assert value(registry, "xsp_circuit_open") == 0
            server.stop()
            # With the one success in the window, the 20th call (19 failures of 20) opens it.
            for failures in range(1, 20):
                assert (await ad("b")).headers["x-xsp-decision"] == "store_unavailable"
                assert value(registry, "xsp_circuit_open") == (1 if failures == 19 else 0)
            assert (await ad("b")).headers["x-xsp-decision"] == "store_unavailable"  # not tried
            assert value(registry, "xsp_store_errors_total", kind="circuit_open") == 1
            server.start()  # same port
            deadline = time.monotonic() + 3
            while (await ad("c")).status_code != 200:  # the probe is due 1 s after opening
                assert value(registry, "xsp_circuit_open") == 1
                assert time.monotonic() < deadline, "the circuit did not close"
                await asyncio.sleep(0.05)
            assert value(registry, "xsp_circuit_open") == 0
    finally:
        server.stop()
    assert value(registry, "xsp_store_errors_total", kind="connection") == 19


# -- the campaign label ------------------------------------------------------------------------


async def test_campaign_label_only_when_enabled(
    redis_url: str, build: Any, registry: CollectorRegistry
) -> None:
    plain = CollectorRegistry()
    enable_metrics(registry=plain)
    app = build(redis_url=redis_url)

    async def traffic() -> None:
        async with client(app) as c:
            for path in ("/ad?campaign_id=c1", "/ad?campaign_id=c1", "/ad?campaign_id=c2"):
                assert (await c.get(path)).status_code == 200
            assert (await c.get("/ad?campaign_id=c1&cpm=x")).status_code == 400

    await traffic()
    assert samples(plain, "xsp_decisions_total", "outcome", "reason") == {
        ("served", "served"): 3,
        ("invalid", "cpm"): 1,
    }
    enable_metrics(campaign_label=True, registry=registry)
    await traffic()
    assert samples(registry, "xsp_decisions_total", "outcome", "reason", "campaign") == {
        ("served", "served", "c1"): 2,
        ("served", "served", "c2"): 1,
        ("invalid", "cpm", ""): 1,
    }
    assert samples(plain, "xsp_decisions_total", "outcome", "reason")["served", "served"] == 3


def test_campaign_label_values_are_bounded(registry: CollectorRegistry) -> None:
    observer = enable_metrics(campaign_label=True, registry=registry, max_campaigns=2)
    for campaign in ("a", "b", "c", "d", "a"):
        observer.decision("served", "served", campaign)
    assert samples(registry, "xsp_decisions_total", "outcome", "reason", "campaign") == {
        ("served", "served", "a"): 2,
        ("served", "served", "b"): 1,
        ("served", "served", "__other__"): 2,
    }


# -- enabling ----------------------------------------------------------------------------------


def test_enable_metrics_is_idempotent_per_registry(registry: CollectorRegistry) -> None:
    observer = enable_metrics(registry=registry)
    assert isinstance(observer, PrometheusObserver)
    assert observe.current is observer
    observe.install(None)
    assert enable_metrics(registry=registry) is observer
    assert observe.current is observer
    with pytest.raises(ConfigError, match="campaign_label"):
        enable_metrics(campaign_label=True, registry=registry)
    other = enable_metrics(campaign_label=True, registry=CollectorRegistry())
    assert other is not observer and observe.current is other  # one observer per process
    with pytest.raises(ConfigError):
        enable_metrics(campaign_label="yes", registry=CollectorRegistry())  # type: ignore[arg-type]


def test_a_registry_with_foreign_xsp_metrics_is_refused_cleanly(
    registry: CollectorRegistry,
) -> None:
    PromCounter("xsp_reservations_released", "not ours", registry=registry)
    with pytest.raises(ConfigError, match="another registry"):
        enable_metrics(registry=registry)
    names = {m.name for m in registry.collect()}
    assert names == {"xsp_reservations_released"}  # nothing half-registered
    assert observe.current is None


def test_importing_without_prometheus_client_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib

    monkeypatch.delitem(sys.modules, "xsp_middleware.metrics")
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r"xsp-middleware\[metrics\]") as caught:
        importlib.import_module("xsp_middleware.metrics")
    assert isinstance(caught.value, ConfigError)
    assert type(caught.value).__name__ == MetricsUnavailable.__name__  # a re-imported class


async def test_a_failing_metric_never_breaks_a_request(
    redis_url: str,
    build: Any,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    observer = enable_metrics(registry=registry)

    class Broken:
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError("metrics backend down")

    for name in (
        "decisions",
        "store_latency",
        "store_errors",
        "degraded_decisions",
        "circuit_open",
        "reservations_released",
    ):
        setattr(observer, name, Broken())
    observer.store_error("timeout")
    observer.degraded("budget")
    observer.circuit(True)
    app = build(redis_url=redis_url)
    async with client(app) as c:
        assert (await c.get("/ad?campaign_id=c1", headers={"cookie": "user_id=u"})).text
        assert (await c.get("/status/503?campaign_id=c1")).status_code == 503
        assert (await c.get("/ad?campaign_id=c1&cpm=x")).status_code == 400
    failed = [r for r in caplog.records if "metrics failed" in r.getMessage()]
    assert {r.getMessage().split(" on ")[1].split()[0] for r in failed} == {
        "decision",
        "store_call",
        "store_error",
        "degraded",
        "circuit",
        "released",
    }


# -- serving /metrics --------------------------------------------------------------------------


async def test_mount_metrics_on_starlette(redis_url: str, registry: CollectorRegistry) -> None:
    async def ad(request: Request) -> Response:
        return Response("ad")

    enable_metrics(registry=registry)
    starlette = Starlette(routes=[Route("/ad", ad)])
    route = mount_metrics(starlette, registry=registry)
    assert mount_metrics(starlette, registry=registry) is route  # once
    app = XSPMiddleware(starlette, redis_url=redis_url, secret_key=SECRET)
    try:
        async with client(app) as c:
            assert (await c.get("/ad?campaign_id=c1")).status_code == 200
            r = await c.get("/metrics")
            head = await c.head("/metrics")
            post = await c.post("/metrics")
            slash = await c.get("/metrics/")
    finally:
        await app.store.aclose()
    assert r.status_code == 200
    assert r.headers["content-type"] == CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    assert 'xsp_decisions_total{outcome="served",reason="served"} 1.0' in r.text
    assert "xsp_store_latency_seconds_count 1.0" in r.text
    assert "# TYPE xsp_circuit_open gauge" in r.text
    assert (head.status_code, head.content) == (200, b"")
    assert post.status_code == 405
    assert slash.status_code in (307, 404)  # exactly /metrics; no catch-all mount


async def test_mount_metrics_on_fastapi(redis_url: str, registry: CollectorRegistry) -> None:
    from fastapi import FastAPI

    enable_metrics(registry=registry)
    api = FastAPI()

    @api.get("/ad")
    async def ad() -> dict[str, str]:
        return {"ad": "yes"}

    api.add_middleware(XSPMiddleware, redis_url=redis_url, secret_key=SECRET)
    mount_metrics(api, registry=registry)
    async with client(api) as c:
        assert (await c.get("/ad?campaign_id=c1")).status_code == 200
        r = await c.get("/metrics")
        schema = (await c.get("/openapi.json")).json()
    assert r.status_code == 200
    assert r.headers["content-type"] == CONTENT_TYPE
    assert 'xsp_decisions_total{outcome="served",reason="served"} 1.0' in r.text
    assert "/metrics" not in schema["paths"] and "/ad" in schema["paths"]


def test_mount_metrics_refuses_what_is_not_a_starlette_app() -> None:
    with pytest.raises(ConfigError, match="not a Starlette or FastAPI app"):
        mount_metrics(object())
    with pytest.raises(ConfigError, match="must start with"):
        mount_metrics(Starlette(), path="metrics")


async def test_metrics_app_is_plain_asgi(registry: CollectorRegistry) -> None:
    enable_metrics(registry=registry).released("late_reply")
    transport = httpx.ASGITransport(app=metrics_app(registry))
    async with httpx.AsyncClient(transport=transport, base_url="http://metrics") as c:
        r = await c.get("/anything")
    assert r.headers["content-type"] == CONTENT_TYPE
    assert 'xsp_reservations_released_total{why="late_reply"} 1.0' in r.text


def test_the_module_docstring_example_runs() -> None:
    import xsp_middleware.metrics as module

    try:
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    finally:
        observe.install(None)
    assert result.attempted > 10 and result.failed == 0


# -- multiprocess mode -------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import asyncio, sys
    import httpx
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route
    from xsp_middleware import XSPMiddleware
    from xsp_middleware.metrics import enable_metrics, metrics_app

    redis_url, first, last, scrape = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

    async def ad(request):
        return Response("ad")

    def client(app):
        transport = httpx.ASGITransport(app=app)
        return httpx.AsyncClient(transport=transport, base_url="http://w")

    async def main():
        enable_metrics()  # prometheus_client's default REGISTRY
        app = XSPMiddleware(
            Starlette(routes=[Route("/ad", ad)]),
            redis_url=redis_url, secret_key="test-secret-key-0123456789", default_caps=["1/1h"],
        )
        async with client(app) as c:
            for user in range(first, last):
                for _ in range(2):  # served, then frequency_capped
                    await c.get("/ad?campaign_id=mp", headers={"cookie": f"user_id=u{user}"})
        await app.store.aclose()
        if scrape == "scrape":
            async with client(metrics_app()) as c:
                r = await c.get("/metrics")
            print(r.headers["content-type"])
            print(r.text)

    asyncio.run(main())
    """
)


def parse(text: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, number = line.rpartition(" ")
            found[name] = float(number)
    return found


async def test_multiprocess_mode_merges_every_process(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }

    def worker(first: int, last: int, scrape: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", WORKER, redis_url, str(first), str(last), scrape],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    worker(0, 3, "-")  # 3 served, 3 capped
    output = worker(3, 5, "scrape")  # 2 served, 2 capped, then scrape both processes' files
    content_type, _, text = output.partition("\n")
    assert content_type == CONTENT_TYPE
    merged = parse(text)
    assert merged['xsp_decisions_total{outcome="served",reason="served"}'] == 5
    assert merged['xsp_decisions_total{outcome="denied",reason="frequency_capped"}'] == 5
    assert merged["xsp_store_latency_seconds_count"] == 10
    assert merged["xsp_circuit_open"] == 0  # livemax: one series, no pid label
    assert not any(name.startswith("xsp_circuit_open{") for name in merged)
    assert len(list(directory.glob("*.db"))) >= 4  # counters, histogram, gauge of each process

    # Any process serving metrics_app() merges the same files.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    async with client(metrics_app()) as c:
        here = parse((await c.get("/metrics")).text)
    assert here == merged
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "missing"))
    async with client(metrics_app()) as c:
        assert (await c.get("/metrics")).status_code == 500  # logged, never raised
