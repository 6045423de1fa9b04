"""One Redis, one campaign, two frameworks: a Django site under WSGI (runserver, the sync
store) and a FastAPI service under uvicorn (the async store) enforce one budget and one set of
caps, because they run the same scripts on the same keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path

import httpx
from conftest import SECRET, as_user
from http_load import fire
from redis_server import free_port

from xsp_middleware import Settings
from xsp_middleware.settings import Rules
from xsp_middleware.store import Store

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def serving(command: list[str], env: dict[str, str]) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        [arg.replace("{port}", str(port)) for arg in command],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, f"{command} did not start"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


DJANGO_WSGI = [
    sys.executable,
    "examples/django_project/manage.py",
    "runserver",
    "127.0.0.1:{port}",
    "--noreload",
]
FASTAPI = [
    sys.executable,
    "-m",
    "uvicorn",
    "examples.fastapi_app:app",
    "--port",
    "{port}",
    "--log-level",
    "warning",
]


def _env(redis_url: str) -> dict[str, str]:
    return {
        "XSP_REDIS_URL": redis_url,
        "XSP_SECRET_KEY": SECRET,
        # 137 impressions at the default CPM 2.00
        "XSP_CAMPAIGNS": json.dumps([{"id": "shared", "budget": "0.274"}]),
    }


async def test_django_wsgi_and_fastapi_share_one_budget_exactly(redis_url: str) -> None:
    env = _env(redis_url)
    with serving(DJANGO_WSGI, env) as django_port, serving(FASTAPI, env) as fastapi_port:
        ports = (django_port, fastapi_port)
        replies = await fire(
            [(ports[i % 2], "/ad?campaign_id=shared", as_user(f"user-{i}")) for i in range(1000)],
            concurrency=100,
        )
    statuses = [r.status for r in replies]
    assert set(statuses) <= {200, 204}, set(statuses)
    assert statuses.count(200) == 137
    assert {r.port for r in replies if r.status == 200} == set(ports), "both must have served"
    assert {r.headers["x-xsp-decision"] for r in replies if r.status == 204} == {"budget_exhausted"}
    store = Store(Rules.from_settings(Settings(redis_url=redis_url, secret_key=SECRET)))
    view = await store.get_campaign("shared")
    assert (view.spent, view.impressions) == (Decimal("0.274"), 137)


async def test_one_users_cap_holds_across_both_frameworks(redis_url: str) -> None:
    env = _env(redis_url)
    with serving(DJANGO_WSGI, env) as django_port, serving(FASTAPI, env) as fastapi_port:
        ports = (django_port, fastapi_port)
        replies = await fire(
            [(ports[i % 2], "/ad?campaign_id=c1", as_user("same-user")) for i in range(200)],
            concurrency=50,
        )
    assert [r.status for r in replies].count(200) == 3  # the default 3/1h, across both
