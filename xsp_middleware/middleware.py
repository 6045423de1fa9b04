"""``XSPMiddleware``: pure ASGI. request -> facts -> reserve (one round trip) -> handler ->
confirm (a 2xx response that completed) or release (anything else)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import unquote

from .decision import Decision
from .errors import InvalidParameter, StoreUnavailable
from .money import parse_cpm
from .settings import Rules, Settings, campaign_id_problem
from .store import Reservation, Store

logger = logging.getLogger("xsp_middleware")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_USER_ID_BYTES = 256
"""Longer user ids count as anonymous: no real id is that long, and it bounds HMAC work."""

_warned: set[str] = set()


def warn_once(key: str, message: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)


def cookie_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first non-empty value of cookie ``name`` across every Cookie header, or None.

    Duplicates: the first occurrence wins (browsers send the most specific path first).
    Surrounding double quotes are removed. Never raises on hostile input.
    """
    for key, value in headers:
        if key != b"cookie":
            continue
        for part in value.split(b";"):
            k, sep, v = part.partition(b"=")
            if sep and k.strip() == name:
                v = v.strip()
                if len(v) >= 2 and v[0] == 34 and v[-1] == 34:  # '"'
                    v = v[1:-1]
                if v:
                    return v
    return None


def query_values(query: bytes, first: str, second: str) -> tuple[set[str], set[str]]:
    """The distinct values of two parameters, decoded exactly as ``urllib.parse.parse_qsl``
    (which Starlette uses) decodes them, so the handler's ``query_params`` agree with ours.
    Only the two wanted names are decoded: most of an ad request's query is never touched."""
    firsts: set[str] = set()
    seconds: set[str] = set()
    for pair in query.decode("latin-1").split("&"):
        if not pair:
            continue
        name, _, value = pair.partition("=")
        if "%" in name or "+" in name:
            name = unquote(name.replace("+", " "))
        if name == first:
            target = firsts
        elif name == second:
            target = seconds
        else:
            continue
        if "%" in value or "+" in value:
            value = unquote(value.replace("+", " "))
        target.add(value)
    return firsts, seconds


class _Facts:
    __slots__ = ("campaign_id", "cost_units", "user_key")

    def __init__(self, campaign_id: str, cost_units: int | None, user_key: str | None) -> None:
        self.campaign_id = campaign_id
        self.cost_units = cost_units
        self.user_key = user_key


class XSPMiddleware:
    """Guard ad requests with exact frequency caps and budgets.

    >>> from starlette.applications import Starlette
    >>> app = XSPMiddleware(Starlette(), redis_url="memory://")

    Options are :class:`Settings` fields as keyword arguments (they win over ``XSP_*``
    environment variables), or a ready ``settings=Settings(...)``.
    """

    def __init__(self, app: ASGIApp, settings: Settings | None = None, **options: Any) -> None:
        if settings is None:
            settings = Settings.from_env(**options)
        elif options:
            settings = settings.replace(**options)
        self.app = app
        self.settings = settings
        self.rules = Rules.from_settings(settings)
        self.store = Store(self.rules)
        self._paths = self.rules.paths
        self._campaign_param = settings.campaign_param
        self._campaign_needle = settings.campaign_param.encode()
        self._price_param = settings.price_param
        self._cookie = settings.user_cookie.encode()
        self._pass_denied = settings.on_denied == "pass"
        if self.rules.uses_development_key:
            warn_once(
                "dev-key",
                "xsp_middleware: secret_key is unset; user ids are hashed with the fixed "
                "development key. Set XSP_SECRET_KEY in production.",
            )
        if self.store.is_memory:
            warn_once(
                "memory",
                "xsp_middleware: using the embedded in-memory store; its state is per process, "
                "so several workers each enforce caps and budgets on their own. Set "
                "XSP_REDIS_URL to share state.",
            )

    # -- which requests are guarded --------------------------------------------------------

    def _guards_path(self, path: str) -> bool:
        for prefix in self._paths or ():
            if path == prefix or path.startswith(prefix if prefix.endswith("/") else prefix + "/"):
                return True
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (
            self._paths is not None and not self._guards_path(scope["path"])
        ):
            await self.app(scope, receive, send)
            return
        query: bytes = scope.get("query_string", b"")
        if self._campaign_needle not in query and b"%" not in query:
            await self.app(scope, receive, send)
            return
        campaign_values, prices = query_values(query, self._campaign_param, self._price_param)
        if not campaign_values:
            await self.app(scope, receive, send)
            return
        try:
            facts = self._facts(scope, campaign_values, prices)
        except InvalidParameter as exc:
            await _send_problem(send, exc)
            return
        decision, reservation = await self._decide(facts)
        if not decision.allowed and not self._pass_denied:
            await _send_denied(send, decision.reason)
            return
        scope.setdefault("state", {})["xsp"] = decision
        if reservation is None:
            await self.app(scope, receive, send)
            return
        await self._run_reserved(scope, receive, send, reservation)

    # -- request -> facts -------------------------------------------------------------------

    def _facts(self, scope: Scope, campaigns: set[str], prices: set[str]) -> _Facts:
        field = self._campaign_param
        if len(campaigns) > 1:
            raise InvalidParameter(field, "given more than once with different values")
        (campaign_id,) = campaigns
        problem = campaign_id_problem(campaign_id)
        if problem is not None:
            raise InvalidParameter(field, problem)
        cost_units: int | None = None
        if len(prices) > 1:
            raise InvalidParameter(self._price_param, "given more than once with different values")
        if prices:
            (price,) = prices
            cost_units = parse_cpm(
                price, field=self._price_param, max_cpm_units=self.rules.max_cpm_cost_units
            )
        user_id = cookie_value(scope.get("headers", ()), self._cookie)
        user_key = None
        if user_id is not None and len(user_id) <= MAX_USER_ID_BYTES:
            user_key = self.store.user_key(user_id)
        return _Facts(campaign_id, cost_units, user_key)

    # -- facts -> decision (one round trip) ------------------------------------------------

    async def _decide(self, facts: _Facts) -> tuple[Decision, Reservation | None]:
        rule = self.rules.rule_for(facts.campaign_id)
        try:
            r = await self.store.reserve(facts.campaign_id, facts.user_key, facts.cost_units, rule)
        except StoreUnavailable as exc:
            return self._degraded(facts, rule.cost_units, str(exc)), None
        except Exception as exc:  # our bug must not become a 500: log it, apply the policy
            logger.exception("xsp_middleware: unexpected error while deciding")
            return self._degraded(facts, rule.cost_units, f"internal error: {exc!r}"), None
        decision = Decision(
            allowed=r.reserved,
            reason=r.reason,
            campaign_id=facts.campaign_id,
            cost_units=r.cost_units,
            remaining_impressions=r.remaining_impressions,
            remaining_budget_units=r.remaining_budget_units,
            anonymous=facts.user_key is None,
        )
        return decision, (r if r.reserved else None)

    def _degraded(self, facts: _Facts, default_cost: int, why: str) -> Decision:
        # Caps fail open by default (a missed cap costs little); the budget fails closed by
        # default (an overspend costs money). Serving needs both checks to allow it.
        allowed = self.settings.budget_fail_open and (
            self.settings.frequency_fail_open or facts.user_key is None
        )
        return Decision(
            allowed=allowed,
            reason="served" if allowed else "store_unavailable",
            campaign_id=facts.campaign_id,
            cost_units=facts.cost_units if facts.cost_units is not None else default_cost,
            remaining_impressions=None,
            remaining_budget_units=None,
            anonymous=facts.user_key is None,
            degraded=True,
            degraded_reason=why,
        )

    # -- handler -> confirm or release -----------------------------------------------------

    async def _run_reserved(
        self, scope: Scope, receive: Receive, send: Send, reservation: Reservation
    ) -> None:
        status = 0
        completed = False
        disconnected = False
        trailers = False

        async def observe_receive() -> Message:
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.disconnect" and not completed:
                disconnected = True
            return message

        async def observe_send(message: Message) -> None:
            nonlocal status, completed, trailers
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                trailers = message.get("trailers", False)
            await send(message)  # raises (OSError) when the client has gone away
            if kind == "http.response.body" or kind == "http.response.zerocopysend":
                if not message.get("more_body", False) and not trailers:
                    completed = True
            elif kind == "http.response.pathsend" or (
                kind == "http.response.trailers" and not message.get("more_trailers", False)
            ):
                completed = True

        try:
            await self.app(scope, observe_receive, observe_send)
        finally:
            # Confirming costs nothing: the reservation already stands. Anything but a completed
            # 2xx gives it back. Shielded, so a cancelled request still releases.
            if not (completed and 200 <= status < 300 and not disconnected):
                await asyncio.shield(self._release(reservation))

    async def _release(self, reservation: Reservation) -> None:
        try:
            await self.store.release(reservation)
        except StoreUnavailable as exc:
            # The spend stays counted: under-delivery, never overspend.
            logger.warning(
                "xsp_middleware: could not release a reservation of campaign %s: %s",
                reservation.campaign_id,
                exc,
            )


async def _send_denied(send: Send, reason: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 204,
            "headers": [(b"x-xsp-decision", reason.encode())],
        }
    )
    await send({"type": "http.response.body", "body": b""})


_PROBLEM_TYPE = "urn:xsp-middleware:problem:invalid-parameter"


async def _send_problem(send: Send, exc: InvalidParameter) -> None:
    body = json.dumps(
        {
            "type": _PROBLEM_TYPE,
            "title": "Invalid ad request parameter",
            "detail": exc.detail,
            "field": exc.field,
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
