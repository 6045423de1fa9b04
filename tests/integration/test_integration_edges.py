"""Edges of the integrations found in review: mounts, late routes, HEAD, outer middleware that
fails to send, nesting, Flask under other WSGI middleware, a slow store under WSGI."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from conftest import SECRET, as_user, client
from flask import Flask, request
from redis_server import RedisServer, free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route, Router
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.test import Client

from xsp_middleware import XSPMiddleware, ad_route
from xsp_middleware.flask import ad_route as flask_ad_route
from xsp_middleware.wsgi import XSPWSGIMiddleware


def _recorded(redis_url: str, campaign: str) -> tuple[int, int]:
    state = redis.Redis.from_url(redis_url).hgetall(f"xsp:c:{{{campaign}}}:st")
    return int(state.get(b"spent", 0)), int(state.get(b"impressions", 0))


async def plain_asgi(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"legacy"})


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


async def test_a_mounted_app_without_a_router_is_guarded_by_the_core_rule(redis_url: str) -> None:
    app = XSPMiddleware(
        Starlette(routes=[Route("/ok", ok), Mount("/legacy", app=plain_asgi)]),
        redis_url=redis_url,
        secret_key=SECRET,
        default_caps=["1/1h"],
    )
    async with client(app) as c:
        codes = [
            (await c.get("/legacy/ad?campaign_id=m1", headers=as_user("u1"))).status_code
            for _ in range(2)
        ]
    assert codes == [200, 204]


async def test_routes_added_later_to_a_mounted_router_are_guarded(redis_url: str) -> None:
    sub = Router()
    app = XSPMiddleware(
        Starlette(routes=[Route("/ok", ok), Mount("/sub", app=sub)]),
        redis_url=redis_url,
        secret_key=SECRET,
        default_caps=["1/1h"],
    )
    async with client(app) as c:
        await c.get("/ok")
        sub.routes.append(Route("/late", ad_route()(ok)))
        codes = [
            (await c.get("/sub/late?campaign_id=l1", headers=as_user("u1"))).status_code
            for _ in range(2)
        ]
    assert codes == [200, 204]


async def test_head_requests_never_reserve(redis_url: str) -> None:
    app = XSPMiddleware(
        Starlette(routes=[Route("/ad", ad_route()(ok))]), redis_url=redis_url, secret_key=SECRET
    )
    async with client(app) as c:
        for _ in range(3):
            await c.head("/ad?campaign_id=h1", headers=as_user("u1"))
    assert _recorded(redis_url, "h1") == (0, 0)


async def test_a_response_an_outer_middleware_fails_to_send_is_released(redis_url: str) -> None:
    class Buffering:
        """Holds the response back, then fails to send it (the client went away)."""

        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            held: list[Any] = []

            async def hold(message: Any) -> None:
                held.append(message)

            await self.app(scope, receive, hold)
            if scope["type"] == "http":
                raise OSError("client disconnected")

    starlette = Starlette(routes=[Route("/ad", ok)])
    app = XSPMiddleware(Buffering(starlette.router), redis_url=redis_url, secret_key=SECRET)
    async with client(app) as c:
        await c.get("/ad?campaign_id=b1", headers=as_user("u1"))
    spent, impressions = _recorded(redis_url, "b1")
    assert (spent, impressions) == (0, 0)


async def test_nested_middlewares_decide_a_request_once(redis_url: str) -> None:
    inner = XSPMiddleware(
        Starlette(routes=[Route("/ad", ok)]), redis_url=redis_url, secret_key=SECRET
    )
    outer = XSPMiddleware(
        Starlette(routes=[Mount("/", app=inner)]), redis_url=redis_url, secret_key=SECRET
    )
    async with client(outer) as c:
        assert (await c.get("/ad?campaign_id=n1", headers=as_user("u1"))).status_code == 200
    assert _recorded(redis_url, "n1")[1] == 1


def _flask(redis_url: str, *, proxied: bool = False, twice: bool = False) -> Flask:
    app = Flask(__name__)

    @app.get("/fixed")
    @flask_ad_route(campaign="fx", caps=["1/1d"])
    def fixed() -> str:
        return "ok"

    @app.get("/ad")
    def ad() -> str:
        return "ok" if "xsp.decision" in request.environ else "plain"

    wsgi: Any = app.wsgi_app
    if proxied:
        wsgi = ProxyFix(wsgi)
    wsgi = XSPWSGIMiddleware(wsgi, redis_url=redis_url, secret_key=SECRET)
    if twice:
        wsgi = XSPWSGIMiddleware(wsgi, redis_url=redis_url, secret_key=SECRET)
    app.wsgi_app = wsgi  # type: ignore[method-assign]
    return app


def test_flask_under_other_wsgi_middleware_still_applies_route_rules(redis_url: str) -> None:
    c = _flask(redis_url, proxied=True).test_client()
    c.set_cookie("user_id", "u1")  # the test client's cookie jar owns the Cookie header
    codes = [c.get("/fixed").status_code for _ in range(2)]
    assert codes == [200, 204]


def test_flask_wrapped_twice_decides_once(redis_url: str) -> None:
    c = _flask(redis_url, twice=True).test_client()
    assert c.get("/ad?campaign_id=w2", headers=as_user("u1")).text == "ok"
    assert _recorded(redis_url, "w2")[1] == 1


def test_wsgi_head_requests_never_reserve(redis_url: str) -> None:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ad"]

    c = Client(XSPWSGIMiddleware(app, redis_url=redis_url, secret_key=SECRET))
    for _ in range(3):
        c.head("/ad?campaign_id=wh", headers=as_user("u1"))
    assert _recorded(redis_url, "wh") == (0, 0)


@pytest.fixture
def slow_proxy(redis_server: RedisServer) -> Iterator[str]:
    """Forwards to Redis, delaying every reply by 0.3 s (a latency spike)."""
    port = free_port()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen()

    def pipe(src: socket.socket, dst: socket.socket, delay: float) -> None:
        try:
            while data := src.recv(65536):
                time.sleep(delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            src.close()
            dst.close()

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", redis_server.port))
            threading.Thread(target=pipe, args=(conn, upstream, 0), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, conn, 0.3), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"redis://127.0.0.1:{port}/0"
    listener.close()


def test_a_late_reservation_under_wsgi_is_released(redis_url: str, slow_proxy: str) -> None:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ad"]

    warm = Client(XSPWSGIMiddleware(app, redis_url=redis_url, secret_key=SECRET))
    warm.get("/ad?campaign_id=warm")  # loads the scripts on the server
    slow = Client(XSPWSGIMiddleware(app, redis_url=slow_proxy, secret_key=SECRET))
    r = slow.get("/ad?campaign_id=late", headers=as_user("u1"))
    assert (r.status_code, r.headers["x-xsp-decision"]) == (204, "store_unavailable")
    deadline = time.monotonic() + 5
    while _recorded(redis_url, "late") != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _recorded(redis_url, "late") == (0, 0)  # the late reply was read and released


def test_wsgi_debug_headers_are_opt_in(redis_url: str) -> None:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ad"]

    quiet = Client(XSPWSGIMiddleware(app, redis_url=redis_url, secret_key=SECRET))
    assert "Server-Timing" not in quiet.get("/ad?campaign_id=dq", headers=as_user("u1")).headers
    loud = Client(
        XSPWSGIMiddleware(app, redis_url=redis_url, secret_key=SECRET, debug_headers=True),
        use_cookies=False,  # so the explicit Cookie header is what arrives
    )
    r = loud.get("/ad?campaign_id=dl", headers=as_user("u1"))
    assert r.headers["Server-Timing"].startswith("xsp;dur=")
    assert r.headers["X-XSP-Remaining-Impressions"] == "2"
