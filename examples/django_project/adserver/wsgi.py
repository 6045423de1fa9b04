"""WSGI entry point (``manage.py runserver``, gunicorn): the middleware runs synchronously."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "adserver.settings")

application = get_wsgi_application()
