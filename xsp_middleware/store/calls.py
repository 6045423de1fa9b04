"""The calls a cluster plan sends: what ``plans.py`` and ``choice.py`` yield to a driver."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from .halves import Undo
from .protocol import Context
from .scripts import Script

Late = Callable[[Context, Any], Undo | None]
"""What a half's reply means once nobody awaits it: the release it needs, if any."""


class Call(NamedTuple):
    """One script call of a cluster plan: its slot, script, argument count and packed
    arguments, and (for a reservation's half) what its reply needs if it comes too late."""

    slot: int
    script: Script
    nargs: int
    body: bytes
    late: Late | None = None


class Batch(NamedTuple):
    """Calls a plan sends together (one round trip of latency). The driver answers with one
    ``(node, breaker ticket, reply or StoreUnavailable)`` per call, in order, having re-sent
    once any call the cluster redirected. Only a ``decision`` may be a half-open probe."""

    calls: list[Call]
    decision: bool
    context: Context | None = None
    """The reservation its late replies release (None: the decision's own)."""


Answer = tuple[str, int, Any]
