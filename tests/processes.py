"""Running the package the way a user does, for the tests: the ``xsp-middleware`` CLI and
the example app under uvicorn, as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from conftest import SECRET
from redis_server import free_port

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "xsp-middleware")


@contextmanager
def uvicorn(env: dict[str, str], *extra: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "examples.fastapi_app:app",
            "--port",
            str(port),
            "--log-level",
            "warning",
            *extra,
        ],
        cwd=ROOT,
        env={**os.environ, **env},
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
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


def example_env(redis_url: str, **more: str) -> dict[str, str]:
    return {"XSP_REDIS_URL": redis_url, "XSP_SECRET_KEY": SECRET, **more}


def cli(*args: str, redis_url: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "XSP_SECRET_KEY": SECRET, **env}
    if redis_url is not None:
        full_env["XSP_REDIS_URL"] = redis_url
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=full_env, timeout=30)


def show(redis_url: str, campaign: str) -> dict[str, Any]:
    result = cli("campaign", "show", campaign, "--json", redis_url=redis_url)
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data
