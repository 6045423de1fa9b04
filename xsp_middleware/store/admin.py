"""Campaign admin and inspection: what the CLI, ``doctor``, the demo and an operator's code call.
None of it is on the decision path; each call is a few plain commands (or a snapshot in one
MULTI), bounded by ``max(store_timeout, 2 s)``."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisClusterException, RedisError

from ..caps import CALENDAR_PERIODS, FrequencyCap, parse_caps
from ..clock import Clock, bounds, zone
from ..errors import ConfigError, StoreUnavailable
from ..money import amount_to_units, cpm_to_cost_units, units_to_decimal
from ..setting_checks import check_weight
from ..settings import (
    CampaignConfig,
    CapLike,
    Money,
    Rules,
    campaign_id_problem,
    instant_ms,
    validate_campaign_id,
)
from ..store_url import StoreURL, redacted
from .protocol import REASONS, Reason, held_times, text, user_log
from .redis_compat import server_address
from .scripts import CLUSTER_SCRIPTS, STANDALONE_SCRIPTS

if TYPE_CHECKING:
    from .leasing import Leasing


@dataclass(frozen=True, slots=True)
class CampaignView:
    """A campaign as the store sees it: stored config over the settings' rules, and its state."""

    id: str
    configured: bool
    config: CampaignConfig
    spent_units: int
    impressions: int
    daily_spent_units: int
    denials: Mapping[str, int]
    released: int
    now_ms: int
    pacing_target_units: int | None
    """What pacing allows the period's spend to reach right now (None: asap)."""
    leased_units: int = 0
    """Units processes hold in budget leases, unspent or not yet reported as served. They are
    not in ``spent_units`` (spend on impressions) but no reservation can take them either."""
    pending: int = 0
    """Reservations waiting for their impression beacon (``record_on="beacon"``), expired ones
    not yet settled included."""
    pending_units: int = 0
    """The spend they hold: not in ``spent_units``, and no other reservation can take it."""
    beacons_served: int = 0
    """Reservations served pending a beacon, ever."""
    beacons_confirmed: int = 0
    beacons_expired: int = 0

    @property
    def render_rate(self) -> float | None:
        """Confirmed ÷ served under beacons (None: none served). A ratio of counts, not money."""
        if not self.beacons_served:
            return None
        return self.beacons_confirmed / self.beacons_served

    @property
    def recorded(self) -> bool:
        """Anything stored at all (config or state)."""
        return (
            self.configured
            or self.spent_units > 0
            or self.impressions > 0
            or self.pending > 0
            or any(self.denials.values())
        )

    @property
    def budget_units(self) -> int:
        return self.config.budget_units

    @property
    def cost_units(self) -> int:
        return self.config.cost_units

    @property
    def caps(self) -> tuple[FrequencyCap, ...]:
        return self.config.caps

    @property
    def status(self) -> str:
        return self.config.status

    @property
    def weight(self) -> int:
        """The relative chance of being chosen under ``selection="weighted"`` (default 1)."""
        return self.config.weight

    @property
    def remaining_units(self) -> int:
        # Leased units count as remaining; what pending reservations hold does not.
        return max(0, self.budget_units - self.spent_units - self.pending_units)

    @property
    def budget(self) -> Decimal:
        return units_to_decimal(self.budget_units)

    @property
    def spent(self) -> Decimal:
        return units_to_decimal(self.spent_units)

    @property
    def remaining(self) -> Decimal:
        return units_to_decimal(self.remaining_units)


class Admin:
    """The admin half of :class:`~xsp_middleware.store.Store` (a mixin: the store supplies the
    connections, the keys and the leases)."""

    rules: Rules
    url: str
    topology: StoreURL
    is_cluster: bool
    timeout: float
    leasing: Leasing
    clock: Clock
    prefix: str

    @property
    def client(self) -> Any:
        raise NotImplementedError

    def campaign_keys(self, campaign_id: str) -> tuple[str, str]:
        raise NotImplementedError

    def pending_keys(self, campaign_id: str) -> tuple[str, str]:
        raise NotImplementedError

    def history_key(self, campaign_id: str) -> str:
        raise NotImplementedError

    def user_key(self, user_id: bytes | str) -> str:
        raise NotImplementedError

    async def set_campaign(
        self,
        campaign_id: str,
        *,
        budget: Money | None = None,
        daily_budget: Money | None = None,
        cpm: Money | None = None,
        caps: Sequence[CapLike] | None = None,
        status: str | None = None,
        timezone: str | None = None,
        start: str | datetime | None = None,
        end: str | datetime | None = None,
        pacing: str | None = None,
        leasing: bool | None = None,
        max_cpm: Money | None = None,
        weight: int | str | None = None,
    ) -> CampaignView:
        """Create or update a campaign's stored config; fields left as None keep their value.
        ``max_cpm`` is the bid ceiling of request and signed prices (``"none"`` removes it).
        ``leasing`` turns budget leasing on or off for every process (see
        :mod:`xsp_middleware.store.leases`). ``weight`` (1 to 1,000,000, or its digits as a
        string) is the relative chance of being chosen under ``selection="weighted"``.

        Money is given as decimal strings (``budget="500.00"``, ``cpm="4.00"``). Every process
        sees the change on its next decision: the reserve script reads the stored config in the
        same round trip. Raises :class:`ConfigError` for an invalid value or combination (e.g.
        even pacing without a daily budget or a flight). Raising the budget of an exhausted
        campaign makes it active again.

        >>> import asyncio
        >>> store = Store(Rules.from_settings(Settings(redis_url="memory://doc")))
        >>> view = asyncio.run(store.set_campaign("c1", budget="500.00", caps=["5/1d"]))
        >>> view.budget, [str(c) for c in view.caps]
        (Decimal('500.0000000'), ['5/1d'])
        """
        validate_campaign_id(campaign_id)
        new_weight = None if weight is None else check_weight(weight, text=True)
        current = await self.get_campaign(campaign_id)
        old = current.config
        tz = old.timezone if timezone is None else timezone
        zone(tz)
        new_status = old.status if status is None else status
        new_budget = old.budget_units if budget is None else amount_to_units(budget, "budget")
        if (
            budget is not None
            and old.status == "exhausted"
            and status is None
            and new_budget - current.spent_units - current.pending_units >= old.cost_units
        ):
            new_status = "active"
        config = CampaignConfig(
            budget_units=new_budget,
            cost_units=old.cost_units if cpm is None else self._cpm(cpm),
            caps=old.caps if caps is None else parse_caps(caps),
            daily_budget_units=old.daily_budget_units
            if daily_budget is None
            else amount_to_units(daily_budget, "daily_budget"),
            timezone=tz,
            start_ms=old.start_ms if start is None else instant_ms(start, tz),
            end_ms=old.end_ms if end is None else instant_ms(end, tz, end=True),
            pacing=old.pacing if pacing is None else pacing,
            status=new_status,
            leasing=old.leasing if leasing is None else leasing,
            max_cost_units=old.max_cost_units
            if max_cpm is None
            else None
            if str(max_cpm).strip().lower() in ("", "none")
            else self._cpm(max_cpm, "max_cpm"),
            weight=old.weight if new_weight is None else new_weight,
        )
        if leasing is not None and not isinstance(leasing, bool):
            raise ConfigError("leasing: must be True or False")
        if config.max_cost_units is not None and config.cost_units > config.max_cost_units:
            raise ConfigError("cpm: the campaign's price is above its max_cpm")
        # Store what was given, even where it equals this process's settings: another process
        # may have other settings, and the store must win there too.
        given = {
            "budget": budget,
            "daily_budget": daily_budget,
            "cost": cpm,
            "caps": caps,
            "tz": timezone,
            "start": start,
            "end": end,
            "pacing": pacing,
            "max_cost": max_cpm,
            "weight": weight,
        }
        fields = config.fields()
        write = {k: fields[k] for k, value in given.items() if value is not None}
        write["status"] = new_status
        if leasing is not None:
            write["leasing"] = "1" if leasing else "0"
        cfg_key, _ = self.campaign_keys(campaign_id)
        await self.admin_call(self.client.hset(cfg_key, mapping=write))
        # This process sees its own change at once: its lease goes back and the next grant
        # reads the new config. Other processes see it at their next grant.
        await self.leasing.drop(campaign_id)
        return await self.get_campaign(campaign_id)

    def _cpm(self, cpm: Money, name: str = "cpm") -> int:
        cost = cpm_to_cost_units(cpm, name)
        if cost > self.rules.max_cpm_cost_units:
            raise ConfigError(f"{name}: {cpm} is above max_cpm ({self.rules.settings.max_cpm})")
        return cost

    async def _hashes_and_time(self, *keys: str) -> tuple[list[dict[Any, Any]], int]:
        """HGETALL of keys that share one owner (one slot), and the server's clock (ms), as one
        snapshot: a MULTI on one server; on a cluster, a pipeline to the keys' shard."""
        client = self.client
        if self.is_cluster:

            async def read() -> list[Any]:
                await client.initialize()
                node = client.get_node_from_key(keys[0])
                async with client.pipeline() as pipe:
                    for key in keys:
                        pipe.hgetall(key)
                    hashes = await pipe.execute()
                return [*hashes, await client.time(target_nodes=node)]

            *hashes, (seconds, micros) = await self.admin_call(read())
        else:
            async with client.pipeline(transaction=True) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                pipe.time()
                *hashes, (seconds, micros) = await self.admin_call(pipe.execute())
        now = self.clock.seen_ms(int(seconds) * 1000 + int(micros) // 1000)
        return hashes, now

    async def get_campaign(self, campaign_id: str) -> CampaignView:
        """The campaign's effective config and state. Unconfigured campaigns show the defaults.
        This process's budget leases report what they served first (read your own writes)."""
        await self.leasing.report(campaign_id)
        cfg_key, state_key = self.campaign_keys(campaign_id)
        (cfg_raw, st_raw), now = await self._hashes_and_time(cfg_key, state_key)
        # ('pending' marks a campaign that held pending reservations: not a config field.)
        stored = {text(k): text(v) for k, v in cfg_raw.items() if k not in (b"pending", "pending")}
        state = {text(k): text(v) for k, v in st_raw.items()}
        pending = 0
        if "b:served" in state:
            pending = int(
                await self.admin_call(self.client.hlen(self.pending_keys(campaign_id)[1]))
            )
        config = self.rules.rule_for(campaign_id).over(stored)
        configured = bool(stored) or campaign_id in self.rules.campaign_rules
        return self.campaign_view(campaign_id, config, state, now, pending, configured)

    def campaign_view(
        self,
        campaign_id: str,
        config: CampaignConfig,
        state: Mapping[str, str],
        now: int,
        pending: int = 0,
        configured: bool = True,
    ) -> CampaignView:
        """The view of a campaign under ``config`` whose state hash was ``state`` at ``now`` (as
        read now, or as a dashboard's history sample kept it)."""
        day_spent = 0
        day_start = day_end = 0
        # Leased units are charged to the spend (and the day's) when granted: show them apart.
        leased = max(0, int(state.get("leased", "0")))
        if config.daily_budget_units is not None:
            day_start, day_end = day_span(config.timezone, now)
            day_spent = max(0, int(state.get(f"day:{day_start}", "0")) - leased)
        held = max(0, int(state.get("b:held", "0")))
        spent = max(0, int(state.get("spent", "0")) - leased - held)
        return CampaignView(
            id=campaign_id,
            configured=configured,
            config=config,
            spent_units=spent,
            impressions=int(state.get("impressions", "0")),
            daily_spent_units=day_spent,
            denials={
                reason: int(state.get(f"n:{code}", "0"))
                for code, reason in enumerate(REASONS)
                if 0 < code <= Reason.USER_BLOCKED
            },
            released=int(state.get("n:released", "0")),
            now_ms=now,
            pacing_target_units=self._pacing_target(config, now, day_start, day_end),
            leased_units=leased,
            pending=pending,
            pending_units=held,
            beacons_served=int(state.get("b:served", "0")),
            beacons_confirmed=int(state.get("b:confirmed", "0")),
            beacons_expired=int(state.get("b:expired", "0")),
        )

    def _pacing_target(
        self, config: CampaignConfig, now: int, day_start: int, day_end: int
    ) -> int | None:
        """The period spend pacing allows right now (the script's ceiling, in integers)."""
        curve = self.pacing_curve(config, now, day_start, day_end)
        return None if curve is None else curve[1]

    def pacing_curve(
        self, config: CampaignConfig, at: int, day_start: int, day_end: int
    ) -> tuple[int, int] | None:
        """Pacing at ``at``: (the ideal curve's spend, what the burst allowance lets the spend
        reach: the script's ceiling, at most the budget), for the period's spend (the local day
        ``[day_start, day_end)`` with a daily budget, else the flight). None: asap, or no
        period."""
        if config.pacing == "asap":
            return None
        if config.daily_budget_units is not None:
            start, end, budget = day_start, day_end, config.daily_budget_units
        elif config.start_ms is not None and config.end_ms is not None:
            start, end, budget = config.start_ms, config.end_ms, config.budget_units
        else:
            return None
        elapsed = min(max(at - start, 0), end - start)
        allowance = self.rules.pacing_allowance_bp
        if config.pacing == "frontloaded":  # 40% decaying linearly to the allowance
            allowance = 4000 - (4000 - allowance) * elapsed // (end - start)
        ideal: int = budget * elapsed // (end - start)
        return ideal, min(budget, ideal + budget * allowance // 10000)

    async def delete_campaign(self, campaign_id: str) -> bool:
        """Forget a campaign's stored config and state (spend, counters, pending reservations,
        the dashboard's history of it).
        Users' logs expire on their own. The cap slots its pending reservations held stop
        counting at once on one server; on a cluster, the users' shards count them until they
        expire. Returns whether anything was stored."""
        validate_campaign_id(campaign_id)
        await self.leasing.drop(campaign_id)
        keys = (
            *self.campaign_keys(campaign_id),
            *self.pending_keys(campaign_id),
            self.history_key(campaign_id),
        )
        deleted = await self.admin_call(self.client.delete(*keys))
        return bool(deleted)

    async def list_campaigns(self) -> list[str]:
        """Every campaign with stored config or state, and those defined in settings."""
        ids = set(self.rules.campaign_rules)
        prefix = f"{self.prefix}:c:{{"

        async def scan() -> None:
            async for key in self.client.scan_iter(match=f"{prefix}*", count=1000):
                name = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
                campaign_id = name[len(prefix) :].partition("}")[0]
                # (A key no campaign of ours wrote, a stray or hand-made one, is no campaign.)
                if campaign_id_problem(campaign_id) is None:
                    ids.add(campaign_id)

        await self.admin_call(scan())
        return sorted(ids)

    async def user_view(
        self, user_id: str, campaign_id: str | None = None
    ) -> list[tuple[str, list[tuple[FrequencyCap, int, int | None]]]]:
        """Per campaign the user has seen (or ``campaign_id``): each cap with the impressions in
        its current window and when it frees up next (epoch ms; None when not reached)."""
        key = self.user_key(user_id)
        (raw,), now = await self._hashes_and_time(key)
        logs = {text(k): text(v) for k, v in raw.items()}
        # Fields starting with "!" are preferences (opt-out, blocked campaigns), not logs; "~"
        # ones hold pending impressions (record_on="beacon"), which count with their log.
        fields = (
            [campaign_id]
            if campaign_id is not None
            else sorted({f.lstrip("~") for f in logs if not f.startswith("!")})
        )
        result = []
        for field in fields:
            if field == "*":
                caps, tz = parse_caps(self.rules.settings.user_caps), "UTC"
            else:
                config = (await self.get_campaign(field)).config
                caps, tz = config.caps, config.timezone
            held = held_times(logs.get("~" + field), now)
            result.append((field, cap_windows(caps, logs.get(field), now, tz, held)))
        return result

    async def reset_user(self, user_id: str, campaign_id: str | None = None) -> bool:
        """Forget a user's impressions (of one campaign, or all); their preferences stay (see
        ``preferences.forget_user`` for erasure). Returns whether any existed."""
        key = self.user_key(user_id)
        if campaign_id is not None:
            validate_campaign_id(campaign_id)  # never a preference field ("!o", "!b")
            removed = await self.admin_call(self.client.hdel(key, campaign_id, "~" + campaign_id))
            return bool(removed)
        fields = [
            f for f in await self.admin_call(self.client.hkeys(key)) if not text(f).startswith("!")
        ]
        return bool(fields) and bool(await self.admin_call(self.client.hdel(key, *fields)))

    async def server_info(self) -> dict[str, Any]:
        """INFO and the eviction/persistence settings of one server, for ``doctor``."""
        return await self._server_info(self.client, None)

    async def _server_info(self, client: Any, node: Any) -> dict[str, Any]:
        target = {} if node is None else {"target_nodes": node}
        info = await self.admin_call(client.info(**target))
        config: dict[Any, Any] = {}
        names = ["maxmemory-policy", "save", "appendonly"]
        if node is not None:
            names.append("cluster-require-full-coverage")
        for name in names:
            config.update(await self.admin_call(client.config_get(name, **target)))
        return {"info": info, "config": {text(k): text(v) for k, v in config.items()}}

    async def masters(self) -> list[tuple[str, dict[str, Any] | StoreUnavailable]]:
        """Every master (one, or each of a cluster's) with its INFO and settings, or why it
        could not be read: ``doctor`` checks them all."""
        client = self.client
        if self.is_cluster:
            await self.admin_call(client.initialize())
            found: list[tuple[str, dict[str, Any] | StoreUnavailable]] = []
            for node in sorted(client.get_primaries(), key=lambda n: n.name):
                try:
                    found.append((node.name, await self._server_info(client, node)))
                except StoreUnavailable as exc:
                    found.append((node.name, exc))
            return found
        if self.topology.kind == "sentinel":
            host, port = await self.admin_call(client.connection_pool.get_master_address())
            name = f"{host}:{port}"
        else:
            name = server_address(client)
        try:
            return [(name, await self.server_info())]
        except StoreUnavailable as exc:
            return [(name, exc)]

    async def load_scripts(self) -> list[str]:
        """Load every script this topology runs (on every master); returns their SHA1s
        (``doctor`` checks they match)."""
        scripts = CLUSTER_SCRIPTS if self.is_cluster else STANDALONE_SCRIPTS
        # On a cluster, redis-py sends SCRIPT LOAD to every master.
        return [text(await self.admin_call(self.client.script_load(s.text))) for s in scripts]

    async def admin_call(self, awaitable: Any) -> Any:
        try:
            return await asyncio.wait_for(awaitable, max(self.timeout, 2.0))
        except (TimeoutError, RedisError, RedisClusterException, OSError) as exc:
            raise StoreUnavailable(f"{redacted(self.url)}: {type(exc).__name__}: {exc}") from exc

    async def ping(self) -> None:
        await self.admin_call(self.client.ping())


def day_span(tz: str, now_ms: int) -> tuple[int, int]:
    """The local day holding ``now_ms`` in ``tz``, as [start, end) epoch ms."""
    parts = bounds(zone(tz), now_ms)[0].split("|")[0].split(",")
    days = [int(p) for p in parts]
    for start, end in itertools.pairwise(days):
        if start <= now_ms < end:
            return start, end
    return days[1], days[2]


def cap_windows(
    caps: Sequence[FrequencyCap],
    raw: str | None,
    now_ms: int,
    tz: str,
    held: Sequence[int] = (),
) -> list[tuple[FrequencyCap, int, int | None]]:
    """For each cap: impressions in its current window, and when it frees up next if reached.
    ``held``: the times of pending impressions, which count as the scripts count them."""
    lifetime, times = user_log(raw)
    if held:
        lifetime, times = lifetime + len(held), sorted([*times, *held])
    result: list[tuple[FrequencyCap, int, int | None]] = []
    for cap in caps:
        if cap.calendar is not None:
            text = bounds(zone(tz), now_ms)[0].split("|")
            series = [int(p) for p in text[CALENDAR_PERIODS.index(cap.calendar)].split(",")]
            start, end = next(
                ((a, b) for a, b in itertools.pairwise(series) if a <= now_ms < b),
                (series[1], series[2]),
            )
            inside = [t for t in times if t >= start]
            frees: int | None = end
        elif cap.window_seconds is not None:
            window = cap.window_seconds * 1000
            inside = [t for t in times if t > now_ms - window]
            # When the oldest impression that keeps the cap full leaves the window.
            full = len(inside) >= cap.max_impressions
            frees = inside[-cap.max_impressions] + window if full else None
        else:
            inside, frees = times, None
            result.append((cap, lifetime, None))
            continue
        count = len(inside)
        result.append((cap, count, frees if count >= cap.max_impressions else None))
    return result
