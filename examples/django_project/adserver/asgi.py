"""ASGI entry point (``uvicorn --app-dir examples/django_project adserver.asgi:application``):
the middleware runs as a coroutine on the asyncio store."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "adserver.settings")

application = get_asgi_application()
