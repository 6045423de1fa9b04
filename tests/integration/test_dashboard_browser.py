"""The operator dashboard in a real browser: Debian's chromium, driven by Playwright, against
the dashboard and the ad server under uvicorn (one server, the dashboard at /dashboard), on a
real Redis and on the embedded store.

``XSP_REFRESH_SCREENSHOTS=1`` writes the pages' screenshots to docs/ (docs/dashboard.md shows
them); otherwise they go to the test's temporary directory. Without chromium these tests skip,
and fail where CI asks for everything (``XSP_REQUIRE_REDIS=1``): .ci/run installs it.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import uvicorn
from conftest import REQUIRE_REDIS, SECRET
from processes import show
from redis_server import free_port

from xsp_middleware import Campaign, XSPMiddleware, dashboard_app
from xsp_middleware.clock import ManualClock
from xsp_middleware.dashboard import history, sample, with_dashboard
from xsp_middleware.demo import vast_app
from xsp_middleware.money import format_units
from xsp_middleware.settings import Rules, Settings
from xsp_middleware.store import Store, day_span

CHROMIUM = "/usr/bin/chromium"
DOCS = Path(__file__).resolve().parents[2] / "docs"
TOKEN = "dashboard-token-0123456789"
# The flags a headless Chromium needs here: no sandbox as root, and none of the background
# connections this machine's closed network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def midday_zone() -> str:
    """A zone where it is around noon now: today's history has room before now."""
    now = datetime.now(UTC)
    for offset in range(-12, 15):
        name = "UTC" if offset == 0 else f"Etc/GMT{'-' if offset > 0 else '+'}{abs(offset)}"
        if 9 <= now.astimezone(ZoneInfo(name)).hour <= 14:
            return name
    raise AssertionError("every hour has a zone where it is midday")


ZONE = midday_zone()
CAMPAIGNS = [
    Campaign(id="paced", daily_budget="5.00", pacing="even", cpm="2.00", caps=[], timezone=ZONE),
    Campaign(id="steady", budget="20.00", cpm="1.00", caps=["3/1h"]),
    Campaign(id="sold-out", budget="0.003", cpm="2.00", caps=[]),
]


class Served:
    """An ASGI app under uvicorn, in a thread of this process (so that it shares the embedded
    store with the test), on a free port."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)


@pytest.fixture(scope="module")
def chromium() -> str:
    if shutil.which(CHROMIUM) is None:
        if REQUIRE_REDIS:
            pytest.fail(f"{CHROMIUM} is missing (apt-get install chromium; .ci/run does)")
        pytest.skip(f"{CHROMIUM} is not installed")
    return CHROMIUM


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


def serve(store_url: str, **settings: Any) -> Iterator[tuple[Served, XSPMiddleware]]:
    ads = XSPMiddleware(vast_app, redis_url=store_url, secret_key=SECRET, campaigns=CAMPAIGNS)
    dashboard = dashboard_app(
        redis_url=store_url, secret_key=SECRET, campaigns=CAMPAIGNS, **settings
    )
    served = Served(with_dashboard(ads, dashboard))
    try:
        yield served, ads
    finally:
        served.stop()


@pytest.fixture
def signed(store_url: str) -> Iterator[tuple[Served, XSPMiddleware]]:
    """The ad server and, at /dashboard, the dashboard with a token (actions on)."""
    yield from serve(store_url, dashboard_token=TOKEN)


@pytest.fixture
def read_only(store_url: str) -> Iterator[tuple[Served, XSPMiddleware]]:
    """The same without a token: read-only, for this machine only."""
    yield from serve(store_url)


@pytest.fixture
async def admin(store_url: str) -> AsyncIterator[Store]:
    """An operator's admin store on the store under test."""
    store = Store(Rules.from_settings(Settings(redis_url=store_url, campaigns=CAMPAIGNS)))
    yield store
    await store.aclose()


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.node.callspec.params["store_url"])


async def ad(base: str, campaign: str, users: range) -> list[httpx.Response]:
    """Ad requests from ``users``, through the server, as players send them."""
    async with httpx.AsyncClient(base_url=base) as c:
        return [
            await c.get(f"/ad?campaign_id={campaign}", headers={"cookie": f"user_id=user-{i}"})
            for i in users
        ]


def screenshot(tmp_path: Path, name: str) -> Path:
    folder = DOCS if os.environ.get("XSP_REFRESH_SCREENSHOTS") == "1" else tmp_path
    return folder / f"dashboard-{name}.png"


async def sign_in(page: Any, base: str, path: str = "/dashboard/") -> None:
    await page.goto(base + path)
    assert "/dashboard/login" in page.url
    await page.fill("#token", TOKEN)
    await page.click("form[action='/dashboard/login'] button")
    await page.wait_for_url(re.compile(re.escape(base + path) + "$"))


STORES = pytest.mark.parametrize("store_url", ["redis", "memory"], indirect=True)


@STORES
async def test_the_chart_plots_the_stored_spend_of_each_sample_and_now(
    browser: Any, signed: tuple[Served, XSPMiddleware], admin: Store, tmp_path: Path
) -> None:
    served, _ = signed
    now = (await admin.get_campaign("paced")).now_ms
    day_start, _ = day_span(ZONE, now)
    stored = []  # (sample time, the day's spend `campaign show` reported then)
    clock = ManualClock(0)
    for i, users in enumerate((range(0, 3), range(3, 8), range(8, 10))):
        assert {r.status_code for r in await ad(served.url, "paced", users)} == {200}
        # Three minutes of this morning (the dashboard samples once a minute as it runs; a
        # test cannot wait for minutes): each sample reads the store as it is now.
        clock.now = now - (3 - i) * 600_000
        assert clock.now > day_start
        admin.clock = clock
        assert await sample(admin, "paced")
        admin.clock = None
        stored.append((clock.now, (await admin.get_campaign("paced")).daily_spent_units))
    await ad(served.url, "steady", range(40))
    await ad(served.url, "sold-out", range(3))

    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    await sign_in(page, served.url)
    for _ in range(3):  # the dashboard's own sampler may add a minute's sample meanwhile
        before = await history(admin, "paced", day_start)
        await page.goto(f"{served.url}/dashboard/campaigns/paced")
        plotted = await page.eval_on_selector_all(
            "svg.spend-chart circle.spend",
            """points => points.map(p => ({at: +p.dataset.at, units: +p.dataset.units,
                  spend: p.dataset.spend, now: p.classList.contains('now'),
                  x: +p.getAttribute('cx'), y: +p.getAttribute('cy')}))""",
        )
        if await history(admin, "paced", day_start) == before:
            break

    # Every stored sample of today, then now, each at its time with the day's spend then.
    config = (await admin.get_campaign("paced")).config
    kept = [
        (s.at_ms, admin.campaign_view("paced", config, s.state, s.at_ms).daily_spent_units)
        for s in before
    ]
    assert [(p["at"], p["units"]) for p in plotted[:-1]] == kept
    assert set(stored) <= set(kept)  # the three this test took, as `campaign show` said then
    assert [p["now"] for p in plotted] == [False] * len(kept) + [True]
    shown_now = (await admin.get_campaign("paced")).daily_spent_units
    assert plotted[-1]["units"] == shown_now == 10 * 20_000
    assert [p["spend"] for p in plotted] == [format_units(p["units"]) for p in plotted]
    # Where they are drawn: left to right in time, higher for more spend, on the line.
    xs, ys = [p["x"] for p in plotted], [p["y"] for p in plotted]
    assert xs == sorted(xs) and ys == sorted(ys, reverse=True) and ys[0] > ys[-1]
    line = await page.get_attribute("svg.spend-chart polyline.spend-line", "points")
    assert line is not None
    drawn = [tuple(float(v) for v in point.split(",")) for point in line.split()]
    assert drawn == list(zip(xs, ys, strict=True))
    assert await page.locator("svg.spend-chart polygon.band").count() == 1
    note = await page.inner_text("p.history")
    assert "History since" in note and "only: the dashboard was not sampling" in note


@STORES
async def test_pause_from_the_page_denies_the_next_ad_request_and_the_cli_shows_it(
    browser: Any,
    signed: tuple[Served, XSPMiddleware],
    admin: Store,
    store_url: str,
    store_kind: str,
) -> None:
    served, _ = signed
    assert (await ad(served.url, "steady", range(1)))[0].status_code == 200
    page = await browser.new_page()
    await sign_in(page, served.url, "/dashboard/campaigns/steady")
    await page.click("form:has(input[value='pause']) button")
    await page.wait_for_url(re.compile(r"/dashboard/campaigns/steady\?done=paused$"))
    assert "Paused: every process's next decision" in await page.inner_text("p.banner.done")
    assert await page.inner_text("h1 .status") == "paused"

    denied = (await ad(served.url, "steady", range(1, 2)))[0]
    assert denied.status_code == 204
    assert denied.headers["x-xsp-decision"] == "campaign_paused"
    if store_kind == "redis":  # another process: the CLI
        assert show(store_url, "steady")["status"] == "paused"
    assert (await admin.get_campaign("steady")).status == "paused"

    await page.click("form:has(input[value='resume']) button")
    await page.wait_for_url(re.compile(r"\?done=resumed$"))
    assert (await ad(served.url, "steady", range(2, 3)))[0].status_code == 200


@STORES
async def test_a_bad_budget_shows_its_error_and_changes_nothing(
    browser: Any,
    signed: tuple[Served, XSPMiddleware],
    admin: Store,
    store_url: str,
    store_kind: str,
    tmp_path: Path,
) -> None:
    served, _ = signed
    await ad(served.url, "steady", range(2))
    before = show(store_url, "steady") if store_kind == "redis" else None
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    await sign_in(page, served.url, "/dashboard/campaigns/steady")
    await page.fill("#budget", "12.345678901")
    await page.click("form:has(#budget) button")
    alert = await page.inner_text("p.banner.error")
    assert alert == (
        "Nothing changed: budget: '12.345678901' must be a non-negative decimal with at most "
        "7 decimal places"
    )
    assert await page.get_attribute("#budget", "aria-invalid") == "true"
    assert await page.input_value("#budget") == "12.345678901"  # what was typed, to fix it
    assert (await admin.get_campaign("steady")).budget == 20
    if store_kind == "redis":  # as the CLI of another process shows it: nothing changed
        assert show(store_url, "steady") == before
    await page.screenshot(path=tmp_path / "error.png", full_page=True)

    await page.fill("#budget", "25.50")  # a good one goes through
    await page.click("form:has(#budget) button")
    await page.wait_for_url(re.compile(r"\?done=budget$"))
    assert (await admin.get_campaign("steady")).budget == 25.5


@STORES
async def test_a_cross_site_post_is_refused(
    browser: Any, signed: tuple[Served, XSPMiddleware], admin: Store
) -> None:
    """A page of another origin (another port: same site, so the Strict cookie goes along)
    submits a form that would pause the campaign: refused, and the campaign still serves."""
    served, _ = signed
    target = f"{served.url}/dashboard/campaigns/steady"

    async def evil(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = (
            f'<form id="f" method="post" action="{target}"><input name="action" value="pause">'
            "</form><script>document.getElementById('f').submit()</script>"
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/html")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    attacker = Served(evil)
    try:
        page = await browser.new_page()
        await sign_in(page, served.url, "/dashboard/campaigns/steady")
        async with page.expect_response(target) as caught:
            await page.goto(attacker.url)
        answer = await caught.value
        assert answer.status == 403
        assert "Cross-site request refused" in await answer.text()
    finally:
        attacker.stop()
    assert (await admin.get_campaign("steady")).status == "active"
    assert (await ad(served.url, "steady", range(1)))[0].status_code == 200


@STORES
async def test_without_a_token_the_actions_are_absent_and_a_forged_post_is_refused(
    browser: Any, read_only: tuple[Served, XSPMiddleware], admin: Store, tmp_path: Path
) -> None:
    served, _ = read_only
    await ad(served.url, "steady", range(2))
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    await page.goto(f"{served.url}/dashboard/campaigns/steady")
    assert "Read-only: no dashboard_token is set" in await page.inner_text("p.banner.readonly")
    assert await page.locator("form[method='post']").count() == 0
    assert await page.locator("button").count() == 0
    await page.screenshot(path=tmp_path / "read-only.png", full_page=True)
    # A POST forged from the page itself (same origin, so only read-only mode stops it): a
    # form written into the page and submitted. (The page's policy lets no script fetch.)
    target = f"{served.url}/dashboard/campaigns/steady"
    async with page.expect_response(lambda r: r.url == target and r.request.method == "POST") as (
        caught
    ):
        await page.evaluate(
            """url => { const f = document.createElement('form');
                        f.method = 'post'; f.action = url;
                        const i = document.createElement('input');
                        i.name = 'action'; i.value = 'pause'; f.appendChild(i);
                        document.body.appendChild(f); f.submit(); }""",
            target,
        )
    answer = await caught.value
    assert answer.status == 403
    assert "the dashboard changes nothing" in await answer.text()
    assert (await admin.get_campaign("steady")).status == "active"
    assert (await ad(served.url, "steady", range(2, 3)))[0].status_code == 200


@pytest.mark.parametrize("store_url", ["memory"], indirect=True)
async def test_a_simulated_day_of_even_pacing_stays_inside_its_band_on_the_chart(
    browser: Any, store_url: str, tmp_path: Path
) -> None:
    """A day of traffic at twice what the daily budget buys, on a test clock (five minutes a
    step), sampled as the dashboard does: every plotted spend is at most what the burst
    allowance lets the spend reach then. Its pages are the screenshots docs/dashboard.md
    shows (``XSP_REFRESH_SCREENSHOTS=1``)."""
    day = ms_utc("2027-03-01T00:00:00")
    clock = ManualClock(day)
    campaigns = [
        Campaign(id="spring-sale", daily_budget="2.00", pacing="even", cpm="2.00", caps=["3/1h"]),
        Campaign(id="brand-video", budget="50.00", cpm="4.00", caps=["2/1h"]),
        Campaign(id="retarget", budget="0.05", cpm="1.50", caps=["1/1h"]),
    ]
    settings = {"redis_url": store_url, "secret_key": SECRET, "campaigns": campaigns}
    ads = XSPMiddleware(vast_app, **settings)
    dashboard = dashboard_app(**settings, dashboard_token=TOKEN)
    for store in (ads.store, dashboard.store):
        store.clock = clock
    served = Served(with_dashboard(ads, dashboard))
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=ads), base_url="http://ads"
        ) as c:
            for step in range(15 * 12):  # 00:00 to 15:00
                clock.now = day + step * 300_000
                for i in range(7):
                    user = {"cookie": f"user_id=u{(step * 7 + i) % 400}"}
                    campaign = ("spring-sale", "brand-video", "spring-sale", "retarget")[i % 4]
                    await c.get(f"/ad?campaign_id={campaign}", headers=user)
                clock.now += 60_000  # sampled a minute into the step
                for campaign in ("spring-sale", "brand-video", "retarget"):
                    await sample(dashboard.store, campaign)
        clock.now = day + 15 * 3_600_000
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        await page.goto(f"{served.url}/dashboard/campaigns/spring-sale")
        await page.screenshot(path=screenshot(tmp_path, "login"), full_page=True)
        await page.fill("#token", TOKEN)
        await page.click("form[action='/dashboard/login'] button")
        await page.wait_for_selector("svg.spend-chart")
        await page.screenshot(path=screenshot(tmp_path, "campaign"), full_page=True)
        plotted = await page.eval_on_selector_all(
            "svg.spend-chart circle.spend",
            "points => points.map(p => [+p.dataset.at, +p.dataset.units])",
        )
        await page.goto(f"{served.url}/dashboard/?sort=spent&order=desc")
        await page.screenshot(path=screenshot(tmp_path, "campaigns"), full_page=True)
    finally:
        served.stop()
        await ads.store.aclose()
    assert len(plotted) == 15 * 12 + 1  # a sample each step, and now
    view = await dashboard.store.get_campaign("spring-sale")
    assert view.denials["paced"] > 0  # the traffic asked for more than the curve allows
    for at, units in plotted:
        curve = dashboard.store.pacing_curve(view.config, at, day, day + 86_400_000)
        assert curve is not None
        assert units <= curve[1] + 1, (at, units, curve)  # (the script compares in floats)
    assert plotted[-1][1] >= 0.9 * view.config.daily_budget_units * 15 // 24  # on pace
    await dashboard.aclose()


def ms_utc(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)
