"""Hostile input never becomes a 500.

Raw ASGI scopes carry arbitrary bytes in the query string and the Cookie headers (an HTTP client
would sanitise them). Every request ends as exactly one of:

* 200: passed through (no campaign parameter) or served;
* 204 with a valid ``x-xsp-decision``: a no-fill;
* 400 ``application/problem+json`` naming the offending field (``cpm`` or ``campaign_id``).

The property tests also check WHICH of those, against an oracle written from the contract and
from the handler's own view of the query (Starlette's ``QueryParams``).
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any
from urllib.parse import quote, quote_from_bytes, quote_plus, urlencode

import pytest
from conftest import VAST
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.datastructures import QueryParams

from xsp_middleware import XSPMiddleware

DENIAL_REASONS = {
    "frequency_capped",
    "budget_exhausted",
    "campaign_paused",
    "store_unavailable",
    "no_eligible_campaign",  # none of several candidates (campaign_id=a,b)
}
MAX_CANDIDATES = 16  # the default max_candidates
PROBLEM_KEYS = {"type", "title", "detail", "field"}
CAMPAIGN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", re.ASCII)
PLAIN_DECIMAL = re.compile(r"([0-9]+)(?:\.([0-9]+))?", re.ASCII)
MAX_CPM = Decimal("1000.00")


# -- driving the app with raw ASGI ------------------------------------------------------------


class Result:
    def __init__(self, messages: list[dict[str, Any]]) -> None:
        start = messages[0]
        assert start["type"] == "http.response.start", messages
        self.status: int = start["status"]
        self.headers: list[tuple[bytes, bytes]] = list(start.get("headers", []))
        body = [m for m in messages[1:] if m["type"] == "http.response.body"]
        assert body, messages
        assert not body[-1].get("more_body", False)
        self.body = b"".join(m.get("body", b"") for m in body)

    def header(self, name: bytes) -> bytes | None:
        values = [v for k, v in self.headers if k.lower() == name]
        assert len(values) <= 1, self.headers
        return values[0] if values else None


async def call(
    app: XSPMiddleware, path: str, query: bytes, cookies: list[bytes] | None = None
) -> Result:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": [(b"host", b"testserver"), *((b"cookie", c) for c in cookies or [])],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    messages: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # no disconnect while we wait for the response
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        messages.append(dict(message))

    # Unexpected exceptions escape here and fail the test: they would be a 500 in a server.
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return Result(messages)


def problem_field(result: Result) -> str:
    """Assert ``result`` is a well-formed 400 problem and return its field."""
    assert result.status == 400
    assert result.header(b"content-type") == b"application/problem+json"
    length = result.header(b"content-length")
    assert length is not None and int(length) == len(result.body)
    problem = json.loads(result.body)
    assert isinstance(problem, dict)
    assert set(problem) == PROBLEM_KEYS
    assert all(isinstance(problem[k], str) and problem[k] for k in PROBLEM_KEYS), problem
    assert problem["field"] in ("cpm", "campaign_id")
    return str(problem["field"])


def assert_valid_outcome(result: Result) -> None:
    """The contract's three outcomes, never anything else."""
    assert result.status in (200, 204, 400), result.status
    if result.status == 200:
        assert result.body == VAST.encode()
        assert result.header(b"x-xsp-decision") is None
    elif result.status == 204:
        decision = result.header(b"x-xsp-decision")
        assert decision is not None and decision.decode() in DENIAL_REASONS, decision
        assert result.body == b""
    else:
        problem_field(result)


# -- the oracle -------------------------------------------------------------------------------


def cpm_verdict(text: str) -> str:
    """'ok', 'bad', or 'either' (a plain decimal so long that rejecting it is fair too)."""
    match = PLAIN_DECIMAL.fullmatch(text)
    if match is None:
        return "bad"
    whole, frac = match.group(1), (match.group(2) or "")
    value = Decimal(text)
    if len(frac.rstrip("0")) > 4 or value > MAX_CPM:
        return "bad"
    if len(whole) > 16 or len(frac) > 32:
        return "either"
    return "ok"


def valid_candidates(value: str) -> bool:
    """One campaign id, or several in priority order (``a,b,c``): none empty, none repeated,
    at most max_candidates."""
    ids = value.split(",")
    return (
        len(ids) <= MAX_CANDIDATES
        and len(set(ids)) == len(ids)
        and all(CAMPAIGN_ID.fullmatch(i) for i in ids)
    )


def expected(query: bytes) -> set[str]:
    """Acceptable outcomes: 'pass' (200 from the handler), 'decide' (200 or 204), or the
    field a 400 must name."""
    params = QueryParams(query)  # exactly what the handler would see
    campaigns = set(params.getlist("campaign_id"))
    if not campaigns:
        return {"pass"}
    bad: set[str] = set()
    if len(campaigns) > 1 or not valid_candidates(next(iter(campaigns))):
        bad.add("campaign_id")
    prices = set(params.getlist("cpm"))
    cpm_ok = True
    if len(prices) > 1:
        bad.add("cpm")
    elif prices:
        verdict = cpm_verdict(next(iter(prices)))
        if verdict == "bad":
            bad.add("cpm")
        elif verdict == "either":
            cpm_ok = False
    if bad:
        return bad  # when both are bad, naming either is right
    if not cpm_ok:
        return {"decide", "cpm"}
    return {"decide"}


def assert_matches_oracle(result: Result, query: bytes) -> None:
    assert_valid_outcome(result)
    allowed = expected(query)
    if result.status == 400:
        field = problem_field(result)
        assert field in allowed, (query, allowed, result.body)
    elif allowed == {"pass"}:
        assert result.status == 200, (query, result.status)
    else:
        assert "decide" in allowed, (query, allowed, result.status, result.body)


# -- strategies -------------------------------------------------------------------------------

CPM_SAMPLES = [
    "2.00",
    "0",
    "0.0000",
    "1000.00",
    "1000.0000000000",
    "1000.0001",
    "1000.01",
    "999.9999",
    "1.2345",
    "1.23456",
    "1.2345000000",
    "-1",
    "-1.00",
    "+1",
    " 1",
    "1 ",
    "1e3",
    "1E3",
    "0x10",
    "1,5",
    "1_000",
    "1.",
    ".5",
    "NaN",
    "nan",
    "Infinity",
    "-Infinity",
    "inf",
    "INF",
    "",
    "9" * 16,
    "9" * 17,
    "0" * 17 + "1",
    "1." + "0" * 33,
    "1" + "0" * 400,
    "\u0661",
    "\uff11",
    "\u00b2",
    "\u0663.\u0665",
    "1\n",
    "1\x00",
    "2.00\u200b",
]
CAMPAIGN_SAMPLES = [
    "c1",
    "C.1_-x",
    "0",
    "",
    "_x",
    "-x",
    ".x",
    "a b",
    "a{b}",
    "a:b",
    "a*",
    "a/b",
    "c1\n",
    "c1\x00",
    "x" * 128,
    "x" * 129,
    "\u0663",
    "c\u00e9",
    "{c1}",
    "c1 ",
    # Candidates in priority order: a valid list decides; an empty, repeated or 17th is a 400.
    "c1,c2",
    "c1,,c2",
    "c1,c1",
    ",c1",
    "c1,",
    ",".join(f"c{i}" for i in range(16)),
    ",".join(f"c{i}" for i in range(17)),
    "c1, c2",
]
KEYS = [
    "campaign_id",
    "cpm",
    "campaign%5Fid",
    "campaign%5fid",
    "cp%6D",
    "CPM",
    "Campaign_Id",
    "campaign_id ",
    "campaign+id",
    "other",
    "",
]

text_or_sample = st.one_of(
    st.sampled_from(CPM_SAMPLES),
    st.sampled_from(CAMPAIGN_SAMPLES),
    st.text(max_size=20),
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
)


@st.composite
def encoded(draw: st.DrawFn, value: st.SearchStrategy[str]) -> bytes:
    """A query component: text raw (utf-8), quote()d, quote_plus()d, or raw bytes."""
    how = draw(st.sampled_from(["raw", "quote", "quote_plus", "bytes_raw", "bytes_quoted"]))
    if how == "bytes_raw":
        return draw(st.binary(max_size=24))
    if how == "bytes_quoted":
        return quote_from_bytes(draw(st.binary(max_size=24)), safe="").encode()
    text = draw(value)
    if how == "raw":
        return text.encode("utf-8", "surrogatepass")
    if how == "quote":
        return quote(text, safe="", errors="surrogatepass").encode()
    return quote_plus(text, safe="", errors="surrogatepass").encode()


pairs = st.lists(
    st.tuples(
        st.one_of(st.sampled_from(KEYS).map(str.encode), encoded(st.text(max_size=12))),
        st.one_of(st.none(), encoded(text_or_sample)),  # None: a key with no '='
    ),
    max_size=6,
)


# Mostly-valid ad requests, so the store path (serve, cap, budget) is fuzzed too.
ad_request_pairs = st.tuples(
    st.tuples(
        st.sampled_from([b"campaign_id", b"campaign%5Fid"]),
        st.one_of(st.sampled_from([b"c1", b"c2", b"C.1_-x"]), encoded(text_or_sample)),
    ),
    st.tuples(
        st.sampled_from([b"cpm", b"cp%6D"]),
        st.one_of(st.sampled_from([b"2.00", b"1000.00", b"0.0001"]), encoded(text_or_sample)),
    ),
).map(list)


@st.composite
def query_strings(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=64))
    if draw(st.booleans()):
        extra = draw(pairs)
        items = draw(ad_request_pairs) + extra
        order = draw(st.permutations(range(len(items))))
        chosen = [items[i] for i in order]
    else:
        chosen = draw(pairs)
    parts = [k if v is None else k + b"=" + v for k, v in chosen]
    sep = draw(st.sampled_from([b"&", b"&", b"&", b";", b"&&"]))
    return sep.join(parts)


def _repeat(t: tuple[bytes, int]) -> bytes:
    return t[0] * t[1]


cookie_values = st.one_of(
    st.binary(max_size=64),
    st.builds(
        lambda name, value, quoted, junk: (
            b"%s=%s%s%s%s" % (name, b'"' if quoted else b"", value, b'"' if quoted else b"", junk)
        ),
        st.sampled_from([b"user_id", b" user_id ", b"USER_ID", b"user_id\x00", b"", b"a"]),
        st.binary(max_size=40),
        st.booleans(),
        st.sampled_from([b"", b";", b"; a=b", b";;;", b'"', b"=", b"; user_id=u2"]),
    ),
    st.text(max_size=30).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from(
        [
            b"",
            b";",
            b"=",
            b'""',
            b'user_id=""',
            b"user_id=",
            b"user_id",
            b'user_id="',
            "user_id=\u00e9\u4e2d\U0001f600".encode(),
            b"user_id=\xff\xfe\x00\x80",
            b"user_id=" + b"x" * 16384,
            b"user_id=" + b"\xff" * 16384,
            b";" * 16384,
        ]
    ),
    st.tuples(st.binary(min_size=1, max_size=8), st.integers(1, 4096)).map(_repeat),
)
cookie_headers = st.lists(
    st.one_of(st.sampled_from([b"user_id=u1", b"user_id=u2", b'user_id="u3"']), cookie_values),
    max_size=3,
)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for every example of a property test (apps keep per-loop connections)."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


# A tight cap and a small budget, so fuzzing also reaches the 204 no-fills.
FUZZ_SETTINGS: dict[str, Any] = {"default_caps": ["1/1h"], "default_budget": "0.01"}


def _close_app(loop: asyncio.AbstractEventLoop, app: XSPMiddleware) -> None:
    loop.run_until_complete(app.store.aclose())


@pytest.fixture
def embedded_app(
    make_app: Callable[..., XSPMiddleware], loop: asyncio.AbstractEventLoop
) -> Iterator[XSPMiddleware]:
    """One app for every example of a test (state accumulates, as in production)."""
    app = make_app(redis_url=f"memory://fuzz-{uuid.uuid4().hex}", **FUZZ_SETTINGS)
    yield app
    _close_app(loop, app)


@pytest.fixture
def redis_app(
    make_app: Callable[..., XSPMiddleware], loop: asyncio.AbstractEventLoop, redis_url: str
) -> Iterator[XSPMiddleware]:
    app = make_app(redis_url=redis_url, **FUZZ_SETTINGS)
    yield app
    _close_app(loop, app)


def _fuzz_once(
    loop: asyncio.AbstractEventLoop, app: XSPMiddleware, query: bytes, cookies: list[bytes]
) -> None:
    result = loop.run_until_complete(call(app, "/ad", query, cookies))
    assert_matches_oracle(result, query)
    kind = "pass-through" if expected(query) == {"pass"} else "ad request"
    event(f"{kind}: {result.status} {(result.header(b'x-xsp-decision') or b'').decode()}")


# -- property tests ---------------------------------------------------------------------------


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(query=query_strings(), cookies=cookie_headers)
def test_fuzzed_query_and_cookies_never_500_on_embedded_store(
    embedded_app: XSPMiddleware,
    loop: asyncio.AbstractEventLoop,
    query: bytes,
    cookies: list[bytes],
) -> None:
    _fuzz_once(loop, embedded_app, query, cookies)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(query=query_strings(), cookies=cookie_headers)
def test_fuzzed_query_and_cookies_never_500_on_real_redis(
    redis_app: XSPMiddleware,
    loop: asyncio.AbstractEventLoop,
    query: bytes,
    cookies: list[bytes],
) -> None:
    _fuzz_once(loop, redis_app, query, cookies)


@settings(max_examples=100, deadline=None)
@given(cpm=st.sampled_from(CPM_SAMPLES) | st.text(max_size=12) | st.decimals().map(str))
def test_cpm_is_accepted_exactly_when_it_is_a_plain_bounded_decimal(cpm: str) -> None:
    """The oracle's CPM rule against the middleware, one value at a time, on a fresh store."""
    query = urlencode({"campaign_id": "c1", "cpm": cpm}).encode()

    async def run() -> Result:
        app = XSPMiddleware(_routes_app(), redis_url=f"memory://cpm-{uuid.uuid4().hex}")
        try:
            return await call(app, "/ad", query)
        finally:
            await app.store.aclose()

    result = asyncio.run(run())
    verdict = cpm_verdict(QueryParams(query)["cpm"])
    if verdict == "ok":
        assert result.status == 200, (cpm, result.body)
    elif verdict == "bad":
        assert problem_field(result) == "cpm", cpm
    else:
        assert result.status == 200 or problem_field(result) == "cpm"


def _routes_app() -> Any:
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def ad(request: Any) -> Response:
        return Response(VAST, media_type="application/xml")

    return Starlette(routes=[Route("/ad", ad)])


# -- explicit contract cases ------------------------------------------------------------------


@pytest.fixture
async def app(make_app: Callable[..., XSPMiddleware]) -> Any:
    app = make_app(redis_url=f"memory://explicit-{uuid.uuid4().hex}", default_caps=["1/1h"])
    yield app
    await app.store.aclose()


BAD_CPM = [
    "abc",
    "1e3",
    "+1",
    " 1",
    "0x10",
    "1,5",
    "-1.00",
    "-1",
    "NaN",
    "Infinity",
    "inf",
    "1.23456",
    "1000.01",
    "1000.0001",
    "",
    "1.",
    ".5",
    "\u0661",
    "\uff11",
]


@pytest.mark.parametrize("cpm", BAD_CPM)
async def test_bad_cpm_is_400_naming_cpm_and_reserves_nothing(app: Any, cpm: str) -> None:
    query = urlencode({"campaign_id": "c1", "cpm": cpm}).encode()
    result = await call(app, "/ad", query, [b"user_id=u1"])
    assert problem_field(result) == "cpm"
    problem = json.loads(result.body)
    assert problem["type"] == "urn:xsp-middleware:problem:invalid-parameter"
    view = await app.store.get_campaign("c1")
    assert (view.spent_units, view.impressions) == (0, 0)


@pytest.mark.parametrize("cpm", ["0", "2", "2.00", "1.2345", "1.2345000", "1000.00", "1000"])
async def test_good_cpm_is_served(app: Any, cpm: str) -> None:
    query = urlencode({"campaign_id": "c1", "cpm": cpm}).encode()
    result = await call(app, "/ad", query)
    assert result.status == 200
    view = await app.store.get_campaign("c1")
    assert view.spent == Decimal(cpm) / 1000
    assert view.impressions == 1


BAD_CAMPAIGN = [
    "_x",
    "-x",
    ".x",
    "a b",
    "a{b}",
    "a:b",
    "a*",
    "a/b",
    "x" * 129,
    "",
    "c1\n",
    "c\u00e9",
    "\u0663",
]


@pytest.mark.parametrize("campaign", BAD_CAMPAIGN, ids=lambda c: repr(c)[:20])
async def test_bad_campaign_id_is_400_naming_campaign_id(app: Any, campaign: str) -> None:
    query = urlencode({"campaign_id": campaign, "cpm": "2.00"}).encode()
    result = await call(app, "/ad", query)
    assert problem_field(result) == "campaign_id"


async def test_empty_campaign_id_without_value_is_400(app: Any) -> None:
    for query in (b"campaign_id=", b"campaign_id", b"campaign_id=&cpm=2.00", b"campaign%5Fid="):
        result = await call(app, "/ad", query)
        assert problem_field(result) == "campaign_id", query


async def test_percent_encoded_campaign_key_is_validated_too(app: Any) -> None:
    assert problem_field(await call(app, "/ad", b"campaign%5Fid=_x")) == "campaign_id"
    assert problem_field(await call(app, "/ad", b"campaign%5Fid=c1&cp%6D=abc")) == "cpm"
    assert (await call(app, "/ad", b"campaign%5Fid=c1&cp%6D=2.00")).status == 200
    view = await app.store.get_campaign("c1")
    assert view.impressions == 1


async def test_longest_valid_campaign_id_is_served(app: Any) -> None:
    campaign = "c" + "x" * 127
    result = await call(app, "/ad", f"campaign_id={campaign}&cpm=2.00".encode())
    assert result.status == 200


@pytest.mark.parametrize(
    ("query", "field"),
    [
        (b"campaign_id=c1&campaign_id=c2&cpm=2.00", "campaign_id"),
        (b"campaign_id=c1&cpm=2.00&campaign_id=", "campaign_id"),
        (b"campaign_id=c1&campaign%5Fid=c2", "campaign_id"),
        (b"campaign_id=c1&cpm=1.00&cpm=2.00", "cpm"),
        (b"campaign_id=c1&cpm=2.00&cpm=", "cpm"),
        (b"campaign_id=c1&cpm=2.00&cpm=2.0", "cpm"),
    ],
)
async def test_parameter_given_twice_with_different_values_is_400(
    app: Any, query: bytes, field: str
) -> None:
    assert problem_field(await call(app, "/ad", query)) == field


async def test_parameter_repeated_with_the_same_value_is_fine(app: Any) -> None:
    result = await call(app, "/ad", b"campaign_id=c1&campaign_id=c1&cpm=2.00&cpm=2.00")
    assert result.status == 200
    view = await app.store.get_campaign("c1")
    assert (view.spent, view.impressions) == (Decimal("0.002"), 1)


# -- hostile and anonymous cookies ------------------------------------------------------------

ANONYMOUS_COOKIES: list[list[bytes]] = [
    [],
    [b""],
    [b";"],
    [b";;;;"],
    [b"="],
    [b"user_id"],
    [b"user_id="],
    [b"user_id=   "],
    [b'user_id=""'],
    [b"USER_ID=u1"],
    [b"user_id\x00=u1"],
    [b"other=u1; session=x"],
    [b"\xff\xfe\x00\x80"],
    ["\u4e2d\u6587=\u00e9".encode()],
    [b"user_id=" + b"x" * 257],  # longer than any real id: anonymous
    [b"user_id=" + b"x" * 16384],
    [b";" * 16384],
    [b"user_id=", b"", b"user_id=;"],
]


def decision_fields(body: bytes) -> dict[str, str]:
    names = (
        "allowed",
        "reason",
        "campaign_id",
        "cost",
        "remaining_impressions",
        "remaining_budget",
        "anonymous",
        "degraded",
    )
    return dict(zip(names, body.decode().split("|"), strict=True))


@pytest.mark.parametrize("cookies", ANONYMOUS_COOKIES, ids=lambda c: repr(c)[:30])
async def test_missing_empty_or_unparsable_cookie_is_anonymous(
    app: Any, cookies: list[bytes]
) -> None:
    result = await call(app, "/decision", b"campaign_id=c1&cpm=2.00", cookies)
    assert result.status == 200
    fields = decision_fields(result.body)
    assert (fields["allowed"], fields["reason"], fields["anonymous"]) == ("True", "served", "True")
    assert fields["remaining_impressions"] == "None"  # no cap applies to anonymous users


@pytest.mark.parametrize(
    "cookies",
    [
        [b"user_id=u1"],
        [b'user_id="u1"'],
        [b"  user_id  =  u1  "],
        [b"a=b; user_id=u1; c=d"],
        [b"user_id=; user_id=u1"],
        [b"other=x", b"user_id=u1"],
        [b"user_id=\xff\xfe\x80"],
        [b"user_id=" + b"x" * 256],
        ["user_id=\u00e9\U0001f600".encode()],
    ],
    ids=lambda c: repr(c)[:30],
)
async def test_usable_cookie_is_a_capped_user(app: Any, cookies: list[bytes]) -> None:
    first = await call(app, "/decision", b"campaign_id=c1&cpm=2.00", cookies)
    fields = decision_fields(first.body)
    assert (fields["allowed"], fields["anonymous"]) == ("True", "False")
    second = await call(app, "/decision", b"campaign_id=c1&cpm=2.00", cookies)
    assert second.status == 204
    assert second.header(b"x-xsp-decision") == b"frequency_capped"


async def test_hostile_cookies_never_500_and_budget_still_binds_anonymous_users(
    make_app: Callable[..., XSPMiddleware],
) -> None:
    # Budget for exactly three impressions at CPM 2.00; the 1/1h cap cannot apply (anonymous).
    app = make_app(
        redis_url=f"memory://anon-{uuid.uuid4().hex}",
        default_caps=["1/1h"],
        default_budget="0.006",
    )
    try:
        outcomes = []
        for cookies in ANONYMOUS_COOKIES:
            result = await call(app, "/decision", b"campaign_id=c1&cpm=2.00", cookies)
            assert result.status in (200, 204)
            if result.status == 200:
                assert decision_fields(result.body)["anonymous"] == "True"
                outcomes.append("served")
            else:
                outcomes.append(result.header(b"x-xsp-decision").decode())
        assert outcomes == ["served"] * 3 + ["budget_exhausted"] * (len(ANONYMOUS_COOKIES) - 3)
        view = await app.store.get_campaign("c1")
        assert (view.spent, view.impressions) == (Decimal("0.006"), 3)
    finally:
        await app.store.aclose()
