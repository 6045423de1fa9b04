"""User preferences: opt-out, blocked campaigns and erasure, in the user's own hash.

They live next to the user's cap logs, in the hash ``Store.user_key(user_id)``, so the reserve
script reads them in the same round trip as the caps:

* ``!o``: ``"1"`` when the user opted out (absent otherwise);
* ``!b``: the blocked campaign ids, comma-separated (absent when none).

Every write is one small Lua script (``lua/prefs.lua``): atomic, no duplicates, and it keeps the
hash alive at least :data:`PREFERENCES_TTL_MS` (a preference outlives cap windows), extending the
TTL but never shortening it.

Two ways in:

* an admin API on a :class:`~xsp_middleware.store.Store` (what the CLI's ``user opt-out``,
  ``user opt-in``, ``user block``, ``user unblock`` and ``user forget`` use);
* :func:`preferences_app`, a mountable ASGI app acting for the user of the request's user
  cookie, with CSRF checks on every state-changing request.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError

from . import logs
from .core.admission import PROBLEM_TYPE
from .core.guard import warn_once
from .core.request import MAX_USER_ID_BYTES, cookie_value
from .errors import StoreUnavailable, XSPError
from .settings import Rules, Settings, campaign_id_problem, validate_campaign_id
from .sites import BodyTooLarge, ClientGone, cross_site, mounted_path, normal_origin, read_body
from .store import Store
from .store.protocol import prefs_reply
from .store.scripts import PREFS
from .types import Headers, Receive, Scope, Send

__all__ = [
    "BLOCKED_FIELD",
    "MAX_BLOCKED_CAMPAIGNS",
    "OPTED_OUT_FIELD",
    "PREFERENCES_TTL_MS",
    "Preferences",
    "PreferencesApp",
    "TooManyBlockedCampaigns",
    "block_campaign",
    "forget_user",
    "get_preferences",
    "preferences_app",
    "set_opted_out",
    "unblock_campaign",
]

logger = logging.getLogger("xsp_middleware")

OPTED_OUT_FIELD = "!o"
BLOCKED_FIELD = "!b"
PREFERENCES_TTL_MS = 400 * 86400 * 1000
"""A stored preference keeps the user's hash alive at least this long (ms)."""
MAX_BLOCKED_CAMPAIGNS = 1000
"""The most campaigns one user may block: the reserve script reads the list on every decision."""


class TooManyBlockedCampaigns(XSPError, ValueError):
    """A block would make the user's list longer than :data:`MAX_BLOCKED_CAMPAIGNS`."""


@dataclass(frozen=True, slots=True)
class Preferences:
    """What a user chose. ``blocked_campaigns`` is sorted and holds no duplicates."""

    opted_out: bool = False
    blocked_campaigns: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"opted_out": self.opted_out, "blocked_campaigns": list(self.blocked_campaigns)}


def _text(value: bytes | str | None) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _parse(opted: bytes | str | None, blocked: bytes | str | None) -> Preferences:
    """The two stored fields as Preferences. Whatever is not a valid campaign id (a hand-edited
    hash) is left out rather than shown."""
    ids = {i for i in (_text(blocked) or "").split(",") if campaign_id_problem(i) is None}
    return Preferences(opted_out=_text(opted) == "1", blocked_campaigns=tuple(sorted(ids)))


# -- the admin API ----------------------------------------------------------------------------


async def get_preferences(store: Store, user_id: str | bytes) -> Preferences:
    """The user's preferences (defaults when nothing is stored). Raises StoreUnavailable."""
    key = store.user_key(user_id)
    opted, blocked = await store.admin_call(store.client.hmget(key, OPTED_OUT_FIELD, BLOCKED_FIELD))
    return _parse(opted, blocked)


async def _write(store: Store, user_id: str | bytes, op: str, campaign_id: str = "") -> Preferences:
    key = store.user_key(user_id)
    args = (op, campaign_id, PREFERENCES_TTL_MS, MAX_BLOCKED_CAMPAIGNS)
    client = store.client

    async def run() -> Any:
        try:
            return await client.evalsha(PREFS.sha, 1, key, *args)
        except NoScriptError:  # a new (or flushed) server: EVAL also caches it there
            return await client.eval(PREFS.text, 1, key, *args)

    reply = prefs_reply(await store.admin_call(run()))
    opted, blocked = reply.opted_out, reply.blocked
    if reply.status == 0:
        raise TooManyBlockedCampaigns(
            f"a user may block at most {MAX_BLOCKED_CAMPAIGNS} campaigns; unblock some first"
        )
    return _parse(opted or None, blocked or None)


async def set_opted_out(store: Store, user_id: str | bytes, value: bool) -> Preferences:
    """Opt the user out (``True``) or back in (``False``); returns the new preferences."""
    return await _write(store, user_id, "optout" if value else "optin")


async def block_campaign(store: Store, user_id: str | bytes, campaign_id: str) -> Preferences:
    """Never show the user this campaign. Idempotent. Raises ConfigError for a bad id and
    :class:`TooManyBlockedCampaigns` beyond :data:`MAX_BLOCKED_CAMPAIGNS`."""
    return await _write(store, user_id, "block", validate_campaign_id(campaign_id))


async def unblock_campaign(store: Store, user_id: str | bytes, campaign_id: str) -> Preferences:
    """Undo :func:`block_campaign`. Idempotent. Raises ConfigError for a bad id."""
    return await _write(store, user_id, "unblock", validate_campaign_id(campaign_id))


async def forget_user(store: Store, user_id: str | bytes) -> bool:
    """Erase everything stored for the user (preferences and cap logs: the whole hash).
    Returns whether anything was stored."""
    return bool(await store.admin_call(store.client.delete(store.user_key(user_id))))


# -- the ASGI app -----------------------------------------------------------------------------

MAX_BODY_BYTES = 4096
_ROOT = "/preferences"
_BLOCKED = "/preferences/blocked-campaigns/"
_ROOT_METHODS: tuple[str, ...] = ("GET", "HEAD", "PUT", "DELETE", "OPTIONS")
_BLOCKED_METHODS: tuple[str, ...] = ("POST", "DELETE", "OPTIONS")
_UNSAFE = frozenset({"PUT", "POST", "DELETE"})
_PROBLEM = "urn:xsp-middleware:problem:"


class _Problem(Exception):
    """An answer other than success, as problem+json."""

    def __init__(
        self,
        status: int,
        kind: str,
        title: str,
        detail: str,
        field: str | None = None,
        headers: Headers | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.type = PROBLEM_TYPE if kind == "invalid-parameter" else _PROBLEM + kind
        self.title = title
        self.detail = detail
        self.field = field
        self.headers = headers or []


def _invalid(detail: str, field: str | None) -> _Problem:
    return _Problem(422, "invalid-parameter", "Invalid preferences request", detail, field)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise _invalid(f"{name[:40]!r} is given more than once", name[:64])
        result[name] = value
    return result


def _opted_out_from(body: bytes) -> bool:
    """The ``opted_out`` of a PUT body: exactly ``{"opted_out": true|false}``."""
    try:
        data = json.loads(body, object_pairs_hook=_reject_duplicates)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, deep nesting
        raise _invalid('the body must be a JSON object such as {"opted_out": true}', None) from None
    if not isinstance(data, dict):
        raise _invalid('the body must be a JSON object such as {"opted_out": true}', None)
    extra = sorted(set(data) - {"opted_out"})
    if extra:
        raise _invalid(f"unknown field {extra[0][:40]!r}; only opted_out may be set", extra[0][:64])
    if "opted_out" not in data:
        raise _invalid("opted_out is required", "opted_out")
    if not isinstance(data["opted_out"], bool):
        raise _invalid("opted_out must be true or false", "opted_out")
    return data["opted_out"]


class PreferencesApp:
    """The preferences of the user in the request's user cookie, as a small JSON API.

    Routes, relative to where the app is mounted:

    * ``GET /preferences``: ``{"opted_out": bool, "blocked_campaigns": [...]}``;
    * ``PUT /preferences`` with ``{"opted_out": bool}``: the new preferences;
    * ``POST``/``DELETE /preferences/blocked-campaigns/{campaign_id}``: block, unblock;
    * ``DELETE /preferences``: erase everything stored for the user (204).

    State-changing requests from another site are refused (403): a ``Sec-Fetch-Site`` header
    must say ``same-origin`` or ``none``, and an ``Origin`` header must be the request's own
    origin, unless the ``Origin`` is listed in ``preferences_origins`` (which also get CORS
    answers). Requests with neither header (non-browser clients) pass.
    """

    def __init__(self, settings: Settings | None = None, **options: Any) -> None:
        if settings is None:
            settings = Settings.from_env(**options)
        elif options:
            settings = settings.replace(**options)
        self.settings = settings
        self.rules = Rules.from_settings(settings)
        self.store = Store(self.rules)
        self.cookie = settings.user_cookie.encode()
        self.origins = frozenset(normal_origin(o) for o in settings.preferences_origins)
        if self.rules.uses_development_key:
            warn_once(
                "dev-key",
                "xsp_middleware: secret_key is unset; user ids are hashed with the fixed "
                "development key. Set XSP_SECRET_KEY in production.",
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":  # served on its own: nothing to start, nothing to stop
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if kind != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        headers: Headers = list(scope.get("headers") or [])
        cors = self._cors_headers(headers)
        head = scope.get("method") == "HEAD"  # methods are case-sensitive (RFC 9110)
        try:
            status, body, extra = await self._handle(scope, receive, headers)
        except _Problem as problem:
            payload = {
                "type": problem.type,
                "title": problem.title,
                "detail": problem.detail,
                "field": problem.field,
            }
            await _respond(
                send,
                problem.status,
                json.dumps(payload).encode(),
                b"application/problem+json",
                problem.headers + cors,
                head,
            )
            return
        content_type = None if status == 204 else b"application/json"
        await _respond(send, status, body, content_type, extra + cors, head)

    # -- routing --------------------------------------------------------------------------

    async def _handle(
        self, scope: Scope, receive: Receive, headers: Headers
    ) -> tuple[int, bytes, Headers]:
        path = mounted_path(scope)
        method = str(scope.get("method", "GET"))
        campaign_id: str | None = None
        if path == _ROOT:
            allowed = _ROOT_METHODS
        elif path.startswith(_BLOCKED) and len(path) > len(_BLOCKED):
            allowed = _BLOCKED_METHODS
            campaign_id = path[len(_BLOCKED) :]
        else:
            raise _Problem(404, "not-found", "Not found", "no such preferences resource")
        if method not in allowed:
            raise _Problem(
                405,
                "method-not-allowed",
                "Method not allowed",
                f"{method[:16]} is not allowed here; use {', '.join(allowed)}",
                headers=[(b"allow", ", ".join(allowed).encode())],
            )
        if method == "OPTIONS":
            return 204, b"", [(b"allow", ", ".join(allowed).encode())]
        if method in _UNSAFE:
            self._check_same_site(scope, headers)
        user_id = cookie_value(headers, self.cookie)
        if user_id is None or len(user_id) > MAX_USER_ID_BYTES:
            raise _Problem(
                401,
                "unauthenticated",
                "No user",
                f"the request carries no usable {self.settings.user_cookie} cookie",
            )
        if campaign_id is not None:
            problem = campaign_id_problem(campaign_id)
            if problem is not None:
                raise _invalid(f"campaign id {problem}", "campaign_id")
        try:
            status, body = await self._act(method, campaign_id, user_id, receive, headers)
            return status, body, []
        except StoreUnavailable as exc:
            logs.event(
                "preferences_store_unavailable",
                logging.WARNING,
                "xsp_middleware: preferences: the store is unavailable: %s",
                exc,
            )
            raise _Problem(
                503,
                "store-unavailable",
                "Store unavailable",
                "preferences cannot be read or saved right now; try again later",
                headers=[(b"retry-after", b"1")],
            ) from None

    async def _act(
        self,
        method: str,
        campaign_id: str | None,
        user_id: bytes,
        receive: Receive,
        headers: Headers,
    ) -> tuple[int, bytes]:
        store = self.store
        if campaign_id is not None:
            try:
                if method == "POST":
                    prefs = await block_campaign(store, user_id, campaign_id)
                else:
                    prefs = await unblock_campaign(store, user_id, campaign_id)
            except TooManyBlockedCampaigns as exc:
                raise _Problem(
                    409, "too-many-blocked", "Too many blocked campaigns", str(exc), "campaign_id"
                ) from None
        elif method in ("GET", "HEAD"):
            prefs = await get_preferences(store, user_id)
        elif method == "PUT":
            body = await _read_body(receive, headers)
            prefs = await set_opted_out(store, user_id, _opted_out_from(body))
        else:  # DELETE /preferences
            await forget_user(store, user_id)
            return 204, b""
        return 200, json.dumps(prefs.as_dict()).encode()

    # -- cross-site requests ----------------------------------------------------------------

    def _check_same_site(self, scope: Scope, headers: Headers) -> None:
        found = cross_site(scope, headers, self.origins)
        if found == "sec-fetch-site":
            raise _forbidden("Sec-Fetch-Site says this request comes from another site")
        if found == "origin":
            raise _forbidden("the Origin is neither this site nor one of preferences_origins")

    def _cors_headers(self, headers: Headers) -> Headers:
        """CORS answers for an Origin listed in ``preferences_origins`` (credentials: the user
        cookie), so those sites can read and change preferences from the browser."""
        origins = [v for k, v in headers if k == b"origin"]
        if len(origins) != 1 or normal_origin(origins[0].decode("latin-1")) not in self.origins:
            return [(b"vary", b"Origin")] if self.origins else []
        return [
            (b"access-control-allow-origin", origins[0].strip()),
            (b"access-control-allow-credentials", b"true"),
            (b"access-control-allow-methods", b"GET, PUT, POST, DELETE"),
            (b"access-control-allow-headers", b"content-type"),
            (b"access-control-max-age", b"600"),
            (b"vary", b"Origin"),
        ]


def _forbidden(detail: str) -> _Problem:
    return _Problem(403, "cross-site", "Cross-site request refused", detail)


async def _read_body(receive: Receive, headers: Headers) -> bytes:
    try:
        return await read_body(receive, headers, MAX_BODY_BYTES)
    except BodyTooLarge as exc:
        raise _Problem(413, "body-too-large", "Body too large", str(exc)) from None
    except ClientGone as exc:
        raise _invalid(str(exc), None) from None


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes | None,
    extra: Iterable[tuple[bytes, bytes]],
    head: bool,
) -> None:
    headers: Headers = [(b"cache-control", b"no-store")]
    if content_type is not None:
        headers.append((b"content-type", content_type))
        headers.append((b"x-content-type-options", b"nosniff"))
    if status != 204:
        headers.append((b"content-length", str(len(body)).encode()))
    headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head or status == 204 else body})


def preferences_app(settings: Settings | None = None, **options: Any) -> PreferencesApp:
    """A mountable ASGI app for the preferences of the user in the user cookie.

    Settings as for :class:`~xsp_middleware.XSPMiddleware`: a ready ``settings``, or
    :class:`Settings` fields as keyword arguments over ``XSP_*`` environment variables. Use the
    same ``redis_url``, ``key_prefix``, ``secret_key`` and ``user_cookie`` as the middleware.

    >>> from starlette.routing import Mount
    >>> route = Mount("/me", app=preferences_app(redis_url="memory://doc", secret_key="s" * 16))
    """
    return PreferencesApp(settings, **options)
