"""The state store: Redis (or the embedded fakeredis) running the same Lua scripts.

Key layout (every key carries the hash tag of the entity that owns it, so each script touches
exactly one cluster slot per entity):

* ``<prefix>:c:{<campaign id>}:cfg``: hash, the campaign's stored config (``budget``, ``cost``,
  ``caps``, ``status``), written by the CLI or :meth:`Store.set_campaign`. It wins over settings.
* ``<prefix>:c:{<campaign id>}:st``: hash, ``spent`` (units) and ``impressions``.
* ``<prefix>:u:{<HMAC of the user id>}``: hash, one field per campaign holding the user's
  lifetime count and recent impression times. Raw user ids never reach Redis.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from typing import Any

import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .caps import FrequencyCap, caps_from_spec, caps_spec, parse_caps
from .errors import ConfigError, StoreUnavailable
from .money import amount_to_units, cpm_to_cost_units, units_to_decimal
from .pipeline import AutoPipeline, Script
from .settings import (
    CAMPAIGN_STATUSES,
    CampaignRule,
    CapLike,
    Money,
    Rules,
    validate_campaign_id,
)

logger = logging.getLogger("xsp_middleware")

REASONS = ("served", "frequency_capped", "budget_exhausted", "campaign_paused")


def _load_script(name: str) -> Script:
    lua = resources.files("xsp_middleware") / "lua"
    text = (lua / "lib.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()
    return Script(name, text)


RESERVE = _load_script("reserve")
RELEASE = _load_script("release")
PEEK = _load_script("peek")

_PIPELINE_SLOTS = 8
"""Connections per event loop. Batching makes a few enough; more only add server contention."""

_memory_servers: dict[str, Any] = {}
_memory_lock = threading.Lock()


def _memory_server(url: str) -> Any:
    """One fakeredis server per ``memory://`` URL per process, shared by every store on it."""
    import fakeredis

    with _memory_lock:
        if url not in _memory_servers:
            _memory_servers[url] = fakeredis.FakeServer()
        return _memory_servers[url]


def _require_lua() -> None:
    """The embedded store runs our Lua through lupa; without it fakeredis has no EVAL at all,
    and every decision would fail. Fail loudly at start-up instead."""
    try:
        import lupa  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        raise ConfigError(
            "the embedded store (memory://) needs Lua support: pip install 'fakeredis[lua]'"
        ) from None


@dataclass(frozen=True, slots=True)
class Reservation:
    """What the reserve script answered, plus what a release needs."""

    reserved: bool
    reason: str
    cost_units: int
    remaining_budget_units: int
    remaining_impressions: int | None
    at_ms: int
    campaign_id: str
    user_key: str | None
    counts_impression: bool = True


@dataclass(frozen=True, slots=True)
class CampaignView:
    """A campaign as the store sees it: stored config over the settings' rule, and its spend."""

    id: str
    configured: bool
    budget_units: int
    cost_units: int
    caps: tuple[FrequencyCap, ...]
    status: str
    spent_units: int
    impressions: int

    @property
    def remaining_units(self) -> int:
        return max(0, self.budget_units - self.spent_units)

    @property
    def budget(self) -> Decimal:
        return units_to_decimal(self.budget_units)

    @property
    def spent(self) -> Decimal:
        return units_to_decimal(self.spent_units)

    @property
    def remaining(self) -> Decimal:
        return units_to_decimal(self.remaining_units)


class _LoopState:
    __slots__ = ("client", "pipeline")

    def __init__(self, client: Any, pipeline: AutoPipeline) -> None:
        self.client = client
        self.pipeline = pipeline


class Store:
    """Reservations and campaign admin on one store URL. Safe to share across event loops:
    each loop gets its own connections, created lazily (no lifespan events needed)."""

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.url = rules.redis_url
        self.is_memory = self.url.startswith("memory://")
        # The timeout guards against a network that stalls. The embedded store has none; its
        # first script call alone takes tens of ms (Lua start-up), so it gets a floor of 1 s.
        self.timeout = max(rules.store_timeout, 1.0) if self.is_memory else rules.store_timeout
        self._prefix = rules.settings.key_prefix
        self._secret = rules.secret_key
        if self.is_memory:
            _require_lua()
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary()
        )

    # -- keys -------------------------------------------------------------------------------

    def campaign_keys(self, campaign_id: str) -> tuple[str, str]:
        tag = f"{self._prefix}:c:{{{campaign_id}}}"
        return f"{tag}:cfg", f"{tag}:st"

    def user_key(self, user_id: bytes | str) -> str:
        if isinstance(user_id, str):
            user_id = user_id.encode("utf-8", "surrogateescape")
        digest = hmac.digest(self._secret, user_id, "sha256")[:16]
        return f"{self._prefix}:u:{{{base64.urlsafe_b64encode(digest).rstrip(b'=').decode()}}}"

    # -- connections ------------------------------------------------------------------------

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            client = self._make_client()
            pipeline = AutoPipeline(
                client.connection_pool.make_connection,
                slots=_PIPELINE_SLOTS,
                timeout=self.timeout,
                preload=(RESERVE, RELEASE, PEEK),
            )
            state = self._loops[loop] = _LoopState(client, pipeline)
        return state

    def _make_client(self) -> Any:
        if self.is_memory:
            import fakeredis

            return fakeredis.FakeAsyncRedis(server=_memory_server(self.url))
        return aredis.Redis.from_url(
            self.url,
            socket_connect_timeout=self.timeout,
            # Callers time out on their own deadline; this only frees a connection stuck on a
            # hung server.
            socket_timeout=max(1.0, self.timeout * 10),
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )

    @property
    def client(self) -> Any:
        """The redis-py (or fakeredis) asyncio client of the running loop, for admin calls."""
        return self._state().client

    # -- hot path ---------------------------------------------------------------------------

    async def reserve(
        self,
        campaign_id: str,
        user_key: str | None,
        cost_units: int | None,
        rule: CampaignRule,
        *,
        counts_impression: bool = True,
        now_ms: int | None = None,
    ) -> Reservation:
        """Check and reserve in one round trip. Raises StoreUnavailable on failure or timeout."""
        cfg_key, state_key = self.campaign_keys(campaign_id)
        argv: tuple[str | int, ...]
        tail = (
            campaign_id,
            "" if cost_units is None else str(cost_units),
            rule.cost_units,
            rule.budget_units,
            rule.caps_spec,
            rule.status,
            "" if now_ms is None else str(now_ms),
            "1" if counts_impression else "0",
        )
        if user_key is None:
            argv = (2, cfg_key, state_key, *tail)
        else:
            argv = (3, cfg_key, state_key, user_key, *tail)
        reply = await self._state().pipeline.call(RESERVE, argv, self._release_orphan)
        try:
            reserved, reason, cost, remaining, left, at_ms = (int(x) for x in reply)
        except (TypeError, ValueError):
            raise StoreUnavailable(f"unexpected reply from the reserve script: {reply!r}") from None
        return Reservation(
            reserved=reserved == 1,
            reason=REASONS[reason],
            cost_units=cost,
            remaining_budget_units=max(0, remaining),
            remaining_impressions=None if left < 0 else left,
            at_ms=at_ms,
            campaign_id=campaign_id,
            user_key=user_key,
            counts_impression=counts_impression,
        )

    async def release(self, reservation: Reservation) -> None:
        """Give back a reservation's spend and impression. Raises StoreUnavailable."""
        await self._state().pipeline.call(RELEASE, self._release_argv(reservation))

    def _release_argv(self, r: Reservation) -> tuple[str | int, ...]:
        cfg_key, state_key = self.campaign_keys(r.campaign_id)
        keys: tuple[str, ...] = (
            (cfg_key, state_key) if r.user_key is None else (cfg_key, state_key, r.user_key)
        )
        return (
            len(keys),
            *keys,
            r.campaign_id,
            str(r.cost_units),
            str(r.at_ms),
            "1" if r.counts_impression else "0",
        )

    def _release_orphan(self, argv: tuple[str | int, ...], reply: Any) -> None:
        """A reservation whose caller had already given up (timeout, cancellation): undo it, so
        a late reply never leaves spend or a cap slot behind."""
        try:
            if int(reply[0]) != 1:
                return
            numkeys = int(argv[0])
            keys = argv[1 : 1 + numkeys]
            args = argv[1 + numkeys :]
            release_argv = (
                numkeys,
                *keys,
                args[0],
                str(int(reply[2])),
                str(int(reply[5])),
                args[7],
            )
        except (TypeError, ValueError, IndexError):
            logger.error("could not release an orphaned reservation: reply %r", reply)
            return
        future = self._state().pipeline.call(RELEASE, release_argv)
        future.add_done_callback(_log_release_failure)

    async def can_serve(
        self, campaign_id: str, user_key: str, rule: CampaignRule
    ) -> tuple[bool, int | None]:
        """Read-only cap check (one round trip): would one more impression pass every cap?"""
        cfg_key, _ = self.campaign_keys(campaign_id)
        reply = await self._state().pipeline.call(
            PEEK, (2, cfg_key, user_key, campaign_id, rule.caps_spec, "")
        )
        allowed, left = (int(x) for x in reply)
        return allowed == 1, None if left < 0 else left

    # -- admin ------------------------------------------------------------------------------

    async def set_campaign(
        self,
        campaign_id: str,
        *,
        budget: Money | None = None,
        cpm: Money | None = None,
        caps: Sequence[CapLike] | None = None,
        status: str | None = None,
    ) -> None:
        """Create or update a campaign's stored config; fields left as None keep their value.

        Money is given as decimal strings (``budget="500.00"``, ``cpm="4.00"``). Every process
        sees the change on its next decision: the reserve script reads the stored config in the
        same round trip. Raises :class:`ConfigError` for an invalid value.

        >>> import asyncio
        >>> store = Store(Rules.from_settings(Settings(redis_url="memory://doc")))
        >>> asyncio.run(store.set_campaign("c1", budget="500.00", caps=["5/1d"], cpm="4.00"))
        """
        validate_campaign_id(campaign_id)
        fields: dict[str, str] = {}
        if budget is not None:
            fields["budget"] = str(amount_to_units(budget, "budget"))
        if cpm is not None:
            fields["cost"] = str(cpm_to_cost_units(cpm, "cpm"))
        if caps is not None:
            fields["caps"] = caps_spec(parse_caps(caps))
        if status is not None:
            if status not in CAMPAIGN_STATUSES:
                raise ConfigError(f"status must be one of {', '.join(CAMPAIGN_STATUSES)}")
            fields["status"] = status
        cfg_key, _ = self.campaign_keys(campaign_id)
        async with self.client.pipeline(transaction=True) as pipe:
            if fields:
                pipe.hset(cfg_key, mapping=fields)
            pipe.hsetnx(cfg_key, "status", "active")
            await self._admin(pipe.execute())

    async def get_campaign(self, campaign_id: str) -> CampaignView:
        """The campaign's effective config and spend. Unconfigured campaigns show the defaults."""
        cfg_key, state_key = self.campaign_keys(campaign_id)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(cfg_key)
            pipe.hgetall(state_key)
            cfg_raw, st_raw = await self._admin(pipe.execute())
        cfg = {_text(k): _text(v) for k, v in cfg_raw.items()}
        st = {_text(k): _text(v) for k, v in st_raw.items()}
        rule = self.rules.rule_for(campaign_id)
        return CampaignView(
            id=campaign_id,
            configured=bool(cfg) or campaign_id in self.rules.campaign_rules,
            budget_units=int(cfg.get("budget", rule.budget_units)),
            cost_units=int(cfg.get("cost", rule.cost_units)),
            caps=caps_from_spec(cfg["caps"]) if "caps" in cfg else rule.caps,
            status=cfg.get("status", rule.status),
            spent_units=int(st.get("spent", "0")),
            impressions=int(st.get("impressions", "0")),
        )

    async def _admin(self, awaitable: Any) -> Any:
        try:
            return await asyncio.wait_for(awaitable, max(self.timeout, 2.0))
        except (TimeoutError, RedisError, OSError) as exc:
            raise StoreUnavailable(f"{self.url}: {type(exc).__name__}: {exc}") from exc

    async def ping(self) -> None:
        await self._admin(self.client.ping())

    async def aclose(self) -> None:
        """Close this loop's connections (optional: they are also freed with the loop)."""
        loop = asyncio.get_running_loop()
        state = self._loops.pop(loop, None)
        if state is not None:
            await state.pipeline.aclose()
            await state.client.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _log_release_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("releasing an orphaned reservation failed: %s", future.exception())
