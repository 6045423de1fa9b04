"""The ``xsp-middleware`` CLI, driven as a user would: a subprocess reading XSP_REDIS_URL."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
from conftest import as_user, client
from processes import cli, show

CORE_FIELDS = ("id", "budget", "spent", "remaining", "impressions", "caps", "cpm", "status")


def core(data: dict[str, Any]) -> dict[str, Any]:
    """The fields the core contract names (show prints more: daily budget, pacing...)."""
    return {k: data[k] for k in CORE_FIELDS}


def test_set_then_show_prints_exact_amounts(redis_url: str) -> None:
    result = cli(
        "campaign",
        "set",
        "c1",
        "--budget",
        "500.00",
        "--cap",
        "5/1d",
        "--cap",
        "2/1h",
        "--cpm",
        "4.00",
        redis_url=redis_url,
    )
    assert result.returncode == 0, result.stderr
    assert core(show(redis_url, "c1")) == {
        "id": "c1",
        "budget": "500.00",
        "spent": "0.00",
        "remaining": "500.00",
        "impressions": 0,
        "caps": ["5/1d", "2/1h"],
        "cpm": "4.00",
        "status": "active",
    }
    # Unset options keep their values.
    assert cli("campaign", "set", "c1", "--budget", "600", redis_url=redis_url).returncode == 0
    assert show(redis_url, "c1")["caps"] == ["5/1d", "2/1h"]
    assert show(redis_url, "c1")["budget"] == "600.00"


def test_redis_url_option_overrides_the_environment(redis_url: str) -> None:
    result = cli(
        "--redis-url",
        redis_url,
        "campaign",
        "set",
        "c1",
        "--budget",
        "7.00",
        redis_url="redis://127.0.0.1:1/0",
    )
    assert result.returncode == 0, result.stderr
    result = cli("campaign", "show", "c1", "--json", "--redis-url", redis_url)
    assert json.loads(result.stdout)["budget"] == "7.00"


async def test_show_works_for_a_campaign_that_only_ever_served_with_defaults(
    redis_url: str, make_app: Any
) -> None:
    app = make_app(redis_url=redis_url)
    async with client(app) as c:
        for i in range(400):
            r = await c.get("/ad?campaign_id=fresh&cpm=1.2345", headers=as_user(f"u{i}"))
            assert r.status_code == 200
    data = core(show(redis_url, "fresh"))
    assert data == {
        "id": "fresh",
        "budget": "1000.00",
        "spent": "0.4938",
        "remaining": "999.5062",
        "impressions": 400,
        "caps": ["3/1h"],
        "cpm": "2.00",
        "status": "active",
    }
    text = cli("campaign", "show", "fresh", redis_url=redis_url).stdout
    assert re.search(r"^spent\s+0\.4938$", text, re.MULTILINE)


async def test_a_cli_change_is_seen_by_a_running_app_within_one_second(
    redis_url: str, make_app: Any
) -> None:
    app = make_app(redis_url=redis_url)
    async with client(app) as c:
        for i in range(3):
            r = await c.get("/ad?campaign_id=c1&cpm=2.00", headers=as_user(f"u{i}"))
            assert r.status_code == 200
        # Spent is 0.006; a budget of 0.006 leaves nothing for the next impression.
        assert (
            cli("campaign", "set", "c1", "--budget", "0.006", redis_url=redis_url).returncode == 0
        )
        changed_at = time.monotonic()
        while True:
            r = await c.get("/ad?campaign_id=c1&cpm=2.00", headers=as_user("late"))
            if r.status_code == 204:
                break
            assert time.monotonic() - changed_at < 1.0, "the change was not seen within 1 s"
        assert r.headers["x-xsp-decision"] == "budget_exhausted"

        # Caps too: a stricter cap applies to the next request of a user who already has one.
        assert (
            cli(
                "campaign", "set", "c1", "--budget", "10", "--cap", "1/1h", redis_url=redis_url
            ).returncode
            == 0
        )
        r = await c.get("/ad?campaign_id=c1&cpm=2.00", headers=as_user("u0"))
        assert r.headers["x-xsp-decision"] == "frequency_capped"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["campaign", "set", "bad:id"], "campaign id"),
        (["campaign", "set", "c1", "--cap", "3/fortnight"], "N/<window>"),
        (["campaign", "set", "c1", "--budget", "-5"], "budget"),
        (["campaign", "set", "c1", "--budget", "1.00000001"], "decimal places"),
        (["campaign", "set", "c1", "--cpm", "abc"], "cpm"),
        (["campaign", "show", "a b"], "campaign id"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(redis_url: str, args: list[str], message: str) -> None:
    result = cli(*args, redis_url=redis_url)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_cli_reports_an_unreachable_store_in_one_line() -> None:
    result = cli("campaign", "show", "c1", redis_url="redis://127.0.0.1:1/0")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "127.0.0.1:1" in result.stderr
