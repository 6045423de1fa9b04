"""Exactness across OS processes: two uvicorn servers running the example app on one Redis."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from conftest import SECRET, as_user
from http_load import Reply, fire
from processes import example_env, uvicorn

from xsp_middleware import Settings
from xsp_middleware.settings import Rules
from xsp_middleware.store import Store

ROOT = Path(__file__).resolve().parents[2]


async def _hammer(bases: list[str], n: int, user: str | None = None) -> list[Reply]:
    ports = [int(base.rsplit(":", 1)[1]) for base in bases]
    return await fire(
        [
            (ports[i % len(ports)], "/ad?campaign_id=c1&cpm=2.00", as_user(user or f"user-{i}"))
            for i in range(n)
        ],
        concurrency=100,
    )


async def test_two_processes_serve_exactly_the_budget(redis_url: str) -> None:
    campaigns = json.dumps([{"id": "c1", "budget": "0.274"}])  # 137 impressions at CPM 2.00
    env = example_env(redis_url, XSP_CAMPAIGNS=campaigns)
    with uvicorn(env) as a, uvicorn(env) as b:
        responses = await _hammer([a, b], 1000)
    codes = [r.status for r in responses]
    assert set(codes) <= {200, 204}
    assert codes.count(200) == 137
    served_by = {r.port for r in responses if r.status == 200}
    assert len(served_by) == 2, "both processes must have served"
    store = Store(Rules.from_settings(Settings(redis_url=redis_url, secret_key=SECRET)))
    view = await store.get_campaign("c1")
    assert (view.spent, view.impressions) == (Decimal("0.274"), 137)
    denials = {r.headers["x-xsp-decision"] for r in responses if r.status == 204}
    assert denials == {"budget_exhausted"}


async def test_two_processes_hold_one_users_cap_exactly(redis_url: str) -> None:
    with uvicorn(example_env(redis_url)) as a, uvicorn(example_env(redis_url)) as b:
        responses = await _hammer([a, b], 300, user="u1")
    assert [r.status for r in responses].count(200) == 3


def test_example_runs_with_two_workers(redis_url: str) -> None:
    with uvicorn(example_env(redis_url), "--workers", "2") as base:
        r = httpx.get(f"{base}/ad?campaign_id=c1&cpm=2.50", headers=as_user("u1"))
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/xml")
        assert '<VAST version="4.2"' in r.text
        assert httpx.get(f"{base}/ad?campaign_id=c1&cpm=x").status_code == 400


@pytest.mark.parametrize("path", ["/health", "/ad"])
def test_example_passes_unguarded_requests_through(redis_url: str, path: str) -> None:
    with uvicorn(example_env(redis_url)) as base:
        r = httpx.get(f"{base}{path}")
    # /ad without campaign_id is not an ad request: the example answers it with its own 400.
    assert r.status_code == (400 if path == "/ad" else 200)
