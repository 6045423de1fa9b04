"""Django system checks (``manage.py check``), registered by the app config.

* ``xsp.E001``: ``XSP_MIDDLEWARE`` (or an ``XSP_*`` environment variable) is invalid;
* ``xsp.E002``: the Redis store does not answer a ping (skipped for the embedded store);
* ``xsp.W001``: no ``SECRET_KEY`` (the public development key hashes user ids), DEBUG off;
* ``xsp.W002``: the app is installed but ``XSPMiddleware`` is not in ``MIDDLEWARE``.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings as django_settings  # type: ignore[import-untyped,unused-ignore]
from django.core import checks  # type: ignore[import-untyped,unused-ignore]
from django.utils.module_loading import (  # type: ignore[import-untyped,unused-ignore]
    import_string,
)
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from ..cli.doctor import safe_url
from ..errors import ConfigError
from ..settings import DEVELOPMENT_SECRET_KEY, Settings
from ..store.topology import sync_client
from ..store_url import parse_store_url
from .conf import SETTING, settings_from_django

TAG = "xsp"
MIDDLEWARE_PATH = "xsp_middleware.django.XSPMiddleware"


def register() -> None:
    """Register the checks (idempotent: Django keeps a set)."""
    checks.register(check_settings, TAG)
    checks.register(check_store, TAG)


def _settings() -> Settings | None:
    try:
        return settings_from_django(django_settings)
    except ConfigError:
        return None


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    try:
        s = settings_from_django(django_settings)
    except ConfigError as exc:
        return [
            checks.Error(
                str(exc),
                hint=f"{SETTING} takes the names of xsp_middleware.Settings in upper case, "
                "e.g. {'REDIS_URL': 'redis://127.0.0.1:6379/0', 'DEFAULT_CAPS': ['3/1h']}; "
                "XSP_* environment variables fill what it leaves out.",
                id="xsp.E001",
            )
        ]
    messages: list[Any] = []
    if s.secret_key in (None, DEVELOPMENT_SECRET_KEY) and not django_settings.DEBUG:
        messages.append(
            checks.Warning(
                "xsp-middleware hashes user ids with the public development key: SECRET_KEY "
                "is unset on a site with DEBUG = False.",
                hint=f"Set {SETTING}['SECRET_KEY'] (or XSP_SECRET_KEY) to a random string of "
                "at least 16 characters, the same in every process.",
                id="xsp.W001",
            )
        )
    if not _middleware_installed():
        messages.append(
            checks.Warning(
                "xsp_middleware.django is installed, but no request is guarded: XSPMiddleware "
                "is not in MIDDLEWARE.",
                hint=f"Add {MIDDLEWARE_PATH!r} to MIDDLEWARE.",
                id="xsp.W002",
            )
        )
    return messages


def check_store(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    s = _settings()
    if s is None:
        return []  # xsp.E001 says why
    problem = store_problem(s)
    if problem is None:
        return []
    return [
        checks.Error(
            f"the xsp-middleware store {safe_url(s.redis_url or '')} does not answer: {problem}",
            hint=f"Start Redis, or fix {SETTING}['REDIS_URL'] (or XSP_REDIS_URL). "
            "`xsp-middleware doctor` checks the store in depth.",
            id="xsp.E002",
        )
    ]


def store_problem(s: Settings) -> str | None:
    """Why the store does not answer a ping, or None (always None for the embedded store)."""
    url = s.redis_url or "memory://"
    if url.startswith("memory://"):
        return None
    timeout = min(2.0, max(0.5, float(s.store_timeout) * 10))
    options = {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    try:
        client = sync_client(parse_store_url(url), options)
    except (RedisError, RedisClusterException, OSError, ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        client.ping()
    except (RedisError, RedisClusterException, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
    return None


def _middleware_installed() -> bool:
    for path in getattr(django_settings, "MIDDLEWARE", None) or ():
        if path == MIDDLEWARE_PATH:
            return True
        try:
            cls = import_string(path)
        except Exception:  # Django's own checks report middleware that does not import
            continue
        from .middleware import XSPMiddleware

        if isinstance(cls, type) and issubclass(cls, XSPMiddleware):
            return True
    return False
