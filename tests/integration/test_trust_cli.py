"""A campaign's bid ceiling and its beacon counts through the ``xsp-middleware`` console script,
driven as an operator would: the installed script as a subprocess on a throwaway Redis, next to
an in-process ASGI ad server whose settings name no ceiling of their own."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from conftest import SECRET, as_user, client
from processes import cli, show
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from xsp_middleware import XSPMiddleware

PRICE_UNITS = 20_000  # one impression at the default CPM of 2.00, in units of 10**-7


async def ad(request: Request) -> Response:
    """The handler: the price it was charged, and the impression URL (record_on="beacon")."""
    d = request.state.xsp
    return PlainTextResponse(f"{d.cost}|{d.impression_url or ''}")


def ad_server(redis_url: str, **settings: Any) -> XSPMiddleware:
    return XSPMiddleware(
        Starlette(routes=[Route("/ad", ad)]), redis_url=redis_url, secret_key=SECRET, **settings
    )


def set_campaign(redis_url: str, *options: str) -> dict[str, Any]:
    """``campaign set c1 ...``: what it printed it saved."""
    result = cli("campaign", "set", "c1", *options, redis_url=redis_url)
    assert result.returncode == 0, result.stderr
    prefix = "campaign c1 saved: "
    assert result.stdout.startswith(prefix), result.stdout
    saved: dict[str, Any] = json.loads(result.stdout.removeprefix(prefix))
    return saved


async def test_a_bid_ceiling_set_from_the_cli_binds_a_running_server(redis_url: str) -> None:
    assert set_campaign(redis_url, "--max-cpm", "5.00")["max_cpm"] == "5.00"
    assert show(redis_url, "c1")["max_cpm"] == "5.00"

    app = ad_server(redis_url)  # no max_cpm in its settings: only the settings' 1000.00
    async with client(app) as c:
        above = await c.get("/ad?campaign_id=c1&cpm=6.00", headers=as_user("u1"))
        assert above.status_code == 400
        assert above.headers["content-type"] == "application/problem+json"
        assert above.json()["field"] == "cpm"
        at = await c.get("/ad?campaign_id=c1&cpm=5.00", headers=as_user("u1"))
        assert at.status_code == 200
        assert Decimal(at.text.split("|")[0]) == Decimal("0.005")

        assert set_campaign(redis_url, "--max-cpm", "none")["max_cpm"] is None
        assert show(redis_url, "c1")["max_cpm"] is None
        again = await c.get("/ad?campaign_id=c1&cpm=6.00", headers=as_user("u2"))
        assert again.status_code == 200
        assert Decimal(again.text.split("|")[0]) == Decimal("0.006")
    await app.store.aclose()

    data = show(redis_url, "c1")
    assert (data["impressions"], data["spent"]) == (2, "0.011")
    assert data["cpm"] == "2.00" and data["caps"] == ["3/1h"]  # --max-cpm changed only it


def test_a_bad_bid_ceiling_exits_2_with_one_line_and_changes_nothing(redis_url: str) -> None:
    set_campaign(redis_url, "--max-cpm", "5.00")
    for bad in ("abc", "-1", "5.123456789", "1e3"):
        result = cli("campaign", "set", "c1", "--max-cpm", bad, redis_url=redis_url)
        assert result.returncode == 2, (bad, result)
        assert result.stdout == ""
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("xsp-middleware: error: max_cpm: ")
        assert repr(bad) in lines[0]
        if bad in ("abc", "-1"):
            assert lines[0].endswith("is not a plain non-negative decimal number")
    assert show(redis_url, "c1")["max_cpm"] == "5.00"


async def test_show_reports_pending_impressions_and_the_render_rate(redis_url: str) -> None:
    set_campaign(redis_url, "--budget", "10.00")
    app = ad_server(redis_url, record_on="beacon")
    async with client(app) as c:
        served = [await c.get("/ad?campaign_id=c1", headers=as_user(u)) for u in ("u1", "u2")]
        assert [r.status_code for r in served] == [200, 200]
        cost, url = served[0].text.split("|")
        assert Decimal(cost) == Decimal("0.002") and url.startswith("http://testserver/")

        data = show(redis_url, "c1")
        assert data["pending"] == {"count": 2, "amount": "0.004"}
        assert (data["impressions"], data["render_rate"]) == (0, 0.0)

        beacon = await c.get(url)
        assert beacon.status_code == 204 and "x-xsp-beacon" not in beacon.headers
    await app.store.aclose()

    data = show(redis_url, "c1")
    # The amount one pending impression holds: the CLI's exact decimal, as for every amount.
    assert data["pending"] == {"count": 1, "amount": "0.002"}
    assert Decimal(data["pending"]["amount"]) == Decimal(PRICE_UNITS) / 10**7
    assert data["render_rate"] == 0.5
    assert (data["impressions"], data["spent"]) == (1, "0.002")
    assert data["remaining"] == "9.996"  # the budget less what is spent and what is pending
    text = cli("campaign", "show", "c1", redis_url=redis_url).stdout
    assert "pending       count=1, amount=0.002" in text.splitlines()
    assert "render_rate   0.5" in text.splitlines()
