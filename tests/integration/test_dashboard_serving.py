"""Every way the dashboard is served, driven as its operator would: ``xsp-middleware dashboard``
(its own process, on the store of ``XSP_REDIS_URL``), ``demo --serve`` (next to the demo ad
server, on the embedded store), mounted in Starlette and FastAPI, and Django's ASGI handler
(the example project, under uvicorn)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from conftest import SECRET, as_user, client
from fastapi import FastAPI
from processes import CLI
from redis_server import free_port
from starlette.applications import Starlette
from starlette.routing import Mount

from xsp_middleware import Campaign, XSPMiddleware, dashboard_app
from xsp_middleware.dashboard import history
from xsp_middleware.demo import vast_app

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "dashboard-token-0123456789"


@contextmanager
def running(args: list[str], ready: str, cwd: Path = ROOT, **env: str) -> Iterator[str]:
    """A server process, once ``ready`` (a path) answers; its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [a.replace("{port}", str(port)) for a in args],
        cwd=cwd,
        env={**os.environ, "XSP_SECRET_KEY": SECRET, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(base + ready, timeout=1)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"{args} did not start: {proc.communicate()[0][-3000:]}")
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


async def test_the_cli_serves_a_read_only_dashboard_on_loopback_and_samples_from_start_up(
    redis_url: str,
) -> None:
    ads = XSPMiddleware(
        vast_app, redis_url=redis_url, secret_key=SECRET, campaigns=[Campaign(id="spring")]
    )
    async with client(ads) as c:
        for user in ("a", "b"):
            assert (await c.get("/ad?campaign_id=spring", headers=as_user(user))).status_code == 200
    with running([CLI, "dashboard", "--port", "{port}"], "/", XSP_REDIS_URL=redis_url) as base:
        page = httpx.get(f"{base}/campaigns/spring")
        assert page.status_code == 200
        assert "Read-only: no <code>dashboard_token</code> is set" in page.text
        deadline = time.monotonic() + 10  # the sampler samples at start-up
        while not await history(ads.store, "spring", 0):
            assert time.monotonic() < deadline, "no sample at start-up"
            time.sleep(0.1)
        (first,) = await history(ads.store, "spring", 0)
        assert first.state["impressions"] == "2"
        assert httpx.post(f"{base}/campaigns/spring", data={"action": "pause"}).status_code == 403
    await ads.store.aclose()


def test_the_cli_refuses_a_public_address_without_a_token(redis_url: str) -> None:
    result = subprocess.run(
        [CLI, "dashboard", "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "XSP_REDIS_URL": redis_url, "XSP_SECRET_KEY": SECRET},
    )
    assert result.returncode == 2
    assert "the dashboard serves 0.0.0.0 only with a token: set XSP_DASHBOARD_TOKEN" in (
        result.stderr
    )


def test_with_a_token_the_cli_serves_any_address_and_every_page_needs_the_token(
    redis_url: str,
) -> None:
    args = [CLI, "dashboard", "--host", "0.0.0.0", "--port", "{port}"]
    with running(args, "/login", XSP_REDIS_URL=redis_url, XSP_DASHBOARD_TOKEN=TOKEN) as base:
        anonymous = httpx.get(f"{base}/")
        signed = httpx.get(f"{base}/", headers={"authorization": f"Bearer {TOKEN}"})
    assert anonymous.status_code == 303 and anonymous.headers["location"] == "/login?next=/"
    assert signed.status_code == 200 and "Read-only" not in signed.text


def test_demo_serve_mounts_the_dashboard_next_to_its_ad_server() -> None:
    with running([CLI, "demo", "--serve", "--port", "{port}"], "/dashboard/") as base:
        served = httpx.get(f"{base}/ad?campaign_id=campaign_standard", cookies={"user_id": "alice"})
        page = httpx.get(f"{base}/dashboard/")
        detail = httpx.get(f"{base}/dashboard/campaigns/campaign_standard")
    assert served.status_code == 200
    assert page.status_code == 200
    for campaign in ("campaign_premium", "campaign_standard", "campaign_budget", "campaign_even"):
        assert f'href="/dashboard/campaigns/{campaign}"' in page.text
    assert detail.status_code == 200 and "svg" in detail.text
    assert '<link rel="stylesheet" href="/dashboard/static/dashboard.css">' in page.text


@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
async def test_mounted_in_an_app_every_link_and_cookie_stays_under_the_mount(
    framework: str,
) -> None:
    dash = dashboard_app(
        redis_url="memory://mounted",
        secret_key=SECRET,
        dashboard_token=TOKEN,
        campaigns=[Campaign(id="spring")],
    )
    if framework == "starlette":
        host = Starlette(routes=[Mount("/ops", app=dash)])
    else:
        host = FastAPI()
        host.mount("/ops", dash)
    transport = httpx.ASGITransport(app=host, client=("127.0.0.1", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as c:
        login = await c.get("/ops/")
        assert login.status_code == 303 and login.headers["location"] == "/ops/login?next=/"
        signed = await c.post("/ops/login", data={"token": TOKEN, "next": "/"})
        assert signed.headers["location"] == "/ops/"
        assert "Path=/ops;" in signed.headers["set-cookie"]
        page = await c.get("/ops/", headers={"cookie": signed.headers["set-cookie"].split(";")[0]})
        css = await c.get("/ops/static/dashboard.css")
    assert page.status_code == 200
    assert 'href="/ops/static/dashboard.css"' in page.text
    assert 'action="/ops/logout"' in page.text
    assert css.status_code == 200 and css.headers["content-type"] == "text/css; charset=utf-8"
    await dash.aclose()


def test_django_serves_it_through_its_asgi_handler(redis_url: str) -> None:
    args = [sys.executable, "-m", "uvicorn", "adserver.asgi:application", "--port", "{port}"]
    django = ROOT / "examples" / "django_project"
    with running(args, "/health", django, XSP_REDIS_URL=redis_url) as base:
        ad = httpx.get(f"{base}/ad?campaign_id=c1", cookies={"user_id": "alice"})
        page = httpx.get(f"{base}/dashboard/")
        detail = httpx.get(f"{base}/dashboard/campaigns/c1")
        health = httpx.get(f"{base}/health")
    assert ad.status_code == 200
    assert health.status_code == 200  # Django's own routes, as before
    assert page.status_code == 200 and 'href="/dashboard/campaigns/c1"' in page.text
    assert detail.status_code == 200 and "svg" in detail.text
