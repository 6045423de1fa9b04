"""Per-route rules on Starlette and FastAPI: ``@ad_route`` and ``Depends(xsp_decision)``.

The rules apply once the router has chosen the route, still before the handler runs, and the
response is observed at the ASGI level as everywhere."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

import pytest
from conftest import SECRET, VAST, as_user, client
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response as FastAPIResponse
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from xsp_middleware import Campaign, Decision, XSPMiddleware, ad_route, xsp_decision


def starlette_app(**settings: Any) -> XSPMiddleware:
    @ad_route(caps=["1/1h"])
    async def capped(request: StarletteRequest) -> Response:
        return Response(VAST, media_type="application/xml")

    @ad_route()
    async def by_path(request: StarletteRequest) -> Response:
        d = request.state.xsp
        return PlainTextResponse(f"{d.campaign_id}|{d.cost}")

    @ad_route(campaign="fixed-id")
    async def fixed(request: StarletteRequest) -> Response:
        return PlainTextResponse(request.state.xsp.campaign_id)

    @ad_route(campaign_param="cid", price_param="price", cpm="3.00")
    async def custom(request: StarletteRequest) -> Response:
        d = request.state.xsp
        return PlainTextResponse(f"{d.campaign_id}|{d.cost}")

    async def plain(request: StarletteRequest) -> Response:
        decision = getattr(request.state, "xsp", None)
        return PlainTextResponse("plain" if decision is None else "guarded")

    async def fails(request: StarletteRequest) -> Response:
        raise RuntimeError("boom")

    routes = [
        Route("/capped", ad_route(caps=["1/1h"])(capped)),
        Route("/ad/{campaign_id}", by_path),
        Route("/fixed", fixed),
        Route("/custom", custom),
        Route("/ad", plain),
        Route("/plain", plain),
        Route("/fails", ad_route()(fails)),
    ]
    settings.setdefault("secret_key", SECRET)
    return XSPMiddleware(Starlette(routes=routes), **settings)


@pytest.fixture
def starlette_guarded(store_url: str) -> XSPMiddleware:
    return starlette_app(redis_url=store_url, paths=["/ad"])


async def test_route_caps_beat_the_global_caps(starlette_guarded: XSPMiddleware) -> None:
    async with client(starlette_guarded) as c:
        first = await c.get("/capped?campaign_id=c1", headers=as_user("u1"))
        second = await c.get("/capped?campaign_id=c1", headers=as_user("u1"))
        other = await c.get("/ad?campaign_id=c1", headers=as_user("u2"))
    assert first.status_code == 200
    assert (second.status_code, second.headers["x-xsp-decision"]) == (204, "frequency_capped")
    assert other.text == "guarded"  # the global rule (3/1h) still applies elsewhere


async def test_campaign_from_a_path_parameter(starlette_guarded: XSPMiddleware) -> None:
    async with client(starlette_guarded) as c:
        r = await c.get("/ad/camp-7?cpm=1.50", headers=as_user("u1"))
        bad = await c.get("/ad/bad:id", headers=as_user("u1"))
    assert r.text == "camp-7|0.0015000"
    assert bad.status_code == 400 and bad.json()["field"] == "campaign_id"
    view = await starlette_guarded.store.get_campaign("camp-7")
    assert view.spent == Decimal("0.0015")


async def test_a_fixed_campaign_needs_no_parameter(starlette_guarded: XSPMiddleware) -> None:
    async with client(starlette_guarded) as c:
        r = await c.get("/fixed", headers=as_user("u1"))
    assert r.text == "fixed-id"
    assert (await starlette_guarded.store.get_campaign("fixed-id")).impressions == 1


async def test_custom_parameter_names_and_default_price(starlette_guarded: XSPMiddleware) -> None:
    async with client(starlette_guarded) as c:
        default = await c.get("/custom?cid=c9", headers=as_user("u1"))
        priced = await c.get("/custom?cid=c9&price=1.00", headers=as_user("u2"))
        bad = await c.get("/custom?cid=c9&price=abc", headers=as_user("u3"))
    assert default.text == "c9|0.0030000"
    assert priced.text == "c9|0.0010000"
    assert bad.json()["field"] == "price"


async def test_a_decorated_route_is_guarded_outside_paths_and_needs_its_campaign(
    starlette_guarded: XSPMiddleware,
) -> None:
    async with client(starlette_guarded) as c:
        missing = await c.get("/capped", headers=as_user("u1"))
        guarded = await c.get("/capped?campaign_id=c1", headers=as_user("u1"))
    assert (missing.status_code, missing.json()["field"]) == (400, "campaign_id")
    assert guarded.status_code == 200


async def test_undecorated_unguarded_routes_make_no_store_call(
    starlette_guarded: XSPMiddleware,
) -> None:
    calls = 0
    real = starlette_guarded.store.reserve

    async def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return await real(*args, **kwargs)

    starlette_guarded.store.reserve = counting  # type: ignore[method-assign]
    async with client(starlette_guarded) as c:
        assert (await c.get("/plain?campaign_id=c1", headers=as_user("u1"))).text == "plain"
        assert (await c.get("/nowhere?campaign_id=c1", headers=as_user("u1"))).status_code == 404
    assert calls == 0


async def test_a_failing_decorated_handler_releases(starlette_guarded: XSPMiddleware) -> None:
    async with client(starlette_guarded) as c:
        r = await c.get("/fails?campaign_id=c1", headers=as_user("u1"))
    assert r.status_code == 500
    view = await starlette_guarded.store.get_campaign("c1")
    assert (view.spent_units, view.impressions, view.released) == (0, 0, 1)


async def test_what_the_store_holds_still_wins_over_route_rules(
    starlette_guarded: XSPMiddleware,
) -> None:
    await starlette_guarded.store.set_campaign("c1", caps=["3/1h"])
    async with client(starlette_guarded) as c:
        codes = [
            (await c.get("/capped?campaign_id=c1", headers=as_user("u1"))).status_code
            for _ in range(4)
        ]
    assert codes == [200, 200, 200, 204]


async def test_routes_added_after_the_first_request_are_guarded(store_url: str) -> None:
    inner = Starlette()
    app = XSPMiddleware(inner, redis_url=store_url, secret_key=SECRET, default_caps=["1/1h"])

    async def late(request: StarletteRequest) -> Response:
        return PlainTextResponse("late")

    async with client(app) as c:
        await c.get("/nothing-yet")
        inner.add_route("/late", ad_route()(late))
        assert (await c.get("/late?campaign_id=c1", headers=as_user("u1"))).status_code == 200
        assert (await c.get("/late?campaign_id=c1", headers=as_user("u1"))).status_code == 204


# -- FastAPI -----------------------------------------------------------------------------------


class Ad(BaseModel):
    campaign: str
    cost: str


def fastapi_app(store_url: str, **settings: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(
        XSPMiddleware, redis_url=store_url, secret_key=SECRET, default_caps=["2/1h"], **settings
    )
    router = APIRouter(prefix="/v1")

    @app.get("/with-request/{campaign_id}")
    @ad_route(caps=["1/1h"])
    async def with_request(request: Request, campaign_id: str) -> dict[str, str]:
        return {"campaign": request.state.xsp.campaign_id}

    @app.get("/no-request")
    @ad_route()
    async def no_request(decision: Annotated[Decision | None, Depends(xsp_decision)]) -> Any:
        assert decision is not None
        return {"campaign": decision.campaign_id, "allowed": decision.allowed}

    @app.get("/sync")
    @ad_route(cpm="5.00")
    def sync_endpoint(decision: Annotated[Decision | None, Depends(xsp_decision)]) -> Any:
        assert decision is not None
        return {"cost": str(decision.cost)}

    @app.get("/model", response_model=Ad)
    @ad_route()
    async def model(decision: Annotated[Decision | None, Depends(xsp_decision)]) -> Any:
        assert decision is not None
        return {"campaign": decision.campaign_id, "cost": str(decision.cost), "extra": "x"}

    @router.get("/ad/{campaign_id}")
    @ad_route(caps=["1/1h"])
    async def routed(campaign_id: str) -> FastAPIResponse:
        return FastAPIResponse(VAST, media_type="application/xml")

    @app.get("/boom")
    @ad_route()
    async def boom() -> None:
        raise RuntimeError("handler failed")

    @app.get("/open")
    async def open_route(decision: Annotated[Decision | None, Depends(xsp_decision)]) -> Any:
        return {"decision": None if decision is None else decision.reason}

    app.include_router(router)
    sub = FastAPI()

    @sub.get("/ad")
    @ad_route(campaign="mounted")
    async def mounted_ad(decision: Annotated[Decision | None, Depends(xsp_decision)]) -> Any:
        assert decision is not None
        return {"campaign": decision.campaign_id}

    app.mount("/sub", sub)
    return app


async def test_fastapi_endpoints_with_and_without_request_sync_and_async(store_url: str) -> None:
    app = fastapi_app(store_url)
    async with client(app) as c:
        assert (await c.get("/with-request/c1", headers=as_user("u1"))).json() == {"campaign": "c1"}
        capped = await c.get("/with-request/c1", headers=as_user("u1"))
        assert capped.headers["x-xsp-decision"] == "frequency_capped"
        r = await c.get("/no-request?campaign_id=c2", headers=as_user("u1"))
        assert r.json() == {"campaign": "c2", "allowed": True}
        assert (await c.get("/sync?campaign_id=c3")).json() == {"cost": "0.0050000"}
        model = await c.get("/model?campaign_id=c4&cpm=1.00")
        assert model.json() == {"campaign": "c4", "cost": "0.0010000"}  # response_model applied
        assert (await c.get("/open")).json() == {"decision": None}


async def test_fastapi_router_prefixes_and_mounted_sub_apps(store_url: str) -> None:
    app = fastapi_app(store_url)
    async with client(app) as c:
        assert (await c.get("/v1/ad/c1", headers=as_user("u1"))).status_code == 200
        assert (await c.get("/v1/ad/c1", headers=as_user("u1"))).status_code == 204
        assert (await c.get("/sub/ad", headers=as_user("u1"))).json() == {"campaign": "mounted"}


async def test_fastapi_failing_endpoint_releases(store_url: str) -> None:
    app = fastapi_app(store_url)
    async with client(app) as c:
        assert (await c.get("/boom?campaign_id=c1", headers=as_user("u1"))).status_code == 500
        # The released cap slot serves again: 2/1h allows two more, not one.
        codes = [
            (await c.get("/no-request?campaign_id=c1", headers=as_user("u1"))).status_code
            for _ in range(3)
        ]
    assert codes == [200, 200, 204]


async def test_xsp_decision_adds_nothing_to_openapi(store_url: str) -> None:
    app = fastapi_app(store_url)
    async with client(app) as c:
        spec = (await c.get("/openapi.json")).json()
    assert "parameters" not in spec["paths"]["/no-request"]["get"]
    assert [
        p["name"] for p in spec["paths"]["/with-request/{campaign_id}"]["get"]["parameters"]
    ] == ["campaign_id"]


async def test_route_rules_apply_with_settings_campaigns(store_url: str) -> None:
    app = fastapi_app(store_url, campaigns=[Campaign(id="c5", budget="0.002", cpm="1.00")])
    async with client(app) as c:
        codes = [
            (await c.get("/no-request?campaign_id=c5", headers=as_user(f"u{i}"))).status_code
            for i in range(3)
        ]
    assert codes == [200, 200, 204]  # the campaign's budget buys two at its CPM


async def test_an_app_reached_without_the_middleware_is_not_guarded(store_url: str) -> None:
    """The middleware wraps the routes of the app it guards; the same app object served
    another way (directly, or under a middleware with other settings) keeps to that way."""

    async def ad(request: StarletteRequest) -> Response:
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route("/ad", ad)])
    strict = XSPMiddleware(inner, redis_url=store_url, secret_key=SECRET, default_caps=["1/1h"])
    loose = XSPMiddleware(inner, redis_url=store_url, secret_key=SECRET, default_caps=["3/1h"])
    async with client(strict) as s, client(loose) as lo, client(inner) as bare:
        assert [
            (await s.get("/ad?campaign_id=c1", headers=as_user("a"))).status_code for _ in range(2)
        ] == [200, 204]
        assert [
            (await lo.get("/ad?campaign_id=c2", headers=as_user("b"))).status_code for _ in range(4)
        ] == [200, 200, 200, 204]
        assert [
            (await bare.get("/ad?campaign_id=c3", headers=as_user("c"))).status_code
            for _ in range(5)
        ] == [200] * 5
    assert (await strict.store.get_campaign("c3")).impressions == 0
