"""A circuit breaker for the store: stop waiting on a dead Redis, probe it for recovery.

Closed: every call goes to the store. After ``failures`` consecutive failures it opens: calls
fail at once (the failure policy decides, no request waits). After ``reset_after`` seconds one
call is let through as a probe: a success closes the breaker, a failure opens it again.
"""

from __future__ import annotations

import logging
import threading
import time

from . import observe

logger = logging.getLogger("xsp_middleware")


class CircuitBreaker:
    """Shared by every event loop and thread of one store (a process-wide view of its health)."""

    def __init__(self, failures: int, reset_after: float) -> None:
        self.failures = failures
        self.reset_after = reset_after
        self._consecutive = 0
        self._opened_at: float | None = None
        self._probing = False
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def allow(self) -> bool:
        """May a call go to the store now? (Closed: yes. Open: only one probe, once due.)"""
        opened_at = self._opened_at
        if opened_at is None or self.failures <= 0:
            return True
        with self._lock:
            if (
                self._opened_at is not None
                and not self._probing
                and time.monotonic() - self._opened_at >= self.reset_after
            ):
                self._probing = True
                return True
            return self._opened_at is None

    def success(self) -> None:
        if self._consecutive == 0 and self._opened_at is None:
            return  # the common case: nothing to change, no lock
        with self._lock:
            was_open = self._opened_at is not None
            self._consecutive = 0
            self._opened_at = None
            self._probing = False
        if was_open:
            logger.info("store circuit closed", extra={"xsp_event": "circuit_closed"})
            if observe.current is not None:
                observe.current.circuit(False)

    def failure(self) -> None:
        if self.failures <= 0:
            return
        with self._lock:
            self._consecutive += 1
            opened = False
            if self._probing:  # the probe failed: stay open for another period
                self._probing = False
                self._opened_at = time.monotonic()
            elif self._opened_at is None and self._consecutive >= self.failures:
                self._opened_at = time.monotonic()
                opened = True
        if opened:
            if observe.current is not None:
                observe.current.circuit(True)
            logger.warning(
                "store circuit opened after %d consecutive failures",
                self.failures,
                extra={"xsp_event": "circuit_opened", "failures": self.failures},
            )
