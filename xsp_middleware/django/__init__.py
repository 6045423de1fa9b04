"""Django integration: exact frequency caps and campaign budgets for Django views.

Install it in ``settings.py``::

    INSTALLED_APPS += ["xsp_middleware.django"]          # the system checks (xsp.E001, ...)
    MIDDLEWARE += ["xsp_middleware.django.XSPMiddleware"]
    XSP_MIDDLEWARE = {
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "SECRET_KEY": "a-random-string-of-at-least-16-characters",
        "DEFAULT_CAPS": ["3/1h"],
        "PATHS": ["/ad"],
        "CAMPAIGNS": [{"id": "c1", "budget": "500.00", "caps": ["5/1d"], "cpm": "4.00"}],
    }

``XSP_MIDDLEWARE`` takes the names of :class:`~xsp_middleware.Settings` in upper case;
``CAMPAIGNS`` items are dicts with :class:`~xsp_middleware.Campaign`'s fields, or ``Campaign``
objects. ``XSP_*`` environment variables (``XSP_REDIS_URL``, ``XSP_SECRET_KEY``...) fill what
the dict leaves out. A bad value fails at start-up (``ImproperlyConfigured``, also a
``ConfigError``), never on a request.

**Which requests are guarded.** The decision is taken once Django has resolved the view
(``process_view``), before the view runs, in one store round trip:

* a view decorated with :func:`ad_view` is always guarded; its campaign may come from a URL
  keyword argument named like the campaign parameter (``path("ad/<str:campaign_id>", view)``);
* any other view is guarded when the path matches ``PATHS`` and the query string carries the
  campaign parameter (``GET /ad?campaign_id=c1&cpm=2.50``). Every other request passes through
  with no store call.

**What the view sees.** When the impression is reserved, ``request.xsp`` is the
:class:`~xsp_middleware.Decision` (campaign, cost, remaining caps and budget). A denial answers
``204`` with ``X-XSP-Decision: <reason>`` without running the view (with ``"ON_DENIED":
"pass"`` the view runs and ``request.xsp.allowed`` is ``False``). Bad input answers ``400``
``application/problem+json``. On requests that are not ad requests ``request.xsp`` is unset:
use ``getattr(request, "xsp", None)``.

**Confirm or release.** A 2xx response keeps the reservation; any other status, an exception
(which Django turns into a 500) or a cancelled request (an ASGI client that went away) releases
it. A plain 2xx response is kept once the view returned it: WSGI gives no way to see whether
the client got it. A streaming response (``StreamingHttpResponse``, ``FileResponse``; sync or
async iterator) is kept only when its body is iterated to the end; a body that raises part-way,
or is closed before its end (``response.close()``, which servers call), releases it. Its body is
wrapped for that, so a ``FileResponse`` is not handed to ``wsgi.file_wrapper`` (sendfile).

**Sync and async.** Under WSGI the middleware runs synchronously on a blocking store (one
EVALSHA per decision, no event loop, no ``async_to_sync``); under ASGI it runs as a coroutine
(its ``process_view`` too) on the asyncio store. Django calls ``response.close()``
synchronously, so the release of a streaming body closed early uses the blocking store in both.
Behind a sync-only middleware Django runs it synchronously, also under ASGI.

Outside ``MIDDLEWARE``, ``XSPMiddleware(get_response, settings=Settings(...))`` takes ready
settings instead of ``XSP_MIDDLEWARE``.

**System checks** (``manage.py check``; registered by the app config):

* ``xsp.E001``: ``XSP_MIDDLEWARE`` (or an ``XSP_*`` variable) is invalid, or has unknown keys;
* ``xsp.E002``: the Redis store does not answer a ping;
* ``xsp.W001``: ``SECRET_KEY`` is unset (user ids are hashed with the public development key)
  on a site with ``DEBUG = False``;
* ``xsp.W002``: the app is installed but ``XSPMiddleware`` is not in ``MIDDLEWARE``.
"""

from __future__ import annotations

from .conf import XSPImproperlyConfigured, settings_from_dict, settings_from_django
from .middleware import XSPMiddleware, ad_view

__all__ = [
    "XSPImproperlyConfigured",
    "XSPMiddleware",
    "ad_view",
    "settings_from_dict",
    "settings_from_django",
]
