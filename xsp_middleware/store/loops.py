"""What one event loop holds of a store (its connections and budget leases), and what the
lease code needs of the asyncio store (:class:`Host`), so that it depends on this contract and
not on the store's module."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from typing import Any, Protocol

from ..breaker import CircuitBreaker
from ..settings import Rules
from .calls import Late
from .leases import Lease
from .pipeline import AutoPipeline
from .plans import Planner
from .scripts import Script
from .shards import Shards


class LoopState:
    """One event loop's connections and budget leases."""

    __slots__ = (
        "checks",
        "client",
        "lease_client",
        "lease_seq",
        "lease_tasks",
        "leases",
        "pipeline",
        "shards",
    )

    def __init__(self, client: Any, pipeline: AutoPipeline | None, shards: Shards | None) -> None:
        self.client = client
        self.pipeline = pipeline
        self.shards = shards
        self.leases: dict[str, Lease] = {}
        """Budget leases of this event loop, per campaign (see leases.py)."""
        self.lease_tasks: set[asyncio.Task[None]] = set()
        self.lease_client = secrets.token_hex(8)
        """Names this loop's lease calls."""
        self.checks: dict[tuple[int, bytes], Any] = {}
        """A cluster's campaign checks in flight (choosing among candidates), by slot and
        arguments: concurrent decisions share one (see ``Store._send_check``)."""
        self.lease_seq = 0
        """The last sequence number of this loop's lease calls. One counter for all of them:
        a campaign's lease dropped from ``leases`` and made again never reuses a number that
        its key in the store has already recorded (the script would take it for a resend)."""


class Host(Protocol):
    """The asyncio store, as budget leasing sees it (:class:`~xsp_middleware.store.Store`)."""

    rules: Rules
    planner: Planner
    timeout: float
    is_cluster: bool
    breaker: CircuitBreaker

    def state(self) -> LoopState: ...
    def current_state(self) -> LoopState | None: ...
    def now_ms(self) -> int: ...
    def campaign_keys(self, campaign_id: str) -> tuple[str, str]: ...
    def orphan(self, late: Late) -> Callable[[Any, Any], None]: ...
    async def call_slot(self, slot: int, script: Script, nargs: int, body: bytes) -> Any: ...
    async def relearn(self, shards: Shards) -> None: ...
