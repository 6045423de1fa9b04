"""``xsp-middleware doctor``: is this store safe to enforce money on?"""

from __future__ import annotations

from typing import Any

from .errors import XSPError
from .store import PEEK, RELEASE, RESERVE, Store

Check = tuple[str, str, str]  # (ok | warn | fail, name, detail)

SAFE_EVICTION = "noeviction"


async def run_checks(store: Store) -> list[Check]:
    checks: list[Check] = []
    rules = store.rules
    if rules.uses_development_key:
        checks.append(
            ("warn", "secret_key", "unset: user ids are hashed with the public development key")
        )
    else:
        checks.append(("ok", "secret_key", "set"))
    if store.is_memory:
        checks.append(
            ("warn", "store", "embedded in-memory store: state is per process and lost on exit")
        )
    try:
        await store.ping()
    except XSPError as exc:
        checks.append(("fail", "store", f"unreachable: {exc}"))
        return checks
    checks.append(("ok", "store", f"reachable at {_safe_url(store.url)}"))
    try:
        shas = await store.load_scripts()
    except XSPError as exc:
        checks.append(("fail", "scripts", f"could not load the Lua scripts: {exc}"))
    else:
        expected = [RESERVE.sha, RELEASE.sha, PEEK.sha]
        if shas == expected:
            checks.append(("ok", "scripts", f"{len(shas)} Lua scripts load"))
        else:
            checks.append(("fail", "scripts", f"SHA mismatch: {shas} != {expected}"))
    if store.is_memory:
        return checks
    try:
        server = await store.server_info()
    except XSPError as exc:
        checks.append(("fail", "config", f"cannot read the server's settings: {exc}"))
        return checks
    checks.extend(_server_checks(server["info"], server["config"]))
    return checks


def _server_checks(info: dict[str, Any], config: dict[str, str]) -> list[Check]:
    checks: list[Check] = []
    version = str(info.get("redis_version", "?"))
    major = int(version.split(".")[0]) if version[:1].isdigit() else 0
    if major >= 6:
        checks.append(("ok", "version", f"Redis {version}"))
    else:
        checks.append(("fail", "version", f"Redis {version}: 6.0 or newer is needed"))
    policy = config.get("maxmemory-policy", "?")
    if policy == SAFE_EVICTION:
        checks.append(("ok", "eviction", "maxmemory-policy noeviction"))
    else:
        checks.append(
            (
                "fail",
                "eviction",
                f"maxmemory-policy {policy} can evict our keys: an evicted spend counter is an "
                "overspend, an evicted user log a broken cap. Set it to noeviction.",
            )
        )
    saves = config.get("save", "").strip()
    aof = config.get("appendonly", "no")
    if not saves and aof != "yes":
        checks.append(
            (
                "warn",
                "persistence",
                "Redis keeps nothing on disk (save '' and appendonly no): budgets, spend and "
                "caps are lost on restart",
            )
        )
    else:
        checks.append(("ok", "persistence", f"appendonly {aof}, save '{saves}'"))
    return checks


def _safe_url(url: str) -> str:
    """The URL without its password."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
