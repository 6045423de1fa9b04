"""``xsp-middleware doctor``: is this store safe to enforce money on?"""

from __future__ import annotations

from typing import Any

from ..errors import XSPError
from ..settings import Settings
from ..signing import drain_warning
from ..store import Store
from ..store.scripts import CLUSTER_SCRIPTS, STANDALONE_SCRIPTS
from ..store_url import redacted

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
    checks.append(price_check(rules.settings))
    if store.is_memory:
        checks.append(
            ("warn", "store", "embedded in-memory store: state is per process and lost on exit")
        )
    if store.is_memory:
        try:
            await store.ping()
        except XSPError as exc:
            checks.append(("fail", "store", f"unreachable: {exc}"))
            return checks
        checks.append(("ok", "store", f"reachable at {safe_url(store.url)}"))
        checks.append(await _scripts_check(store))
        return checks
    try:
        masters = await store.masters()
    except XSPError as exc:
        checks.append(("fail", "store", f"unreachable: {exc}"))
        return checks
    reachable = [m for m in masters if not isinstance(m[1], XSPError)]
    checks.append(_topology_check(store, masters))
    if not reachable:
        problem = masters[0][1] if masters else "no master found"
        checks.append(("fail", "store", f"unreachable: {problem}"))
        return checks
    down = [(name, error) for name, error in masters if isinstance(error, XSPError)]
    if down:
        names = ", ".join(name for name, _ in down)
        checks.append(
            (
                "fail",
                "store",
                f"{len(down)} of {len(masters)} masters do not answer ({names}): requests whose "
                f"user or campaign lives there are degraded; {down[0][1]}",
            )
        )
    else:
        checks.append(("ok", "store", f"reachable at {safe_url(store.url)}"))
    checks.append(await _scripts_check(store))
    # Eviction and persistence on every master: one that may evict is one that may lose a
    # spend counter, whichever shard it is.
    several = len(masters) > 1
    for name, server in reachable:
        assert isinstance(server, dict)
        for level, check, detail in _server_checks(server["info"], server["config"]):
            checks.append((level, check, f"{name}: {detail}" if several else detail))
        coverage = server["config"].get("cluster-require-full-coverage")
        if coverage == "yes":
            checks.append(
                (
                    "warn",
                    "coverage",
                    f"{name}: cluster-require-full-coverage yes: one dead master stops every "
                    "shard; set it to no so that only its own slots degrade",
                )
            )
    return checks


def price_check(settings: Settings) -> Check:
    """Can a request's price be trusted: the drain warning, or how prices are protected."""
    warning = drain_warning(settings)
    if warning is not None:
        return ("warn", "price", warning)
    source = settings.price_source
    if source == "signed":
        if settings.price_key is None:  # Settings refuses this; kept for a hand-built Settings
            return ("fail", "price", "price_source signed without price_key (XSP_PRICE_KEY)")
        return ("ok", "price", "price_source signed: a price needs a valid signature (price_key)")
    if source == "campaign":
        return ("ok", "price", "price_source campaign: the campaign's cpm; request prices ignored")
    return (
        "ok",
        "price",
        f"price_source request (anonymous {settings.anonymous}, record_on {settings.record_on}): "
        "request prices are trusted up to max_cpm, which is right behind a trusted caller",
    )


async def _scripts_check(store: Store) -> Check:
    try:
        shas = await store.load_scripts()
    except XSPError as exc:
        return ("fail", "scripts", f"could not load the Lua scripts: {exc}")
    expected = [s.sha for s in (CLUSTER_SCRIPTS if store.is_cluster else STANDALONE_SCRIPTS)]
    if shas != expected:
        return ("fail", "scripts", f"SHA mismatch: {shas} != {expected}")
    return ("ok", "scripts", f"{len(shas)} Lua scripts load")


def _topology_check(store: Store, masters: list[tuple[str, Any]]) -> Check:
    names = ", ".join(name for name, _ in masters)
    topology = store.topology
    if topology.kind == "cluster":
        return ("ok", "topology", f"Redis Cluster with {len(masters)} masters: {names}")
    if topology.kind == "sentinel":
        sentinels = len(topology.nodes)
        return (
            "ok",
            "topology",
            f"Redis Sentinel: service {topology.service!r}, master {names}, "
            f"{sentinels} sentinel{'s' if sentinels > 1 else ''}",
        )
    return ("ok", "topology", f"standalone Redis at {names}")


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


def safe_url(url: str) -> str:
    """The URL without its password."""
    return redacted(url)
