"""A bad setting fails the start, not every request: each example server, started as it is
deployed with one bad ``XSP_*`` value, refuses to start and says which variable is wrong."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
DJANGO = ROOT / "examples" / "django_project"

SERVERS = {
    "fastapi under uvicorn": (["-m", "uvicorn", "examples.fastapi_app:app"], ROOT),
    "flask under gunicorn": (["-m", "gunicorn", "examples.flask_app:app"], ROOT),
    "django under uvicorn (ASGI)": (["-m", "uvicorn", "adserver.asgi:application"], DJANGO),
    "django under gunicorn (WSGI)": (["-m", "gunicorn", "adserver.wsgi:application"], DJANGO),
}


def _start(which: str, port: int, **env: str) -> subprocess.Popen[str]:
    args, cwd = SERVERS[which]
    bind = ["--port", str(port)] if "uvicorn" in args else ["--bind", f"127.0.0.1:{port}"]
    return subprocess.Popen(
        [sys.executable, *args, *bind],
        cwd=cwd,
        env={**os.environ, "XSP_SECRET_KEY": "startup-test-secret-0123456789", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.parametrize("which", list(SERVERS))
@pytest.mark.parametrize(
    ("variable", "value"),
    [("XSP_ON_DENIED", "popup"), ("XSP_CIRCUIT_BREAKER", "5 failures"), ("XSP_DEFAULT_CAPS", "3")],
)
def test_a_bad_value_stops_the_server_at_start_naming_it(
    which: str, variable: str, value: str
) -> None:
    proc = _start(which, free_port(), **{variable: value})
    try:
        output, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"{which} kept running with {variable}={value!r}: {output[-2000:]}")
    assert proc.returncode != 0, output[-2000:]
    assert variable in output, f"the output does not name {variable}: {output[-2000:]}"


@pytest.mark.parametrize("which", list(SERVERS))
def test_the_same_servers_start_with_good_values(which: str) -> None:
    port = free_port()
    proc = _start(which, port, XSP_ON_DENIED="pass")
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.communicate()[0][-2000:]
                assert time.monotonic() < deadline, f"{which} did not start"
                time.sleep(0.1)
        assert r.status_code == 200
    finally:
        proc.terminate()
        proc.communicate(timeout=15)
