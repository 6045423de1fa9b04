"""``xsp-middleware dashboard``: the operator dashboard on its own server (uvicorn), reading
the store of ``XSP_REDIS_URL`` (``--redis-url``). See docs/dashboard.md."""

from __future__ import annotations

import sys

from ..errors import XSPError
from ..settings import Settings
from ..sites import is_loopback
from ..store_url import redacted


def serve_dashboard(settings: Settings, host: str, port: int) -> int:
    """Serve the dashboard until interrupted. Refuses a non-loopback ``host`` without a
    ``dashboard_token``: without one, the dashboard is read-only and for this machine only."""
    if settings.dashboard_token is None and not is_loopback(host):
        raise XSPError(
            f"the dashboard serves {host} only with a token: set XSP_DASHBOARD_TOKEN (at least "
            "16 characters), or serve on 127.0.0.1"
        )
    try:
        import uvicorn
    except ImportError:
        raise XSPError(
            "the dashboard needs uvicorn: pip install 'xsp-middleware[dashboard]'"
        ) from None
    from ..dashboard import dashboard_app

    app = dashboard_app(settings)
    if app.store.is_memory:
        print(
            "warning: no XSP_REDIS_URL/--redis-url: this dashboard reads an embedded store of its "
            "own, which no ad server writes to. To see the demo's campaigns, run "
            "'xsp-middleware demo --serve' (its dashboard is at /dashboard/).",
            file=sys.stderr,
        )
    mode = "actions need the token" if settings.dashboard_token else "read-only, no token set"
    where = f"[{host}]" if ":" in host else host  # an IPv6 address, as a URL writes it
    print(
        f"Serving the dashboard of {redacted(app.store.url)} on http://{where}:{port}/ ({mode}; "
        "Ctrl-C to stop)"
    )
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level="info", lifespan="on")
    )
    server.run()
    return 0
