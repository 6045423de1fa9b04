"""The example ad server as a real video player's VAST library sees it.

The player is Dailymotion's ``@dailymotion/vast-client`` 6 (``tests/vast_client.mjs``), installed
from npm into ``tests/.npm-vast/`` (ignored by git) once and reused. It fetches the ad from the
example app under uvicorn, on a throwaway Redis, with ``record_on="beacon"``; the test then
fetches the impression URL it found, as the player would, and reads the count back through the
CLI. Without node, npm or the registry the tests skip, or fail under ``XSP_REQUIRE_REDIS=1`` (CI).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
from conftest import REQUIRE_REDIS, as_user
from processes import ROOT, cli, example_env, show, uvicorn

PACKAGE = "@dailymotion/vast-client@6"
NPM_DIR = ROOT / "tests" / ".npm-vast"
SCRIPT = ROOT / "tests" / "vast_client.mjs"
AD = "/ad?campaign_id=c1&cpm=2.50"
USER = as_user("u1")["cookie"]
BROWSER_IMAGE_ACCEPT = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"


def _unavailable(why: str) -> None:
    if REQUIRE_REDIS:
        pytest.fail(f"XSP_REQUIRE_REDIS=1 but the VAST client is unavailable: {why}")
    pytest.skip(f"the VAST client is unavailable: {why}")


def _installed_major() -> int | None:
    manifest = NPM_DIR / "node_modules" / "@dailymotion" / "vast-client" / "package.json"
    try:
        return int(json.loads(manifest.read_text())["version"].split(".")[0])
    except (OSError, ValueError, KeyError):
        return None


@pytest.fixture(scope="session")
def vast_client_dir() -> Path:
    """Where ``@dailymotion/vast-client`` 6 is installed: npm runs only when it is not yet."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        _unavailable("node and npm must be on PATH")
    assert node is not None and npm is not None
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout
    if int(version.lstrip("v").split(".")[0] or 0) < 18:  # the client fetches with global fetch
        _unavailable(f"node {version.strip()} is older than 18")
    if _installed_major() != 6:
        NPM_DIR.mkdir(parents=True, exist_ok=True)
        manifest = NPM_DIR / "package.json"
        if not manifest.exists():  # npm would otherwise look for a project further up
            manifest.write_text('{"name": "xsp-vast-client-test", "private": true}\n')
        try:
            result = subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", PACKAGE],
                cwd=NPM_DIR,
                capture_output=True,
                text=True,
                timeout=300,
            )
        except subprocess.TimeoutExpired:
            _unavailable(f"npm install {PACKAGE} took more than 300 s")
        if result.returncode != 0 or _installed_major() != 6:
            _unavailable(f"npm install {PACKAGE} failed: {result.stderr.strip()[-2000:]}")
    return NPM_DIR


def play(vast_client_dir: Path, url: str, cookie: str | None = USER) -> dict[str, Any]:
    """What the VAST client made of ``url``: see tests/vast_client.mjs for the fields."""
    result = subprocess.run(
        ["node", str(SCRIPT), str(vast_client_dir), url, *([cookie] if cookie else [])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    assert parsed["patchedDoms"] >= 1, "the client's required-value checks would not run"
    return parsed


def campaign(redis_url: str, *command: str) -> None:
    result = cli("campaign", *command, redis_url=redis_url)
    assert result.returncode == 0, result.stderr


def pause(redis_url: str, campaign_id: str) -> None:
    campaign(redis_url, "set", campaign_id, "--budget", "10.00")
    campaign(redis_url, "pause", campaign_id)


def denied(base: str) -> httpx.Response:
    """An ad request for the paused campaign, once the servers see the pause."""
    deadline = time.monotonic() + 5
    while True:
        r = httpx.get(f"{base}{AD}", headers=as_user("u1"))
        if r.headers.get("x-xsp-decision") == "campaign_paused" or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


def tampered(url: str) -> str:
    """``url`` with one character of its token changed (mid-token: a token's last base64
    character can carry unused bits)."""
    at = url.index("t=") + 2 + (len(url) - url.index("t=") - 2) // 2
    while not url[at].isalnum():
        at += 1
    return url[:at] + ("A" if url[at] != "A" else "B") + url[at + 1 :]


def test_the_vast_client_reports_a_document_missing_required_elements(
    vast_client_dir: Path,
) -> None:
    # The check the next test relies on ("no warnings") is alive: an InLine with neither
    # AdServingId nor a creative's UniversalAdId is reported, as a browser player would.
    incomplete = (
        '<VAST version="4.2"><Ad id="a"><InLine><AdSystem>x</AdSystem>'
        "<Impression><![CDATA[https://example.com/i]]></Impression><AdTitle>t</AdTitle>"
        "<Creatives><Creative><Linear><Duration>00:00:15</Duration><MediaFiles><MediaFile "
        'delivery="progressive" type="video/mp4" width="640" height="360">'
        "<![CDATA[https://example.com/a.mp4]]></MediaFile></MediaFiles></Linear></Creative>"
        "</Creatives></InLine></Ad></VAST>"
    )
    parsed = play(vast_client_dir, "data:application/xml," + quote(incomplete), cookie=None)
    assert parsed["ok"] and parsed["ads"] == 1
    assert any("AdServingId" in w for w in parsed["warnings"]), parsed
    assert any("UniversalAdId" in w for w in parsed["warnings"]), parsed


def test_a_vast_player_plays_the_served_ad_and_its_one_beacon_counts_one_impression(
    vast_client_dir: Path, redis_url: str
) -> None:
    campaign(redis_url, "set", "c1", "--budget", "10.00")  # so that show knows it from the start
    with uvicorn(example_env(redis_url, XSP_RECORD_ON="beacon")) as base:
        parsed = play(vast_client_dir, f"{base}{AD}")
        assert parsed == {
            "ok": True,
            "version": "4.2",
            "ads": 1,
            "creatives": [["linear"]],
            "impressions": [[parsed["impressions"][0][0]]],  # exactly one, checked below
            "warnings": [],
            "noAd": False,
            "patchedDoms": parsed["patchedDoms"],
        }
        impression = parsed["impressions"][0][0]
        # Absolute, on the origin the player asked (no beacon_base_url), on the beacon path.
        parts = urlsplit(impression)
        assert f"{parts.scheme}://{parts.netloc}" == base
        assert parts.path == "/xsp/impression"
        assert re.fullmatch(r"t=[^&]+", parts.query), impression
        assert show(redis_url, "c1")["impressions"] == 0, "served is not yet an impression"

        # A browser player fires it as an image (vast-client: ``new Image().src = url``).
        beacon = httpx.get(impression, headers={"accept": BROWSER_IMAGE_ACCEPT})
        assert (beacon.status_code, beacon.headers["content-type"]) == (200, "image/gif")
        assert "x-xsp-beacon" not in beacon.headers
        assert show(redis_url, "c1")["impressions"] == 1

        # Fired twice (here without an image Accept: 204), or tampered with: counts no more.
        again = httpx.get(impression)
        assert again.status_code == 204 and "x-xsp-beacon" not in again.headers
        rejected = httpx.get(tampered(impression))
        assert (rejected.status_code, rejected.headers.get("x-xsp-beacon")) == (204, "rejected")
        assert show(redis_url, "c1")["impressions"] == 1


def test_a_denial_is_no_ad_to_a_vast_player_with_on_denied_vast(
    vast_client_dir: Path, redis_url: str
) -> None:
    pause(redis_url, "c1")
    env = example_env(redis_url, XSP_RECORD_ON="beacon", XSP_ON_DENIED="vast")
    with uvicorn(env) as base:
        r = denied(base)
        assert (r.status_code, r.headers["x-xsp-decision"]) == (200, "campaign_paused")
        assert r.headers["content-type"].startswith("application/xml")
        assert re.search(r'<VAST version="4\.2"\s*/>', r.text), r.text

        parsed = play(vast_client_dir, f"{base}{AD}")
        assert (parsed["ok"], parsed["ads"], parsed["noAd"]) == (True, 0, True), parsed
        assert "error" not in parsed and parsed["warnings"] == []

        # Bad input is still a 400 problem+json, an error to the player.
        bad = play(vast_client_dir, f"{base}/ad?campaign_id=c1&cpm=abc")
        assert not bad["ok"] and "(400)" in bad["error"], bad
    assert show(redis_url, "c1")["impressions"] == 0


def test_a_204_denial_and_a_400_are_errors_to_a_vast_player(
    vast_client_dir: Path, redis_url: str
) -> None:
    pause(redis_url, "c1")
    with uvicorn(example_env(redis_url, XSP_RECORD_ON="beacon")) as base:
        r = denied(base)
        assert (r.status_code, r.headers["x-xsp-decision"]) == (204, "campaign_paused")

        parsed = play(vast_client_dir, f"{base}{AD}")
        assert not parsed["ok"] and "No Content (204)" in parsed["error"], parsed

        bad = play(vast_client_dir, f"{base}/ad?campaign_id=c1&cpm=abc")
        assert not bad["ok"] and "Bad Request (400)" in bad["error"], bad
