"""XSPWSGIMiddleware: Flask (decided after routing, by a before_request hook) and a plain WSGI
app (decided before the app, by the core rule), on real Redis and on the embedded store.

A response keeps its reservation only when start_response got a 2xx status and the body
iterable was exhausted; an exception, a body that fails part-way, a close() before exhaustion
or another status gives spend, impression and cap slot back.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import pytest
from conftest import SECRET, STREAM_CHUNKS, VAST
from flask import Flask, Response, request
from werkzeug.test import Client, EnvironBuilder, TestResponse
from werkzeug.wsgi import FileWrapper

from xsp_middleware import Decision
from xsp_middleware.flask import ad_route, xsp_decision
from xsp_middleware.wsgi import XSPWSGIMiddleware

CAMPAIGN = "c1"
AD = f"/ad?campaign_id={CAMPAIGN}&cpm=2.00"
COST_UNITS = 20_000  # one impression at a CPM of 2.00, in units of 10**-7
KINDS = ["flask", "wsgi"]

# Which streamed bodies the app saw closed (the middleware passes close() through).
CLOSED: list[str] = []


# -- the apps ---------------------------------------------------------------------------------


def decision_text(decision: Decision | None) -> str:
    assert isinstance(decision, Decision)
    d = decision
    return (
        f"{d.allowed}|{d.reason}|{d.campaign_id}|{d.cost}|{d.remaining_impressions}|"
        f"{d.remaining_budget}|{d.anonymous}|{d.degraded}"
    )


def fields(text: str) -> dict[str, str]:
    names = ("allowed", "reason", "campaign_id", "cost", "remaining", "budget", "anonymous", "deg")
    return dict(zip(names, text.split("|"), strict=True))


def chunks(name: str, fail: bool = False) -> Iterator[bytes]:
    try:
        yield STREAM_CHUNKS[0]
        if fail:
            raise RuntimeError("stream died")
        yield from STREAM_CHUNKS[1:]
    finally:
        CLOSED.append(name)


def flask_app() -> Flask:
    app = Flask("xsp_wsgi_test")

    @app.get("/ad")
    def ad() -> Response:
        return Response(VAST, content_type="application/xml")

    @app.get("/decision")
    def decision() -> str:
        assert xsp_decision() is request.environ["xsp.decision"]
        return decision_text(request.environ["xsp.decision"])

    @app.get("/status/<int:code>")
    def status(code: int) -> tuple[str, int]:
        return "status", code

    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError("view failed")

    @app.get("/stream")
    def stream() -> Response:
        return Response(chunks("flask"), content_type="application/octet-stream")

    @app.get("/stream-fails")
    def stream_fails() -> Response:
        return Response(chunks("flask", fail=True))

    @app.get("/other")
    def other() -> str:
        return "other"

    @app.post("/post-only")
    def post_only() -> str:
        return "posted"

    # Route rules: below @app.get (the registered view is marked)...
    @app.get("/ad/<campaign_id>")
    @ad_route(caps=["2/1h"])
    def ad_by_url(campaign_id: str) -> str:
        return decision_text(request.environ["xsp.decision"])

    # ...or above it (app.get returns the same function, which gets marked).
    @ad_route(campaign=CAMPAIGN, cpm="5.00")
    @app.get("/fixed")
    def fixed() -> str:
        return decision_text(request.environ["xsp.decision"])

    @app.get("/custom")
    @ad_route(campaign_param="cid", price_param="price")
    def custom() -> str:
        return decision_text(request.environ["xsp.decision"])

    return app


def plain_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """A WSGI app with no framework: it knows nothing of the middleware but the environ key."""
    path = environ["PATH_INFO"]
    if path == "/ad":
        start_response("200 OK", [("Content-Type", "application/xml")])
        return [VAST.encode()]
    if path == "/decision":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [decision_text(environ.get("xsp.decision")).encode()]
    if path.startswith("/status/"):
        code = int(path.rsplit("/", 1)[1])
        start_response(f"{code} Whatever", [("Content-Type", "text/plain")])
        return [b"status"]
    if path == "/boom":
        raise RuntimeError("app failed")
    if path in ("/stream", "/stream-fails"):

        def lazy() -> Iterator[bytes]:  # start_response at the first iteration, as allowed
            start_response("200 OK", [("Content-Type", "application/octet-stream")])
            yield from chunks("wsgi", fail=path == "/stream-fails")

        return lazy()
    if path == "/file":
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        wrapper = environ.get("wsgi.file_wrapper", FileWrapper)
        return wrapper(environ["test.file"], 8192)  # type: ignore[no-any-return]
    if path == "/other":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"other"]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found"]


# -- the harness ------------------------------------------------------------------------------


class Harness:
    """One app under the middleware, its test client, and what the store recorded."""

    def __init__(self, kind: str, **settings: Any) -> None:
        self.kind = kind
        settings.setdefault("secret_key", SECRET)
        settings.setdefault("default_caps", ["1/1h"])
        if kind == "flask":
            self.flask = flask_app()
            self.mw = XSPWSGIMiddleware(self.flask.wsgi_app, **settings)
            self.flask.wsgi_app = self.mw  # type: ignore[method-assign]
            self.wsgi: Any = self.flask
            self.client: Client = self.flask.test_client(use_cookies=False)
        else:
            self.mw = XSPWSGIMiddleware(plain_app, **settings)
            self.wsgi = self.mw
            self.client = Client(self.mw, use_cookies=False)
        assert (self.mw.flask_app is not None) == (kind == "flask")
        self.store_calls: list[str] = []
        # Each reserve and release of the blocking store is one round trip (on a cluster, two
        # halves sent together); test_roundtrips.py counts them at the server.
        sync_store = self.mw.guard.sync_store
        reserve, release = sync_store.reserve, sync_store.release

        def counting_reserve(*args: Any, **kwargs: Any) -> Any:
            self.store_calls.append("reserve")
            return reserve(*args, **kwargs)

        def counting_release(*args: Any, **kwargs: Any) -> Any:
            self.store_calls.append("release")
            return release(*args, **kwargs)

        sync_store.reserve = counting_reserve
        sync_store.release = counting_release

    def get(self, url: str, user: str | None = "u1", **kwargs: Any) -> TestResponse:
        """Like a server: read the whole body, then close() it (unless ``buffered=False``)."""
        headers = {"Cookie": f"user_id={user}"} if user else {}
        kwargs.setdefault("buffered", True)
        return self.client.get(url, headers=headers, **kwargs)

    def recorded(self, campaign: str = CAMPAIGN) -> tuple[int, int]:
        """(spent units, impressions) from the campaign's state hash."""
        _, state_key = self.mw.store.campaign_keys(campaign)
        state = self.mw.guard.sync_store.client.hgetall(state_key)
        return int(state.get(b"spent", 0)), int(state.get(b"impressions", 0))

    def environ(self, path: str, query: str, user: str = "u1") -> dict[str, Any]:
        builder = EnvironBuilder(
            path=path, query_string=query, headers={"Cookie": f"user_id={user}"}
        )
        return builder.get_environ()

    def assert_released(self) -> None:
        assert self.recorded() == (0, 0)
        # With a 1/1h cap, u1 is served again only if the slot was given back.
        again = self.get(AD)
        assert again.status_code == 200, again.headers.get("X-XSP-Decision")
        assert again.text == VAST
        assert self.recorded() == (COST_UNITS, 1)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def build(kind: str, store_url: str) -> Callable[..., Harness]:
    def factory(**settings: Any) -> Harness:
        return Harness(kind, redis_url=store_url, **settings)

    return factory


@pytest.fixture(autouse=True)
def _clear_closed() -> None:
    CLOSED.clear()


def start_response_recorder() -> tuple[list[str], Callable[..., Any]]:
    statuses: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Callable[..., Any]:
        statuses.append(status)
        return lambda data: None

    return statuses, start_response


# -- allowed, denied, bad input ---------------------------------------------------------------


def test_allowed_request_runs_the_view_which_sees_the_decision(build: Any) -> None:
    h = build()
    r = h.get(f"/decision?campaign_id={CAMPAIGN}&cpm=2.00")
    assert r.status_code == 200
    d = fields(r.text)
    assert (d["allowed"], d["reason"], d["campaign_id"]) == ("True", "served", CAMPAIGN)
    assert Decimal(d["cost"]) == Decimal("0.002")
    assert (d["remaining"], d["anonymous"], d["deg"]) == ("0", "False", "False")
    assert Decimal(d["budget"]) == Decimal("999.998")
    assert h.recorded() == (COST_UNITS, 1)
    assert h.store_calls == ["reserve"]  # one round trip, and keeping costs none


def test_capped_request_answers_204_frequency_capped(build: Any) -> None:
    h = build()
    assert h.get(AD).status_code == 200
    r = h.get(AD)
    assert r.status_code == 204
    assert r.headers["X-XSP-Decision"] == "frequency_capped"
    assert "Content-Type" not in r.headers
    assert r.data == b""
    assert h.recorded() == (COST_UNITS, 1)  # the denial reserved nothing
    assert h.get(AD, user="u2").status_code == 200  # another user is not capped


def test_exhausted_budget_answers_204_budget_exhausted(build: Any) -> None:
    h = build(default_budget="0.002")  # exactly one impression; anonymous: no cap applies
    assert h.get(AD, user=None).status_code == 200
    r = h.get(AD, user=None)
    assert r.status_code == 204
    assert r.headers["X-XSP-Decision"] == "budget_exhausted"
    assert h.recorded() == (COST_UNITS, 1)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("campaign_id=bad%20id&cpm=2.00", "campaign_id"),
        ("campaign_id=&cpm=2.00", "campaign_id"),
        ("campaign_id=c1&campaign_id=c2", "campaign_id"),
        ("campaign_id=c1&cpm=abc", "cpm"),
        ("campaign_id=c1&cpm=1e3", "cpm"),
        ("campaign_id=c1&cpm=2.00001", "cpm"),
    ],
)
def test_bad_input_answers_400_problem_json_with_field(build: Any, query: str, field: str) -> None:
    h = build()
    r = h.get(f"/ad?{query}")
    assert r.status_code == 400
    assert r.headers["Content-Type"] == "application/problem+json"
    problem = json.loads(r.data)
    assert set(problem) == {"type", "title", "detail", "field"}
    assert problem["field"] == field
    assert h.store_calls == []


def test_on_denied_pass_runs_the_view_with_the_denial(build: Any) -> None:
    h = build(on_denied="pass")
    url = f"/decision?campaign_id={CAMPAIGN}&cpm=2.00"
    assert fields(h.get(url).text)["reason"] == "served"
    r = h.get(url)
    assert r.status_code == 200
    assert "X-XSP-Decision" not in r.headers
    d = fields(r.text)
    assert (d["allowed"], d["reason"]) == ("False", "frequency_capped")
    assert h.recorded() == (COST_UNITS, 1)


# -- keep or release --------------------------------------------------------------------------


def test_completed_2xx_body_keeps_the_reservation(build: Any) -> None:
    h = build()
    r = h.get(f"/stream?campaign_id={CAMPAIGN}&cpm=2.00", buffered=False)
    assert r.status_code == 200
    assert r.data == b"".join(STREAM_CHUNKS)
    r.close()
    assert h.recorded() == (COST_UNITS, 1)
    assert [h.kind] == CLOSED
    assert h.get(AD).headers["X-XSP-Decision"] == "frequency_capped"
    assert h.store_calls == ["reserve", "reserve"]  # no release

    async def view() -> Any:  # the admin API agrees with the raw hash
        try:
            return await h.mw.store.get_campaign(CAMPAIGN)
        finally:
            await h.mw.store.aclose()

    campaign = asyncio.run(view())
    assert (campaign.spent, campaign.impressions) == (Decimal("0.002"), 1)


@pytest.mark.parametrize("code", [201, 299])
def test_any_completed_2xx_status_keeps(build: Any, code: int) -> None:
    h = build()
    r = h.get(f"/status/{code}?campaign_id={CAMPAIGN}&cpm=2.00")
    assert r.status_code == code
    assert h.recorded() == (COST_UNITS, 1)


@pytest.mark.parametrize("code", [302, 404, 500])
def test_non_2xx_status_releases(build: Any, code: int) -> None:
    h = build()
    r = h.get(f"/status/{code}?campaign_id={CAMPAIGN}&cpm=2.00")
    assert r.status_code == code
    assert r.data == b"status"  # the view ran, so the impression had been reserved
    h.assert_released()


def test_failing_view_releases(build: Any) -> None:
    h = build()
    if h.kind == "flask":
        r = h.get(f"/boom?campaign_id={CAMPAIGN}&cpm=2.00")
        assert r.status_code == 500  # Flask's own error handling, inside the middleware
    else:
        with pytest.raises(RuntimeError, match="app failed"):  # the server's 500
            h.get(f"/boom?campaign_id={CAMPAIGN}&cpm=2.00")
    assert h.store_calls == ["reserve", "release"]
    h.assert_released()


def test_flask_propagated_exception_releases(store_url: str) -> None:
    h = Harness("flask", redis_url=store_url)
    h.flask.testing = True  # PROPAGATE_EXCEPTIONS: the error goes through the middleware
    with pytest.raises(RuntimeError, match="view failed"):
        h.get(f"/boom?campaign_id={CAMPAIGN}&cpm=2.00")
    h.assert_released()


def test_generator_body_failing_part_way_releases(build: Any) -> None:
    h = build()
    r = h.get(f"/stream-fails?campaign_id={CAMPAIGN}&cpm=2.00", buffered=False)
    assert r.status_code == 200  # the status had gone out: only the body is cut short
    with pytest.raises(RuntimeError, match="stream died"):
        r.get_data()
    r.close()
    h.assert_released()


def test_body_failing_part_way_releases_even_before_close(build: Any) -> None:
    """The error itself releases: a server that never reaches close() loses nothing."""
    h = build()
    _, start_response = start_response_recorder()
    result = h.wsgi(h.environ("/stream-fails", f"campaign_id={CAMPAIGN}&cpm=2.00"), start_response)
    body = iter(result)
    assert next(body) == STREAM_CHUNKS[0]
    with pytest.raises(RuntimeError, match="stream died"):
        next(body)
    assert h.store_calls == ["reserve", "release"]
    h.assert_released()


def test_body_closed_before_exhaustion_releases_and_closes_the_app_body(build: Any) -> None:
    h = build()
    statuses, start_response = start_response_recorder()
    environ = h.environ("/stream", f"campaign_id={CAMPAIGN}&cpm=2.00")
    result = h.wsgi(environ, start_response)
    body = iter(result)
    assert next(body) == STREAM_CHUNKS[0]
    assert statuses == ["200 OK"]
    assert h.recorded() == (COST_UNITS, 1)
    result.close()  # the server gave up: e.g. the client went away
    assert [h.kind] == CLOSED  # passed through to the app's iterable
    h.assert_released()


def test_body_exhausted_then_closed_keeps(build: Any) -> None:
    """What a server does: iterate to the end, then close()."""
    h = build()
    _, start_response = start_response_recorder()
    result = h.wsgi(h.environ("/stream", f"campaign_id={CAMPAIGN}&cpm=2.00"), start_response)
    assert b"".join(result) == b"".join(STREAM_CHUNKS)
    result.close()
    result.close()  # twice is harmless
    assert [h.kind] == CLOSED
    assert h.recorded() == (COST_UNITS, 1)
    assert h.store_calls == ["reserve"]


def test_file_wrapper_body_is_served_kept_and_closed(store_url: str) -> None:
    h = Harness("wsgi", redis_url=store_url)
    payload = bytes(range(256)) * 100
    handle = io.BytesIO(payload)
    environ = h.environ("/file", f"campaign_id={CAMPAIGN}&cpm=2.00")
    environ["wsgi.file_wrapper"] = FileWrapper
    environ["test.file"] = handle
    _, start_response = start_response_recorder()
    result = h.wsgi(environ, start_response)
    assert b"".join(result) == payload
    result.close()
    assert handle.closed
    assert h.recorded() == (COST_UNITS, 1)


# -- which requests are guarded ---------------------------------------------------------------


def test_route_rules_beat_global_rules(store_url: str) -> None:
    h = Harness("flask", redis_url=store_url)  # global cap 1/1h
    # @ad_route(caps=["2/1h"]) and the campaign from the URL variable.
    served = [h.get("/ad/c2") for _ in range(3)]
    assert [r.status_code for r in served] == [200, 200, 204]
    assert served[2].headers["X-XSP-Decision"] == "frequency_capped"
    assert fields(served[0].text)["campaign_id"] == "c2"
    assert h.recorded("c2") == (2 * COST_UNITS, 2)
    # The undecorated route keeps the global 1/1h.
    assert [h.get("/ad?campaign_id=c3").status_code for _ in range(2)] == [200, 204]
    # A fixed campaign and price beat the query's.
    d = fields(h.get("/fixed?campaign_id=other&cpm=2.00", user="u9").text)
    assert (d["campaign_id"], Decimal(d["cost"])) == (CAMPAIGN, Decimal("0.002"))
    d = fields(h.get("/fixed", user="u8").text)
    assert (d["campaign_id"], Decimal(d["cost"])) == (CAMPAIGN, Decimal("0.005"))
    # Renamed parameters.
    d = fields(h.get("/custom?cid=c5&price=3.00&campaign_id=c6").text)
    assert (d["campaign_id"], Decimal(d["cost"])) == ("c5", Decimal("0.003"))
    assert h.recorded("c6") == (0, 0)


def test_url_variable_campaign(store_url: str) -> None:
    h = Harness("flask", redis_url=store_url)
    r = h.get("/ad/c7?cpm=4.00")
    assert r.status_code == 200
    d = fields(r.text)
    assert (d["campaign_id"], d["reason"], Decimal(d["cost"])) == ("c7", "served", Decimal("0.004"))
    assert h.recorded("c7") == (40_000, 1)
    bad = h.get("/ad/bad!id")
    assert bad.status_code == 400
    assert json.loads(bad.data)["field"] == "campaign_id"


def test_decorated_route_without_its_campaign_is_400(store_url: str) -> None:
    h = Harness("flask", redis_url=store_url)
    r = h.get("/custom?campaign_id=c1")
    assert r.status_code == 400
    assert json.loads(r.data)["field"] == "cid"
    assert h.store_calls == []


def test_unguarded_requests_make_no_store_call(build: Any) -> None:
    h = build(paths=["/ad"])
    r = h.get(f"/other?campaign_id={CAMPAIGN}&cpm=2.00")  # undecorated, outside paths
    assert (r.status_code, r.text) == (200, "other")
    assert h.get("/ad").status_code == 200  # no campaign: not an ad request
    assert h.get("/ad?campaign=c1&other=1").status_code == 200
    assert h.store_calls == []
    assert h.get(AD).status_code == 200  # the guarded path still is
    assert h.store_calls == ["reserve"]


def test_requests_no_view_handles_make_no_store_call(store_url: str) -> None:
    h = Harness("flask", redis_url=store_url)
    query = f"campaign_id={CAMPAIGN}&cpm=2.00"
    assert h.get(f"/nope?{query}").status_code == 404
    assert h.client.post(f"/ad?{query}", headers={"Cookie": "user_id=u1"}).status_code == 405
    assert h.client.get(f"/post-only?{query}").status_code == 405
    assert h.client.options(f"/ad?{query}").status_code == 200  # Flask's automatic OPTIONS
    assert h.store_calls == []
    assert h.recorded() == (0, 0)


def test_plain_wsgi_app_404_is_reserved_then_released(store_url: str) -> None:
    """Without a router to ask, the core rule decides before the app: its 404 releases."""
    h = Harness("wsgi", redis_url=store_url)
    assert h.get(f"/nope?campaign_id={CAMPAIGN}").status_code == 404
    assert h.store_calls == ["reserve", "release"]
    h.assert_released()


def test_flask_app_itself_can_be_wrapped(store_url: str) -> None:
    app = flask_app()
    mw = XSPWSGIMiddleware(app, redis_url=store_url, secret_key=SECRET, default_caps=["1/1h"])
    assert mw.flask_app is app
    c = Client(mw, use_cookies=False)
    u1 = {"Cookie": "user_id=u1"}
    assert c.get(f"/nope?campaign_id={CAMPAIGN}", headers=u1).status_code == 404
    assert [c.get("/ad/c2", headers=u1).status_code for _ in range(3)] == [200, 200, 204]


def test_flask_hook_does_nothing_for_requests_not_behind_the_middleware(store_url: str) -> None:
    """Reached without the middleware (nobody to keep or release), the hook stands aside."""
    h = Harness("flask", redis_url=store_url)
    inner = h.mw.app  # Flask's own wsgi_app
    _, start_response = start_response_recorder()
    body = b"".join(inner(h.environ("/ad", f"campaign_id={CAMPAIGN}"), start_response))
    assert body == VAST.encode()
    assert h.store_calls == []


# -- failure policy ---------------------------------------------------------------------------


def test_unreachable_store_fails_closed_for_the_budget_never_500(kind: str) -> None:
    h = Harness(kind, redis_url="redis://127.0.0.1:1/0")
    r = h.get(AD)
    assert r.status_code == 204
    assert r.headers["X-XSP-Decision"] == "store_unavailable"
    open_h = Harness(kind, redis_url="redis://127.0.0.1:1/0", budget_fail_open=True)
    r = open_h.get(f"/decision?campaign_id={CAMPAIGN}")
    assert r.status_code == 200
    d = fields(r.text)
    assert (d["allowed"], d["deg"]) == ("True", "True")


# -- sync all the way -------------------------------------------------------------------------


def test_no_event_loop_is_created_per_request(build: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import asgiref.sync

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the WSGI path must not run an event loop")

    for target, name in [
        (asyncio, "new_event_loop"),
        (asyncio.events, "new_event_loop"),
        (asyncio, "run"),
        (asyncio.runners, "run"),
        (asyncio, "get_event_loop"),
        (asgiref.sync, "async_to_sync"),
    ]:
        monkeypatch.setattr(target, name, forbidden)

    h = build()
    assert h.get(AD).status_code == 200
    assert h.get(AD).headers["X-XSP-Decision"] == "frequency_capped"
    assert h.get("/status/500?campaign_id=c2").status_code == 500
    assert h.get("/ad?campaign_id=c1&cpm=x").status_code == 400
    assert h.recorded() == (COST_UNITS, 1)
    assert h.recorded("c2") == (0, 0)
    assert h.store_calls == ["reserve", "reserve", "reserve", "release"]


def test_300_concurrent_requests_from_one_user_serve_exactly_3(kind: str, redis_url: str) -> None:
    h = Harness(kind, redis_url=redis_url, default_caps=["3/1h"])

    def one(_: int) -> int:
        r = h.get(AD)
        r.close()
        return r.status_code

    with ThreadPoolExecutor(max_workers=32) as pool:
        statuses = Counter(pool.map(one, range(300)))
    assert statuses == {200: 3, 204: 297}
    assert h.recorded() == (3 * COST_UNITS, 3)
