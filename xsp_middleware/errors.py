"""Typed errors. Every error a user can act on says what to fix."""

from __future__ import annotations


class XSPError(Exception):
    """Base class of every error raised by xsp-middleware."""


class ConfigError(XSPError, ValueError):
    """A setting, campaign definition or CLI argument is invalid.

    Raised at construction time (``XSPMiddleware(...)``, ``Settings(...)``), never per request.
    """


class InvalidParameter(XSPError, ValueError):
    """A request parameter is invalid. The middleware turns it into a 400 problem+json.

    ``field`` names the offending parameter (``cpm`` or ``campaign_id``, as the settings name them).
    """

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


STORE_FAILURES = frozenset({"timeout", "connection", "error"})
"""The kinds of :class:`StoreUnavailable` that are evidence about the store itself."""


class StoreUnavailable(XSPError):
    """The state store did not answer in time, or refused the connection.

    ``kind`` says which: ``timeout`` (no reply within ``store_timeout`` of the call reaching
    the store), ``connection`` (refused, reset, closed), ``error`` (the store answered an
    error), ``circuit_open`` (not tried: the circuit is open) or ``cancelled`` (the caller or
    the event loop went away first). Only the first three count against the circuit breaker.
    """

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind if kind is not None else _kind_of(message)

    @property
    def is_store_failure(self) -> bool:
        """Evidence about the store (not the caller's own lag, cancellation or circuit)."""
        return self.kind in STORE_FAILURES


def _kind_of(message: str) -> str:
    if "circuit" in message:
        return "circuit_open"
    if "cancelled" in message:
        return "cancelled"
    if "did not answer" in message or "Timeout" in message:
        return "timeout"
    if "answered an error" in message:
        return "error"
    return "connection"


class FrequencyCapExceeded(XSPError):
    """The user has reached a frequency cap of the campaign (kept from the tutorial's API)."""


class BudgetExceeded(XSPError):
    """The campaign's budget cannot pay for this impression (kept from the tutorial's API)."""


class CampaignPaused(XSPError):
    """The campaign is paused in the store."""


class NoEligibleCampaign(XSPError):
    """None of several candidates could be served. ``candidates``: (campaign id, reason) of
    each one evaluated, as ``Decision.candidates`` has them."""

    def __init__(self, message: str, candidates: list[tuple[str, str]]) -> None:
        super().__init__(message)
        self.candidates = candidates
