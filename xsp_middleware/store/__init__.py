"""The store: reservations and campaign admin on Redis, Redis Cluster, Sentinel or the
embedded in-memory server.

One I/O-free protocol (``protocol.py``: keys, call builders, typed replies, the shared
reserve plans) is driven by two thin drivers: ``aio.py`` (asyncio, auto-pipelined) and
``sync.py`` (blocking, for WSGI threads). ``docs/architecture.md`` draws the flow."""

from .admin import CampaignView, cap_windows, day_span
from .aio import Store
from .protocol import Reservation
from .sync import SyncStore

__all__ = ["CampaignView", "Reservation", "Store", "SyncStore", "cap_windows", "day_span"]
