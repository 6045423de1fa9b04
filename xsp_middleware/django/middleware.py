"""``XSPMiddleware`` for Django (WSGI and ASGI) and the ``@ad_view`` decorator.

Data flow: ``process_view`` (the view is known) -> facts -> reserve (one round trip) -> the
view -> ``__call__``/``__acall__`` confirm (2xx; a streaming body iterated to its end) or
release (anything else). The rules and responses are the shared :class:`~xsp_middleware.guard.
Guard`'s; this module only translates Django's request and response objects.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpResponse  # type: ignore[import-untyped,unused-ignore]

from .. import logs
from ..caps import FrequencyCap
from ..decision import Decision
from ..errors import ConfigError, InvalidParameter
from ..guard import Facts, Guard, Reply, rules_marker, rules_of
from ..settings import Money, Settings
from ..store import Reservation
from .conf import XSPImproperlyConfigured, settings_from_django

__all__ = ["XSPMiddleware", "ad_view"]

T = TypeVar("T")

_RESERVATION = "_xsp_reservation"
_ASSIGNED = "_xsp_assigned_user_id"
_DETAILS = "_xsp_debug_headers"
_COOKIE_JOIN = re.compile(rb",(?=\s*[!#$%&'*+\-.^_`|~0-9A-Za-z]+=)")
"""Where Django's ASGI handler joined two Cookie headers: a comma before ``name=``."""
"""The request attribute that carries a reservation from ``process_view`` to the response."""


def ad_view(
    *,
    caps: Sequence[str | FrequencyCap] | None = None,
    campaign_param: str | None = None,
    price_param: str | None = None,
    cpm: Money | None = None,
    campaign: str | None = None,
) -> Callable[[T], T]:
    """Make a Django view an ad view with its own rules; every argument is optional.

    The rules beat the global settings: ``caps`` for this view's campaigns, the names of the
    campaign and price parameters, a default ``cpm``, or a fixed ``campaign``. The campaign may
    also come from a URL keyword argument named like ``campaign_param``
    (``path("ad/<str:campaign_id>", view)``). A decorated view is always guarded, even where
    ``PATHS`` would not match it; without a campaign it answers 400.

    >>> @ad_view(caps=["2/1h"])
    ... def ad(request, campaign_id): ...

    On a class-based view, decorate the class (``as_view()`` keeps it as ``view_class``). The
    view itself is returned unchanged; ``XSPMiddleware`` applies the rules in ``process_view``.
    """
    return rules_marker(
        caps=caps,
        campaign_param=campaign_param,
        price_param=price_param,
        cpm=cpm,
        campaign=campaign,
    )


class XSPMiddleware:
    """Guard Django ad views with exact frequency caps and budgets (see the package docs).

    Configured by ``settings.XSP_MIDDLEWARE`` and ``XSP_*`` environment variables; a ready
    ``settings=Settings(...)`` wins over both (for use outside ``MIDDLEWARE``).
    """

    sync_capable = True
    async_capable = True

    def __init__(
        self, get_response: Callable[[Any], Any], settings: Settings | None = None
    ) -> None:
        if settings is None:
            try:
                settings = settings_from_django()
            except ConfigError as exc:
                raise XSPImproperlyConfigured(str(exc)) from None
        self.get_response = get_response
        self.settings = settings
        self.guard = Guard(settings)
        self.store = self.guard.store
        self.async_mode = iscoroutinefunction(get_response)
        if not self.async_mode:
            self.guard.sync_store  # noqa: B018 - the blocking store, built now, not per request
        else:
            # Django awaits the middleware and its view hook: both must be coroutine functions.
            markcoroutinefunction(self)
            self.process_view = self._process_view_async  # type: ignore[method-assign]

    # -- before the view: decide -------------------------------------------------------------

    def process_view(
        self,
        request: Any,
        view_func: Callable[..., Any],
        view_args: Sequence[Any],
        view_kwargs: dict[str, Any],
    ) -> Any:
        facts = self._facts(request, view_func, view_kwargs)
        if not isinstance(facts, Facts):
            return facts  # None: not an ad request; or the 400
        started = time.perf_counter()
        decision, reservation = self.guard.decide_sync(facts)
        return self._admit(request, decision, reservation, started)

    async def _process_view_async(
        self,
        request: Any,
        view_func: Callable[..., Any],
        view_args: Sequence[Any],
        view_kwargs: dict[str, Any],
    ) -> Any:
        facts = self._facts(request, view_func, view_kwargs)
        if not isinstance(facts, Facts):
            return facts
        started = time.perf_counter()
        decision, reservation = await self.guard.decide(facts)
        return self._admit(request, decision, reservation, started)

    def _facts(
        self, request: Any, view_func: Callable[..., Any], view_kwargs: dict[str, Any]
    ) -> Facts | HttpResponse | None:
        """The request's facts; None when it is not an ad request; a 400 for bad input."""
        guard = self.guard
        if "xsp" in request.__dict__ or not guard.guards_method(request.method):
            return None  # decided already (the middleware twice in MIDDLEWARE), or HEAD/OPTIONS
        rules = rules_of(view_func)
        meta = request.META
        query = meta.get("QUERY_STRING", "")
        if rules is None and (
            not guard.guards_path(request.path)
            or (guard.campaign_param not in query and "%" not in query)
        ):
            return None  # the core rule: no campaign parameter, no store call
        try:
            headers = [
                # Django's ASGI handler joins repeated Cookie headers with ","; a cookie value
                # may not contain one (RFC 6265), so it separates cookies here.
                (b"cookie", _COOKIE_JOIN.sub(b";", _raw(meta.get("HTTP_COOKIE", "")))),
                (b"sec-gpc", _raw(meta.get("HTTP_SEC_GPC", ""))),
            ]
            facts = guard.facts(_raw(query), headers, rules, view_kwargs)
            if facts is not None and facts.assigned is not None:
                setattr(request, _ASSIGNED, facts.assigned)  # set on the response
            if facts is None and rules is not None:  # a decorated ad view needs its campaign
                raise InvalidParameter(rules.campaign_param or guard.campaign_param, "is required")
        except InvalidParameter as exc:
            return _response(guard.problem(exc))
        return facts

    def _admit(
        self, request: Any, decision: Decision, reservation: Reservation | None, started: float
    ) -> HttpResponse | None:
        guard = self.guard
        denied = not decision.allowed and not guard.pass_denied
        if guard.debug_headers:
            details = guard.detail_headers(decision, time.perf_counter() - started)
            setattr(request, _DETAILS, details[:1] + details[2:] if denied else details)
        if denied:
            return _response(guard.denied(decision.reason))
        request.xsp = decision
        if reservation is not None:
            setattr(request, _RESERVATION, reservation)
        return None  # run the view

    # -- after the view: confirm or release --------------------------------------------------

    def __call__(self, request: Any) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        try:
            response = self.get_response(request)
        except BaseException:
            reservation = request.__dict__.pop(_RESERVATION, None)
            if reservation is not None:
                _release_sync(self.guard, reservation)
            raise
        self._give_cookie(request, response)
        reservation = request.__dict__.pop(_RESERVATION, None)
        if reservation is not None:
            if not 200 <= response.status_code < 300:
                _release_sync(self.guard, reservation)
            elif response.streaming:
                self._watch_body(response, reservation)
        return response

    async def __acall__(self, request: Any) -> Any:
        try:
            response = await self.get_response(request)
        except BaseException:  # also a cancelled request (the client went away)
            reservation = request.__dict__.pop(_RESERVATION, None)
            if reservation is not None:
                await asyncio.shield(_release(self.guard, reservation))
            raise
        self._give_cookie(request, response)
        reservation = request.__dict__.pop(_RESERVATION, None)
        if reservation is not None:
            if not 200 <= response.status_code < 300:
                await asyncio.shield(_release(self.guard, reservation))
            elif response.streaming:
                self._watch_body(response, reservation)
        return response

    def _give_cookie(self, request: Any, response: Any) -> None:
        """An id assigned while deciding (``ANONYMOUS: "assign"``) goes to the browser, next
        to the view's own cookies; so do the opt-in debug headers."""
        for name, value in request.__dict__.pop(_DETAILS, ()):
            response.headers[name.decode()] = value.decode("latin-1")
        assigned = request.__dict__.pop(_ASSIGNED, None)
        if assigned is None:
            return
        s = self.guard.settings
        response.set_cookie(
            s.user_cookie,
            assigned,
            max_age=s.cookie_max_age,
            path=s.cookie_path,
            domain=s.cookie_domain,
            secure=s.cookie_secure,
            httponly=s.cookie_httponly,
            samesite=s.cookie_samesite.capitalize(),
        )

    def _watch_body(self, response: Any, reservation: Reservation) -> None:
        """Keep the reservation of a streaming 2xx only if its body is iterated to the end."""
        ticket = _Ticket(self.guard, reservation, self.async_mode)
        content = response.streaming_content
        if getattr(response, "is_async", False):
            response.streaming_content = _AsyncBody(content, ticket)
        else:
            response.streaming_content = _SyncBody(content, ticket)


def _release_sync(guard: Guard, reservation: Reservation) -> None:
    try:
        guard.release_sync(reservation)  # a store failure is logged there
    except Exception as exc:  # our bug must not become a 500: the spend stays counted
        logs.internal_error("releasing a reservation", exc)


async def _release(guard: Guard, reservation: Reservation) -> None:
    try:
        await guard.release(reservation)
    except Exception as exc:
        logs.internal_error("releasing a reservation", exc)


def _raw(text: str) -> bytes:
    """A META string back to its bytes: WSGI (PEP 3333) and Django's ASGI request give
    headers as latin-1; Django's ASGI request decodes the query string as UTF-8."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


def _response(reply: Reply) -> HttpResponse:
    response = HttpResponse(reply.body, status=reply.status)
    if not reply.body:
        del response["Content-Type"]  # a 204 no-fill carries only its decision
    for name, value in reply.headers:
        response[name.decode("latin-1")] = value.decode("latin-1")
    return response


class _Ticket:
    """A streaming response's reservation: kept once its body ended, released at most once."""

    __slots__ = ("async_mode", "guard", "reservation", "settled")

    def __init__(self, guard: Guard, reservation: Reservation, async_mode: bool) -> None:
        self.guard = guard
        self.reservation = reservation
        self.async_mode = async_mode
        self.settled = False

    def keep(self) -> None:
        self.settled = True

    def release_sync(self) -> None:
        if not self.settled:
            self.settled = True
            _release_sync(self.guard, self.reservation)

    async def release(self) -> None:
        if self.settled:
            return
        if not self.async_mode:  # an async body served by WSGI (Django's async_to_sync)
            self.release_sync()
            return
        self.settled = True
        await asyncio.shield(_release(self.guard, self.reservation))


class _SyncBody:
    """A sync streaming body: releases when it raises part-way or is closed before its end.

    Django calls ``close()`` through ``response.close()``, which every server calls once the
    response is done (after the last chunk, or early when the client went away).
    """

    __slots__ = ("_it", "_ticket")

    def __init__(self, content: Iterable[bytes], ticket: _Ticket) -> None:
        self._it = iter(content)
        self._ticket = ticket

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._it)
        except StopIteration:
            self._ticket.keep()
            raise
        except BaseException:
            self._ticket.release_sync()
            raise

    def close(self) -> None:
        self._ticket.release_sync()  # a no-op once the body ended


class _AsyncBody:
    """An async streaming body (ASGI): the same, releasing on the asyncio store when it raises
    part-way (or is cancelled). Django's ``close()`` is synchronous (run in a thread by its ASGI
    handler), so an early close releases on the blocking store."""

    __slots__ = ("_it", "_ticket")

    def __init__(self, content: AsyncIterable[bytes], ticket: _Ticket) -> None:
        self._it = aiter(content)
        self._ticket = ticket

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await anext(self._it)
        except StopAsyncIteration:
            self._ticket.keep()
            raise
        except BaseException:
            await self._ticket.release()
            raise

    def close(self) -> None:
        self._ticket.release_sync()
