"""The dashboard's spend history: each campaign's counters, sampled once a minute by a dashboard
process. A decision never writes it: the reserve scripts are what they were.

**Where.** A stream per campaign, ``<prefix>:c:{<id>}:h`` (in the campaign's slot, so that one
script reads the state and writes the sample on a cluster too). Each entry is one minute's
sample: its id is the minute's start (epoch ms), its fields the campaign's state hash as it was
then (spend, the day spends, impressions, denial and beacon counters) and ``t``, the time it was
taken. Reading a day is one ``XRANGE`` from the day's start.

**How long.** The last :data:`HISTORY_SAMPLES` samples, 2,880: 48 hours at one a minute, so
today is whole in every time zone. A sample of a busy campaign takes about 65 bytes, so its
history about 190 KB (``MEMORY USAGE`` on Redis 7; see docs/dashboard.md). A campaign with no
state yet gets none, and ``campaign delete`` deletes it with the campaign.

**Who.** Every dashboard process runs a :class:`Sampler`. The one holding the sampler lease (a
key renewed each minute, :data:`LEASE_MS`) samples; the others wait to take over when it
stops. Should two sample the same minute anyway (a lease handed over), the minute's id makes the
second write nothing: no minute is sampled twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError

from .. import logs
from ..errors import StoreUnavailable
from ..store import Store
from ..store.scripts import SAMPLE

__all__ = [
    "HISTORY_SAMPLES",
    "LEASE_MS",
    "SAMPLE_SECONDS",
    "Sample",
    "Sampler",
    "history",
    "sample",
]

HISTORY_SAMPLES = 2880
"""Samples kept per campaign: 48 hours at one a minute."""
SAMPLE_SECONDS = 60.0
"""How often the sampler samples every campaign."""
LEASE_MS = 150_000
"""How long the sampler lease outlives its holder's last renewal: after that long without a
sample, another dashboard process takes over."""
RESCAN_SECONDS = 600.0
"""How often the sampler looks for campaigns created in the store (those in the settings are
always sampled)."""

# The sampler lease: taken when free, kept (renewed) when it is this process's; given up only
# when it is still this process's (a plain DEL could drop another's).
_LEAD = (
    "local holder = redis.call('GET', KEYS[1]) "
    "if holder and holder ~= ARGV[1] then return 0 end "
    "redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1"
)
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end"


@dataclass(frozen=True, slots=True)
class Sample:
    """A campaign's state hash (``state``) as it was at ``at_ms``."""

    at_ms: int
    state: dict[str, str]


async def sample(store: Store, campaign_id: str) -> bool:
    """Take this minute's sample of one campaign; False when the minute has one already.
    Raises :class:`~xsp_middleware.errors.StoreUnavailable`."""
    keys = (store.campaign_keys(campaign_id)[1], store.history_key(campaign_id))
    args = (store.clock.arg, HISTORY_SAMPLES)
    client = store.client

    async def run() -> Any:
        try:
            return await client.evalsha(SAMPLE.sha, 2, *keys, *args)
        except NoScriptError:  # a new (or flushed) server: EVAL also caches it there
            return await client.eval(SAMPLE.text, 2, *keys, *args)

    return bool(await store.admin_call(run()))


async def history(store: Store, campaign_id: str, since_ms: int) -> list[Sample]:
    """The campaign's samples taken since ``since_ms``, oldest first."""
    entries = await store.admin_call(
        store.client.xrange(store.history_key(campaign_id), min=since_ms, max="+")
    )
    samples = []
    for _, fields in entries:
        state = {_text(k): _text(v) for k, v in fields.items()}
        taken = state.pop("t", "")
        if taken.isascii() and taken.isdigit() and len(taken) <= 15:  # else no sample of ours
            samples.append(Sample(int(taken), state))
    return samples


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class Sampler:
    """Samples every campaign once a minute while this process holds the sampler lease.

    :meth:`start` it in the event loop that serves the dashboard (the dashboard app does, at
    its first request or at lifespan start-up); :meth:`aclose` stops it and gives the lease
    up."""

    def __init__(self, store: Store, campaign_ids: Iterable[str] = ()) -> None:
        self.store = store
        self.known = sorted(set(campaign_ids))
        """The campaigns of the settings, always sampled."""
        self.lease_key = f"{store.prefix}:dashboard:sampler"
        self.token = secrets.token_hex(8)
        self.task: asyncio.Task[None] | None = None
        self._stopping = False
        self._ids: list[str] = []
        self._scanned = float("-inf")

    def start(self) -> None:
        """Start sampling in the running event loop (again if its loop has stopped)."""
        loop = asyncio.get_running_loop()
        if self.task is not None and not self.task.done() and self.task.get_loop() is loop:
            return  # (a task of a loop that has stopped is dead: start one in this one)
        self._stopping = False
        # A context of its own: started from a request, it must carry none of the request's
        # context variables for its whole life.
        self.task = loop.create_task(self._run(), name="xsp-sampler", context=contextvars.Context())

    async def aclose(self) -> None:
        """Stop sampling; give the lease up, so another dashboard process samples next."""
        task, self.task = self.task, None
        if task is not None and task.get_loop() is asyncio.get_running_loop():
            # The flag stops it even where a library swallows the cancellation (Python 3.11's
            # wait_for can, when the call it waits on completes at that moment).
            self._stopping = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(StoreUnavailable):
            await self.store.admin_call(
                self.store.client.eval(_RELEASE, 1, self.lease_key, self.token)
            )

    async def sample_once(self) -> int:
        """One round: if this process holds (or takes) the lease, this minute's sample of every
        campaign. Returns how many were written. Raises StoreUnavailable after trying every
        campaign (on a cluster, the shards that answer still get theirs)."""
        if not await self._lead():
            return 0
        written, failed = 0, None
        for campaign_id in await self._campaigns():
            try:
                written += await sample(self.store, campaign_id)
            except StoreUnavailable as exc:
                failed = exc
        if failed is not None:
            raise failed
        return written

    async def _run(self) -> None:
        while True:
            try:
                await self.sample_once()
            except StoreUnavailable as exc:
                logs.event(
                    "dashboard_sampler_store_unavailable",
                    logging.WARNING,
                    "xsp_middleware: dashboard: no history sample this minute, the store is "
                    "unavailable: %s",
                    exc,
                )
            except Exception as exc:
                # Sampling goes on next minute whatever one round met (a stray key, a bug):
                # the history is the dashboard's, and serving never depends on it.
                logs.event(
                    "dashboard_sampler_failed",
                    logging.ERROR,
                    "xsp_middleware: dashboard: a history round failed: %s",
                    exc,
                    error=exc,
                )
            if self._stopping:
                return
            # A second into the next minute (by this machine's clock; the sample's minute is
            # the store's): each minute gets its sample early, and once.
            await asyncio.sleep(SAMPLE_SECONDS - time.time() % SAMPLE_SECONDS + 1.0)

    async def _lead(self) -> bool:
        """Take the lease if it is free, or keep it if it is ours: one atomic call."""
        held = await self.store.admin_call(
            self.store.client.eval(_LEAD, 1, self.lease_key, self.token, LEASE_MS)
        )
        return bool(held)

    async def _campaigns(self) -> list[str]:
        now = time.monotonic()
        if now - self._scanned >= RESCAN_SECONDS:
            self._ids = sorted(set(self.known) | set(await self.store.list_campaigns()))
            self._scanned = now
        return self._ids
