"""Choosing among candidate campaigns (``campaign_id=a,b,c``, ``@ad_route(candidates=...)``),
driven as a user would, through HTTP, in every integration: Starlette and FastAPI (ASGI,
httpx), a plain WSGI app and Flask (werkzeug's test client), Django under WSGI and ASGI
(Django's test clients, through test_django's ``Site``), on every store ``store_url`` offers.

Every handler answers the :class:`~xsp_middleware.Decision` it was given as JSON, so a test
asserts what the handler saw; denials are asserted on the response (204, ``X-XSP-Decision``)
and on the campaigns' denial counts, as an operator reads them. Settings are the defaults a
user gets, but for the one under test (each says why in one line).

The harness here (``serve``, ``admin``, the routes, CAMPAIGNS) is shared with
test_candidates_input.py, test_candidates_weighted.py and test_candidates_session.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import SECRET, client
from django.http import HttpRequest, HttpResponse
from django.urls import path
from fastapi import FastAPI
from flask import Flask
from flask import Request as FlaskRequest
from flask import request as flask_request
from processes import show
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from test_django import Site, _no_xsp_environment, made  # noqa: F401 - fixtures, used by name
from werkzeug.test import Client

from xsp_middleware import Campaign, Settings, XSPMiddleware, ad_route, observe
from xsp_middleware.django import ad_view
from xsp_middleware.flask import ad_route as flask_ad_route
from xsp_middleware.flask import xsp_decision
from xsp_middleware.metrics import enable_metrics
from xsp_middleware.preferences import block_campaign
from xsp_middleware.settings import Rules
from xsp_middleware.store import Store
from xsp_middleware.wsgi import XSPWSGIMiddleware

KINDS = ["starlette", "fastapi", "wsgi", "flask", "django-wsgi", "django-asgi"]
ROUTED = [k for k in KINDS if k != "wsgi"]  # the integrations with a route decorator
ASYNC_CAPABLE = ["starlette", "fastapi", "django-asgi"]  # they may await a candidates callable

# a: capped at 1/1h (the test shows it once first); b: budget below one impression (a CPM of
# 2.00 costs 0.002); off: paused; c, d: the defaults.
CAMPAIGNS = [
    Campaign(id="a", caps=["1/1h"]),
    Campaign(id="b", budget="0.001"),
    Campaign(id="off", status="paused"),
]
PRIORITY = [("a", "frequency_capped"), ("b", "budget_exhausted"), ("c", "served")]


# -- the candidates callables (each framework's request has ``.headers.get``) ------------------

AUDIENCES: dict[str, list[str]] = {
    "sports": ["a", "b", "c"],
    "news": ["b", "d"],
    "solo": ["a"],
    "repeats": ["a", "b", "a", "c", "b"],
    "nobody": [],
}


def by_audience(request: Any) -> list[str]:
    """The app's own targeting: the candidates for the ``X-Audience`` header."""
    return AUDIENCES.get(request.headers.get("x-audience") or "", [])


async def by_audience_async(request: Any) -> list[str]:
    await asyncio.sleep(0)  # really suspends: it is awaited, not just called
    return by_audience(request)


def query_param(request: Any, name: str) -> str:
    """A query parameter from Starlette's, Flask's or Django's request."""
    for attribute in ("query_params", "args", "GET"):
        params = getattr(request, attribute, None)
        if params is not None:
            return str(params.get(name) or "")
    raise AssertionError(f"not a request: {request!r}")


def by_query(request: Any) -> list[str]:
    """Candidates from the app's own ``pick`` query parameter."""
    return [cid for cid in query_param(request, "pick").split(",") if cid]


class TargetingDown(RuntimeError):
    pass


def misbehaving(request: Any) -> Any:
    """A broken candidates callable: what it does is the ``X-Mode`` header."""
    mode = request.headers.get("x-mode") or ""
    if mode == "raise":
        raise TargetingDown("the targeting service is down")
    return {
        "none": None,
        "string": "a,b",
        "ints": [1, 2],
        "invalid": ["a", "b c"],
        "twenty": [f"t{i}" for i in range(20)],
        "dict": {"c": 1, "d": 2},
        "set": {"c", "d"},
        "empty": [],
        "repeats": ["c", "c", "d"],
    }[mode]


async def misbehaving_async(request: Any) -> Any:
    await asyncio.sleep(0)
    return misbehaving(request)


async def from_json_body(request: Any) -> list[str]:
    """Targeting from a POSTed JSON body (an OpenRTB-like bid request): Starlette's request."""
    candidates: list[str] = (await request.json())["candidates"]
    return candidates


def from_flask_body(request: Any) -> list[str]:
    candidates: list[str] = request.get_json()["candidates"]
    return candidates


def from_django_body(request: Any) -> list[str]:
    candidates: list[str] = json.loads(request.body)["candidates"]
    return candidates


def with_body(decision: Any, body: bytes) -> str:
    """The decision, and the body as the handler read it after the callable."""
    return json.dumps({**json.loads(describe(decision)), "body": body.decode()})


SEEN_REQUESTS: list[str] = []
"""Whose request each ``typed`` callable got, in order."""


def request_kind(request: Any) -> str:
    if isinstance(request, Request):  # FastAPI's is Starlette's
        return "starlette"
    if isinstance(request, FlaskRequest):  # Flask's ``request`` proxy passes for one
        return "flask"
    if isinstance(request, HttpRequest):
        return "django"
    return type(request).__name__


def typed(request: Any) -> list[str]:
    SEEN_REQUESTS.append(request_kind(request))
    return ["b", "c"]


async def typed_async(request: Any) -> list[str]:
    SEEN_REQUESTS.append(request_kind(request))
    return ["b", "c"]


# -- the handlers: each answers the Decision it got, as JSON ---------------------------------


def describe(decision: Any) -> str:
    assert decision is not None, "the handler got no decision"
    return json.dumps(
        {
            "allowed": decision.allowed,
            "reason": decision.reason,
            "campaign_id": decision.campaign_id,
            "candidates": [list(entry) for entry in decision.candidates],
            "degraded": decision.degraded,
            "personalized": decision.personalized,
            "degraded_reason": decision.degraded_reason,
            "impression_url": decision.impression_url,
        }
    )


def status_of(headers: Any) -> int:
    """The status the test asks the handler for (``X-Status``; 200 by default): a non-2xx
    one releases the reservation."""
    return int(headers.get("x-status") or 200)


# (path, candidates, selection): the same routes in every integration with a decorator.
ROUTES: list[tuple[str, Any, str | None]] = [
    ("/pick", by_audience, None),
    ("/apick", by_audience_async, None),
    ("/query", by_query, None),
    ("/static", ["a", "b", "c"], None),
    ("/bad", misbehaving, None),
    ("/abad", misbehaving_async, None),
    ("/weighted", ["w1", "w2", "w5", "wx"], "weighted"),
    ("/first", ["w1", "w2", "w5", "wx"], "first"),
    ("/typed", typed, None),
    ("/atyped", typed_async, None),
]


def starlette_handler() -> Callable[[Request], Awaitable[Response]]:
    """A handler of its own for each route (``ad_route`` marks the function it is given)."""

    async def ad(request: Request) -> Response:
        return PlainTextResponse(describe(request.state.xsp), status_of(request.headers))

    return ad


async def starlette_post(request: Request) -> Response:
    return PlainTextResponse(with_body(request.state.xsp, await request.body()))


def starlette_app() -> Starlette:
    routes = [
        Route("/ad", starlette_handler()),
        Route("/by/{campaign_id}", ad_route()(starlette_handler())),
        Route("/post", ad_route(candidates=from_json_body)(starlette_post), methods=["POST"]),
    ]
    for url, candidates, selection in ROUTES:
        decorate = ad_route(candidates=candidates, selection=selection)
        routes.append(Route(url, decorate(starlette_handler())))
    return Starlette(routes=routes)


def fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.get("/ad")
    async def ad(request: Request) -> Response:
        return PlainTextResponse(describe(request.state.xsp), status_of(request.headers))

    @app.get("/by/{campaign_id}")
    @ad_route()
    async def by_path(request: Request, campaign_id: str) -> Response:
        return PlainTextResponse(describe(request.state.xsp), status_of(request.headers))

    @app.post("/post")
    @ad_route(candidates=from_json_body)
    async def post(request: Request) -> Response:
        return PlainTextResponse(with_body(request.state.xsp, await request.body()))

    for url, candidates, selection in ROUTES:

        async def routed(request: Request) -> Response:
            return PlainTextResponse(describe(request.state.xsp), status_of(request.headers))

        app.get(url)(ad_route(candidates=candidates, selection=selection)(routed))
    return app


def plain_wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ["PATH_INFO"] != "/ad":
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]
    status = status_of({"x-status": environ.get("HTTP_X_STATUS")})
    start_response(f"{status} Status", [("Content-Type", "text/plain")])
    return [describe(environ.get("xsp.decision")).encode()]


def flask_app() -> Flask:
    app = Flask("xsp_candidates_frameworks")

    def answer() -> tuple[str, int]:
        return describe(xsp_decision()), status_of(flask_request.headers)

    @app.get("/ad")
    def ad() -> tuple[str, int]:
        return answer()

    @app.get("/by/<campaign_id>")
    @flask_ad_route()
    def by_path(campaign_id: str) -> tuple[str, int]:
        return answer()

    @app.post("/post")
    @flask_ad_route(candidates=from_flask_body)
    def post() -> str:
        return with_body(xsp_decision(), flask_request.get_data())

    for url, candidates, selection in ROUTES:

        def routed() -> tuple[str, int]:
            return answer()

        decorated = flask_ad_route(candidates=candidates, selection=selection)(routed)
        app.add_url_rule(url, endpoint=url, view_func=decorated, methods=["GET"])
    return app


def django_ad(request: Any, **kwargs: Any) -> HttpResponse:
    return HttpResponse(
        describe(getattr(request, "xsp", None)),
        content_type="text/plain",
        status=status_of(request.headers),
    )


def django_post(request: Any) -> HttpResponse:
    return HttpResponse(with_body(getattr(request, "xsp", None), request.body))


def django_view(url: str) -> Callable[[Any], Any]:
    """A view of its own for each route (``ad_view`` marks the function it is given): the
    ``/a...`` routes async, the others sync, as a Django site has both."""
    if url.startswith("/a"):

        async def async_view(request: Any, **kwargs: Any) -> HttpResponse:
            return django_ad(request)

        return async_view

    def sync_view(request: Any, **kwargs: Any) -> HttpResponse:
        return django_ad(request)

    return sync_view


urlpatterns = [  # Site.start(urlconf=__name__)
    path("ad", django_ad),
    path("by/<str:campaign_id>", ad_view()(django_view("/by"))),
    path("post", ad_view(candidates=from_django_body)(django_post)),
]
for _url, _candidates, _selection in ROUTES:
    _view = ad_view(candidates=_candidates, selection=_selection)(django_view(_url))
    urlpatterns.append(path(_url.lstrip("/"), _view))


# -- one integration, driven over its own test client -----------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    @property
    def decision(self) -> dict[str, Any]:
        """What the handler saw (it ran: a 200)."""
        assert self.status == 200, self
        seen: dict[str, Any] = json.loads(self.body)
        seen["candidates"] = [tuple(entry) for entry in seen["candidates"]]
        return seen

    def denied(self, reason: str) -> None:
        """A no-fill: 204, empty, ``X-XSP-Decision`` the reason."""
        assert self.status == 204, self
        assert self.body == b"", self
        assert self.headers.get("x-xsp-decision") == reason, self

    def problem_field(self) -> str:
        assert self.status == 400, self
        assert self.headers["content-type"] == "application/problem+json", self
        field: str = json.loads(self.body)["field"]
        return field


class Served:
    """An app under one integration's middleware."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    async def get(
        self, url: str, user: str | None = "u1", headers: dict[str, str] | None = None
    ) -> Reply:
        sent = dict(headers or {})
        if user:
            sent["cookie"] = f"user_id={user}"
        reply = await self.fetch(url, sent)
        assert reply.status < 500, (self.kind, url, reply)  # never a 500
        return reply

    async def post(self, url: str, body: bytes, user: str | None = "u1") -> Reply:
        """POST a JSON ``body``."""
        sent = {"content-type": "application/json"}
        if user:
            sent["cookie"] = f"user_id={user}"
        reply = await self.fetch(url, sent, body)
        assert reply.status < 500, (self.kind, url, reply)  # never a 500
        return reply

    async def fetch(self, url: str, headers: dict[str, str], body: bytes | None = None) -> Reply:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


class ASGIServed(Served):
    def __init__(self, kind: str, app: Any) -> None:
        super().__init__(kind)
        self.app = app
        self.client = client(app)

    async def fetch(self, url: str, headers: dict[str, str], body: bytes | None = None) -> Reply:
        if body is None:
            r = await self.client.get(url, headers=headers)
        else:
            r = await self.client.post(url, headers=headers, content=body)
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
    def __init__(self, kind: str, wsgi: Any, mw: XSPWSGIMiddleware) -> None:
        super().__init__(kind)
        self.mw = mw
        self.client = Client(wsgi, use_cookies=False)

    async def fetch(self, url: str, headers: dict[str, str], body: bytes | None = None) -> Reply:
        # A WSGI server calls the app from a worker thread, and reads the whole body.
        method = "GET" if body is None else "POST"
        r = await asyncio.to_thread(
            self.client.open, url, method=method, headers=headers, data=body, buffered=True
        )
        return Reply(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.data)

    async def aclose(self) -> None:
        self.mw.guard.sync_store.client.close()
        await self.mw.store.aclose()


class DjangoServed(Served):
    def __init__(self, kind: str, site: Site) -> None:
        super().__init__(kind)
        self.site = site

    async def fetch(self, url: str, headers: dict[str, str], body: bytes | None = None) -> Reply:
        site = self.site
        if body is None:
            send = partial(site.client.get, url, headers=headers)
        else:
            content_type = headers.pop("content-type")
            send = partial(site.client.post, url, body, content_type=content_type, headers=headers)
        response = await (asyncio.to_thread(send) if site.mode == "wsgi" else send())
        body = await site.body(response)
        return Reply(
            response.status_code, {k.lower(): v for k, v in response.headers.items()}, body
        )

    async def aclose(self) -> None:
        await self.site.aclose()


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=ROUTED)
def routed_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    """Which of conftest's stores ``store_url`` is: redis, memory, cluster or sentinel."""
    return str(request.node.callspec.params["store_url"])


@pytest.fixture
async def admin(store_url: str) -> AsyncIterator[Store]:
    """The store's admin API, as an operator's process would use it."""
    store = Store(Rules.from_settings(Settings(redis_url=store_url, secret_key=SECRET)))
    yield store
    await store.aclose()


Serve = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve(
    store_url: str,
    made: list[Any],  # noqa: F811 - test_django's fixture
) -> AsyncIterator[Serve]:
    """``await serve(kind, debug_headers=True)``: the ``kind`` integration, on the store under
    test, with CAMPAIGNS and those settings."""
    built: list[Served] = []

    async def build(kind: str, **settings: Any) -> Served:
        served: Served
        options = {
            "redis_url": store_url,
            "secret_key": SECRET,
            "campaigns": CAMPAIGNS,
            **settings,
        }
        if kind == "starlette":
            served = ASGIServed(kind, XSPMiddleware(starlette_app(), **options))
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
            site = Site(kind.removeprefix("django-"), store_url, made)
            conf = {name.upper(): value for name, value in options.items()}  # XSP_MIDDLEWARE
            site.start(urlconf=__name__, conf=conf)
            served = DjangoServed(kind, site)
        built.append(served)
        return served

    yield build
    for served in built:
        await served.aclose()


async def denials(admin: Store, campaign: str, reason: str, expected: int) -> int:
    """The campaign's count of ``reason`` denials, as ``campaign show`` reports it. A cluster
    sends a passed-over candidate's count after answering the request: it may take a moment."""
    deadline = time.monotonic() + 3
    while True:
        count = (await admin.get_campaign(campaign)).denials[reason]
        if count >= expected or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.02)


async def cap_a(app: Served, user: str = "u1") -> None:
    """One earlier impression of ``a`` for ``user``: ``a`` (1/1h) is capped for them now."""
    first = await app.get("/ad?campaign_id=a", user=user)
    assert first.decision["campaign_id"] == "a"
    assert first.decision["candidates"] == [("a", "served")]


# -- priority ---------------------------------------------------------------------------------


async def test_the_first_eligible_candidate_is_served_and_the_passed_over_count_denials(
    kind: str, store_kind: str, store_url: str, serve: Serve, admin: Store
) -> None:
    app = await serve(kind)
    await cap_a(app)
    served = await app.get("/ad?campaign_id=a,b,c")
    seen = served.decision
    assert seen["campaign_id"] == "c"
    assert seen["allowed"] is True and seen["reason"] == "served"
    assert seen["candidates"] == PRIORITY
    assert seen["degraded"] is False
    # The debug headers are opt-in: by default the response says nothing about candidates.
    assert "x-xsp-candidates" not in served.headers
    assert "x-xsp-decision" not in served.headers

    assert await denials(admin, "a", "frequency_capped", 1) == 1
    assert await denials(admin, "b", "budget_exhausted", 1) == 1
    views = {cid: await admin.get_campaign(cid) for cid in ("a", "b", "c")}
    assert {cid: v.impressions for cid, v in views.items()} == {"a": 1, "b": 0, "c": 1}
    assert views["c"].spent_units == 20_000  # c's own price, 2.00 CPM
    assert sum(views["c"].denials.values()) == 0
    if store_kind == "redis" and kind == "starlette":  # as an operator reads them
        assert show(store_url, "a")["denied"]["frequency_capped"] == 1
        assert show(store_url, "b")["denied"]["budget_exhausted"] == 1

    # Another user: a is not capped for them, so a is the first eligible and b, c unevaluated.
    other = (await app.get("/ad?campaign_id=a,b,c", user="u2")).decision
    assert (other["campaign_id"], other["candidates"]) == ("a", [("a", "served")])
    assert await denials(admin, "b", "budget_exhausted", 1) == 1  # not evaluated: not counted


async def test_none_eligible_is_a_no_fill_that_lists_each_candidate(
    kind: str, serve: Serve, admin: Store
) -> None:
    # debug_headers: the X-XSP-Candidates header exists only under it.
    app = await serve(kind, debug_headers=True)
    await cap_a(app)

    none = await app.get("/ad?campaign_id=a,b,off")
    none.denied("no_eligible_campaign")
    assert none.headers["x-xsp-candidates"] == (
        "a=frequency_capped,b=budget_exhausted,off=campaign_paused"
    )
    assert "x-xsp-degraded" not in none.headers

    served = await app.get("/ad?campaign_id=a,b,c")
    assert served.decision["campaign_id"] == "c"
    assert served.headers["x-xsp-decision"] == "served"
    assert served.headers["x-xsp-candidates"] == "a=frequency_capped,b=budget_exhausted,c=served"

    # One candidate: the old behaviour, the reason itself, no candidates header.
    for url, reason in (
        ("/ad?campaign_id=a", "frequency_capped"),
        ("/ad?campaign_id=b", "budget_exhausted"),
        ("/ad?campaign_id=off", "campaign_paused"),
    ):
        alone = await app.get(url)
        alone.denied(reason)
        assert "x-xsp-candidates" not in alone.headers, (url, alone)

    assert await denials(admin, "a", "frequency_capped", 3) == 3  # a,b,off + a,b,c + a alone
    assert await denials(admin, "b", "budget_exhausted", 3) == 3
    assert await denials(admin, "off", "campaign_paused", 2) == 2


async def test_the_handler_sees_a_no_fill_under_on_denied_pass(kind: str, serve: Serve) -> None:
    # on_denied="pass": the only way the handler itself sees a denial's Decision.
    app = await serve(kind, on_denied="pass")
    await cap_a(app)
    seen = (await app.get("/ad?campaign_id=a,b,off")).decision
    assert seen["allowed"] is False
    assert seen["reason"] == "no_eligible_campaign"
    assert seen["degraded"] is False
    assert seen["candidates"] == [
        ("a", "frequency_capped"),
        ("b", "budget_exhausted"),
        ("off", "campaign_paused"),
    ]
    alone = (await app.get("/ad?campaign_id=a")).decision
    assert (alone["reason"], alone["candidates"]) == (
        "frequency_capped",
        [("a", "frequency_capped")],
    )


async def test_a_no_fill_under_on_denied_vast_is_an_empty_vast_document(
    kind: str, serve: Serve
) -> None:
    app = await serve(kind, on_denied="vast")  # the setting under test: players want VAST
    await cap_a(app)
    none = await app.get("/ad?campaign_id=a,b")
    assert none.status == 200
    assert none.headers["content-type"] == "application/xml"
    assert none.headers["x-xsp-decision"] == "no_eligible_campaign"
    assert "<VAST" in none.text


# -- a route's candidates: a list, or the app's own callable -----------------------------------


async def test_a_static_candidates_list_is_served_in_priority_order(
    routed_kind: str, serve: Serve, admin: Store
) -> None:
    app = await serve(routed_kind)
    await cap_a(app)
    # The route's list wins over whatever the query names.
    seen = (await app.get("/static?campaign_id=d")).decision
    assert (seen["campaign_id"], seen["candidates"]) == ("c", PRIORITY)
    assert await denials(admin, "a", "frequency_capped", 1) == 1
    assert (await admin.get_campaign("d")).impressions == 0


@pytest.mark.parametrize(
    ("routed_kind", "route"),
    [(kind, "/pick") for kind in ROUTED]
    # (An async callable under a sync integration: test_candidates_input.py.)
    + [(kind, "/apick") for kind in ROUTED if kind in ASYNC_CAPABLE],
    indirect=["routed_kind"],
)
async def test_a_candidates_callable_chooses_by_the_request(
    routed_kind: str, route: str, serve: Serve, admin: Store
) -> None:
    # debug_headers: to see that an empty answer is not degraded, and the candidates header.
    app = await serve(routed_kind, debug_headers=True)
    await cap_a(app)

    sports = await app.get(route, headers={"x-audience": "sports"})
    assert (sports.decision["campaign_id"], sports.decision["candidates"]) == ("c", PRIORITY)
    assert sports.headers["x-xsp-candidates"] == "a=frequency_capped,b=budget_exhausted,c=served"

    news = (await app.get(route, headers={"x-audience": "news"})).decision
    assert news["campaign_id"] == "d"
    assert news["candidates"] == [("b", "budget_exhausted"), ("d", "served")]

    # Repeats the callable returns are dropped, the first kept: a, b, c in that order.
    repeats = (await app.get(route, headers={"x-audience": "repeats"})).decision
    assert (repeats["campaign_id"], repeats["candidates"]) == ("c", PRIORITY)

    # One candidate: the old behaviour (its reason is the decision).
    (await app.get(route, headers={"x-audience": "solo"})).denied("frequency_capped")

    # The targeting found nothing: a no-fill, with no store call, and not degraded.
    for audience in ("nobody", "unknown"):
        nothing = await app.get(route, headers={"x-audience": audience})
        nothing.denied("no_eligible_campaign")
        assert "x-xsp-degraded" not in nothing.headers, nothing
    nothing = await app.get(route)  # no header at all: the callable answers []
    nothing.denied("no_eligible_campaign")

    assert await denials(admin, "a", "frequency_capped", 3) == 3  # sports, repeats, solo
    assert await denials(admin, "b", "budget_exhausted", 3) == 3  # sports, news, repeats
    assert (await admin.get_campaign("c")).impressions == 2
    assert (await admin.get_campaign("d")).impressions == 1


async def test_a_callable_may_choose_by_a_query_parameter(routed_kind: str, serve: Serve) -> None:
    app = await serve(routed_kind)
    await cap_a(app)
    seen = (await app.get("/query?pick=a,d,c")).decision
    assert (seen["campaign_id"], seen["candidates"]) == (
        "d",
        [("a", "frequency_capped"), ("d", "served")],
    )
    seen = (await app.get("/query?pick=off,b,c")).decision
    assert seen["candidates"] == [
        ("off", "campaign_paused"),
        ("b", "budget_exhausted"),
        ("c", "served"),
    ]


# -- metrics ---------------------------------------------------------------------------------


@pytest.fixture
def registry() -> Iterable[CollectorRegistry]:
    yield CollectorRegistry()
    observe.install(None)


@pytest.mark.parametrize("store_url", ["memory", "cluster"], indirect=True)
async def test_the_candidates_evaluated_histogram_counts_decisions_that_named_several(
    store_kind: str, serve: Serve, registry: CollectorRegistry
) -> None:
    enable_metrics(registry=registry)
    app = await serve("starlette")
    await cap_a(app)  # one candidate: not observed
    assert (await app.get("/ad?campaign_id=a,b,c")).status == 200  # 3 evaluated
    assert (await app.get("/ad?campaign_id=c,d")).status == 200  # 1 (c)
    (await app.get("/ad?campaign_id=a,b")).denied("no_eligible_campaign")  # 2
    (await app.get("/pick", headers={"x-audience": "nobody"})).denied("no_eligible_campaign")

    def sample(name: str, **labels: str) -> float:
        found = registry.get_sample_value(name, labels)
        return 0.0 if found is None else found

    assert sample("xsp_candidates_evaluated_count") == 3
    assert sample("xsp_candidates_evaluated_sum") == 6
    assert sample("xsp_candidates_evaluated_bucket", le="1.0") == 1
    assert sample("xsp_candidates_evaluated_bucket", le="2.0") == 2
    assert sample("xsp_candidates_evaluated_bucket", le="3.0") == 3
    assert sample("xsp_decisions_total", outcome="served", reason="served") == 3
    assert sample("xsp_decisions_total", outcome="denied", reason="no_eligible_campaign") == 2


@pytest.mark.parametrize("store_url", ["memory"], indirect=True)
async def test_a_failing_callable_is_no_store_failure_in_the_metrics(
    store_kind: str, serve: Serve, registry: CollectorRegistry
) -> None:
    """``xsp_degraded_decisions_total{check}`` counts the decisions the store's failure policy
    took (the check it could not make): the app's targeting failing is no such decision, and
    must not page whoever watches the store."""
    enable_metrics(registry=registry)
    app = await serve("starlette")
    for _ in range(3):
        (await app.get("/bad", headers={"x-mode": "raise"})).denied("no_eligible_campaign")
    decisions = registry.get_sample_value(
        "xsp_decisions_total", {"outcome": "denied", "reason": "no_eligible_campaign"}
    )
    assert decisions == 3
    degraded = {
        check: registry.get_sample_value("xsp_degraded_decisions_total", {"check": check})
        for check in ("budget", "frequency")
    }
    assert degraded == {"budget": 0.0, "frequency": 0.0}, degraded


# -- the chosen candidate's reservation: released on a non-2xx, counted by its beacon ---------


async def test_a_non_2xx_response_releases_the_chosen_candidate(
    kind: str, serve: Serve, admin: Store
) -> None:
    app = await serve(kind)
    await cap_a(app)
    failed = await app.get("/ad?campaign_id=a,b,c", headers={"x-status": "404"})
    assert failed.status == 404  # the handler said so: not kept
    c = await admin.get_campaign("c")
    assert (c.impressions, c.spent_units) == (0, 0)  # released
    assert (await admin.get_campaign("a")).impressions == 1  # a's earlier one stands
    kept = (await app.get("/ad?campaign_id=a,b,c")).decision
    assert (kept["campaign_id"], kept["candidates"]) == ("c", PRIORITY)
    c = await admin.get_campaign("c")
    assert (c.impressions, c.spent_units) == (1, 20_000)


async def test_under_beacons_the_chosen_candidates_impression_counts(
    kind: str, serve: Serve, admin: Store
) -> None:
    app = await serve(kind, record_on="beacon")  # the setting under test
    await cap_a(app)
    seen = (await app.get("/ad?campaign_id=a,b,c")).decision
    assert (seen["campaign_id"], seen["candidates"]) == ("c", PRIORITY)
    url = urlsplit(seen["impression_url"])
    c = await admin.get_campaign("c")
    assert (c.impressions, c.pending, c.pending_units) == (0, 1, 20_000)
    beacon = await app.get(f"{url.path}?{url.query}", user=None)
    assert beacon.status == 204 and "x-xsp-beacon" not in beacon.headers, beacon
    c = await admin.get_campaign("c")
    assert (c.impressions, c.pending, c.spent_units) == (1, 0, 20_000)
    assert (await admin.get_campaign("b")).pending == 0


# -- where the request names them, and what the callable gets -------------------------------


async def test_candidates_in_the_path_of_a_decorated_route(routed_kind: str, serve: Serve) -> None:
    app = await serve(routed_kind)
    await cap_a(app)
    seen = (await app.get("/by/a,b,c")).decision
    assert (seen["campaign_id"], seen["candidates"]) == ("c", PRIORITY)
    assert (await app.get("/by/a,,c")).problem_field() == "campaign_id"


REQUEST_CLASSES = {
    "starlette": "starlette",
    "fastapi": "starlette",
    "flask": "flask",
    "django-wsgi": "django",
    "django-asgi": "django",
}


async def test_the_callable_gets_the_frameworks_request_once_per_request(
    routed_kind: str, serve: Serve
) -> None:
    app = await serve(routed_kind)
    SEEN_REQUESTS.clear()
    routes = ["/typed", "/atyped"] if routed_kind in ASYNC_CAPABLE else ["/typed"]
    for route in routes:
        seen = (await app.get(route)).decision
        assert seen["candidates"] == [("b", "budget_exhausted"), ("c", "served")]
    assert [REQUEST_CLASSES[routed_kind]] * len(routes) == SEEN_REQUESTS


# -- every check applies to each candidate ----------------------------------------------------


def just_after_midnight() -> str:
    """A time zone whose local day has just begun (its hour is 0 or 1 for the whole test): a
    daily budget paced ``even`` there may have spent almost nothing yet."""
    offset = -datetime.now(UTC).hour % 24
    if offset > 14:
        offset -= 24
    return f"Etc/GMT{-offset:+d}" if offset else "UTC"


@pytest.mark.parametrize("driver", ["starlette", "flask"])  # the asyncio and the blocking store
async def test_status_flight_pacing_blocks_and_consent_apply_to_each_candidate(
    driver: str, serve: Serve, admin: Store
) -> None:
    app = await serve(
        driver,
        campaigns=[
            *CAMPAIGNS,
            Campaign(id="later", start="2099-01-01T00:00:00Z"),
            Campaign(
                id="paced", daily_budget="0.004", pacing="even", timezone=just_after_midnight()
            ),
        ],
    )
    await block_campaign(admin, "u1", "blk")  # what the user chose on the preferences page
    seen = (await app.get("/ad?campaign_id=off,later,paced,blk,c")).decision
    assert seen["campaign_id"] == "c"
    assert seen["candidates"] == [
        ("off", "campaign_paused"),
        ("later", "campaign_inactive"),
        ("paced", "paced"),
        ("blk", "user_blocked"),
        ("c", "served"),
    ]
    for cid, reason in (
        ("off", "campaign_paused"),
        ("later", "campaign_inactive"),
        ("paced", "paced"),
        ("blk", "user_blocked"),
    ):
        assert await denials(admin, cid, reason, 1) == 1, cid

    # GPC (consent_policy "no_tracking", the default): served without the user's state, so
    # a's cap and the block do not apply; the first candidate is served.
    await cap_a(app)
    gpc = (await app.get("/ad?campaign_id=a,c", headers={"sec-gpc": "1"})).decision
    assert (gpc["campaign_id"], gpc["personalized"]) == ("a", False)
    assert gpc["candidates"] == [("a", "served")]
    # Anonymous (no cookie): no caps either.
    anonymous = (await app.get("/ad?campaign_id=a,c", user=None)).decision
    assert anonymous["candidates"] == [("a", "served")]


@pytest.mark.parametrize("driver", ["starlette", "flask"])  # the asyncio and the blocking store
async def test_caps_across_campaigns_apply_to_the_candidates(driver: str, serve: Serve) -> None:
    app = await serve(driver, user_caps=["2/1h"])  # the setting under test
    assert (await app.get("/ad?campaign_id=x")).decision["campaign_id"] == "x"  # 1 of 2
    # b cannot pay; c can, and the user may see one more ad: c.
    seen = await app.get("/ad?campaign_id=b,c")
    assert seen.status == 200, seen
    assert seen.decision["candidates"] == [("b", "budget_exhausted"), ("c", "served")]
    # 2 of 2: every candidate is capped now.
    (await app.get("/ad?campaign_id=x,y,z")).denied("no_eligible_campaign")
    (await app.get("/ad?campaign_id=y")).denied("frequency_capped")
    other = (await app.get("/ad?campaign_id=x,y,z", user="u2")).decision
    assert other["candidates"] == [("x", "served")]


@pytest.mark.parametrize("driver", ["starlette", "flask"])  # the asyncio and the blocking store
async def test_a_caps_change_in_the_store_applies_to_the_candidates_at_once(
    driver: str, serve: Serve, admin: Store
) -> None:
    """``campaign set a --cap 1/1h`` while the app runs: the next request that names a among
    its candidates denies a for a user who saw it, and serves the next eligible one."""
    app = await serve(driver, campaigns=[Campaign(id="b", budget="0.001")])
    seen = (await app.get("/ad?campaign_id=a")).decision  # under the default caps, 3/1h
    assert seen["campaign_id"] == "a"
    await admin.set_campaign("a", caps=["1/1h"])  # what the CLI writes
    after = await app.get("/ad?campaign_id=b,a,c")
    assert after.status == 200, after
    assert after.decision["candidates"] == [
        ("b", "budget_exhausted"),
        ("a", "frequency_capped"),
        ("c", "served"),
    ]


@pytest.mark.parametrize("store_url", ["memory"], indirect=True)
async def test_a_callable_may_read_the_posted_body(
    routed_kind: str, store_kind: str, serve: Serve
) -> None:
    """A POSTed ad request (an OpenRTB-like JSON body): the app's targeting reads the body to
    choose, and the handler reads it again."""
    app = await serve(routed_kind)
    body = json.dumps({"candidates": ["b", "c"]}).encode()
    reply = await app.post("/post", body)
    assert reply.status == 200, reply
    seen = json.loads(reply.body)
    assert seen["candidates"] == [["b", "budget_exhausted"], ["c", "served"]], seen
    assert seen["body"] == body.decode()
