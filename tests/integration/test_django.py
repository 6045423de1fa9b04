"""The Django integration, through Django's own test clients: ``Client`` (WSGI: the middleware
runs synchronously on the blocking store) and ``AsyncClient`` (ASGI: it runs as a coroutine on
the asyncio store), on a real Redis and on the embedded store.

Each test builds a fresh client under ``override_settings``, so Django loads a fresh middleware
with that test's ``XSP_MIDDLEWARE``. The example project (``examples/django_project``) is tested
in-process and as real ``runserver`` and ``uvicorn`` processes.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import django
import httpx
import pytest
from conftest import SECRET
from django.conf import settings
from redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "django_project"
MIDDLEWARE = "xsp_middleware.django.XSPMiddleware"

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="django-tests-only",
        ALLOWED_HOSTS=["testserver"],
        ROOT_URLCONF=__name__,
        INSTALLED_APPS=["xsp_middleware.django"],
        MIDDLEWARE=[MIDDLEWARE],
        DATABASES={},
        USE_TZ=True,
        XSP_MIDDLEWARE={},
    )
    django.setup()
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))  # the example's ``adserver`` package

from django.core import checks  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.core.management.base import SystemCheckError  # noqa: E402
from django.http import (  # noqa: E402
    FileResponse,
    HttpResponse,
    StreamingHttpResponse,
)
from django.test import AsyncClient, Client, override_settings  # noqa: E402
from django.urls import path  # noqa: E402
from django.views import View  # noqa: E402

from xsp_middleware import Campaign, ConfigError, Settings, Store  # noqa: E402
from xsp_middleware.demo import vast_xml  # noqa: E402
from xsp_middleware.django import (  # noqa: E402
    XSPMiddleware,
    ad_view,
    settings_from_dict,
)
from xsp_middleware.guard import Guard  # noqa: E402
from xsp_middleware.money import cpm_to_cost_units, units_to_decimal  # noqa: E402
from xsp_middleware.settings import Rules  # noqa: E402

CAMPAIGN = "c1"
AD = f"/ad?campaign_id={CAMPAIGN}&cpm=2.00"
COST_UNITS = 20_000  # one impression at a CPM of 2.00
CHUNKS = [b"chunk-%d;" % i for i in range(20)]
PAYLOAD = os.urandom(64 * 1024)


# -- the test site: views and URLs ------------------------------------------------------------


def describe(request: Any) -> HttpResponse:
    d = getattr(request, "xsp", None)
    if d is None:
        return HttpResponse("no decision", content_type="text/plain")
    return HttpResponse(
        f"{d.allowed}|{d.reason}|{d.campaign_id}|{d.cpm}|{d.remaining_impressions}|{d.anonymous}",
        content_type="text/plain",
    )


def status_view(request: Any, code: int) -> HttpResponse:
    return HttpResponse("status", status=code)


def boom(request: Any) -> HttpResponse:
    raise RuntimeError("view failed")


def stream(request: Any) -> StreamingHttpResponse:
    return StreamingHttpResponse(iter(CHUNKS))


def stream_fails(request: Any) -> StreamingHttpResponse:
    def body() -> Iterator[bytes]:
        yield CHUNKS[0]
        raise RuntimeError("stream died")

    return StreamingHttpResponse(body())


async def astream(request: Any) -> StreamingHttpResponse:
    async def body() -> AsyncIterator[bytes]:
        for chunk in CHUNKS:
            yield chunk

    return StreamingHttpResponse(body())


async def astream_fails(request: Any) -> StreamingHttpResponse:
    async def body() -> AsyncIterator[bytes]:
        yield CHUNKS[0]
        raise RuntimeError("stream died")

    return StreamingHttpResponse(body())


def file_view(request: Any) -> FileResponse:
    return FileResponse(_payload_file().open("rb"))


def _payload_file() -> Path:
    target = Path(tempfile.gettempdir()) / f"xsp-django-{os.getpid()}.bin"
    if not target.exists():
        target.write_bytes(PAYLOAD)
    return target


@ad_view(caps=["2/1h"])
def routed(request: Any, campaign_id: str) -> HttpResponse:
    return describe(request)


@ad_view(price_param="price")
async def priced(request: Any) -> HttpResponse:
    return describe(request)


@ad_view(caps=["1/1h"], cpm="4.00", campaign="fixed")
class FixedCampaignView(View):
    def get(self, request: Any) -> HttpResponse:
        return describe(request)


def other(request: Any) -> HttpResponse:
    return HttpResponse("other", content_type="text/plain")


async def slow(request: Any) -> HttpResponse:
    await asyncio.sleep(30)
    return describe(request)


class SyncOnlyMiddleware:
    """A middleware that cannot run async: under ASGI, Django runs XSPMiddleware (above it)
    synchronously too, and its view hook in a thread."""

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        return self.get_response(request)


urlpatterns = [
    path("ad", describe),
    path("ad/status/<int:code>", status_view),
    path("ad/boom", boom),
    path("ad/stream", stream),
    path("ad/stream-fails", stream_fails),
    path("ad/astream", astream),
    path("ad/astream-fails", astream_fails),
    path("ad/file", file_view),
    path("ad/slow", slow),
    path("routed/<str:campaign_id>", routed),  # outside PATHS: decorated views are guarded
    path("priced", priced),
    path("cbv", FixedCampaignView.as_view()),
    path("other", other),
]


# -- the harness ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_xsp_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's XSP_* variables must not leak into these settings."""
    for name in list(os.environ):
        if name.startswith("XSP_") and name != "XSP_REQUIRE_REDIS":
            monkeypatch.delenv(name)


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[XSPMiddleware]]:
    """Every XSPMiddleware Django builds during the test; their sync clients closed after."""
    instances: list[XSPMiddleware] = []
    original = XSPMiddleware.__init__

    def init(self: XSPMiddleware, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        instances.append(self)

    monkeypatch.setattr(XSPMiddleware, "__init__", init)
    yield instances
    for mw in instances:
        mw.guard.sync_store.client.close()


def xsp_settings(store_url: str, **more: Any) -> dict[str, Any]:
    return {
        "REDIS_URL": store_url,
        "SECRET_KEY": SECRET,
        "DEFAULT_CAPS": ["1/1h"],
        "PATHS": ["/ad"],
        **more,
    }


class Site:
    """The test site under one mode (``wsgi`` or ``asgi``), one store and one XSP_MIDDLEWARE."""

    def __init__(self, mode: str, store_url: str, made: list[XSPMiddleware]) -> None:
        self.mode = mode
        self.store_url = store_url
        self.made = made
        self.store = Store(Rules.from_settings(Settings(redis_url=store_url, secret_key=SECRET)))
        self._override: Any = None
        self.client: Any = None

    def start(
        self,
        urlconf: str = __name__,
        conf: dict[str, Any] | None = None,
        middleware: tuple[str, ...] = (MIDDLEWARE,),
        **xsp: Any,
    ) -> Site:
        """Serve ``urlconf`` under a fresh middleware: ``XSP_MIDDLEWARE`` is ``conf``, or the
        test defaults updated with ``xsp``."""
        self.stop()
        self._override = override_settings(
            XSP_MIDDLEWARE=xsp_settings(self.store_url, **xsp) if conf is None else conf,
            ROOT_URLCONF=urlconf,
            MIDDLEWARE=list(middleware),
            DEBUG=False,
        )
        self._override.enable()
        self.client = (
            Client(raise_request_exception=False)
            if self.mode == "wsgi"
            else AsyncClient(raise_request_exception=False)
        )
        return self

    def stop(self) -> None:
        if self._override is not None:
            self._override.disable()
            self._override = None

    @property
    def mw(self) -> XSPMiddleware:
        return self.made[-1]

    async def get(self, url: str, user: str | None = "u1") -> Any:
        headers = {"cookie": f"user_id={user}"} if user else {}
        if self.mode == "wsgi":  # a WSGI server calls the app from a worker thread
            return await asyncio.to_thread(self.client.get, url, headers=headers)
        return await self.client.get(url, headers=headers)

    async def body(self, response: Any) -> bytes:
        """The whole body, as a server reads it (a streaming one is closed at its end)."""
        if not response.streaming:
            return bytes(response.content)
        if response.is_async:
            return b"".join([chunk async for chunk in response.streaming_content])
        return await asyncio.to_thread(lambda: b"".join(response.streaming_content))

    async def recorded(self, campaign: str = CAMPAIGN) -> tuple[int, int]:
        """(spent units, impressions) as the store recorded them."""
        view = await self.store.get_campaign(campaign)
        return view.spent_units, view.impressions

    async def aclose(self) -> None:
        self.stop()
        await self.store.aclose()
        for mw in self.made:
            await mw.store.aclose()


@pytest.fixture(params=["wsgi", "asgi"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def site(mode: str, store_url: str, made: list[XSPMiddleware]) -> AsyncIterator[Site]:
    s = Site(mode, store_url, made)
    yield s
    await s.aclose()


def assert_denied(response: Any, reason: str) -> None:
    assert response.status_code == 204
    assert response["X-XSP-Decision"] == reason
    assert response.content == b""
    assert not response.has_header("Content-Type")


def assert_problem(response: Any, field: str) -> None:
    assert response.status_code == 400
    assert response["Content-Type"] == "application/problem+json"
    problem = response.json()
    assert set(problem) == {"type", "title", "detail", "field"}
    assert problem["field"] == field


# -- decisions ---------------------------------------------------------------------------------


async def test_allowed_then_frequency_capped(site: Site) -> None:
    site.start()
    first = await site.get(AD)
    assert first.status_code == 200
    assert first.content == b"True|served|c1|2.0000000|0|False"  # the view saw request.xsp
    assert site.mw.async_mode is (site.mode == "asgi")
    assert await site.recorded() == (COST_UNITS, 1)

    second = await site.get(AD)
    assert_denied(second, "frequency_capped")
    assert await site.recorded() == (COST_UNITS, 1)  # a denial reserves nothing

    other_user = await site.get(AD, user="u2")
    assert other_user.status_code == 200
    anonymous = await site.get(AD, user=None)  # caps skipped, the budget still counts
    assert anonymous.content == b"True|served|c1|2.0000000|None|True"
    assert await site.recorded() == (3 * COST_UNITS, 3)


async def test_budget_exhausted(site: Site) -> None:
    site.start(DEFAULT_CAPS=["100/1h"], CAMPAIGNS=[{"id": "tiny", "budget": "0.004"}])
    url = "/ad?campaign_id=tiny&cpm=2.00"
    assert (await site.get(url, user="u1")).status_code == 200
    assert (await site.get(url, user="u2")).status_code == 200
    assert_denied(await site.get(url, user="u3"), "budget_exhausted")
    assert await site.recorded("tiny") == (2 * COST_UNITS, 2)


async def test_bad_input_is_a_400_problem(site: Site) -> None:
    site.start()
    assert_problem(await site.get("/ad?campaign_id=c1&cpm=abc"), "cpm")
    assert_problem(await site.get("/ad?campaign_id=bad%20id"), "campaign_id")
    assert_problem(await site.get("/ad?campaign_id=c1&campaign_id=c2"), "campaign_id")
    assert_problem(await site.get("/ad?campaign_id=c1&cpm=1001"), "cpm")  # above max_cpm
    assert await site.recorded() == (0, 0)


async def test_on_denied_pass_runs_the_view_with_the_denial(site: Site) -> None:
    site.start(ON_DENIED="pass")
    assert (await site.get(AD)).status_code == 200
    second = await site.get(AD)
    assert second.status_code == 200
    assert second.content.startswith(b"False|frequency_capped|c1|")
    assert await site.recorded() == (COST_UNITS, 1)


# -- confirm or release -----------------------------------------------------------------------


async def assert_released(site: Site) -> None:
    assert await site.recorded() == (0, 0)
    again = await site.get(AD)  # the 1/1h cap slot came back too
    assert again.status_code == 200, again.get("X-XSP-Decision")
    assert await site.recorded() == (COST_UNITS, 1)


async def test_failing_view_becomes_a_500_and_releases(site: Site) -> None:
    site.start()
    response = await site.get(f"/ad/boom?campaign_id={CAMPAIGN}&cpm=2.00")
    assert response.status_code == 500
    await assert_released(site)


@pytest.mark.parametrize("code", [302, 404, 503])
async def test_non_2xx_releases(site: Site, code: int) -> None:
    site.start()
    response = await site.get(f"/ad/status/{code}?campaign_id={CAMPAIGN}&cpm=2.00")
    assert response.status_code == code
    await assert_released(site)


async def test_other_2xx_keeps(site: Site) -> None:
    site.start()
    response = await site.get(f"/ad/status/201?campaign_id={CAMPAIGN}&cpm=2.00")
    assert response.status_code == 201
    assert await site.recorded() == (COST_UNITS, 1)
    assert_denied(await site.get(AD), "frequency_capped")


async def test_cancelled_request_releases(store_url: str, made: list[XSPMiddleware]) -> None:
    """Under ASGI a client that goes away cancels the request: the reservation is released."""
    site = Site("asgi", store_url, made)
    try:
        await _cancel_a_running_view(site)
    finally:
        await site.aclose()


async def _cancel_a_running_view(site: Site) -> None:
    site.start()
    request = asyncio.ensure_future(site.get(f"/ad/slow?campaign_id={CAMPAIGN}&cpm=2.00"))
    deadline = time.monotonic() + 5
    while await site.recorded() != (COST_UNITS, 1):  # reserved: the view is running
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    await assert_released(site)


async def test_release_errors_never_become_a_500(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> Any:
        raise TypeError("a bug in release")

    async def abroken(*args: Any) -> Any:
        raise TypeError("a bug in release")

    monkeypatch.setattr(Guard, "release_sync", broken)
    monkeypatch.setattr(Guard, "release", abroken)
    site.start()
    assert (await site.get(f"/ad/status/404?campaign_id={CAMPAIGN}")).status_code == 404
    failing = await site.get(f"/ad/stream-fails?campaign_id={CAMPAIGN}", user="u2")
    with pytest.raises(RuntimeError, match="stream died"):  # the body's own error, not ours
        await site.body(failing)
    assert await site.recorded() == (2 * COST_UNITS, 2)  # unreleased: under-delivery


async def test_behind_a_sync_only_middleware(site: Site) -> None:
    """Django runs XSPMiddleware synchronously when the handler below it is sync (also under
    ASGI): the blocking store decides, in Django's thread."""
    site.start(middleware=(MIDDLEWARE, f"{__name__}.SyncOnlyMiddleware"))
    assert (await site.get(AD)).content == b"True|served|c1|2.0000000|0|False"
    assert site.mw.async_mode is False
    assert_denied(await site.get(AD), "frequency_capped")
    assert (await site.get(f"/ad/boom?campaign_id={CAMPAIGN}", user="u2")).status_code == 500
    assert await site.recorded() == (COST_UNITS, 1)


@pytest.mark.parametrize("route", ["stream", "astream", "file"])
async def test_streaming_body_read_to_its_end_keeps(site: Site, route: str) -> None:
    site.start()
    response = await site.get(f"/ad/{route}?campaign_id={CAMPAIGN}&cpm=2.00")
    assert response.status_code == 200
    assert await site.body(response) == (PAYLOAD if route == "file" else b"".join(CHUNKS))
    assert await site.recorded() == (COST_UNITS, 1)
    assert_denied(await site.get(AD), "frequency_capped")


@pytest.mark.parametrize("route", ["stream-fails", "astream-fails"])
async def test_streaming_body_that_fails_part_way_releases(site: Site, route: str) -> None:
    site.start()
    response = await site.get(f"/ad/{route}?campaign_id={CAMPAIGN}&cpm=2.00")
    assert response.status_code == 200  # the headers went out before the body died
    assert await site.recorded() == (COST_UNITS, 1)  # reserved while the body streams
    with pytest.raises(RuntimeError, match="stream died"):
        await site.body(response)
    await assert_released(site)


@pytest.mark.parametrize("route", ["stream", "astream"])
async def test_streaming_body_closed_before_its_end_releases(site: Site, route: str) -> None:
    site.start()
    response = await site.get(f"/ad/{route}?campaign_id={CAMPAIGN}&cpm=2.00")
    content = response.streaming_content
    if response.is_async:
        assert await content.__anext__() == CHUNKS[0]
        response.close()  # the server gave up (the client went away)
        await content.aclose()
    else:
        assert await asyncio.to_thread(next, content) == CHUNKS[0]
        await asyncio.to_thread(response.close)
    await assert_released(site)


# -- which requests are guarded ---------------------------------------------------------------


async def test_route_rules_beat_global_rules(site: Site) -> None:
    site.start()  # global: 1/1h, PATHS ["/ad"]
    for expected in (200, 200):  # the decorated view's 2/1h, outside PATHS, campaign in the URL
        r = await site.get("/routed/c2")
        assert r.status_code == expected
        assert r.content.startswith(b"True|served|c2|2.0000000|")
    assert_denied(await site.get("/routed/c2"), "frequency_capped")
    assert await site.recorded("c2") == (2 * COST_UNITS, 2)

    assert (await site.get("/ad?campaign_id=c3")).status_code == 200  # the global 1/1h
    assert_denied(await site.get("/ad?campaign_id=c3"), "frequency_capped")

    # A decorated view with its own price parameter; without a campaign it is a 400.
    r = await site.get("/priced?campaign_id=c4&price=3.00")
    assert r.content == b"True|served|c4|3.0000000|0|False"
    assert_problem(await site.get("/priced?price=3.00"), "campaign_id")
    assert_problem(await site.get("/priced?campaign_id=c4&price=x"), "price")
    assert_problem(await site.get("/routed/bad%20id"), "campaign_id")


async def test_decorated_class_based_view(site: Site) -> None:
    site.start()
    first = await site.get("/cbv")  # the campaign is fixed by @ad_view(campaign="fixed")
    assert first.content == b"True|served|fixed|4.0000000|0|False"
    assert_denied(await site.get("/cbv?campaign_id=other"), "frequency_capped")
    assert await site.recorded("fixed") == (40_000, 1)
    assert await site.recorded("other") == (0, 0)


async def test_unguarded_requests_make_no_store_call(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    for name in ("decide", "decide_sync", "release", "release_sync"):
        original = getattr(Guard, name)

        def counting(*args: Any, _name: str = name, _original: Any = original) -> Any:
            calls.append(_name)
            return _original(*args)

        monkeypatch.setattr(Guard, name, counting)
    site.start()
    for url in ("/other?campaign_id=c1", "/ad", "/ad?foo=bar&cpm=2.00", "/other"):
        r = await site.get(url)
        assert r.status_code == 200
        assert r.content in (b"other", b"no decision")
    assert calls == []
    assert (await site.get(AD)).status_code == 200
    assert calls == (["decide_sync"] if site.mode == "wsgi" else ["decide"])
    # A failed response under each mode releases with that mode's store.
    assert (await site.get("/ad/boom?campaign_id=c9")).status_code == 500
    assert calls[-1] == ("release_sync" if site.mode == "wsgi" else "release")


async def test_unreachable_store_fails_closed_never_a_500(
    mode: str, made: list[XSPMiddleware]
) -> None:
    site = Site(mode, "memory://unused", made)
    try:
        site.store_url = f"redis://127.0.0.1:{free_port()}/0"
        site.start()
        assert_denied(await site.get(AD), "store_unavailable")  # the budget fails closed
        site.start(BUDGET_FAIL_OPEN=True)
        r = await site.get(AD)
        assert r.status_code == 200
        assert r.content.startswith(b"True|served|c1|")
    finally:
        await site.aclose()


def test_wsgi_path_creates_no_event_loop(store_url: str, made: list[XSPMiddleware]) -> None:
    """Under WSGI a decision is one blocking EVALSHA: no event loop, no async_to_sync."""

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an event loop was created on the WSGI path")

    with override_settings(XSP_MIDDLEWARE=xsp_settings(store_url), ROOT_URLCONF=__name__):
        client = Client(raise_request_exception=False)
        headers = {"cookie": "user_id=u1"}
        with (
            mock.patch("asyncio.new_event_loop", forbidden),
            mock.patch("asyncio.events.new_event_loop", forbidden),
            mock.patch("asyncio.run", forbidden),
            mock.patch("asgiref.sync.AsyncToSync.__call__", forbidden),
            mock.patch("asgiref.sync.SyncToAsync.__call__", forbidden),
        ):
            assert client.get(AD, headers=headers).status_code == 200
            assert_denied(client.get(AD, headers=headers), "frequency_capped")
            assert client.get("/ad/boom?campaign_id=c2", headers=headers).status_code == 500
            assert client.get("/ad?campaign_id=c2", headers=headers).status_code == 200
            failing = client.get("/ad/stream-fails?campaign_id=c3", headers=headers)
            with pytest.raises(RuntimeError, match="stream died"):
                b"".join(failing.streaming_content)
            assert client.get("/ad?campaign_id=c3", headers=headers).status_code == 200
    mw = made[-1]
    assert mw.async_mode is False

    def recorded(campaign: str) -> tuple[int, int]:
        _, state_key = mw.store.campaign_keys(campaign)
        state = mw.guard.sync_store.client.hgetall(state_key)
        return int(state.get(b"spent", 0)), int(state.get(b"impressions", 0))

    # c2 and c3: the failed reservation was released, the next one kept.
    assert [recorded(c) for c in ("c1", "c2", "c3")] == [(COST_UNITS, 1)] * 3


# -- configuration and system checks ----------------------------------------------------------


def test_settings_dict_campaigns_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XSP_DEFAULT_CAPS", "5/1d")
    monkeypatch.setenv("XSP_USER_COOKIE", "from_env")
    s = settings_from_dict(
        {
            "REDIS_URL": "memory://conf",
            "USER_COOKIE": "uid",  # the dict wins over the environment
            "CAMPAIGNS": [
                {"id": "c1", "budget": "500.00", "caps": ["2/1h"], "cpm": "4.00"},
                Campaign(id="c2", budget="10.00"),
            ],
            "ON_BUDGET_EXHAUSTED": "os.path.join",  # a dotted path is imported
        }
    )
    assert s.user_cookie == "uid"
    assert list(s.default_caps) == ["5/1d"]  # the environment fills what the dict leaves out
    assert [c.id for c in s.campaigns] == ["c1", "c2"]
    assert s.campaigns[0].cpm == "4.00"
    assert s.on_budget_exhausted is os.path.join

    with pytest.raises(ConfigError, match="did you mean 'REDIS_URL'"):
        settings_from_dict({"REDIS_URLL": "memory://"})
    with pytest.raises(ConfigError, match="unknown field"):
        settings_from_dict({"CAMPAIGNS": [{"id": "c1", "budgett": "1.00"}]})
    with pytest.raises(ConfigError, match="float"):
        settings_from_dict({"DEFAULT_BUDGET": 10.5})


def test_a_bad_dict_fails_when_django_loads_the_middleware() -> None:
    with override_settings(XSP_MIDDLEWARE={"DEFAULT_CAPS": ["3/x"]}):
        with pytest.raises(ImproperlyConfigured, match="3/x") as caught:
            XSPMiddleware(lambda request: HttpResponse())
        assert isinstance(caught.value, ConfigError)


def xsp_messages(**overrides: Any) -> dict[str, Any]:
    conf = {"INSTALLED_APPS": ["xsp_middleware.django"], "MIDDLEWARE": [MIDDLEWARE], **overrides}
    with override_settings(**conf):
        return {m.id: m for m in checks.run_checks() if str(m.id).startswith("xsp.")}


@pytest.mark.parametrize(
    "conf",
    [
        {"DEFAULT_CAPS": ["3/x"]},
        {"REDIS_URLL": "redis://127.0.0.1:6379/0"},
        {"CAMPAIGNS": [{"budget": "1.00"}]},
        {"STORE_TIMEOUT": "soon"},
        ["REDIS_URL"],
    ],
)
def test_check_invalid_settings_is_e001(conf: Any) -> None:
    messages = xsp_messages(XSP_MIDDLEWARE=conf, DEBUG=True)
    assert list(messages) == ["xsp.E001"]
    assert isinstance(messages["xsp.E001"], checks.Error)


def test_check_invalid_environment_is_e001(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XSP_FREQUENCY_FAIL_OPEN", "maybe")
    messages = xsp_messages(XSP_MIDDLEWARE={}, DEBUG=True)
    assert "XSP_FREQUENCY_FAIL_OPEN" in messages["xsp.E001"].msg


def test_check_unreachable_store_is_e002() -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    messages = xsp_messages(XSP_MIDDLEWARE={"REDIS_URL": url, "SECRET_KEY": SECRET})
    assert time.monotonic() - started < 5
    assert list(messages) == ["xsp.E002"]
    assert "hunter2" not in messages["xsp.E002"].msg  # the password is not printed


def test_check_development_key_without_debug_is_w001(redis_url: str) -> None:
    assert list(xsp_messages(XSP_MIDDLEWARE={}, DEBUG=False)) == ["xsp.W001"]
    assert xsp_messages(XSP_MIDDLEWARE={}, DEBUG=True) == {}
    assert xsp_messages(XSP_MIDDLEWARE={"SECRET_KEY": SECRET}, DEBUG=False) == {}
    clean = {"REDIS_URL": redis_url, "SECRET_KEY": SECRET}  # a reachable Redis
    assert xsp_messages(XSP_MIDDLEWARE=clean, DEBUG=False) == {}


def test_check_app_without_middleware_is_w002() -> None:
    messages = xsp_messages(XSP_MIDDLEWARE={"SECRET_KEY": SECRET}, MIDDLEWARE=[])
    assert list(messages) == ["xsp.W002"]


def test_check_command_fails_on_e001() -> None:
    with (
        override_settings(XSP_MIDDLEWARE={"ON_DENIED": "sometimes"}),
        pytest.raises(SystemCheckError, match=r"xsp\.E001"),
    ):
        call_command("check", "--tag", "xsp")


# -- the example project ----------------------------------------------------------------------


async def test_example_project(site: Site) -> None:
    from adserver import settings as example_settings

    conf = {  # the example's own XSP_MIDDLEWARE, on this test's store
        **example_settings.XSP_MIDDLEWARE,
        "REDIS_URL": site.store_url,
        "SECRET_KEY": SECRET,
    }
    site.start(urlconf="adserver.urls", conf=conf)

    served = await site.get("/ad?campaign_id=c1&cpm=2.50")
    assert served.status_code == 200
    assert served["Content-Type"] == "application/xml"
    cpm = units_to_decimal(cpm_to_cost_units("2.50", "cpm") * 1000)
    assert served.content.decode() == vast_xml("c1", cpm)
    for _ in range(2):  # the default 3/1h
        assert (await site.get("/ad?campaign_id=c1&cpm=2.50")).status_code == 200
    assert_denied(await site.get("/ad?campaign_id=c1&cpm=2.50"), "frequency_capped")

    for expected in (200, 200):  # GET /ad/<campaign_id>: @ad_view(caps=["2/1h"])
        assert (await site.get("/ad/c2")).status_code == expected
    assert_denied(await site.get("/ad/c2"), "frequency_capped")

    assert_problem(await site.get("/ad?campaign_id=c1&cpm=abc"), "cpm")
    missing = await site.get("/ad")  # the view's own 400, like the FastAPI example's
    assert missing.status_code == 400
    assert missing["Content-Type"] == "application/problem+json"
    assert missing.content == (
        b'{"title":"Missing campaign","detail":"campaign_id is required","field":"campaign_id"}'
    )
    assert (await site.get("/health")).json() == {"status": "ok"}
    assert await site.recorded("c1") == (3 * 25_000, 3)
    assert await site.recorded("c2") == (2 * COST_UNITS, 2)


def _example_env(**more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XSP_", "DJANGO_"))}
    return {**env, "XSP_SECRET_KEY": SECRET, **more}


def test_example_manage_py_check(redis_url: str) -> None:
    manage = [sys.executable, str(EXAMPLE / "manage.py"), "check"]
    ok = subprocess.run(
        manage, env=_example_env(XSP_REDIS_URL=redis_url), capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert "no issues" in ok.stdout
    down = f"redis://127.0.0.1:{free_port()}/0"
    bad = subprocess.run(
        manage, env=_example_env(XSP_REDIS_URL=down), capture_output=True, text=True
    )
    assert bad.returncode != 0
    assert "xsp.E002" in bad.stderr


@pytest.mark.parametrize("server", ["runserver", "uvicorn"])
def test_example_serves_under_runserver_and_uvicorn(redis_url: str, server: str) -> None:
    port = free_port()
    if server == "runserver":
        command = [
            sys.executable,
            str(EXAMPLE / "manage.py"),
            "runserver",
            f"127.0.0.1:{port}",
            "--noreload",
        ]
    else:
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(EXAMPLE),
            "adserver.asgi:application",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=_example_env(XSP_REDIS_URL=redis_url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        user = {"cookie": f"user_id={uuid.uuid4().hex}"}
        served = httpx.get(f"{base}/ad?campaign_id=c1&cpm=2.50", headers=user)
        assert served.status_code == 200
        assert served.headers["content-type"] == "application/xml"
        assert '<VAST version="4.2"' in served.text
        codes = [httpx.get(f"{base}/ad/c2", headers=user).status_code for _ in range(3)]
        assert codes == [200, 200, 204]
        denied = httpx.get(f"{base}/ad/c2", headers=user)
        assert denied.headers["x-xsp-decision"] == "frequency_capped"
        assert httpx.get(f"{base}/ad?campaign_id=c1&cpm=-1").status_code == 400
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(autouse=True, scope="module")
def _remove_payload() -> Iterator[None]:
    yield
    _payload_file().unlink(missing_ok=True)


async def test_the_middleware_listed_twice_decides_once(site: Site) -> None:
    site.start(middleware=(MIDDLEWARE, MIDDLEWARE))
    assert (await site.get(AD)).status_code == 200
    assert await site.recorded() == (COST_UNITS, 1)


async def test_head_requests_never_reserve(site: Site) -> None:
    site.start()
    for _ in range(3):
        if site.mode == "wsgi":
            await asyncio.to_thread(site.client.head, AD, headers={"cookie": "user_id=u1"})
        else:
            await site.client.head(AD, headers={"cookie": "user_id=u1"})
    assert await site.recorded() == (0, 0)
    assert (await site.get(AD)).status_code == 200


async def test_assigned_ids_reach_the_browser_and_gpc_is_honoured(site: Site) -> None:
    site.start(ANONYMOUS="assign")
    first = await site.get(AD, user=None)
    assert first.status_code == 200
    cookie = first.cookies["user_id"]
    assert len(cookie.value) == 32 and cookie["httponly"] and cookie["secure"]
    again = await site.get(AD, user=cookie.value)
    assert_denied(again, "frequency_capped")  # capped under the assigned id
    gpc = {"cookie": "user_id=gpc-user", "sec-gpc": "1"}
    if site.mode == "wsgi":
        r = await asyncio.to_thread(site.client.get, AD, headers=gpc)
    else:
        r = await site.client.get(AD, headers=gpc)
    assert r.status_code == 200
    assert site.store.user_key("gpc-user").encode() not in [
        key async for key in site.store.client.scan_iter("*")
    ]


async def test_debug_headers_are_opt_in(site: Site) -> None:
    site.start()
    assert "Server-Timing" not in (await site.get(AD)).headers
    site.start(DEBUG_HEADERS=True)
    r = await site.get(AD, user="dbg")
    assert r.headers["Server-Timing"].startswith("xsp;dur=")
    assert r.headers["X-XSP-Decision"] == "served"
    assert r.headers["X-XSP-Remaining-Impressions"] == "0"
