"""The operator dashboard: spend against the pacing curve, caps and denials, and the actions
that change a campaign (pause, resume, budgets). See docs/dashboard.md.

``xsp-middleware dashboard`` serves it; :func:`dashboard_app` is the same ASGI app, to mount in
Starlette, FastAPI or (through its ASGI handler) Django.
"""

from .app import DashboardApp, dashboard_app, with_dashboard
from .history import HISTORY_SAMPLES, Sampler, history, sample

__all__ = [
    "HISTORY_SAMPLES",
    "DashboardApp",
    "Sampler",
    "dashboard_app",
    "history",
    "sample",
    "with_dashboard",
]
