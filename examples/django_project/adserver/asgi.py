"""ASGI entry point (``uvicorn --app-dir examples/django_project adserver.asgi:application``):
the middleware runs as a coroutine on the asyncio store, and the operator dashboard is served
at /dashboard/ on the same store (``XSP_DASHBOARD_TOKEN`` turns its actions on)."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "adserver.settings")

django_application = get_asgi_application()

from xsp_middleware.dashboard import dashboard_app, with_dashboard  # noqa: E402
from xsp_middleware.django.conf import settings_from_django  # noqa: E402

application = with_dashboard(django_application, dashboard_app(settings_from_django()))
