"""xsp-middleware: exact, one-round-trip frequency caps and campaign budgets for ad servers.

>>> from xsp_middleware import XSPMiddleware, Settings, Campaign, FrequencyCap
"""

from .caps import FrequencyCap
from .dashboard import dashboard_app
from .decision import Decision
from .errors import (
    BudgetExceeded,
    CampaignPaused,
    ConfigError,
    FrequencyCapExceeded,
    InvalidParameter,
    NoEligibleCampaign,
    StoreUnavailable,
    XSPError,
)
from .middleware import XSPMiddleware
from .preferences import preferences_app
from .routing import ad_route, xsp_decision
from .session import UpstreamSession
from .settings import Campaign, Settings
from .signing import sign_price
from .store import Store

__all__ = [
    "BudgetExceeded",
    "Campaign",
    "CampaignPaused",
    "ConfigError",
    "Decision",
    "FrequencyCap",
    "FrequencyCapExceeded",
    "InvalidParameter",
    "NoEligibleCampaign",
    "Settings",
    "Store",
    "StoreUnavailable",
    "UpstreamSession",
    "XSPError",
    "XSPMiddleware",
    "ad_route",
    "dashboard_app",
    "preferences_app",
    "sign_price",
    "xsp_decision",
]
__version__ = "0.1.0"
