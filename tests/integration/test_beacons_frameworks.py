"""Count on render, signed prices and VAST no-fills in every integration, on a real Redis,
driven as a user would: Starlette and FastAPI (ASGI, httpx), a plain WSGI app and Flask
(werkzeug's test client), and Django under WSGI and ASGI (Django's test clients, through the
``Site`` harness of test_django.py).

Each integration runs a handler that puts ``Decision.impression_url`` in its body, where a VAST
``<Impression>`` would go; the test then fetches that absolute URL through the same app, as a
player would. Settings are the defaults a user gets, but for the one under test.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from conftest import SECRET, client
from django.http import HttpResponse
from django.urls import path
from fastapi import FastAPI
from flask import Flask
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from test_django import Site, _no_xsp_environment, made  # noqa: F401 - fixtures, used by name
from werkzeug.test import Client

from xsp_middleware import Settings, XSPMiddleware, sign_price
from xsp_middleware.settings import Rules
from xsp_middleware.store import Store
from xsp_middleware.wsgi import XSPWSGIMiddleware

KINDS = ["starlette", "fastapi", "wsgi", "flask", "django-wsgi", "django-asgi"]
PRICE_KEY = "frameworks-price-key-0123456789"
AD = "/ad?campaign_id=c1&cpm=2.00"
PRICE_UNITS = 20_000  # one impression at a CPM of 2.00, in units of 10**-7


# -- the handlers: each puts the impression URL where a VAST <Impression> would go ------------


def ad_body(decision: Any) -> str:
    assert decision is not None and decision.allowed, decision
    return decision.impression_url or "no-impression-url"


async def starlette_ad(request: Request) -> Response:
    return PlainTextResponse(ad_body(request.state.xsp))


def fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.get("/ad")
    async def ad(request: Request) -> Response:
        return PlainTextResponse(ad_body(request.state.xsp))

    return app


def plain_wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ["PATH_INFO"] != "/ad":
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [ad_body(environ.get("xsp.decision")).encode()]


def flask_app() -> Flask:
    app = Flask("xsp_beacons_frameworks")

    @app.get("/ad")
    def ad() -> str:
        from flask import request

        return ad_body(request.environ.get("xsp.decision"))

    return app


def django_ad(request: Any) -> HttpResponse:
    return HttpResponse(ad_body(getattr(request, "xsp", None)), content_type="text/plain")


urlpatterns = [path("ad", django_ad)]  # Site.start(urlconf=__name__)


# -- one integration, driven over its own test client -----------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def problem_field(self) -> str:
        assert self.status == 400, self
        assert self.headers["content-type"] == "application/problem+json"
        field: str = json.loads(self.body)["field"]
        return field


class Served:
    """An app under one integration's middleware. ``host`` is what its client sends."""

    host = "testserver"

    def __init__(self, kind: str) -> None:
        self.kind = kind

    async def get(self, url: str, user: str | None = "u1", accept: str | None = None) -> Reply:
        headers = {"cookie": f"user_id={user}"} if user else {}
        if accept is not None:
            headers["accept"] = accept
        reply = await self.fetch(url, headers)
        assert reply.status < 500, (self.kind, url, reply)  # never a 500
        return reply

    async def fetch(self, url: str, headers: dict[str, str]) -> Reply:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


class ASGIServed(Served):
    def __init__(self, kind: str, app: Any) -> None:
        super().__init__(kind)
        self.app = app
        self.client = client(app)  # conftest's: http://testserver

    async def fetch(self, url: str, headers: dict[str, str]) -> Reply:
        r = await self.client.get(url, headers=headers)
        return Reply(r.status_code, dict(r.headers), r.content)

    async def aclose(self) -> None:
        await self.client.aclose()
        mw = _xsp_of(self.app)
        if mw is not None:
            await mw.store.aclose()


def _xsp_of(app: Any) -> XSPMiddleware | None:
    """The XSPMiddleware in an ASGI app's middleware chain (FastAPI builds it lazily)."""
    app = getattr(app, "middleware_stack", None) or app
    for _ in range(16):
        if isinstance(app, XSPMiddleware):
            return app
        app = getattr(app, "app", None)
    return None


class WSGIServed(Served):
    host = "localhost"  # werkzeug's test client

    def __init__(self, kind: str, wsgi: Any, mw: XSPWSGIMiddleware) -> None:
        super().__init__(kind)
        self.mw = mw
        self.client = Client(wsgi, use_cookies=False)

    async def fetch(self, url: str, headers: dict[str, str]) -> Reply:
        # A WSGI server calls the app from a worker thread, and reads the whole body.
        r = await asyncio.to_thread(self.client.get, url, headers=headers, buffered=True)
        return Reply(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.data)

    async def aclose(self) -> None:
        self.mw.guard.sync_store.client.close()
        await self.mw.store.aclose()


class DjangoServed(Served):
    def __init__(self, kind: str, site: Site) -> None:
        super().__init__(kind)
        self.site = site

    async def fetch(self, url: str, headers: dict[str, str]) -> Reply:
        site = self.site
        if site.mode == "wsgi":
            response = await asyncio.to_thread(site.client.get, url, headers=headers)
        else:
            response = await site.client.get(url, headers=headers)
        body = await site.body(response)
        return Reply(
            response.status_code, {k.lower(): v for k, v in response.headers.items()}, body
        )

    async def aclose(self) -> None:
        await self.site.aclose()


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[Store]:
    """The store's admin API, as an operator's process would use it."""
    store = Store(Rules.from_settings(Settings(redis_url=redis_url, secret_key=SECRET)))
    yield store
    await store.aclose()


@pytest.fixture
async def serve(
    kind: str,
    redis_url: str,
    made: list[Any],  # noqa: F811 - test_django's fixture
) -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    """``await serve(record_on="beacon")``: the ``kind`` integration with those settings."""
    built: list[Served] = []

    async def build(**settings: Any) -> Served:
        served: Served
        options = {"redis_url": redis_url, "secret_key": SECRET, **settings}
        if kind == "starlette":
            served = ASGIServed(
                kind, XSPMiddleware(Starlette(routes=[Route("/ad", starlette_ad)]), **options)
            )
        elif kind == "fastapi":
            app = fastapi_app()
            app.add_middleware(XSPMiddleware, **options)  # as examples/fastapi_app.py does
            served = ASGIServed(kind, app)
        elif kind == "wsgi":
            mw = XSPWSGIMiddleware(plain_wsgi_app, **options)
            served = WSGIServed(kind, mw, mw)
        elif kind == "flask":
            flask = flask_app()
            flask.wsgi_app = mw = XSPWSGIMiddleware(flask.wsgi_app, **options)  # type: ignore[method-assign]
            served = WSGIServed(kind, flask, mw)
        else:
            site = Site(kind.removeprefix("django-"), redis_url, made)
            conf = {name.upper(): value for name, value in options.items()}  # XSP_MIDDLEWARE
            site.start(urlconf=__name__, conf=conf)
            served = DjangoServed(kind, site)
        built.append(served)
        return served

    yield build
    for served in built:
        await served.aclose()


# -- record_on="beacon" -----------------------------------------------------------------------


def forged(url: str) -> str:
    """The URL with the last characters of its token's MAC changed."""
    return url[:-3] + ("BBB" if url.endswith("AAA") else "AAA")


async def test_an_impression_counts_when_its_url_is_fetched_through_the_same_app(
    serve: Callable[..., Awaitable[Served]], admin: Store
) -> None:
    app = await serve(record_on="beacon")
    ad = await app.get(AD)
    assert ad.status == 200
    url = ad.text
    parts = urlsplit(url)
    # The request's own origin (Django's WSGI test client sends no Host header: the URL is
    # built from SERVER_NAME and SERVER_PORT, "testserver:80", the same origin).
    origin = (parts.scheme, parts.hostname, parts.port or 80)
    assert (*origin, parts.path) == ("http", app.host, 80, "/xsp/impression"), url
    assert list(parse_qs(parts.query)) == ["t"]

    view = await admin.get_campaign("c1")
    assert (view.impressions, view.pending, view.pending_units) == (0, 1, PRICE_UNITS)
    assert view.spent_units == 0  # sending the ad counted nothing

    first = await app.get(url)
    assert first.status == 204 and first.body == b""
    assert "x-xsp-beacon" not in first.headers
    view = await admin.get_campaign("c1")
    assert (view.impressions, view.pending, view.spent_units) == (1, 0, PRICE_UNITS)

    again = await app.get(url, user=None)  # fired twice (here without the cookie): counted once
    assert again.status == 204 and "x-xsp-beacon" not in again.headers
    pixel = await app.get(url, accept="image/*")
    assert pixel.status == 200
    assert pixel.headers["content-type"] == "image/gif"
    assert pixel.body.startswith(b"GIF89a") and "x-xsp-beacon" not in pixel.headers
    assert (await admin.get_campaign("c1")).impressions == 1

    for junk in ("/xsp/impression?t=garbage", "/xsp/impression", forged(url)):
        rejected = await app.get(junk)
        assert rejected.status == 204 and rejected.body == b"", junk
        assert rejected.headers["x-xsp-beacon"] == "rejected", junk
    view = await admin.get_campaign("c1")
    assert (view.impressions, view.pending, view.spent_units) == (1, 0, PRICE_UNITS)
    assert view.render_rate == 1.0


# -- price_source="signed" --------------------------------------------------------------------


async def test_a_signed_price_is_required_and_accepted_once(
    serve: Callable[..., Awaitable[Served]], admin: Store
) -> None:
    app = await serve(price_source="signed", price_key=PRICE_KEY)
    assert (await app.get(AD)).problem_field() == "sig"
    query = urlencode(sign_price("c1", "2.00", secret_key=PRICE_KEY))
    signed = await app.get(f"/ad?{query}")
    assert signed.status == 200, signed
    replay = await app.get(f"/ad?{query}", user="u2")
    assert replay.problem_field() == "sig"
    view = await admin.get_campaign("c1")
    assert (view.impressions, view.spent_units) == (1, PRICE_UNITS)


# -- on_denied="vast" -------------------------------------------------------------------------


async def test_a_denial_is_an_empty_vast_document(
    serve: Callable[..., Awaitable[Served]], admin: Store
) -> None:
    app = await serve(on_denied="vast")
    await admin.set_campaign("c1", status="paused")
    denied = await app.get(AD)
    assert denied.status == 200
    assert denied.headers["content-type"] == "application/xml"
    assert denied.headers["x-xsp-decision"] == "campaign_paused"
    assert '<VAST version="4.2"/>' in denied.text
    await admin.set_campaign("c1", status="active")
    served = await app.get(AD)
    assert served.status == 200 and "x-xsp-decision" not in served.headers
    assert (await admin.get_campaign("c1")).impressions == 1
