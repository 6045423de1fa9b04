"""Settings of the example Django ad server.

xsp-middleware is configured by ``XSP_MIDDLEWARE``; the ``XSP_*`` environment variables fill
what it leaves out: ``XSP_REDIS_URL`` (unset: the embedded in-memory store), ``XSP_SECRET_KEY``,
``XSP_DEFAULT_CAPS``, ``XSP_CAMPAIGNS`` and so on.
"""

from __future__ import annotations

import os

DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "django-insecure-example-ad-server-only")
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]", "testserver"]

INSTALLED_APPS = ["xsp_middleware.django"]  # the system checks: xsp.E001, xsp.E002, xsp.W001...
MIDDLEWARE = ["xsp_middleware.django.XSPMiddleware"]
ROOT_URLCONF = "adserver.urls"
WSGI_APPLICATION = "adserver.wsgi.application"
DATABASES: dict[str, dict[str, str]] = {}  # no database: the ad server's state is in Redis
USE_TZ = True

XSP_MIDDLEWARE = {
    # Guard GET /ad?campaign_id=... (and the decorated GET /ad/<campaign_id>). Everything else,
    # such as REDIS_URL and SECRET_KEY, comes from the XSP_* environment variables.
    "PATHS": ["/ad"],
}
