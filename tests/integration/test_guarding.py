"""Which requests are guarded: paths AND the campaign parameter. The rest pass untouched,
with no store call at all."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import as_user, client

from xsp_middleware import Campaign, XSPMiddleware


class CountingStore:
    """Wraps the real store's reserve to count calls (on top of the wire-level proof in
    test_roundtrips.py)."""

    def __init__(self, app: XSPMiddleware) -> None:
        self.calls = 0
        real = app.store.reserve

        async def reserve(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return await real(*args, **kwargs)

        app.store.reserve = reserve  # type: ignore[method-assign]


@pytest.mark.parametrize(
    ("path", "guarded"),
    [
        ("/ad?campaign_id=c1", True),
        ("/status/200?campaign_id=c1", True),  # /status guards the segments below it
        ("/other?campaign_id=c1", False),
        ("/ad", False),
        ("/ad?cpm=2.00", False),
        ("/ad?xcampaign_id=c1", False),
        ("/ad?campaign%5Fid=c1", True),  # percent-encoded name is the same parameter
        # No route handles these (a redirect, a 404): no handler runs, so no store call.
        ("/ad/?campaign_id=c1", False),
        ("/status/200/x?campaign_id=c1", False),
    ],
)
async def test_only_listed_paths_with_a_campaign_parameter_are_guarded(
    store_url: str, make_app: Any, path: str, guarded: bool
) -> None:
    app = make_app(redis_url=store_url, paths=["/ad", "/status"])
    counter = CountingStore(app)
    async with client(app) as c:
        await c.get(path, headers=as_user("u1"))
    assert counter.calls == (1 if guarded else 0)


@pytest.mark.parametrize(
    ("path", "guarded"),
    [
        ("/ad?campaign_id=c1", True),
        ("/ad/sub?campaign_id=c1", True),
        ("/vast?campaign_id=c1", True),
        ("/admin?campaign_id=c1", False),  # a prefix matches whole path segments only
        ("/other?campaign_id=c1", False),
        ("/ad", False),
        ("/ad?xcampaign_id=c1", False),
    ],
)
async def test_a_plain_asgi_app_is_guarded_before_it_runs(
    store_url: str, path: str, guarded: bool
) -> None:
    """Without a Starlette router to hook, the middleware decides before calling the app."""

    async def plain(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = XSPMiddleware(plain, redis_url=store_url, secret_key="x" * 16, paths=["/ad", "/vast"])
    counter = CountingStore(app)
    async with client(app) as c:
        await c.get(path, headers=as_user("u1"))
    assert counter.calls == (1 if guarded else 0)


async def test_without_paths_every_path_with_the_parameter_is_guarded(
    store_url: str, make_app: Any
) -> None:
    app = make_app(redis_url=store_url, default_caps=["1/1h"])
    async with client(app) as c:
        assert (await c.get("/other?campaign_id=c1", headers=as_user("u1"))).status_code == 200
        r = await c.get("/other?campaign_id=c1", headers=as_user("u1"))
        assert (r.status_code, r.headers["x-xsp-decision"]) == (204, "frequency_capped")


async def test_custom_parameter_and_cookie_names(store_url: str, make_app: Any) -> None:
    app = make_app(
        redis_url=store_url,
        campaign_param="cid",
        price_param="price",
        user_cookie="uid",
        default_caps=["1/1h"],
    )
    async with client(app) as c:
        r = await c.get("/decision?cid=c1&price=3.00", headers={"cookie": "uid=u1"})
        assert r.text.startswith("True|served|c1|0.0030000|0|")
        r = await c.get("/decision?cid=c1", headers={"cookie": "uid=u1"})
        assert r.headers["x-xsp-decision"] == "frequency_capped"
        r = await c.get("/decision?cid=c1&price=x")
        assert r.json()["field"] == "price"


async def test_paused_campaign_in_the_store_is_denied(store_url: str, make_app: Any) -> None:
    app = make_app(redis_url=store_url, campaigns=[Campaign(id="c1", cpm="4.00")])
    async with client(app) as c:
        assert (await c.get("/decision?campaign_id=c1")).text.startswith("True|served|c1|0.004")
        await app.store.set_campaign("c1", status="paused")
        r = await c.get("/ad?campaign_id=c1")
        assert (r.status_code, r.headers["x-xsp-decision"]) == (204, "campaign_paused")
        await app.store.set_campaign("c1", status="active", cpm="5.00")
        assert (await c.get("/decision?campaign_id=c1")).text.startswith("True|served|c1|0.005")


async def test_store_config_wins_over_settings(store_url: str, make_app: Any) -> None:
    app = make_app(redis_url=store_url, campaigns=[Campaign(id="c1", budget="100", caps=["9/1h"])])
    await app.store.set_campaign("c1", caps=["1/1h"])
    async with client(app) as c:
        assert (await c.get("/ad?campaign_id=c1", headers=as_user("u1"))).status_code == 200
        assert (await c.get("/ad?campaign_id=c1", headers=as_user("u1"))).status_code == 204
    view = await app.store.get_campaign("c1")
    assert (str(view.budget), [str(cap) for cap in view.caps]) == ("100.0000000", ["1/1h"])


async def test_non_http_scopes_pass_straight_through(make_app: Any) -> None:
    seen: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    app = XSPMiddleware(inner, redis_url="memory://pass", secret_key="x" * 16)
    await app({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    await app(
        {"type": "websocket", "path": "/ad", "query_string": b"campaign_id=c1", "headers": []},
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
    )
    assert seen == ["lifespan", "websocket"]


async def test_no_user_id_raw_in_any_key_or_value(redis_url: str, make_app: Any) -> None:
    import redis.asyncio as aredis

    app = make_app(redis_url=redis_url)
    async with client(app) as c:
        for user in ("alice@example.com", "u-42", "{evil}*:key"):
            await c.get("/ad?campaign_id=c1", headers={"cookie": f"user_id={user}"})
    r = aredis.Redis.from_url(redis_url)
    keys = [k async for k in r.scan_iter("*")]
    dump = b" ".join(keys) + b" ".join(
        [
            b" ".join(v)
            for k in keys
            if (await r.type(k)) == b"hash"
            for v in (await r.hgetall(k)).items()
        ]
    )
    for user in (b"alice", b"u-42", b"evil"):
        assert user not in dump
    await r.aclose()


async def test_debug_headers_are_opt_in(store_url: str, make_app: Any) -> None:
    quiet = make_app(redis_url=store_url)
    loud = make_app(redis_url=store_url, debug_headers=True, default_caps=["2/1h"])
    async with client(quiet) as c:
        r = await c.get("/ad?campaign_id=c1", headers=as_user("u1"))
    assert "server-timing" not in r.headers and "x-xsp-decision" not in r.headers
    async with client(loud) as c:
        r = await c.get("/ad?campaign_id=d1", headers=as_user("u1"))
        assert r.headers["server-timing"].startswith("xsp;dur=")
        assert r.headers["x-xsp-decision"] == "served"
        assert r.headers["x-xsp-remaining-impressions"] == "1"
        assert r.headers["x-xsp-remaining-budget"] == "999.9980000"
        await c.get("/ad?campaign_id=d1", headers=as_user("u1"))
        denied = await c.get("/ad?campaign_id=d1", headers=as_user("u1"))
    assert denied.headers.get_list("x-xsp-decision") == ["frequency_capped"]
    assert denied.headers["server-timing"].startswith("xsp;dur=")
