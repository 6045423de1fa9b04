"""Overhead of xsp-middleware in each framework, against that framework's bare app, in one run.

For each framework the same ad endpoint runs twice: bare, and guarded (caps and budget on, real
Redis, a distinct user per request so nothing is capped). Each variant is driven in-process with
no HTTP server: ASGI apps by 64 concurrent coroutines on one event loop, WSGI apps by 8 threads
(like a threaded WSGI server) calling the WSGI callable. Rounds interleave the variants, and the
figures are medians over rounds, reported as guarded/bare ratios.

The WSGI rows also check that the sync path never creates an event loop per request: the
guarded WSGI runs count every new event loop, and any is reported.

    python benchmarks/frameworks.py                 # throwaway redis-server on a free port
    python benchmarks/frameworks.py --seconds 3 --rounds 3 --json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from overhead import drive, request_once  # noqa: E402

from xsp_middleware.demo import vast_xml  # noqa: E402

SECRET = "bench-secret-key-0123456789"
BUDGET = "900000000.00"
WSGI_THREADS = 8
CAMPAIGNS = 10


# -- apps ---------------------------------------------------------------------------------------


def starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def ad(request: Request) -> Response:
        return Response(
            vast_xml(request.query_params["campaign_id"], "2.50"), media_type="application/xml"
        )

    return Starlette(routes=[Route("/ad", ad)])


def fastapi_app(guarded_url: str | None) -> Any:
    from fastapi import FastAPI, Response

    from xsp_middleware import XSPMiddleware

    app = FastAPI()
    if guarded_url is not None:
        app.add_middleware(
            XSPMiddleware, redis_url=guarded_url, secret_key=SECRET, default_budget=BUDGET
        )

    @app.get("/ad")
    async def ad(campaign_id: str) -> Response:
        return Response(vast_xml(campaign_id, "2.50"), media_type="application/xml")

    return app


def flask_app(guarded_url: str | None) -> Any:
    from flask import Flask, Response, request

    from xsp_middleware.wsgi import XSPWSGIMiddleware

    app = Flask(f"bench-{guarded_url is not None}")

    @app.get("/ad")
    def ad() -> Response:
        return Response(
            vast_xml(request.args["campaign_id"], "2.50"), content_type="application/xml"
        )

    if guarded_url is not None:
        app.wsgi_app = XSPWSGIMiddleware(  # type: ignore[method-assign]
            app.wsgi_app, redis_url=guarded_url, secret_key=SECRET, default_budget=BUDGET
        )
    return app


def django_handlers(redis_url: str) -> tuple[Any, Any, Any, Any]:
    """(bare WSGI, guarded WSGI, bare ASGI, guarded ASGI) handlers of one Django ad view."""
    import types

    import django
    from django.conf import settings
    from django.http import HttpResponse
    from django.test.utils import override_settings
    from django.urls import path

    def ad(request: Any) -> HttpResponse:
        return HttpResponse(
            vast_xml(request.GET["campaign_id"], "2.50"), content_type="application/xml"
        )

    urls = types.ModuleType("xsp_bench_urls")
    urls.urlpatterns = [path("ad", ad)]  # type: ignore[attr-defined]
    sys.modules["xsp_bench_urls"] = urls
    settings.configure(
        DEBUG=False,
        SECRET_KEY="bench",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF="xsp_bench_urls",
        MIDDLEWARE=[],
        DATABASES={},
        XSP_MIDDLEWARE={"REDIS_URL": redis_url, "SECRET_KEY": SECRET, "DEFAULT_BUDGET": BUDGET},
    )
    django.setup()
    from django.core.handlers.asgi import ASGIHandler
    from django.core.handlers.wsgi import WSGIHandler

    bare_wsgi, bare_asgi = WSGIHandler(), ASGIHandler()
    with override_settings(MIDDLEWARE=["xsp_middleware.django.XSPMiddleware"]):
        guarded_wsgi, guarded_asgi = WSGIHandler(), ASGIHandler()
    return bare_wsgi, guarded_wsgi, bare_asgi, guarded_asgi


# -- WSGI driving -------------------------------------------------------------------------------


def wsgi_environ(n: int) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/ad",
        "QUERY_STRING": f"campaign_id=c{n % CAMPAIGNS}&cpm=2.50",
        "SERVER_NAME": "bench",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "bench",
        "HTTP_COOKIE": f"user_id=u{n}",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": None,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }


def drive_wsgi(app: Callable[..., Any], seconds: float, users: itertools.count[int]) -> float:
    """Requests/s of ``WSGI_THREADS`` threads calling ``app`` back to back; only 200s count."""
    import io

    ok = [0] * WSGI_THREADS
    deadline = time.perf_counter() + seconds
    lock = threading.Lock()

    def worker(i: int) -> None:
        while time.perf_counter() < deadline:
            with lock:
                n = next(users)
            environ = wsgi_environ(n)
            environ["wsgi.input"] = io.BytesIO(b"")
            status: list[str] = []

            def start_response(
                s: str, headers: Any, exc_info: Any = None, status: list[str] = status
            ) -> Any:
                status.append(s)
                return lambda data: None

            body = app(environ, start_response)
            try:
                for _ in body:
                    pass
            finally:
                close = getattr(body, "close", None)
                if close is not None:
                    close()
            if status and status[0].startswith("200"):
                ok[i] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(WSGI_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(ok) / (time.perf_counter() - started)


class LoopCounter:
    """Counts event loops created while active (the sync path must create none per request)."""

    def __init__(self) -> None:
        self.count = 0
        self._original = asyncio.new_event_loop

    def __enter__(self) -> LoopCounter:
        def counting() -> asyncio.AbstractEventLoop:
            self.count += 1
            return self._original()

        asyncio.new_event_loop = counting  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.new_event_loop = self._original  # type: ignore[assignment]


# -- the run ------------------------------------------------------------------------------------


def run(args: argparse.Namespace, redis_url: str) -> dict[str, Any]:
    from xsp_middleware import XSPMiddleware

    users = itertools.count()
    django_wsgi_bare, django_wsgi, django_asgi_bare, django_asgi = django_handlers(redis_url)
    asgi: dict[str, tuple[Any, Any]] = {
        "starlette": (
            starlette_app(),
            XSPMiddleware(
                starlette_app(), redis_url=redis_url, secret_key=SECRET, default_budget=BUDGET
            ),
        ),
        "fastapi": (fastapi_app(None), fastapi_app(redis_url)),
        "django-asgi": (django_asgi_bare, django_asgi),
    }
    wsgi: dict[str, tuple[Any, Any]] = {
        "flask": (flask_app(None), flask_app(redis_url)),
        "django-wsgi": (django_wsgi_bare, django_wsgi),
    }
    results: dict[str, dict[str, list[float]]] = {
        name: {"bare": [], "guarded": []} for name in [*asgi, *wsgi]
    }
    loops_created = 0

    async def asgi_round() -> None:
        for name, (bare, guarded) in asgi.items():
            receive = request_once if name.startswith("django") else None
            for variant, app in (("bare", bare), ("guarded", guarded)):
                await drive(app, 0.3, users, receive)
                phase = await drive(app, args.seconds, users, receive)
                results[name][variant].append(phase.ok / phase.elapsed)

    for _ in range(args.rounds):
        asyncio.run(asgi_round())
        for name, (bare, guarded) in wsgi.items():
            results[name]["bare"].append(drive_wsgi(bare, args.seconds, users))
            with LoopCounter() as loops:
                results[name]["guarded"].append(drive_wsgi(guarded, args.seconds, users))
            loops_created += loops.count
    report = {
        name: {
            "bare": statistics.median(r["bare"]),
            "guarded": statistics.median(r["guarded"]),
            "ratio": statistics.median(g / b for g, b in zip(r["guarded"], r["bare"], strict=True)),
        }
        for name, r in results.items()
    }
    return {"frameworks": report, "wsgi_event_loops_created": loops_created}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis-url", help="use this Redis (its database is flushed)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    server = None
    redis_url = args.redis_url
    if redis_url is None:
        sys.path.insert(0, str(HERE.parent / "tests"))
        from redis_server import RedisServer

        server = RedisServer()
        redis_url = server.url
    try:
        report = run(args, redis_url)
    finally:
        if server is not None:
            server.stop()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"median of {args.rounds} rounds x {args.seconds} s; guarded = caps + budget on real Redis"
    )
    print(f"{'framework':<14}{'bare req/s':>12}{'guarded req/s':>15}{'guarded/bare':>14}")
    for name, row in report["frameworks"].items():
        print(f"{name:<14}{row['bare']:>12.0f}{row['guarded']:>15.0f}{row['ratio']:>13.2f}x")
    print(f"event loops created by the WSGI sync path: {report['wsgi_event_loops_created']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
