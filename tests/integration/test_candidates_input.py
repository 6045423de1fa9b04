"""Bad candidates, through HTTP, in every integration where they apply: a list the request
names wrongly is the client's fault (``400`` problem+json, ``field`` ``campaign_id``); a route's
candidates callable that fails or answers garbage is the app's (a logged, degraded no-fill:
``204`` ``no_eligible_campaign``, never a ``500`` and never a ``400``); a static list that is
wrong is the developer's (``ConfigError`` when the route is decorated).

Bad input never reaches the store, so two stores (the embedded one and a real Redis) are
enough here; the harness is test_candidates_frameworks.py's.
"""

# ruff: noqa: F811 - the fixtures imported from test_candidates_frameworks are used by name

from __future__ import annotations

import gc
import logging
import time
import uuid
import warnings
from collections.abc import Iterator
from urllib.parse import urlencode

import pytest
from conftest import SECRET
from django.http import HttpResponse
from django.test import override_settings
from starlette.applications import Starlette
from test_candidates_frameworks import (  # noqa: F401 - fixtures, used by name
    ASYNC_CAPABLE,
    Serve,
    _no_xsp_environment,
    admin,
    kind,
    made,
    routed_kind,
    serve,
)

from xsp_middleware import (
    ConfigError,
    Settings,
    UpstreamSession,
    XSPMiddleware,
    ad_route,
    logs,
    sign_price,
)
from xsp_middleware.django import XSPMiddleware as DjangoXSPMiddleware
from xsp_middleware.django import ad_view
from xsp_middleware.flask import ad_route as flask_ad_route
from xsp_middleware.settings import Rules
from xsp_middleware.store import Store
from xsp_middleware.wsgi import XSPWSGIMiddleware

PRICE_KEY = "candidates-price-key-0123456789"


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> str:
    """This module's stores: bad input makes no store call, whatever the store."""
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url"))
    return f"memory://{uuid.uuid4().hex}"


async def nothing_recorded(admin: Store, *campaigns: str) -> None:
    for cid in campaigns:
        view = await admin.get_campaign(cid)
        assert (view.impressions, view.spent_units, sum(view.denials.values())) == (0, 0, 0), cid


# -- the request names them wrongly: 400 ------------------------------------------------------

SEVENTEEN = ",".join(f"c{i}" for i in range(17))
BAD_LISTS = [
    SEVENTEEN,  # more than max_candidates (16)
    "a,,b",  # an empty element
    "a,b,",  # a trailing comma
    ",a,b",  # a leading one
    ",",
    "a,b,a",  # a duplicate
    "a,a",
    "a,b%20c",  # an invalid id: "b c"
    "a,%7Bx%7D",  # "{x}" (a hash tag would break a cluster's slots)
    "a,b!",
    "a," + "x" * 200,  # too long
]


async def test_a_bad_candidates_list_is_a_400_naming_campaign_id(
    kind: str, serve: Serve, admin: Store
) -> None:
    app = await serve(kind)
    for bad in BAD_LISTS:
        reply = await app.get(f"/ad?campaign_id={bad}")
        assert reply.problem_field() == "campaign_id", (bad, reply)
    await nothing_recorded(admin, "a", "b", "c0", "c1")

    # Sixteen, the default max_candidates, is fine; so is a comma sent encoded.
    sixteen = await app.get("/ad?campaign_id=" + ",".join(f"c{i}" for i in range(16)))
    assert sixteen.decision["campaign_id"] == "c0"
    encoded = await app.get("/ad?campaign_id=b%2Cc", user="u2")
    assert encoded.decision["candidates"] == [("b", "budget_exhausted"), ("c", "served")]


async def test_the_max_candidates_setting_bounds_the_list(kind: str, serve: Serve) -> None:
    app = await serve(kind, max_candidates=4)  # the setting under test
    five = await app.get("/ad?campaign_id=c1,c2,c3,c4,c5")
    assert five.problem_field() == "campaign_id"
    four = await app.get("/ad?campaign_id=b,c2,c3,c4")
    assert four.decision["candidates"] == [("b", "budget_exhausted"), ("c2", "served")]


async def test_a_signed_price_names_one_candidate(kind: str, serve: Serve, admin: Store) -> None:
    app = await serve(kind, price_source="signed", price_key=PRICE_KEY)  # the setting under test
    signed = sign_price("c", "2.00", secret_key=PRICE_KEY)
    several = await app.get("/ad?" + urlencode({**signed, "campaign_id": "c,d"}))
    assert several.problem_field() == "sig"
    await nothing_recorded(admin, "c", "d")
    # The same signature for its one campaign is still good: the 400 did not spend its nonce.
    one = await app.get("/ad?" + urlencode(signed))
    assert one.decision["campaign_id"] == "c"


# -- the route's callable fails: a logged, degraded no-fill -----------------------------------

FAILING_MODES = ["raise", "none", "string", "ints", "invalid", "twenty"]


def failing_routes(kind: str) -> list[str]:
    return ["/bad", "/abad"] if kind in ASYNC_CAPABLE else ["/bad"]


async def test_a_failing_candidates_callable_is_a_degraded_no_fill(
    routed_kind: str, serve: Serve, admin: Store
) -> None:
    # debug_headers: X-XSP-Degraded says why, only under it.
    app = await serve(routed_kind, debug_headers=True)
    for route in failing_routes(routed_kind):
        outcomes = {}
        for mode in FAILING_MODES:
            reply = await app.get(route, headers={"x-mode": mode})
            outcomes[mode] = (
                reply.status,
                reply.headers.get("x-xsp-decision"),
                reply.headers.get("x-xsp-degraded", "")[:12],
            )
        expected = (204, "no_eligible_campaign", "candidates: ")
        assert outcomes == dict.fromkeys(FAILING_MODES, expected), route
        raised = await app.get(route, headers={"x-mode": "raise"})
        assert "TargetingDown" in raised.headers["x-xsp-degraded"], raised

        # [] is the app's targeting finding nothing: a no-fill, not degraded.
        empty = await app.get(route, headers={"x-mode": "empty"})
        empty.denied("no_eligible_campaign")
        assert "x-xsp-degraded" not in empty.headers, empty
        # Repeats are dropped, the first kept: c, d.
        repeats = await app.get(route, headers={"x-mode": "repeats"}, user=f"r-{route}")
        assert repeats.decision["candidates"] == [("c", "served")]
    await nothing_recorded(admin, "a", "b", "t0", "t1")


async def test_a_callable_answering_a_dict_or_a_set_is_not_given_a_priority_order(
    serve: Serve,
) -> None:
    """The contract: the callable returns the list, in priority order; anything that is not a
    list is garbage. A set has no order (a string's hash differs per process), and a dict's
    keys are no list of candidates: each must be a degraded no-fill, not silently served."""
    # debug_headers: X-XSP-Degraded says why, only under it. (The answer is read by the core,
    # the same for every integration: one is enough.)
    app = await serve("starlette", debug_headers=True)
    outcomes = {}
    for mode in ("dict", "set"):
        reply = await app.get("/bad", headers={"x-mode": mode})
        outcomes[mode] = (reply.status, reply.headers.get("x-xsp-degraded", "")[:12])
    assert outcomes == dict.fromkeys(("dict", "set"), (204, "candidates: "))


async def test_the_handler_sees_the_degraded_decision_under_on_denied_pass(
    routed_kind: str, serve: Serve
) -> None:
    app = await serve(routed_kind, on_denied="pass")  # the handler runs with the denial
    for route in failing_routes(routed_kind):
        for mode in FAILING_MODES:
            seen = (await app.get(route, headers={"x-mode": mode})).decision
            assert seen["allowed"] is False, (route, mode, seen)
            assert seen["reason"] == "no_eligible_campaign", (route, mode, seen)
            assert seen["degraded"] is True, (route, mode, seen)
            assert seen["degraded_reason"].startswith("candidates: "), (route, mode, seen)
            assert seen["candidates"] == [], (route, mode, seen)
        empty = (await app.get(route, headers={"x-mode": "empty"})).decision
        assert (empty["reason"], empty["degraded"], empty["candidates"]) == (
            "no_eligible_campaign",
            False,
            [],
        )


@pytest.mark.parametrize("sync_kind", ["flask", "django-wsgi"])
async def test_an_async_callable_under_a_sync_integration_is_degraded(
    sync_kind: str, serve: Serve, admin: Store
) -> None:
    # debug_headers: X-XSP-Degraded says why, only under it.
    app = await serve(sync_kind, debug_headers=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for route, headers in (("/apick", {"x-audience": "sports"}), ("/abad", {"x-mode": "ints"})):
            reply = await app.get(route, headers=headers)
            reply.denied("no_eligible_campaign")
            assert reply.headers["x-xsp-degraded"].startswith("candidates: "), reply
            assert "async" in reply.headers["x-xsp-degraded"], reply
        gc.collect()
    never_awaited = [w for w in caught if "never awaited" in str(w.message)]
    assert never_awaited == [], [str(w.message) for w in never_awaited]
    await nothing_recorded(admin, "a", "b", "c")


# -- its log: once per interval, with a count -------------------------------------------------


@pytest.fixture
def fresh_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """No kind inside its interval; our INFO and up captured."""
    logs.reset()
    caplog.set_level(logging.INFO, logger="xsp_middleware")
    yield
    logs.reset()


def records_of(caplog: pytest.LogCaptureFixture, kind: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "xsp_middleware" and getattr(r, "xsp_event", None) == kind
    ]


async def test_a_failing_callable_is_logged_once_per_interval_with_a_count(
    routed_kind: str, serve: Serve, caplog: pytest.LogCaptureFixture, fresh_logs: None
) -> None:
    app = await serve(routed_kind)
    for _ in range(40):
        (await app.get("/bad", headers={"x-mode": "raise"})).denied("no_eligible_campaign")
    deadline = time.monotonic() + 2
    kinds = set()
    while time.monotonic() < deadline:
        kinds = {
            getattr(r, "xsp_event", None) for r in caplog.records if r.name == "xsp_middleware"
        }
        if "candidates_failed" in kinds:
            break
        time.sleep(0.01)
    first = records_of(caplog, "candidates_failed")
    assert len(first) == 1, [r.getMessage() for r in caplog.records]  # at once, then counted
    assert first[0].levelno == logging.WARNING
    logs.flush()  # the interval's end, brought forward
    records = records_of(caplog, "candidates_failed")
    assert len(records) <= 2, [r.getMessage() for r in records]
    assert sum(r.count for r in records) == 40  # type: ignore[attr-defined]
    assert "TargetingDown" in records[-1].getMessage(), records[-1].getMessage()
    assert records[-1].getMessage().startswith("xsp_event=candidates_failed count=")


# -- a static list that is wrong: ConfigError when the route is decorated ----------------------

DECORATORS = {"ad_route": ad_route, "flask": flask_ad_route, "django": ad_view}
BAD_STATIC: list[object] = [
    ["a", "a"],
    ["a", "b", "a"],
    ["a", "b c"],
    ["a", "{x}"],
    ["a", ""],
    ["a", 1],
    [],
    "a,b",
    "a",
]


@pytest.mark.parametrize("decorator", list(DECORATORS))
def test_a_bad_static_list_is_a_config_error_at_decoration(decorator: str) -> None:
    decorate = DECORATORS[decorator]
    for bad in BAD_STATIC:
        with pytest.raises(ConfigError, match="candidates"):
            decorate(candidates=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="selection"):
        decorate(candidates=["a", "b"], selection="random")
    with pytest.raises(ConfigError):
        decorate(candidates=["a", "b"], campaign="a")  # one or the other
    decorate(candidates=("a", "b"))  # a tuple is a list of ids too
    decorate(candidates=["a", "b"], selection="weighted")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("selection", "random"),
        ("selection", "First"),
        ("max_candidates", 0),
        ("max_candidates", 65),
        ("max_candidates", True),
        ("max_candidates", "4"),
    ],
)
def test_bad_candidate_settings_fail_at_start_up(name: str, value: object) -> None:
    options = {"redis_url": "memory://bad-settings", "secret_key": SECRET, name: value}
    with pytest.raises(ConfigError, match=name):
        XSPMiddleware(Starlette(), **options)
    with pytest.raises(ConfigError, match=name):
        XSPWSGIMiddleware(lambda environ, start_response: [], **options)
    with pytest.raises(ConfigError, match=name):
        UpstreamSession(object(), **options)  # type: ignore[arg-type]
    conf = {"REDIS_URL": "memory://bad-settings", "SECRET_KEY": SECRET, name.upper(): value}
    with override_settings(XSP_MIDDLEWARE=conf), pytest.raises(ConfigError, match=name):
        DjangoXSPMiddleware(lambda request: HttpResponse())
    if value in ("random", "First", 0, 65):  # as an environment variable too
        with pytest.raises(ConfigError, match=f"XSP_{name.upper()}"):
            Rules.from_settings(Settings.from_env({f"XSP_{name.upper()}": str(value)}))
