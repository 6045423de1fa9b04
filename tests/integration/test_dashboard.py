"""The operator dashboard over HTTP, as an operator's browser or script reaches it: its pages,
its access rules (token, session cookie, loopback-only without a token, cross-site POSTs), its
actions (the same as the CLI's), its spend history (sampled by the dashboard, once a minute,
never twice), and the ways it is served (``xsp-middleware dashboard``, mounted in Starlette,
FastAPI and Django's ASGI handler, next to the demo). The browser tests are
test_dashboard_browser.py."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from html import unescape
from typing import Any

import httpx
import pytest
from conftest import SECRET, as_user, client
from processes import cli, show
from redis_server import free_port

from xsp_middleware import Campaign, XSPMiddleware, dashboard_app
from xsp_middleware.clock import ManualClock
from xsp_middleware.dashboard import (
    HISTORY_SAMPLES,
    DashboardApp,
    Sampler,
    history,
    sample,
    with_dashboard,
)
from xsp_middleware.demo import vast_app
from xsp_middleware.money import amount_to_units
from xsp_middleware.settings import Rules, Settings
from xsp_middleware.store import Store

TOKEN = "dashboard-token-0123456789"
BEARER = {"authorization": f"Bearer {TOKEN}"}
CAMPAIGNS = [
    Campaign(id="even", daily_budget="3.00", pacing="even", cpm="2.00", caps=[]),
    Campaign(id="asap", budget="5.00", cpm="1.00"),
]


def loopback(app: Any, address: tuple[str, int] = ("127.0.0.1", 50000)) -> httpx.AsyncClient:
    """A client of ``app`` as a browser on this machine reaches it: the ASGI client (and the
    server) at loopback addresses. ``address``: another client address."""
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=address), base_url="http://127.0.0.1:8001"
    )


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    """Which of conftest's stores ``store_url`` is: redis, memory, cluster or sentinel."""
    return str(request.node.callspec.params["store_url"])


@pytest.fixture
async def stores(store_url: str) -> AsyncIterator[tuple[XSPMiddleware, Store]]:
    """The ad server on the store under test, and an operator's admin store on it."""
    app = XSPMiddleware(vast_app, redis_url=store_url, secret_key=SECRET, campaigns=CAMPAIGNS)
    admin = Store(Rules.from_settings(Settings(redis_url=store_url, campaigns=CAMPAIGNS)))
    yield app, admin
    await app.store.aclose()
    await admin.aclose()


async def serve_ads(app: XSPMiddleware, campaign: str, n: int, first_user: int = 0) -> list[int]:
    async with client(app) as c:
        return [
            (await c.get(f"/ad?campaign_id={campaign}", headers=as_user(f"u{i}"))).status_code
            for i in range(first_user, first_user + n)
        ]


def dashboard(store_url: str, **settings: Any) -> DashboardApp:
    return dashboard_app(redis_url=store_url, secret_key=SECRET, campaigns=CAMPAIGNS, **settings)


def text(html: str) -> str:
    """What the page says, tags dropped."""
    return re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", html)))


# -- pages --------------------------------------------------------------------------------------


async def test_the_campaigns_page_lists_spend_pacing_impressions_and_denials(
    store_url: str, stores: tuple[XSPMiddleware, Store]
) -> None:
    ads, admin = stores
    assert await serve_ads(ads, "even", 4) == [200] * 4
    assert await serve_ads(ads, "asap", 6) == [200] * 6
    async with client(ads) as c:  # u0 saw asap already: its 4th within the hour is capped
        for _ in range(3):
            await c.get("/ad?campaign_id=asap", headers=as_user("u0"))
    app = dashboard(store_url, dashboard_token=TOKEN)
    before = (await admin.get_campaign("even")).pacing_target_units
    async with loopback(app) as c:
        page = await c.get("/", headers=BEARER)
    after = (await admin.get_campaign("even")).pacing_target_units
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    said = text(page.text)
    # Today's spend against the pacing target (which grows by the millisecond), as `campaign
    # show` computes them.
    found = re.search(r"even active 0\.008 / 1000\.00 0\.008 / ([0-9.]+) \(\d+%\) 4 ", said)
    assert found, said
    assert before is not None and after is not None
    assert before <= amount_to_units(found.group(1), "target") <= after
    assert "asap active 0.008 / 5.00 no daily budget or pacing 8 no beacons frequency_capped 1" in (
        said
    ), said
    await app.aclose()


async def test_campaigns_sort_by_any_column_and_filter_by_status(
    store_url: str, stores: tuple[XSPMiddleware, Store]
) -> None:
    ads, admin = stores
    await serve_ads(ads, "asap", 3)
    await admin.set_campaign("paused1", budget="10.00", status="paused")
    app = dashboard(store_url, dashboard_token=TOKEN)

    def order(html: str) -> list[str]:
        return re.findall(r'<a href="[^"]*/campaigns/([^"]+)">', html)

    async with loopback(app) as c:
        by_id = order((await c.get("/?sort=id", headers=BEARER)).text)
        by_id_desc = order((await c.get("/?sort=id&order=desc", headers=BEARER)).text)
        by_spend = order((await c.get("/?sort=spent&order=desc", headers=BEARER)).text)
        paused = order((await c.get("/?status=paused", headers=BEARER)).text)
        bogus = await c.get("/?sort=<script>&status=nonsense&order=sideways", headers=BEARER)
    assert by_id == ["asap", "even", "paused1"]
    assert by_id_desc == ["paused1", "even", "asap"]
    assert by_spend[0] == "asap"
    assert paused == ["paused1"]
    assert bogus.status_code == 200 and "<script>" not in bogus.text  # unknown values: defaults
    await app.aclose()


async def test_a_campaign_page_charts_todays_spend_from_the_sampled_history(
    store_url: str, stores: tuple[XSPMiddleware, Store]
) -> None:
    """Samples at three minutes of the day, each after more traffic: the chart plots each at
    its time with the day's spend then, and the spend now last."""
    ads, admin = stores
    app = dashboard(store_url, dashboard_token=TOKEN)
    now = (await admin.get_campaign("even")).now_ms
    day_start = now - now % 86_400_000  # "even" runs in UTC
    clock = admin.clock = ManualClock(0)
    expected = []
    for i, users in ((1, 2), (2, 3), (3, 1)):
        await serve_ads(ads, "even", users, first_user=100 * i)
        clock.now = day_start + (now - day_start) * i // 4  # today, before now
        assert await sample(admin, "even")
        expected.append((clock.now, (await ads.store.get_campaign("even")).daily_spent_units))
    admin.clock = None
    async with loopback(app) as c:
        page = (await c.get("/campaigns/even", headers=BEARER)).text
    points = re.findall(
        r'<circle class="(spend(?: now)?)"[^>]*data-at="(\d+)" data-units="(\d+)"', page
    )
    assert [(int(at), int(units)) for _, at, units in points[:3]] == expected
    assert [kind for kind, _, _ in points] == ["spend", "spend", "spend", "spend now"]
    assert int(points[-1][2]) == (await admin.get_campaign("even")).daily_spent_units == 120_000
    assert 'class="ideal"' in page and 'class="band"' in page  # even pacing: its curve
    assert "History since" in text(page)
    await app.aclose()


async def test_a_dashboard_started_late_says_so(
    store_url: str, stores: tuple[XSPMiddleware, Store]
) -> None:
    ads, admin = stores
    await serve_ads(ads, "asap", 2)
    app = dashboard(store_url, dashboard_token=TOKEN)
    async with loopback(app) as c:
        none_yet = text((await c.get("/campaigns/asap", headers=BEARER)).text)
        now = (await admin.get_campaign("asap")).now_ms
        admin.clock = ManualClock(now - now % 86_400_000 + 14 * 3_600_000 + 300_000)  # 14:05
        assert await sample(admin, "asap")
        admin.clock = None
        late = text((await c.get("/campaigns/asap", headers=BEARER)).text)
    assert "No history yet today" in none_yet and "The chart shows the spend now." in none_yet
    if now % 86_400_000 > 14 * 3_600_000 + 300_000:  # the sample is in today's past
        assert "History since 14:05 only: the dashboard was not sampling earlier today" in late
    await app.aclose()


async def test_unknown_and_invalid_campaigns_are_a_clear_404(store_url: str) -> None:
    app = dashboard(store_url, dashboard_token=TOKEN)
    async with loopback(app) as c:
        unknown = await c.get("/campaigns/never-seen", headers=BEARER)
        invalid = await c.get("/campaigns/%7Bbad%7D", headers=BEARER)
        nowhere = await c.get("/nowhere", headers=BEARER)
        method = await c.request("DELETE", "/", headers=BEARER)
    assert unknown.status_code == 404
    assert "unknown campaign 'never-seen': no config and no recorded state" in text(unknown.text)
    assert invalid.status_code == 404 and "must match" in text(invalid.text)
    assert nowhere.status_code == 404
    assert method.status_code == 405 and method.headers["allow"] == "GET, HEAD"
    await app.aclose()


# -- access ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("store_url", ["memory"], indirect=True)
async def test_with_a_token_every_page_needs_it_and_the_login_form_sets_a_strict_session(
    store_url: str,
) -> None:
    app = dashboard(store_url, dashboard_token=TOKEN)
    async with loopback(app) as c:
        anonymous = await c.get("/campaigns/asap")
        assert anonymous.status_code == 303
        assert anonymous.headers["location"] == "/login?next=/campaigns/asap"
        form = await c.get("/login")
        assert form.status_code == 200 and 'name="token"' in form.text
        wrong = await c.post("/login", data={"token": "nope" * 5, "next": "/"})
        assert wrong.status_code == 401 and "That is not the token." in wrong.text
        assert "set-cookie" not in wrong.headers
        right = await c.post("/login", data={"token": TOKEN, "next": "/campaigns/asap"})
        assert right.status_code == 303 and right.headers["location"] == "/campaigns/asap"
        cookie = right.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Max-Age=43200" in cookie
        session = cookie.split(";")[0]
        page = await c.get("/campaigns/asap", headers={"cookie": session})
        assert page.status_code == 200 and 'name="action"' in page.text
        forged = await c.get("/campaigns/asap", headers={"cookie": session[:-4] + "0000"})
        assert forged.status_code == 303
        out = await c.post("/logout", headers={"cookie": session})
        assert out.status_code == 303 and "Max-Age=0" in out.headers["set-cookie"]
        # Somewhere else after signing in: only this dashboard's own paths.
        away = await c.post("/login", data={"token": TOKEN, "next": "//evil.example/x"})
        assert away.headers["location"] == "/"
    await app.aclose()


@pytest.mark.parametrize("store_url", ["memory"], indirect=True)
async def test_a_new_token_ends_every_session(store_url: str) -> None:
    old = dashboard(store_url, dashboard_token=TOKEN)
    async with loopback(old) as c:
        session = (await c.post("/login", data={"token": TOKEN})).headers["set-cookie"]
    new = dashboard(store_url, dashboard_token=TOKEN[::-1])
    async with loopback(new) as c:
        page = await c.get("/", headers={"cookie": session.split(";")[0]})
    assert page.status_code == 303
    await old.aclose()
    await new.aclose()


@pytest.mark.parametrize("store_url", ["memory"], indirect=True)
async def test_without_a_token_it_is_read_only_and_for_this_machine_only(store_url: str) -> None:
    app = dashboard(store_url)
    async with loopback(app) as c:
        page = await c.get("/campaigns/asap")
        post = await c.post("/campaigns/asap", data={"action": "pause"})
        login = await c.get("/login")
    assert page.status_code == 200
    assert "Read-only: no dashboard_token is set" in text(page.text)
    assert '<form method="post"' not in page.text and 'name="action"' not in page.text
    assert post.status_code == 403 and "changes nothing" in post.text
    assert login.status_code == 404
    async with loopback(app, ("203.0.113.9", 40000)) as c:  # another machine
        remote = await c.get("/")
    assert remote.status_code == 403 and "answers only on this machine" in remote.text
    await app.aclose()


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": "http://evil.example"},
        {"sec-fetch-site": "cross-site"},
        {"sec-fetch-site": "same-site", "origin": "http://127.0.0.1:9999"},
    ],
)
@pytest.mark.parametrize("store_url", ["memory"], indirect=True)
async def test_a_cross_site_post_is_refused_and_changes_nothing(
    store_url: str, stores: tuple[XSPMiddleware, Store], headers: dict[str, str]
) -> None:
    _, admin = stores
    app = dashboard(store_url, dashboard_token=TOKEN)
    async with loopback(app) as c:
        refused = await c.post(
            "/campaigns/asap", data={"action": "pause"}, headers={**BEARER, **headers}
        )
        login = await c.post("/login", data={"token": TOKEN}, headers=headers)
    assert refused.status_code == 403 and "Cross-site request refused" in refused.text
    assert login.status_code == 403 and "set-cookie" not in login.headers
    assert (await admin.get_campaign("asap")).status == "active"
    await app.aclose()


# -- actions --------------------------------------------------------------------------------------


async def test_pause_resume_and_budgets_act_as_the_cli_does(
    store_url: str, stores: tuple[XSPMiddleware, Store], store_kind: str
) -> None:
    ads, admin = stores
    app = dashboard(store_url, dashboard_token=TOKEN)
    same_site = {**BEARER, "origin": "http://127.0.0.1:8001", "sec-fetch-site": "same-origin"}
    async with loopback(app) as c:
        paused = await c.post("/campaigns/asap", data={"action": "pause"}, headers=same_site)
        assert paused.status_code == 303
        assert paused.headers["location"] == "/campaigns/asap?done=paused"
        after = await c.get(paused.headers["location"], headers=BEARER)
        assert "Paused: every process's next decision denies it" in text(after.text)
        async with client(ads) as ad:
            denied = await ad.get("/ad?campaign_id=asap", headers=as_user("p1"))
        assert denied.status_code == 204
        assert denied.headers["x-xsp-decision"] == "campaign_paused"
        if store_kind == "redis":  # another process, as an operator reads it
            assert show(store_url, "asap")["status"] == "paused"
        resumed = await c.post("/campaigns/asap", data={"action": "resume"}, headers=same_site)
        assert resumed.status_code == 303
        assert (await serve_ads(ads, "asap", 1, first_user=50)) == [200]
        budget = await c.post(
            "/campaigns/asap", data={"action": "budget", "value": "12.50"}, headers=same_site
        )
        daily = await c.post(
            "/campaigns/asap", data={"action": "daily_budget", "value": "2.00"}, headers=same_site
        )
        assert budget.status_code == daily.status_code == 303
    view = await admin.get_campaign("asap")
    assert (view.budget_units, view.config.daily_budget_units) == (125_000_000, 20_000_000)
    await app.aclose()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-5", "budget: '-5' must be a non-negative decimal"),
        ("12.345678901", "budget: '12.345678901' must be a non-negative decimal"),
        ("lots", "budget: 'lots' must be a non-negative decimal"),
        ("", "budget: '' must be a non-negative decimal"),
    ],
)
@pytest.mark.parametrize("store_url", ["redis", "memory"], indirect=True)
async def test_a_bad_budget_is_shown_as_the_cli_says_it_and_changes_nothing(
    store_url: str, stores: tuple[XSPMiddleware, Store], store_kind: str, value: str, message: str
) -> None:
    _, admin = stores
    app = dashboard(store_url, dashboard_token=TOKEN)
    before = await admin.get_campaign("asap")
    async with loopback(app) as c:
        page = await c.post(
            "/campaigns/asap", data={"action": "budget", "value": value}, headers=BEARER
        )
    assert page.status_code == 422
    said = text(page.text)
    assert f"Nothing changed: {message}" in said
    assert 'aria-invalid="true"' in page.text
    assert (await admin.get_campaign("asap")).budget_units == before.budget_units
    if store_kind == "redis":  # the CLI refuses the same value with the same words
        result = cli("campaign", "set", "asap", "--budget", value, redis_url=store_url)
        assert result.returncode == 2 and message in result.stderr
    await app.aclose()


@pytest.mark.parametrize("store_url", ["memory"], indirect=True)
async def test_bad_forms_never_become_a_500(store_url: str) -> None:
    app = dashboard(store_url, dashboard_token=TOKEN)
    async with loopback(app) as c:
        unknown = await c.post("/campaigns/asap", data={"action": "delete"}, headers=BEARER)
        huge = await c.post(
            "/campaigns/asap", data={"action": "budget", "value": "9" * 5000}, headers=BEARER
        )
        not_utf8 = await c.post(
            "/campaigns/asap",
            content=b"action=budget&value=\xff\xfe",
            headers={**BEARER, "content-type": "application/x-www-form-urlencoded"},
        )
        no_campaign = await c.post("/campaigns/ghost", data={"action": "pause"}, headers=BEARER)
    assert unknown.status_code == 422
    assert huge.status_code == 413
    assert not_utf8.status_code == 400
    assert no_campaign.status_code == 404
    await app.aclose()


@pytest.mark.parametrize("store_url", ["redis"], indirect=True)
async def test_a_store_that_fails_is_a_503_page_never_a_500(store_url: str) -> None:
    port = free_port()  # nothing listens there
    app = dashboard(f"redis://127.0.0.1:{port}/0", dashboard_token=TOKEN)
    async with loopback(app) as c:
        listed = await c.get("/", headers=BEARER)
        one = await c.get("/campaigns/asap", headers=BEARER)
        acted = await c.post("/campaigns/asap", data={"action": "pause"}, headers=BEARER)
    for answer in (listed, one, acted):
        assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
        assert "The store cannot be read right now" in answer.text
    await app.aclose()


# -- the history ----------------------------------------------------------------------------------


async def test_a_minute_is_sampled_once_whatever_the_number_of_dashboards(
    store_url: str, stores: tuple[XSPMiddleware, Store]
) -> None:
    ads, admin = stores
    await serve_ads(ads, "asap", 2)
    minute = 1_800_000_000_000
    first = Store(Rules.from_settings(Settings(redis_url=store_url)), clock=ManualClock(minute))
    second = Store(
        Rules.from_settings(Settings(redis_url=store_url)), clock=ManualClock(minute + 30_000)
    )
    results = await asyncio.gather(sample(first, "asap"), sample(second, "asap"))
    assert sorted(results) == [False, True]
    assert not await sample(first, "never-served")  # nothing recorded: no history either
    got = await history(admin, "asap", 0)
    assert len(got) == 1 and got[0].state["impressions"] == "2"
    # Two samplers (two dashboard processes): only the lease holder samples.
    a, b = Sampler(first, ["asap"]), Sampler(second, ["asap"])
    first.clock, second.clock = ManualClock(minute + 60_000), ManualClock(minute + 61_000)
    assert [await a.sample_once(), await b.sample_once()] == [1, 0]
    await a.aclose()  # gives the lease up: the other takes over
    first.clock = second.clock = ManualClock(minute + 120_000)
    assert await b.sample_once() == 1
    await b.aclose()
    taken = [s.at_ms for s in await history(admin, "asap", 0)]  # one sample per minute
    assert [at - at % 60_000 for at in taken] == [minute, minute + 60_000, minute + 120_000]
    await first.aclose()
    await second.aclose()


@pytest.mark.parametrize("store_url", ["redis"], indirect=True)
async def test_the_history_keeps_its_last_samples_and_goes_with_the_campaign(
    store_url: str, stores: tuple[XSPMiddleware, Store]
) -> None:
    ads, admin = stores
    await serve_ads(ads, "asap", 1)
    start = 1_800_000_000_000
    admin.clock = ManualClock(start)
    for i in range(HISTORY_SAMPLES + 5):
        admin.clock.now = start + 60_000 * i  # type: ignore[attr-defined]
        assert await sample(admin, "asap")
    kept = await history(admin, "asap", 0)
    assert len(kept) == HISTORY_SAMPLES
    assert kept[0].at_ms == start + 5 * 60_000
    admin.clock = None
    assert await admin.delete_campaign("asap")
    assert await history(admin, "asap", 0) == []


# -- hostile input and hand-edited stores -----------------------------------------------------


@pytest.mark.parametrize(
    ("asked", "lands"),
    [
        ("/campaigns/asap", "/campaigns/asap"),
        ("/%09/evil.example", "/"),  # a browser drops the tab: //evil.example
        ("//evil.example/x", "/"),
        ("https://evil.example/", "/"),
        ("/☃", "/"),
        ("/campaigns/a\r\nSet-Cookie: x=1", "/"),
        ("/campaigns/{bad}", "/"),
    ],
)
@pytest.mark.parametrize("store_url", ["memory"], indirect=True)
async def test_signing_in_leads_only_to_this_dashboards_own_pages(
    store_url: str, asked: str, lands: str
) -> None:
    app = dashboard(store_url, dashboard_token=TOKEN)
    async with loopback(app) as c:
        form = await c.get("/login", params={"next": asked})
        signed = await c.post("/login", data={"token": TOKEN, "next": asked})
    assert form.status_code == 200
    assert signed.status_code == 303 and signed.headers["location"] == lands
    await app.aclose()


@pytest.mark.parametrize(
    "cookie",
    [
        "xsp_dashboard=" + "9" * 5000 + ".x.y",
        "xsp_dashboard=99999999999.zz.00",
        "xsp_dashboard=\u00ff\u00fe",
        "xsp_dashboard",
        "xsp_dashboard=1.2",
    ],
)
@pytest.mark.parametrize("store_url", ["memory"], indirect=True)
async def test_a_forged_or_garbled_session_is_no_session_and_no_500(
    store_url: str, cookie: str
) -> None:
    app = dashboard(store_url, dashboard_token=TOKEN)
    async with loopback(app) as c:
        page = await c.get("/", headers={"cookie": cookie.encode("latin-1")})  # type: ignore[dict-item]
        bearer = await c.get("/", headers={"authorization": "Bearer \u00ff".encode("latin-1")})  # type: ignore[dict-item]
    assert page.status_code == 303 and bearer.status_code == 303
    await app.aclose()


@pytest.mark.parametrize("store_url", ["redis", "memory"], indirect=True)
async def test_hand_edited_values_in_the_store_never_become_a_500(
    store_url: str, stores: tuple[XSPMiddleware, Store]
) -> None:
    """An operator's HSET by hand, or a stray key: the list shows every campaign it can read
    and says how many it cannot; a page it cannot read is a 503, and the sampler goes on."""
    ads, admin = stores
    await serve_ads(ads, "asap", 2)
    await serve_ads(ads, "even", 1)
    client_ = admin.client
    await client_.hset(admin.campaign_keys("even")[1], "spent", "lots")
    await client_.set(f"{admin.prefix}:c:{{broken", "stray")  # no closing brace
    await client_.xadd(admin.history_key("asap"), {"t": "²", "spent": "x"})  # no sample of ours
    app = dashboard(store_url, dashboard_token=TOKEN)
    async with loopback(app) as c:
        listed = await c.get("/", headers=BEARER)
        broken = await c.get("/campaigns/even", headers=BEARER)
        fine = await c.get("/campaigns/asap", headers=BEARER)
    assert listed.status_code == 200
    assert "1 campaign(s) could not be read" in text(listed.text)
    assert re.search(r"asap active 0\.002 / 5\.00", text(listed.text))
    assert broken.status_code == 503 and "cannot read" in text(broken.text)
    assert fine.status_code == 200
    # The dashboard's sampler (started by the first request) copied even's garbled spend
    # rather than read it, and runs on.
    deadline = time.monotonic() + 5
    while not await history(admin, "even", 0):
        assert time.monotonic() < deadline, "no sample"
        await asyncio.sleep(0.05)
    assert (await history(admin, "even", 0))[0].state["spent"] == "lots"
    assert app.sampler.task is not None and not app.sampler.task.done()
    await app.aclose()


@pytest.mark.parametrize("store_url", ["memory"], indirect=True)
async def test_without_a_token_a_page_under_another_host_name_is_refused(store_url: str) -> None:
    """DNS rebinding: a site whose name resolves to 127.0.0.1 sends its own name as Host."""
    app = dashboard(store_url)
    async with loopback(app) as c:
        rebound = await c.get("/", headers={"host": "attacker.example:8001"})
        local = [
            (await c.get("/", headers={"host": host})).status_code
            for host in ("localhost:8001", "127.0.0.1", "[::1]:8001")
        ]
        logout = await c.post("/logout")
    assert rebound.status_code == 403
    assert local == [200, 200, 200]
    assert logout.status_code == 404  # nothing to sign out of
    await app.aclose()


@pytest.mark.parametrize("store_url", ["memory"], indirect=True)
async def test_a_link_to_a_done_banner_says_only_what_is_true(
    store_url: str, stores: tuple[XSPMiddleware, Store]
) -> None:
    app = dashboard(store_url, dashboard_token=TOKEN)
    async with loopback(app) as c:
        page = await c.get("/campaigns/asap?done=paused", headers=BEARER)
        css = await c.get("/static/dashboard.css", headers=BEARER)
    assert "Paused" not in text(page.text)  # asap is active: no such banner
    assert css.headers.get_list("cache-control") == ["max-age=3600"]
    await app.aclose()


@pytest.mark.parametrize("store_url", ["memory"], indirect=True)
async def test_a_client_gone_before_its_form_is_whole_is_a_400(store_url: str) -> None:
    app = dashboard(store_url, dashboard_token=TOKEN)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/campaigns/asap",
        "root_path": "",
        "scheme": "http",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1"), (b"authorization", f"Bearer {TOKEN}".encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8001),
    }
    await app(scope, receive, send)
    assert sent[0]["status"] == 400
    await app.aclose()


@pytest.mark.parametrize("store_url", ["memory"], indirect=True)
async def test_with_dashboard_honours_the_servers_root_path(store_url: str) -> None:
    """``uvicorn --root-path /x``: the path carries the root, and so does every link."""
    app = dashboard(store_url)
    both = with_dashboard(vast_app, app)
    transport = httpx.ASGITransport(app=both, client=("127.0.0.1", 1), root_path="/x")
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
        page = await c.get("/x/dashboard/")
    assert page.status_code == 200
    assert 'href="/x/dashboard/static/dashboard.css"' in page.text
    await app.aclose()
