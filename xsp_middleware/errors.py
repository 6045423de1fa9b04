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


class StoreUnavailable(XSPError):
    """The state store did not answer in time, or refused the connection."""


class FrequencyCapExceeded(XSPError):
    """The user has reached a frequency cap of the campaign (kept from the tutorial's API)."""


class BudgetExceeded(XSPError):
    """The campaign's budget cannot pay for this impression (kept from the tutorial's API)."""


class CampaignPaused(XSPError):
    """The campaign is paused in the store."""
