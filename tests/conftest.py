"""Fixtures: a real throwaway redis-server (session-wide) and the embedded store.

With ``XSP_REQUIRE_REDIS=1`` (CI), a test that needs Redis fails when none can be started;
otherwise it is skipped.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis_server import RedisServer
from redis_topologies import RedisClusterNodes, RedisSentinelSetup
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from xsp_middleware import XSPMiddleware

REQUIRE_REDIS = os.environ.get("XSP_REQUIRE_REDIS") == "1"
SECRET = "test-secret-key-0123456789"


def _no_redis(why: str) -> None:
    if REQUIRE_REDIS:
        pytest.fail(f"XSP_REQUIRE_REDIS=1 but no Redis could be started: {why}")
    pytest.skip(f"no Redis available: {why}")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    try:
        server = RedisServer()
    except (RuntimeError, OSError) as exc:
        _no_redis(str(exc))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if not redis_server.ping():  # a test may have killed it
        redis_server.start()
    redis_server.command("FLUSHALL")
    return redis_server.url


# A cluster and a Sentinel setup take a few seconds to become writable (Redis's own delays):
# they start when the session starts, in the background of the first tests, and only tests
# that ask for them wait.
_topologies: dict[str, Any] = {}


def _start(kind: str) -> Any:
    if kind not in _topologies:
        try:
            _topologies[kind] = RedisClusterNodes() if kind == "cluster" else RedisSentinelSetup()
        except (RuntimeError, OSError) as exc:
            _topologies[kind] = exc
    return _topologies[kind]


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get("XSP_NO_TOPOLOGIES") != "1":
        _start("cluster")
        _start("sentinel")


def pytest_sessionfinish(session: pytest.Session) -> None:
    for topology in _topologies.values():
        if not isinstance(topology, BaseException):
            topology.stop()


def _topology(kind: str) -> Any:
    topology = _start(kind)
    if isinstance(topology, BaseException):
        _no_redis(f"the {kind} setup could not start: {topology}")
    if getattr(topology, "ready_seconds", None) is None:
        try:
            topology.wait_ready()
        except (RuntimeError, OSError) as exc:
            _no_redis(f"the {kind} setup did not get ready: {exc}")
    return topology


@pytest.fixture
def cluster() -> RedisClusterNodes:
    """The session's 3-master Redis Cluster, flushed, every master alive."""
    nodes: RedisClusterNodes = _topology("cluster")
    for index in range(len(nodes.nodes)):
        if not nodes.alive(index):  # a test killed it
            nodes.restart(index)
    nodes.flushall()
    return nodes


@pytest.fixture
def cluster_url(cluster: RedisClusterNodes) -> str:
    return cluster.url


@pytest.fixture
def sentinel() -> RedisSentinelSetup:
    """The session's Sentinel setup (master, replica, sentinel), flushed."""
    setup: RedisSentinelSetup = _topology("sentinel")
    setup.flushall()
    return setup


@pytest.fixture(params=["redis", "memory", "cluster", "sentinel"])
def store_url(request: pytest.FixtureRequest) -> str:
    """Every behavioural test runs on real Redis, on the embedded store (same Lua), on a
    3-master Redis Cluster (the per-slot halves) and through Sentinel."""
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url"))
    if request.param == "cluster":
        return str(request.getfixturevalue("cluster_url"))
    if request.param == "sentinel":
        return str(request.getfixturevalue("sentinel").url)
    return f"memory://{uuid.uuid4().hex}"


VAST = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<VAST version="4.2"><Ad id="a1"><InLine>'
    "<AdSystem>xsp</AdSystem><AdTitle>test</AdTitle></InLine></Ad></VAST>"
)
STREAM_CHUNKS = [b"chunk-%d;" % i for i in range(50)]


async def ad(request: Request) -> Response:
    return Response(VAST, media_type="application/xml")


async def status_route(request: Request) -> Response:
    return PlainTextResponse("status", status_code=int(request.path_params["code"]))


async def boom(request: Request) -> Response:
    raise RuntimeError("handler failed")


async def stream(request: Request) -> Response:
    async def body() -> AsyncIterator[bytes]:
        for chunk in STREAM_CHUNKS:
            yield chunk

    return StreamingResponse(body(), media_type="application/octet-stream")


async def stream_fails(request: Request) -> Response:
    async def body() -> AsyncIterator[bytes]:
        yield STREAM_CHUNKS[0]
        raise RuntimeError("stream died")

    return StreamingResponse(body())


async def slow_stream(request: Request) -> Response:
    async def body() -> AsyncIterator[bytes]:
        yield STREAM_CHUNKS[0]
        await asyncio.sleep(5)
        yield STREAM_CHUNKS[1]

    return StreamingResponse(body())


def file_route(path: Path) -> Callable[[Request], Any]:
    async def serve(request: Request) -> Response:
        return FileResponse(path)

    return serve


async def decision(request: Request) -> Response:
    d = request.state.xsp
    return Response(
        f"{d.allowed}|{d.reason}|{d.campaign_id}|{d.cost}|{d.remaining_impressions}|"
        f"{d.remaining_budget}|{d.anonymous}|{d.degraded}",
        media_type="text/plain",
    )


async def other(request: Request) -> Response:
    return PlainTextResponse("other")


@pytest.fixture(scope="session")
def payload_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("files") / "creative.bin"
    path.write_bytes(os.urandom(256 * 1024))
    return path


@pytest.fixture
def make_app(payload_file: Path) -> Callable[..., XSPMiddleware]:
    """Build the test ad server under XSPMiddleware with the given settings."""

    def build(**settings: Any) -> XSPMiddleware:
        routes = [
            Route("/ad", ad),
            Route("/decision", decision),
            Route("/status/{code:int}", status_route),
            Route("/boom", boom),
            Route("/stream", stream),
            Route("/stream-fails", stream_fails),
            Route("/slow-stream", slow_stream),
            Route("/file", file_route(payload_file)),
            Route("/other", other),
        ]
        settings.setdefault("secret_key", SECRET)
        if os.environ.get("XSP_TEST_LEASING") == "1":
            # The exactness suites again, with every campaign's budget spent from leases.
            settings.setdefault("leasing", True)
        return XSPMiddleware(Starlette(routes=routes), **settings)

    return build


def client(app: Any, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://testserver",
        **kwargs,
    )


def as_user(user_id: str) -> dict[str, str]:
    """Request headers carrying the user cookie."""
    return {"cookie": f"user_id={user_id}"}
