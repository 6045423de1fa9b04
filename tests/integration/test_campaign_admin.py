"""Campaign administration as an operator sees it: the ``xsp-middleware`` CLI (campaign
set/show/list/pause/resume/delete, user show/reset, doctor, demo) against a running app, and the
``on_budget_exhausted`` hook firing exactly once per exhaustion across processes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from conftest import as_user, client
from http_load import fire
from processes import CLI, cli, example_env, show, uvicorn
from redis_server import RedisServer

from xsp_middleware import Campaign, XSPMiddleware

# Generous: a busy 2-core box must never turn a decision into a degraded store_unavailable one.
SHOW_FIELDS = {
    "id",
    "budget",
    "spent",
    "remaining",
    "impressions",
    "caps",
    "status",
    "daily_spent",
    "pacing",
    "pacing_target",
    "daily_budget",
    "timezone",
    "start",
    "end",
}


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def cli_json(*args: str, redis_url: str) -> Any:
    return json.loads(ok(cli(*args, "--json", redis_url=redis_url)))


def dbsize(server: RedisServer) -> int:
    reply = server.command("DBSIZE")
    assert reply.startswith(b":"), reply
    return int(reply[1:].strip())


# -- campaign set / show / list / delete -----------------------------------------------------


def test_show_prints_every_field_and_the_even_pacing_target(redis_url: str) -> None:
    ok(
        cli(
            "campaign",
            "set",
            "paced",
            "--budget",
            "500",
            "--daily-budget",
            "10.00",
            "--timezone",
            "America/New_York",
            "--start",
            "2020-01-01",
            "--end",
            "2099-12-31",
            "--cap",
            "4/day",
            "--cap",
            "2/1h",
            "--cpm",
            "3.00",
            "--pacing",
            "even",
            redis_url=redis_url,
        )
    )
    before = datetime.now(UTC)
    data = show(redis_url, "paced")
    after = datetime.now(UTC)
    assert set(data) >= SHOW_FIELDS
    assert {k: data[k] for k in SHOW_FIELDS - {"pacing_target"}} == {
        "id": "paced",
        "budget": "500.00",
        "spent": "0.00",
        "remaining": "500.00",
        "impressions": 0,
        "caps": ["4/day", "2/1h"],
        "status": "active",
        "daily_budget": "10.00",
        "daily_spent": "0.00",
        "timezone": "America/New_York",
        # Bare dates are local midnights; a bare end date is included (the midnight after).
        "start": "2020-01-01T00:00:00-05:00",
        "end": "2100-01-01T00:00:00-05:00",
        "pacing": "even",
    }
    assert data["cpm"] == "3.00"
    # Even pacing allows the elapsed fraction of today's (New York) budget plus the 5% burst.
    tz = ZoneInfo("America/New_York")
    midnight = datetime.combine(before.astimezone(tz).date(), datetime.min.time(), tz)
    day = ((midnight + timedelta(days=1)) - midnight).total_seconds()

    def allowed(moment: datetime) -> float:
        return 10.00 * (moment - midnight).total_seconds() / day + 0.50

    target = float(data["pacing_target"])
    assert allowed(before) - 0.001 <= target <= allowed(after) + 0.001

    # asap has no pacing target.
    ok(cli("campaign", "set", "paced", "--pacing", "asap", redis_url=redis_url))
    assert show(redis_url, "paced")["pacing_target"] is None


def test_show_of_an_unknown_campaign_exits_2(redis_url: str) -> None:
    result = cli("campaign", "show", "never-seen", "--json", redis_url=redis_url)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "xsp-middleware: error: unknown campaign 'never-seen': no config and no recorded state"
    ]


async def test_list_shows_cli_campaigns_and_campaigns_that_only_served_with_defaults(
    redis_url: str, make_app: Callable[..., XSPMiddleware]
) -> None:
    ok(cli("campaign", "set", "from-cli", "--budget", "5.00", "--cpm", "1.00", redis_url=redis_url))
    app = make_app(redis_url=redis_url)
    async with client(app) as c:
        for i in range(4):
            r = await c.get("/ad?campaign_id=defaults-only", headers=as_user(f"u{i}"))
            assert r.status_code == 200
    rows = cli_json("campaign", "list", redis_url=redis_url)
    assert {row["id"]: row for row in rows} == {
        "defaults-only": {
            "id": "defaults-only",
            "status": "active",
            "budget": "1000.00",
            "spent": "0.008",
            "impressions": 4,
            "pacing": "asap",
        },
        "from-cli": {
            "id": "from-cli",
            "status": "active",
            "budget": "5.00",
            "spent": "0.00",
            "impressions": 0,
            "pacing": "asap",
        },
    }
    text = ok(cli("campaign", "list", redis_url=redis_url))
    assert "defaults-only" in text and "from-cli" in text


async def test_delete_forgets_the_campaigns_config_and_spend(
    redis_url: str, make_app: Callable[..., XSPMiddleware]
) -> None:
    ok(cli("campaign", "set", "c1", "--budget", "1.00", "--cap", "1/1h", redis_url=redis_url))
    app = make_app(redis_url=redis_url)
    async with client(app) as c:
        for i in range(3):
            r = await c.get("/ad?campaign_id=c1", headers=as_user(f"u{i}"))
            assert r.status_code == 200
        data = show(redis_url, "c1")
        assert (data["spent"], data["impressions"], data["caps"]) == ("0.006", 3, ["1/1h"])

        assert "deleted" in ok(cli("campaign", "delete", "c1", redis_url=redis_url))
        result = cli("campaign", "show", "c1", redis_url=redis_url)
        assert result.returncode == 2
        assert "unknown campaign 'c1'" in result.stderr
        assert "c1" not in [row["id"] for row in cli_json("campaign", "list", redis_url=redis_url)]

        # Serving again starts from nothing: the defaults (not the deleted config), no old spend.
        r = await c.get("/ad?campaign_id=c1", headers=as_user("fresh"))
        assert r.status_code == 200
    data = show(redis_url, "c1")
    assert (data["budget"], data["spent"], data["impressions"], data["caps"]) == (
        "1000.00",
        "0.002",
        1,
        ["3/1h"],
    )


# -- pause / resume --------------------------------------------------------------------------


async def test_a_cli_pause_stops_serving_within_one_second_and_resume_serves_again(
    redis_url: str, make_app: Callable[..., XSPMiddleware]
) -> None:
    app = make_app(redis_url=redis_url)
    # (started, finished, status, decision header) of every request, in the order they ended.
    log: list[tuple[float, float, int, str | None]] = []
    stop = asyncio.Event()

    async def traffic(c: Any, worker: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            started = time.monotonic()
            r = await c.get("/ad?campaign_id=c1&cpm=2.00", headers=as_user(f"w{worker}-{n}"))
            log.append((started, time.monotonic(), r.status_code, r.headers.get("x-xsp-decision")))

    async def wait_for(predicate: Callable[[], bool], within: float) -> None:
        deadline = time.monotonic() + within
        while not predicate():
            assert time.monotonic() < deadline, "traffic did not get there in time"
            await asyncio.sleep(0.01)

    async with client(app) as c:
        workers = [asyncio.create_task(traffic(c, w)) for w in range(4)]
        try:
            await wait_for(lambda: sum(s == 200 for _, _, s, _ in log) >= 20, 10)

            calling = time.monotonic()
            paused = await asyncio.to_thread(cli, "campaign", "pause", "c1", redis_url=redis_url)
            returned = time.monotonic()
            assert "paused" in ok(paused)
            assert any(calling < f < returned for _, f, _, _ in log), "traffic must keep flowing"
            await wait_for(
                lambda: any(f >= returned and d == "campaign_paused" for _, f, _, d in log), 1.5
            )
            first = min(f for _, f, _, d in log if f >= returned and d == "campaign_paused")
            assert first - returned < 1.0
            await wait_for(lambda: sum(s > first for s, _, _, _ in log) >= 20, 5)

            resuming = time.monotonic()
            resumed = await asyncio.to_thread(cli, "campaign", "resume", "c1", redis_url=redis_url)
            resumed_at = time.monotonic()
            assert "active" in ok(resumed)
            await wait_for(lambda: sum(s > resumed_at for s, _, _, _ in log) >= 20, 5)
        finally:
            stop.set()
            await asyncio.gather(*workers)

    # Every request that started after the first paused answer (and was answered before the
    # resume began) was paused: no stray serve.
    during_pause = [(st, d) for s, f, st, d in log if first < s and f < resuming]
    assert len(during_pause) >= 20
    assert all((st, d) == (204, "campaign_paused") for st, d in during_pause), during_pause
    # Even stronger: the pause was stored before the CLI returned, so nothing that started
    # after the CLI's return was served.
    assert all(st == 204 for s, f, st, _ in log if returned < s and f < resuming)
    after_resume = [(st, d) for s, _, st, d in log if s > resumed_at]
    assert len(after_resume) >= 20
    assert all(st == 200 for st, _ in after_resume), after_resume
    assert show(redis_url, "c1")["status"] == "active"


# -- the exhaustion hook ---------------------------------------------------------------------

HOOK_MODULE = """\
import os


def hook(campaign_id, kind):
    with open(os.environ["HOOK_FILE"], "a") as f:
        f.write(f"{campaign_id} {kind} {os.getpid()}\\n")
"""


async def test_lifetime_exhaustion_hook_fires_exactly_once_across_two_processes(
    redis_url: str, tmp_path: Path
) -> None:
    (tmp_path / "xsp_hook_probe.py").write_text(HOOK_MODULE)
    hook_file = tmp_path / "hooks.txt"
    pythonpath = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    env = example_env(
        redis_url,
        PYTHONPATH=pythonpath,
        XSP_ON_BUDGET_EXHAUSTED="xsp_hook_probe:hook",
        HOOK_FILE=str(hook_file),
        XSP_CAMPAIGNS=json.dumps([{"id": "c1", "budget": "0.274"}]),  # 137 at CPM 2.00
    )

    def load(ports: list[int], n: int, prefix: str) -> list[tuple[int, str, dict[str, str]]]:
        return [
            (ports[i % 2], "/ad?campaign_id=c1&cpm=2.00", as_user(f"{prefix}-{i}"))
            for i in range(n)
        ]

    with uvicorn(env) as a, uvicorn(env) as b:
        ports = [int(base.rsplit(":", 1)[1]) for base in (a, b)]
        replies = await fire(load(ports, 1000, "user"), concurrency=100)
        codes = [r.status for r in replies]
        assert codes.count(200) == 137
        assert codes.count(204) == 863
        assert {r.headers["x-xsp-decision"] for r in replies if r.status == 204} == {
            "budget_exhausted"
        }
        assert {r.port for r in replies if r.status == 200} == set(ports)
        await asyncio.sleep(1.0)
        lines = hook_file.read_text().splitlines()
        assert len(lines) == 1, lines
        match = re.fullmatch(r"c1 lifetime (\d+)", lines[0])
        assert match, lines
        # It ran in one of the two servers (not in this test process).
        pid = int(match.group(1))
        assert pid != os.getpid()
        assert b"uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes()

        # Many more denials, in both processes: still exactly one call.
        replies = await fire(load(ports, 200, "late"), concurrency=50)
        assert {(r.status, r.headers.get("x-xsp-decision")) for r in replies} == {
            (204, "budget_exhausted")
        }
        await asyncio.sleep(0.5)
        assert hook_file.read_text().splitlines() == lines

    # The CLI needs the same settings as the servers to know c1's budget.
    result = cli("campaign", "show", "c1", "--json", redis_url=redis_url, **env)
    data = json.loads(ok(result))
    assert (data["spent"], data["remaining"], data["impressions"], data["status"]) == (
        "0.274",
        "0.00",
        137,
        "exhausted",
    )


async def test_daily_exhaustion_hook_fires_once_with_kind_daily(
    store_url: str, make_app: Callable[..., XSPMiddleware]
) -> None:
    calls: list[tuple[str, str]] = []

    async def hook(campaign_id: str, kind: str) -> None:
        calls.append((campaign_id, kind))

    app = make_app(
        redis_url=store_url,
        campaigns=[Campaign(id="d1", daily_budget="0.01", budget="100")],  # 5 at CPM 2.00
        on_budget_exhausted=hook,
    )
    async with client(app) as c:

        async def one(i: int) -> tuple[int, str | None]:
            r = await c.get("/ad?campaign_id=d1", headers=as_user(f"u{i}"))
            return r.status_code, r.headers.get("x-xsp-decision")

        results = await asyncio.gather(*(one(i) for i in range(50)))
        assert [s for s, _ in results].count(200) == 5
        assert {d for s, d in results if s == 204} == {"budget_exhausted"}
        await asyncio.sleep(0.2)
        assert calls == [("d1", "daily")]

        results = await asyncio.gather(*(one(i) for i in range(50, 80)))
        assert {s for s, _ in results} == {204}
        await asyncio.sleep(0.2)
        assert calls == [("d1", "daily")]
    view = await app.store.get_campaign("d1")
    assert (view.daily_spent_units, view.impressions, view.status) == (100_000, 5, "active")


async def test_pausing_and_resuming_an_exhausted_campaign_does_not_fire_the_hook_again(
    redis_url: str, make_app: Callable[..., XSPMiddleware]
) -> None:
    calls: list[tuple[str, str]] = []

    async def hook(campaign_id: str, kind: str) -> None:
        calls.append((campaign_id, kind))

    ok(cli("campaign", "set", "c1", "--budget", "0.004", redis_url=redis_url))  # 2 impressions
    app = make_app(redis_url=redis_url, on_budget_exhausted=hook)
    async with client(app) as c:
        statuses = [
            (await c.get("/ad?campaign_id=c1", headers=as_user(f"u{i}"))).status_code
            for i in range(5)
        ]
        assert statuses == [200, 200, 204, 204, 204]
        await asyncio.sleep(0.2)
        assert calls == [("c1", "lifetime")]

        # An operator pauses and resumes it: no money was added, so it is the same exhaustion.
        ok(cli("campaign", "pause", "c1", redis_url=redis_url))
        ok(cli("campaign", "resume", "c1", redis_url=redis_url))
        for i in range(5, 10):
            r = await c.get("/ad?campaign_id=c1", headers=as_user(f"u{i}"))
            assert (r.status_code, r.headers["x-xsp-decision"]) == (204, "budget_exhausted")
        await asyncio.sleep(0.2)
        assert calls == [("c1", "lifetime")], "one exhaustion, but the hook fired again"


# -- user show / reset -----------------------------------------------------------------------


async def test_user_show_reports_window_counts_and_when_each_cap_frees_up(
    redis_url: str, make_app: Callable[..., XSPMiddleware]
) -> None:
    ok(
        cli(
            "campaign",
            "set",
            "cal",
            "--cap",
            "2/day",
            "--cap",
            "5/1h",
            "--timezone",
            "Asia/Tokyo",
            redis_url=redis_url,
        )
    )
    app = make_app(redis_url=redis_url)
    async with client(app) as c:
        t0 = datetime.now(UTC)
        r = await c.get("/ad?campaign_id=c1", headers=as_user("alice"))
        t1 = datetime.now(UTC)
        assert r.status_code == 200
        r = await c.get("/ad?campaign_id=c1", headers=as_user("alice"))
        assert r.status_code == 200
        # Two of three: the cap is not reached, so it frees nothing.
        assert cli_json("user", "show", "alice", "--campaign", "c1", redis_url=redis_url) == {
            "c1": [{"cap": "3/1h", "impressions": 2, "frees_at": None}]
        }
        r = await c.get("/ad?campaign_id=c1", headers=as_user("alice"))
        assert r.status_code == 200
        r = await c.get("/ad?campaign_id=c1", headers=as_user("alice"))
        assert r.headers["x-xsp-decision"] == "frequency_capped"

        shown = cli_json("user", "show", "alice", "--campaign", "c1", redis_url=redis_url)
        [entry] = shown["c1"]
        assert (entry["cap"], entry["impressions"]) == ("3/1h", 3)
        frees_at = datetime.fromisoformat(entry["frees_at"])
        slack = timedelta(milliseconds=50)
        assert t0 + timedelta(hours=1) - slack <= frees_at <= t1 + timedelta(hours=1) + slack

        # A calendar cap frees up at the next local midnight of the campaign's time zone.
        for _ in range(2):
            r = await c.get("/ad?campaign_id=cal", headers=as_user("alice"))
            assert r.status_code == 200
        tokyo = ZoneInfo("Asia/Tokyo")
        midnight = datetime.combine(
            datetime.now(tokyo).date() + timedelta(days=1), datetime.min.time(), tokyo
        )
        everything = cli_json("user", "show", "alice", redis_url=redis_url)
        assert set(everything) == {"c1", "cal"}
        day_cap, hour_cap = everything["cal"]
        assert (day_cap["cap"], day_cap["impressions"]) == ("2/day", 2)
        assert datetime.fromisoformat(day_cap["frees_at"]) == midnight
        assert hour_cap == {"cap": "5/1h", "impressions": 2, "frees_at": None}
        text = ok(cli("user", "show", "alice", redis_url=redis_url))
        assert "frees at" in text and "3/1h" in text

        # Reset one campaign: the user is servable there again, and only there.
        assert "reset" in ok(cli("user", "reset", "alice", "--campaign", "c1", redis_url=redis_url))
        r = await c.get("/ad?campaign_id=c1", headers=as_user("alice"))
        assert r.status_code == 200
        r = await c.get("/ad?campaign_id=cal", headers=as_user("alice"))
        assert r.headers["x-xsp-decision"] == "frequency_capped"

        # Reset everything.
        ok(cli("user", "reset", "alice", redis_url=redis_url))
        assert cli_json("user", "show", "alice", redis_url=redis_url) == {}
        r = await c.get("/ad?campaign_id=cal", headers=as_user("alice"))
        assert r.status_code == 200


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["campaign", "show", "nope"], "unknown campaign 'nope'"),
        (["campaign", "set", "c1", "--cap", "3/fortnight"], "N/<window>"),
        (["campaign", "set", "c1", "--cap", "three"], "N/<window>"),
        (["campaign", "set", "c1", "--budget", "-5"], "budget"),
        (["campaign", "set", "c1", "--daily-budget", "-0.01"], "daily_budget"),
        (["campaign", "set", "c1", "--timezone", "Mars/Olympus"], "Mars/Olympus"),
        (["campaign", "set", "bad:id"], "campaign id"),
        (["campaign", "set", "{c1}"], "campaign id"),
        (["campaign", "pause", "x" * 129], "campaign id"),
        (["campaign", "set", "c1", "--pacing", "even"], "pacing even"),
        (["campaign", "set", "c1", "--pacing", "frontloaded", "--start", "2030-01-01"], "pacing"),
        (["campaign", "set", "c1", "--start", "2030-02-01", "--end", "2030-01-01"], "end"),
        (["campaign", "set", "c1", "--start", "next tuesday"], "ISO 8601"),
        (["campaign", "set", "c1", "--end", "2030-13-45"], "ISO 8601"),
        (["campaign", "set", "c1", "--pacing", "fast"], "pacing"),
        (["campaign", "set", "c1", "--bogus", "1"], "--bogus"),
        (["campaign", "list", "--verbose"], "--verbose"),
        (["user", "show", "alice", "--campaign", "a:b"], "campaign id"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_cli_errors_are_one_line_exit_2_and_store_nothing(
    redis_url: str, redis_server: RedisServer, args: list[str], message: str
) -> None:
    result = cli(*args, redis_url=redis_url)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("xsp-middleware: error: ")
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert dbsize(redis_server) == 0


def test_a_change_that_conflicts_with_the_stored_config_is_refused(redis_url: str) -> None:
    ok(
        cli(
            "campaign",
            "set",
            "c1",
            "--start",
            "2030-01-10",
            "--end",
            "2030-01-20",
            "--pacing",
            "even",
            redis_url=redis_url,
        )
    )
    before = show(redis_url, "c1")
    for args in (["--end", "2030-01-05"], ["--start", "2030-02-01"]):
        result = cli("campaign", "set", "c1", *args, redis_url=redis_url)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            "xsp-middleware: error: end: must be after start"
        ]
    assert show(redis_url, "c1") == before


# -- doctor ----------------------------------------------------------------------------------


def test_doctor_passes_on_noeviction_and_warns_that_nothing_is_on_disk(redis_url: str) -> None:
    result = cli("doctor", redis_url=redis_url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^WARN\s+persistence:", result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^OK\s+eviction: maxmemory-policy noeviction", result.stdout, re.MULTILINE)
    assert re.search(r"^OK\s+topology: standalone Redis at 127\.0\.0\.1:\d+", result.stdout, re.M)
    assert "FAIL" not in result.stdout
    checks = {c["check"]: c["level"] for c in cli_json("doctor", redis_url=redis_url)}
    assert checks == {
        "secret_key": "ok",
        "topology": "ok",
        "store": "ok",
        "scripts": "ok",
        "version": "ok",
        "eviction": "ok",
        "persistence": "warn",
        "price": "warn",  # the defaults trust the request's price: the drain warning
    }


def test_doctor_is_clean_on_a_persistent_noeviction_redis() -> None:
    server = RedisServer("--appendonly", "yes")
    try:
        # Prices from the campaign: the defaults' drain warning is another check's business.
        result = cli("doctor", "--json", redis_url=server.url, XSP_PRICE_SOURCE="campaign")
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert {c["level"] for c in json.loads(result.stdout)} == {"ok"}


def test_doctor_fails_when_redis_may_evict_keys() -> None:
    server = RedisServer("--maxmemory-policy", "allkeys-lru")
    try:
        result = cli("doctor", redis_url=server.url)
        as_json = cli("doctor", "--json", redis_url=server.url)
    finally:
        server.stop()
    assert result.returncode != 0
    assert re.search(r"^FAIL\s+eviction: maxmemory-policy allkeys-lru", result.stdout, re.M)
    assert "Traceback" not in result.stderr
    assert as_json.returncode == result.returncode
    levels = {c["check"]: c["level"] for c in json.loads(as_json.stdout)}
    assert levels["eviction"] == "fail"
    assert levels["store"] == levels["scripts"] == "ok"


# -- demo ------------------------------------------------------------------------------------

DEMO_CAMPAIGNS = ("campaign_premium", "campaign_standard", "campaign_budget", "campaign_even")


def _demo(*args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [CLI, "demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200", **env},
    )


def test_demo_runs_on_the_embedded_store_reports_exactness_and_plots(
    redis_url: str, tmp_path: Path
) -> None:
    png = tmp_path / "pacing.png"
    started = time.monotonic()
    # An unreachable XSP_REDIS_URL shows the demo needs no Redis: without --redis-url it runs on
    # the embedded store.
    plain = _demo(XSP_REDIS_URL="redis://127.0.0.1:1/0")
    out, err = plain.communicate(timeout=60)
    plain_seconds = time.monotonic() - started
    plot = _demo("--plot", str(png))
    plot_out, plot_err = plot.communicate(timeout=60)

    assert plain.returncode == 0, err
    assert "Traceback" not in err
    assert plain_seconds < 30
    for campaign in DEMO_CAMPAIGNS:
        assert re.search(rf"^\W*{campaign}\b", out, re.MULTILINE), out
    summary = [line for line in out.splitlines() if "held exactly" in line]
    assert len(summary) == 1, out
    assert "NOT EXACT" not in out

    assert plot.returncode == 0, plot_err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in plot_out


def test_demo_runs_on_a_real_redis(redis_url: str) -> None:
    import redis

    result = cli("demo", "--redis-url", redis_url)
    assert result.returncode == 0, result.stderr
    assert "held exactly" in result.stdout
    for campaign in DEMO_CAMPAIGNS:
        assert campaign in result.stdout
    with redis.Redis.from_url(redis_url) as r:
        keys = {k.decode() for k in r.keys("xsp-demo:c:*")}
    assert {f"xsp-demo:c:{{{c}}}:st" for c in DEMO_CAMPAIGNS} <= keys
