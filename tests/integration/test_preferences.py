"""User preferences: the admin API, the cookie-authenticated ASGI app (standalone and mounted
under Starlette), its CSRF checks, erasure, TTLs, the CLI, and fuzzing (never a 5xx)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
from conftest import SECRET, as_user, client
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from processes import cli
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from xsp_middleware import ConfigError, Settings, Store, XSPMiddleware, preferences_app
from xsp_middleware import preferences as prefs_module
from xsp_middleware.preferences import (
    Preferences,
    PreferencesApp,
    TooManyBlockedCampaigns,
    block_campaign,
    forget_user,
    get_preferences,
    set_opted_out,
    unblock_campaign,
)
from xsp_middleware.settings import Rules

PROBLEM_KEYS = {"type", "title", "detail", "field"}
DAY_MS = 86400 * 1000
EMPTY = {"opted_out": False, "blocked_campaigns": []}


# Every state-changing request.
CHANGES: list[tuple[str, str, dict[str, Any]]] = [
    ("PUT", "/preferences", {"json": {"opted_out": True}}),
    ("POST", "/preferences/blocked-campaigns/c9", {}),
    ("DELETE", "/preferences/blocked-campaigns/c1", {}),
    ("DELETE", "/preferences", {}),
]


def make_prefs(url: str, **options: Any) -> PreferencesApp:
    options.setdefault("secret_key", SECRET)
    # As conftest's make_app: behaviour tests, not latency tests. With the default 50 ms, a
    # Sentinel connect (ask a sentinel, then connect to the master) on a busy CI box failed one
    # run with "Timeout connecting to server". Tests of timeouts set store_timeout themselves.
    return preferences_app(redis_url=url, **options)


def store_for(url: str) -> Store:
    settings = Settings(redis_url=url, secret_key=SECRET)
    return Store(Rules.from_settings(settings))


def problem(r: httpx.Response, status: int) -> dict[str, Any]:
    """Assert ``r`` is a well-formed problem+json answer with ``status``; return its body."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["cache-control"] == "no-store"
    assert int(r.headers["content-length"]) == len(r.content)
    body: dict[str, Any] = r.json()
    assert set(body) == PROBLEM_KEYS
    assert all(isinstance(body[k], str) and body[k] for k in ("type", "title", "detail"))
    assert body["field"] is None or isinstance(body["field"], str)
    return body


def prefs_of(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    assert r.headers["cache-control"] == "no-store"
    data: dict[str, Any] = r.json()
    assert set(data) == {"opted_out", "blocked_campaigns"}
    return data


def sync_redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


# -- the admin API ----------------------------------------------------------------------------


async def test_admin_api_round_trip(store_url: str) -> None:
    store = store_for(store_url)
    try:
        assert await get_preferences(store, "alice") == Preferences(False, ())
        assert await set_opted_out(store, "alice", True) == Preferences(True, ())
        await block_campaign(store, "alice", "c2")
        await block_campaign(store, "alice", "c1")
        again = await block_campaign(store, "alice", "c2")  # no duplicates
        assert again == Preferences(True, ("c1", "c2"))
        assert await get_preferences(store, "alice") == again
        assert await get_preferences(store, "bob") == Preferences()  # per user
        assert await unblock_campaign(store, "alice", "c9") == again  # idempotent
        assert await unblock_campaign(store, "alice", "c2") == Preferences(True, ("c1",))
        assert await set_opted_out(store, "alice", False) == Preferences(False, ("c1",))
        assert await forget_user(store, "alice") is True
        assert await forget_user(store, "alice") is False
        assert await get_preferences(store, "alice") == Preferences()
        for bad in ("bad:id", "", "a,b", "a b", "{x}", "x" * 129):
            with pytest.raises(ConfigError):
                await block_campaign(store, "alice", bad)
            with pytest.raises(ConfigError):
                await unblock_campaign(store, "alice", bad)
    finally:
        await store.aclose()


async def test_layout_is_two_fields_in_the_user_hash(redis_url: str) -> None:
    store = store_for(redis_url)
    await set_opted_out(store, "alice", True)
    await block_campaign(store, "alice", "zeta")
    await block_campaign(store, "alice", "alpha")
    await store.aclose()
    r = sync_redis(redis_url)
    key = store.user_key("alice")
    assert r.hgetall(key) == {b"!o": b"1", b"!b": b"alpha,zeta"}
    assert "alice" not in key


async def test_removing_the_last_preference_leaves_no_key(store_url: str) -> None:
    store = store_for(store_url)
    try:
        key = store.user_key("alice")
        await set_opted_out(store, "alice", True)
        await set_opted_out(store, "alice", False)
        assert await store.client.exists(key) == 0
        await block_campaign(store, "alice", "c1")
        await unblock_campaign(store, "alice", "c1")
        assert await store.client.exists(key) == 0
        await unblock_campaign(store, "alice", "c1")  # on nothing: still nothing
        await set_opted_out(store, "alice", False)
        assert await store.client.exists(key) == 0
    finally:
        await store.aclose()


async def test_a_preference_write_keeps_the_hash_alive_400_days_and_never_shortens(
    redis_url: str, make_app: Callable[..., XSPMiddleware]
) -> None:
    # A cap log alone lives as long as its window (3/1h: one hour).
    async with client(make_app(redis_url=redis_url)) as c:
        assert (await c.get("/ad?campaign_id=c1", headers=as_user("alice"))).status_code == 200
    store = store_for(redis_url)
    key = store.user_key("alice")
    r = sync_redis(redis_url)
    assert 0 < r.pttl(key) <= 3600 * 1000
    await set_opted_out(store, "alice", True)
    assert r.pttl(key) >= 399 * DAY_MS
    assert r.hexists(key, "c1")  # the cap log is kept

    await block_campaign(store, "bob", "c1")
    bob = store.user_key("bob")
    assert r.pttl(bob) >= 399 * DAY_MS
    r.pexpire(bob, 800 * DAY_MS)  # longer than a preference needs: never shortened
    await block_campaign(store, "bob", "c2")
    await set_opted_out(store, "bob", True)
    assert r.pttl(bob) > 799 * DAY_MS
    await store.aclose()


async def test_block_list_is_bounded(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefs_module, "MAX_BLOCKED_CAMPAIGNS", 3)
    store = store_for(store_url)
    try:
        for cid in ("c1", "c2", "c3"):
            await block_campaign(store, "alice", cid)
        with pytest.raises(TooManyBlockedCampaigns):
            await block_campaign(store, "alice", "c4")
        assert await block_campaign(store, "alice", "c2") == Preferences(False, ("c1", "c2", "c3"))
        app = make_prefs(store_url)
        async with client(app) as c:
            r = await c.post("/preferences/blocked-campaigns/c5", headers=as_user("alice"))
            assert problem(r, 409)["field"] == "campaign_id"
            await app.store.aclose()
    finally:
        await store.aclose()


async def test_hand_edited_junk_is_ignored_on_read(redis_url: str) -> None:
    store = store_for(redis_url)
    r = sync_redis(redis_url)
    r.hset(store.user_key("alice"), mapping={"!o": "yes", "!b": "c2,,bad:id,c1,c2"})
    assert await get_preferences(store, "alice") == Preferences(False, ("c1", "c2"))
    # A write cleans the list up: sorted, deduplicated.
    assert await block_campaign(store, "alice", "c0") == Preferences(False, ("c0", "c1", "c2"))
    await store.aclose()


# -- the ASGI app -----------------------------------------------------------------------------


async def test_get_put_post_delete_flow(store_url: str) -> None:
    app = make_prefs(store_url)
    alice = as_user("alice")
    async with client(app) as c:
        assert prefs_of(await c.get("/preferences", headers=alice)) == EMPTY
        r = await c.put("/preferences", json={"opted_out": True}, headers=alice)
        assert prefs_of(r) == {"opted_out": True, "blocked_campaigns": []}
        r = await c.post("/preferences/blocked-campaigns/c2", headers=alice)
        assert prefs_of(r) == {"opted_out": True, "blocked_campaigns": ["c2"]}
        r = await c.post("/preferences/blocked-campaigns/c1", headers=alice)
        assert prefs_of(r)["blocked_campaigns"] == ["c1", "c2"]
        r = await c.post("/preferences/blocked-campaigns/c1", headers=alice)
        assert prefs_of(r)["blocked_campaigns"] == ["c1", "c2"]
        r = await c.delete("/preferences/blocked-campaigns/c2", headers=alice)
        assert prefs_of(r) == {"opted_out": True, "blocked_campaigns": ["c1"]}
        r = await c.put("/preferences", json={"opted_out": False}, headers=alice)
        assert prefs_of(r) == {"opted_out": False, "blocked_campaigns": ["c1"]}
        assert prefs_of(await c.get("/preferences", headers=as_user("bob"))) == EMPTY

        r = await c.delete("/preferences", headers=alice)
        assert r.status_code == 204 and r.content == b""
        assert r.headers["cache-control"] == "no-store"
        assert prefs_of(await c.get("/preferences", headers=alice)) == EMPTY
        r = await c.delete("/preferences", headers=alice)  # nothing left: still 204
        assert r.status_code == 204

        # HEAD and OPTIONS.
        r = await c.head("/preferences", headers=alice)
        assert r.status_code == 200 and r.content == b""
        r = await c.options("/preferences")
        assert r.status_code == 204 and "PUT" in r.headers["allow"]
    await app.store.aclose()


async def test_the_app_and_the_admin_api_share_state(store_url: str) -> None:
    app = make_prefs(store_url)
    async with client(app) as c:
        await c.put("/preferences", json={"opted_out": True}, headers=as_user("alice"))
        assert await get_preferences(app.store, "alice") == Preferences(True, ())
        await block_campaign(app.store, "alice", "c7")
        r = await c.get("/preferences", headers=as_user("alice"))
        assert prefs_of(r)["blocked_campaigns"] == ["c7"]
    await app.store.aclose()


async def test_mounted_under_starlette(store_url: str) -> None:
    prefs = make_prefs(store_url)

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("home")

    site = Starlette(routes=[Route("/", home), Mount("/me", app=prefs)])
    alice = as_user("alice")
    async with client(site) as c:
        assert prefs_of(await c.get("/me/preferences", headers=alice)) == EMPTY
        r = await c.put("/me/preferences", json={"opted_out": True}, headers=alice)
        assert prefs_of(r)["opted_out"] is True
        r = await c.post("/me/preferences/blocked-campaigns/c1", headers=alice)
        assert prefs_of(r) == {"opted_out": True, "blocked_campaigns": ["c1"]}
        r = await c.delete("/me/preferences/blocked-campaigns/c1", headers=alice)
        assert prefs_of(r)["blocked_campaigns"] == []
        # Same-origin browser requests pass (Origin is the site's own).
        r = await c.put(
            "/me/preferences",
            json={"opted_out": False},
            headers={**alice, "origin": "http://testserver", "sec-fetch-site": "same-origin"},
        )
        assert prefs_of(r)["opted_out"] is False
        problem(await c.get("/me/nothing", headers=alice), 404)
        r = await c.patch("/me/preferences", headers=alice)
        problem(r, 405)
        assert r.headers["allow"] == "GET, HEAD, PUT, DELETE, OPTIONS"
        assert (await c.get("/preferences", headers=alice)).status_code == 404  # not mounted there
        r = await c.delete("/me/preferences", headers=alice)
        assert r.status_code == 204
        assert (await c.get("/")).text == "home"
    await prefs.store.aclose()


@pytest.mark.parametrize("policy", ["no_tracking", "deny"])
async def test_what_the_user_chooses_is_what_the_ad_routes_do(store_url: str, policy: str) -> None:
    """The usual deployment: one Starlette site, XSPMiddleware outside, preferences mounted.
    The reserve script reads the same two fields."""
    prefs = make_prefs(store_url)

    async def ad(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ad")

    site = XSPMiddleware(
        Starlette(routes=[Route("/ad", ad), Mount("/me", app=prefs)]),
        redis_url=store_url,
        secret_key=SECRET,
        default_caps=["1/1h"],
        consent_policy=policy,
    )
    alice = as_user("alice")

    async def decision(campaign: str) -> tuple[int, str | None]:
        r = await c.get(f"/ad?campaign_id={campaign}", headers=alice)
        return r.status_code, r.headers.get("x-xsp-decision")

    async with client(site) as c:
        assert await decision("c1") == (200, None)
        r = await c.post("/me/preferences/blocked-campaigns/c2", headers=alice)
        assert prefs_of(r)["blocked_campaigns"] == ["c2"]
        assert await decision("c2") == (204, "user_blocked")
        assert await decision("c1") == (204, "frequency_capped")  # the cap log is kept
        r = await c.delete("/me/preferences/blocked-campaigns/c2", headers=alice)
        assert prefs_of(r)["blocked_campaigns"] == []
        assert await decision("c2") == (200, None)

        r = await c.put("/me/preferences", json={"opted_out": True}, headers=alice)
        assert prefs_of(r)["opted_out"] is True
        if policy == "deny":
            assert await decision("c3") == (204, "no_consent")
        else:  # served, untracked: no cap applies and nothing is logged
            assert [await decision("c3") for _ in range(2)] == [(200, None)] * 2

        r = await c.delete("/me/preferences", headers=alice)  # erasure: a fresh user again
        assert r.status_code == 204
        assert await decision("c1") == (200, None)
        assert await decision("c1") == (204, "frequency_capped")
    await prefs.store.aclose()
    await site.store.aclose()


async def test_root_path_is_stripped_once(store_url: str) -> None:
    app = make_prefs(store_url)
    # The ASGI spec's way (and Starlette's Mount): ``path`` includes ``root_path``.
    transport = httpx.ASGITransport(app=app, root_path="/me")
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        r = await c.get("/me/preferences", headers=as_user("alice"))
        assert prefs_of(r) == EMPTY
        r = await c.get("/me/me/preferences", headers=as_user("alice"))
        assert r.status_code == 404
    # A server that strips the prefix itself: ``path`` relative, ``root_path`` set.
    cookie = [(b"cookie", b"user_id=alice")]
    status, _, body = await call_raw(app, "GET", "/preferences", "/me", cookie, [b""])
    assert (status, json.loads(body)) == (200, EMPTY)
    await app.store.aclose()


async def test_delete_erases_every_trace_of_the_user(
    redis_url: str, make_app: Callable[..., XSPMiddleware]
) -> None:
    raw = f"user-{uuid.uuid4().hex}"
    ads = make_app(redis_url=redis_url, user_caps=["20/1d"])
    async with client(ads) as c:
        for cid in ("c1", "c2"):
            assert (await c.get(f"/ad?campaign_id={cid}", headers=as_user(raw))).status_code == 200
    await ads.store.aclose()
    app = make_prefs(redis_url)
    r = sync_redis(redis_url)
    async with client(app) as c:
        await c.put("/preferences", json={"opted_out": True}, headers=as_user(raw))
        await c.post("/preferences/blocked-campaigns/c3", headers=as_user(raw))
        # Everything stored about the user is under one key, and the raw id is nowhere.
        key = app.store.user_key(raw)
        user_keys = [k for k in r.scan_iter(match="xsp:u:*")]
        assert user_keys == [key.encode()]
        assert set(r.hkeys(key)) == {b"c1", b"c2", b"*", b"!o", b"!b"}
        for k in r.scan_iter(match="*"):
            assert raw.encode() not in k
            kind = r.type(k)
            values = r.hgetall(k) if kind == b"hash" else {b"": r.get(k) or b""}
            for field, value in values.items():
                assert raw.encode() not in field and raw.encode() not in value

        d = await c.delete("/preferences", headers=as_user(raw))
        assert d.status_code == 204
    assert list(r.scan_iter(match="xsp:u:*")) == []
    assert r.exists(key) == 0
    # Campaign state (spend, impressions) is not the user's: it stays.
    assert list(r.scan_iter(match="xsp:c:*"))
    await app.store.aclose()


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"\xff\xfe{",
        b"[]",
        b"true",
        b"null",
        b'"opted_out"',
        b"{}",
        b'{"opted_out": "yes"}',
        b'{"opted_out": 1}',
        b'{"opted_out": 0}',
        b'{"opted_out": null}',
        b'{"opted_out": [true]}',
        b'{"opted_out": true, "blocked_campaigns": []}',
        b'{"opted_out": true, "opted_out": false}',
        b'{"Opted_out": true}',
        b"[" * 3000,
        b'{"opted_out": true',
    ],
)
async def test_malformed_bodies_get_422(store_url: str, body: bytes) -> None:
    app = make_prefs(store_url)
    async with client(app) as c:
        r = await c.put(
            "/preferences",
            content=body,
            headers={**as_user("alice"), "content-type": "application/json"},
        )
        p = problem(r, 422)
        assert p["field"] in (None, "opted_out", "blocked_campaigns", "Opted_out")
        assert prefs_of(await c.get("/preferences", headers=as_user("alice"))) == EMPTY
    await app.store.aclose()


async def test_oversized_bodies_get_413(store_url: str) -> None:
    app = make_prefs(store_url)
    body = json.dumps({"opted_out": True, "pad": "x" * 5000}).encode()
    async with client(app) as c:
        r = await c.put("/preferences", content=body, headers=as_user("alice"))
        problem(r, 413)

        async def chunks() -> Any:  # no Content-Length: counted as it arrives
            for _ in range(5):
                yield b" " * 1000
            yield b'{"opted_out": true}'

        r = await c.put("/preferences", content=chunks(), headers=as_user("alice"))
        problem(r, 413)
        # Exactly 4 KiB is fine.
        body = b'{"opted_out": true}'.ljust(4096)
        assert prefs_of(await c.put("/preferences", content=body, headers=as_user("alice")))[
            "opted_out"
        ]
    await app.store.aclose()


async def test_bad_campaign_ids_get_422_naming_the_field(store_url: str) -> None:
    app = make_prefs(store_url)
    async with client(app) as c:
        for cid in ("bad:id", "a%2Cb", "-x", "x" * 129, "a%20b", "a/b", "%7Bx%7D"):
            for method in ("POST", "DELETE"):
                r = await c.request(
                    method, f"/preferences/blocked-campaigns/{cid}", headers=as_user("alice")
                )
                assert problem(r, 422)["field"] == "campaign_id", cid
        problem(await c.post("/preferences/blocked-campaigns/", headers=as_user("alice")), 404)
        problem(await c.post("/preferences/blocked-campaigns", headers=as_user("alice")), 404)
        r = await c.get("/preferences/blocked-campaigns/c1", headers=as_user("alice"))
        problem(r, 405)
        assert r.headers["allow"] == "POST, DELETE, OPTIONS"
        assert prefs_of(await c.get("/preferences", headers=as_user("alice"))) == EMPTY
    await app.store.aclose()


@pytest.mark.parametrize(
    "cookie",
    [None, "user_id=", 'user_id=""', "other=alice", "user_id=" + "a" * 257],
)
async def test_no_usable_cookie_is_401_on_every_route(store_url: str, cookie: str | None) -> None:
    app = make_prefs(store_url)
    headers = {} if cookie is None else {"cookie": cookie}
    async with client(app) as c:
        for method, path, kwargs in [("GET", "/preferences", {}), *CHANGES]:
            r = await c.request(method, path, headers=headers, **kwargs)
            problem(r, 401)
    await app.store.aclose()
    # A 256-byte id is a user.
    app = make_prefs(store_url)
    async with client(app) as c:
        r = await c.get("/preferences", headers={"cookie": "user_id=" + "a" * 256})
        assert prefs_of(r) == EMPTY
    await app.store.aclose()


# -- cross-site requests ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": "https://evil.example"},
        {"origin": "null"},
        {"origin": "http://testserver.evil.example"},
        {"origin": "https://testserver"},  # another scheme is another origin
        {"sec-fetch-site": "cross-site"},
        {"sec-fetch-site": "same-site"},
        {"sec-fetch-site": "cross-site", "origin": "http://testserver"},
        {"sec-fetch-site": "same-origin", "origin": "https://evil.example"},
    ],
)
async def test_cross_site_changes_get_403_and_change_nothing(
    store_url: str, headers: dict[str, str]
) -> None:
    app = make_prefs(store_url)
    alice = as_user("alice")
    async with client(app) as c:
        await c.post("/preferences/blocked-campaigns/c1", headers=alice)
        before = prefs_of(await c.get("/preferences", headers=alice))
        for method, path, kwargs in CHANGES:
            r = await c.request(method, path, headers={**alice, **headers}, **kwargs)
            problem(r, 403)
        assert prefs_of(await c.get("/preferences", headers=alice)) == before
        # Reading is not a change: a cross-site GET is answered (without CORS, a browser
        # keeps the answer from the other site).
        r = await c.get("/preferences", headers={**alice, **headers})
        assert prefs_of(r) == before
        assert "access-control-allow-origin" not in r.headers
    await app.store.aclose()


@pytest.mark.parametrize(
    "headers",
    [
        {},  # a non-browser client
        {"origin": "http://testserver"},
        {"origin": "HTTP://TestServer:80"},
        {"sec-fetch-site": "same-origin"},
        {"sec-fetch-site": "none"},
        {"sec-fetch-site": "same-origin", "origin": "http://testserver"},
    ],
)
async def test_same_origin_and_non_browser_changes_pass(
    store_url: str, headers: dict[str, str]
) -> None:
    app = make_prefs(store_url)
    async with client(app) as c:
        r = await c.put(
            "/preferences", json={"opted_out": True}, headers={**as_user("alice"), **headers}
        )
        assert prefs_of(r)["opted_out"] is True
    await app.store.aclose()


async def test_an_allowed_origin_passes_with_cors(store_url: str) -> None:
    app = make_prefs(store_url, preferences_origins=["https://www.example.com"])
    alice = as_user("alice")
    allowed = {"origin": "https://www.example.com", "sec-fetch-site": "same-site"}
    async with client(app) as c:
        r = await c.put("/preferences", json={"opted_out": True}, headers={**alice, **allowed})
        assert prefs_of(r)["opted_out"] is True
        assert r.headers["access-control-allow-origin"] == "https://www.example.com"
        assert r.headers["access-control-allow-credentials"] == "true"
        r = await c.post(
            "/preferences/blocked-campaigns/c1",
            headers={**alice, "origin": "https://www.example.com", "sec-fetch-site": "cross-site"},
        )
        assert prefs_of(r)["blocked_campaigns"] == ["c1"]
        # The browser's preflight.
        r = await c.options(
            "/preferences",
            headers={
                "origin": "https://www.example.com",
                "access-control-request-method": "PUT",
                "access-control-request-headers": "content-type",
            },
        )
        assert r.status_code == 204
        assert r.headers["access-control-allow-origin"] == "https://www.example.com"
        assert "PUT" in r.headers["access-control-allow-methods"]
        # Another origin is still refused, and gets no CORS headers.
        r = await c.put(
            "/preferences",
            json={"opted_out": False},
            headers={**alice, "origin": "https://evil.example"},
        )
        problem(r, 403)
        assert "access-control-allow-origin" not in r.headers
        assert prefs_of(await c.get("/preferences", headers=alice)) == {
            "opted_out": True,
            "blocked_campaigns": ["c1"],
        }
    await app.store.aclose()


def test_preferences_origins_are_validated() -> None:
    for bad in ("https://a.com/path", "a.com", "*", "https://a.com/"):
        with pytest.raises(ConfigError, match="preferences_origins"):
            preferences_app(redis_url="memory://x", preferences_origins=[bad])
    with pytest.raises(ConfigError, match="preferences_origins"):
        preferences_app(redis_url="memory://x", preferences_origins="https://a.com")


# -- failures ---------------------------------------------------------------------------------


async def test_store_failures_are_503_never_500() -> None:
    app = make_prefs("redis://127.0.0.1:1/0")
    async with client(app) as c:
        for method, path, kwargs in [("GET", "/preferences", {}), *CHANGES]:
            r = await c.request(method, path, headers=as_user("alice"), **kwargs)
            problem(r, 503)
            assert r.headers["retry-after"] == "1"
    await app.store.aclose()


async def test_lifespan_and_websocket_scopes(store_url: str) -> None:
    app = make_prefs(store_url)
    sent: list[dict[str, Any]] = []
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

    async def receive() -> dict[str, Any]:
        return inbox.pop(0)

    async def send(message: Any) -> None:
        sent.append(dict(message))

    await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    sent.clear()
    await app({"type": "websocket", "path": "/preferences", "headers": []}, receive, send)
    assert sent[0]["type"] == "websocket.close"


def test_exported_from_the_package() -> None:
    import xsp_middleware

    assert "preferences_app" in xsp_middleware.__all__
    assert xsp_middleware.preferences_app is prefs_module.preferences_app


# -- CLI --------------------------------------------------------------------------------------


def ok(result: Any) -> str:
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    return str(lines[0])


async def test_cli_commands_share_state_with_the_app(redis_url: str) -> None:
    assert ok(cli("user", "opt-out", "alice", redis_url=redis_url)) == "user opted out"
    assert "c1 blocked" in ok(cli("user", "block", "alice", "c1", redis_url=redis_url))
    assert "c2 blocked" in ok(cli("user", "block", "alice", "c2", redis_url=redis_url))
    assert "c2 unblocked" in ok(cli("user", "unblock", "alice", "c2", redis_url=redis_url))
    app = make_prefs(redis_url)
    async with client(app) as c:
        r = await c.get("/preferences", headers=as_user("alice"))
        assert prefs_of(r) == {"opted_out": True, "blocked_campaigns": ["c1"]}
        # user show lists no preference field as a campaign, in JSON or text.
        shown = cli("user", "show", "alice", "--json", redis_url=redis_url)
        assert shown.returncode == 0 and json.loads(shown.stdout) == {}
        text = cli("user", "show", "alice", redis_url=redis_url).stdout
        assert "!o" not in text and "opted out" in text and "blocked campaigns: c1" in text

        assert ok(cli("user", "opt-in", "alice", redis_url=redis_url)) == "user opted in"
        r = await c.get("/preferences", headers=as_user("alice"))
        assert prefs_of(r) == {"opted_out": False, "blocked_campaigns": ["c1"]}
        assert "erased" in ok(cli("user", "forget", "alice", redis_url=redis_url))
        assert prefs_of(await c.get("/preferences", headers=as_user("alice"))) == EMPTY
        assert ok(cli("user", "forget", "alice", redis_url=redis_url)) == "nothing stored"
    await app.store.aclose()
    assert list(sync_redis(redis_url).scan_iter(match="xsp:u:*")) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["user", "block", "alice", "bad:id"], "campaign id"),
        (["user", "unblock", "alice", "a,b"], "campaign id"),
        (["user", "block", "alice"], "campaign_id"),
        (["user", "opt-out"], "user_id"),
        (["user", "forget"], "user_id"),
    ],
)
def test_cli_preference_errors_are_one_line_and_exit_2(
    redis_url: str, args: list[str], message: str
) -> None:
    result = cli(*args, redis_url=redis_url)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_cli_preferences_on_an_unreachable_store_fail_in_one_line() -> None:
    for args in (["user", "opt-out", "alice"], ["user", "forget", "alice"]):
        result = cli(*args, redis_url="redis://127.0.0.1:1/0")
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1
        assert "127.0.0.1:1" in result.stderr


# -- fuzzing: never a 5xx -----------------------------------------------------------------------


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def fuzz_app(loop: asyncio.AbstractEventLoop) -> Iterator[PreferencesApp]:
    app = make_prefs(
        f"memory://prefs-fuzz-{uuid.uuid4().hex}", preferences_origins=["https://ok.example"]
    )
    yield app
    loop.run_until_complete(app.store.aclose())


async def call_raw(
    app: PreferencesApp,
    method: str,
    path: str,
    root_path: str,
    headers: list[tuple[bytes, bytes]],
    chunks: list[bytes],
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "root_path": root_path,
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    pending = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks or [b""])
    ]
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        messages.append(dict(message))

    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    start = messages[0]
    assert start["type"] == "http.response.start"
    assert [m["type"] for m in messages[1:]] == ["http.response.body"]
    assert not messages[-1].get("more_body", False)
    return start["status"], list(start["headers"]), messages[-1].get("body", b"")


SEGMENTS = st.sampled_from(
    ["preferences", "blocked-campaigns", "c1", "bad:id", "", "..", "%2F", "me", "x" * 130]
) | st.text(max_size=12)
ROUTES = st.sampled_from(
    [
        "/preferences",
        "/preferences/blocked-campaigns/c1",
        "/preferences/blocked-campaigns/c2.x_y-z",
        "/preferences/blocked-campaigns/bad:id",
    ]
)
PATHS = st.integers(min_value=0, max_value=9).flatmap(
    lambda n: (
        ROUTES
        if n < 6
        else st.builds(lambda route, tail: route + tail, ROUTES, st.text(max_size=6))
        if n < 7
        else st.lists(SEGMENTS, max_size=5).map(lambda parts: "/" + "/".join(parts))
        if n < 9
        else st.text(max_size=40)
    )
)
METHODS = st.integers(min_value=0, max_value=9).flatmap(
    lambda n: (
        st.sampled_from(["GET", "PUT", "POST", "DELETE"])
        if n < 7
        else st.sampled_from(["HEAD", "OPTIONS", "PATCH", "get", ""])
        if n < 9
        else st.text(max_size=8)
    )
)
COOKIES = st.sampled_from(
    [
        [(b"cookie", b"user_id=alice")],
        [(b"cookie", b"user_id=bob; other=1")],
        [(b"cookie", b'user_id="carol"')],
        [],
        [(b"cookie", b"user_id=")],
        [(b"cookie", b"user_id=" + b"a" * 300)],
    ]
) | st.lists(st.binary(max_size=40).map(lambda v: (b"cookie", v)), max_size=2)
HEADER_NAMES = st.sampled_from(
    [b"cookie", b"origin", b"sec-fetch-site", b"host", b"content-length", b"content-type"]
) | st.binary(min_size=1, max_size=12).map(bytes.lower)
HEADER_VALUES = st.one_of(
    st.sampled_from(
        [
            b"user_id=alice",
            b"user_id=",
            b"https://ok.example",
            b"https://evil.example",
            b"http://testserver",
            b"null",
            b"same-origin",
            b"cross-site",
            b"none",
            b"testserver",
            b"-1",
            b"99999999999999999999999",
            b"10",
        ]
    ),
    st.binary(max_size=64),
)
BODIES = st.one_of(
    st.sampled_from(
        [
            b'{"opted_out": true}',
            b'{"opted_out": false}',
            b'{"opted_out":false}   ',
            b'{"opted_out": true}' + b" " * 4100,
            b'{"opted_out": 1}',
            b"[" * 2000,
            b"{" * 100,
            b'{"opted_out": true, "opted_out": true}',
            b'"\\ud800"',
            b'{"\\ud800": true}',
        ]
    ),
    st.binary(max_size=300),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=10,
    ).map(lambda v: json.dumps(v).encode()),
)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    method=METHODS,
    path=PATHS,
    root_path=st.sampled_from(["", "", "", "/me", "/me", "/other"]),
    cookies=COOKIES,
    headers=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=4),
    body=BODIES,
    split=st.integers(min_value=1, max_value=4),
)
def test_fuzzed_requests_never_get_a_5xx(
    fuzz_app: PreferencesApp,
    loop: asyncio.AbstractEventLoop,
    method: str,
    path: str,
    root_path: str,
    cookies: list[tuple[bytes, bytes]],
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    split: int,
) -> None:
    if root_path == "/me" and path.startswith("/preferences"):
        path = "/me" + path  # as Starlette's Mount passes it
    headers = [(b"host", b"testserver"), *cookies, *headers]
    size = max(1, len(body) // split)
    chunks = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    status, response_headers, content = loop.run_until_complete(
        call_raw(fuzz_app, method, path, root_path, headers, chunks)
    )
    assert 200 <= status < 500, (status, content)
    event(f"{method if method in ('GET', 'PUT', 'POST', 'DELETE') else 'other'} {status}")
    named = dict(response_headers)
    assert named[b"cache-control"] == b"no-store"
    if status >= 400:
        data = json.loads(content) if method != "HEAD" else None
        assert named[b"content-type"] == b"application/problem+json"
        if data is not None:
            assert set(data) == PROBLEM_KEYS
    elif status == 200 and method != "HEAD":
        data = json.loads(content)
        assert set(data) == {"opted_out", "blocked_campaigns"}


def test_user_reset_keeps_preferences_and_forget_erases_them(redis_url: str) -> None:
    from test_cli import cli as run_cli

    assert run_cli("user", "opt-out", "keep-me", redis_url=redis_url).returncode == 0
    assert run_cli("user", "block", "keep-me", "c9", redis_url=redis_url).returncode == 0
    assert run_cli("user", "reset", "keep-me", redis_url=redis_url).returncode == 0
    shown = run_cli("user", "show", "keep-me", redis_url=redis_url).stdout
    assert "opted out" in shown and "c9" in shown
    assert run_cli("user", "forget", "keep-me", redis_url=redis_url).returncode == 0
    assert "opted out" not in run_cli("user", "show", "keep-me", redis_url=redis_url).stdout
