"""``XSPMiddleware`` for Django (WSGI and ASGI) and the ``@ad_view`` decorator.

Data flow: ``process_view`` (the view is known) -> facts -> reserve (one round trip) -> the
view -> ``__call__``/``__acall__`` confirm (2xx; a streaming body iterated to its end) or
release (anything else). The steps are the shared ones of :mod:`xsp_middleware.core.admission`;
this module only translates Django's request and response objects.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpResponse  # type: ignore[import-untyped,unused-ignore]

from ..core.admission import Admission, Answer, admit_sync, prepare, release, release_sync
from ..core.beacons import answer_beacon, answer_beacon_sync, origin_of, server_address
from ..core.guard import Guard
from ..core.request import Facts
from ..core.rules import RouteRules, acall_candidates, rules_of
from ..core.rules import ad_route as ad_view
from ..decision import Decision
from ..errors import ConfigError
from ..settings import Settings
from .conf import XSPImproperlyConfigured, settings_from_django

__all__ = ["XSPMiddleware", "ad_view"]

_ADMISSION = "_xsp_admission"
"""The request attribute that carries the admission from ``process_view`` to the response."""
_COOKIE_JOIN = re.compile(rb",(?=\s*[!#$%&'*+\-.^_`|~0-9A-Za-z]+=)")
"""Where Django's ASGI handler joined two Cookie headers: a comma before ``name=``."""


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
        read = self._read(request, view_func)
        if read is None:
            return None
        admission, query, rules = read
        step = admit_sync(
            self.guard, admission, query, _headers(request), rules, view_kwargs, lambda: request
        )
        return _taken(request, step)

    async def _process_view_async(
        self,
        request: Any,
        view_func: Callable[..., Any],
        view_args: Sequence[Any],
        view_kwargs: dict[str, Any],
    ) -> Any:
        read = self._read(request, view_func)
        if read is None:
            return None
        admission, query, rules = read
        guard = self.guard
        chosen = await acall_candidates(rules, lambda: request)
        facts = prepare(guard, admission, query, _headers(request), rules, view_kwargs, chosen)
        if isinstance(facts, Facts):
            return _taken(request, admission.admitted(guard, facts, *await guard.decide(facts)))
        return _taken(request, facts)

    def _read(
        self, request: Any, view_func: Callable[..., Any]
    ) -> tuple[Admission, bytes, RouteRules | None] | None:
        """An ad request's admission (left on the request), query and rules; None when it is
        not one."""
        if "xsp" in request.__dict__:
            return None  # decided already (the middleware twice in MIDDLEWARE)
        rules = rules_of(view_func)
        query = _raw(request.META.get("QUERY_STRING", ""))
        if not self.guard.reader.is_candidate(request.method, request.path, query, rules):
            return None  # HEAD/OPTIONS; or the core rule: no campaign parameter, no store call
        admission = Admission()
        if self.guard.beacons:
            meta = request.META
            server = server_address(
                meta.get("SERVER_NAME", "localhost"), meta.get("SERVER_PORT", 80)
            )
            host = ((b"host", _raw(meta.get("HTTP_HOST", ""))),)
            admission.origin = origin_of(request.scheme or "http", host, server)
        setattr(request, _ADMISSION, admission)
        return admission, query, rules

    # -- after the view: confirm or release (the one place this integration releases) --------

    def __call__(self, request: Any) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        if self._is_beacon(request):
            if request.method == "HEAD":  # answered, never counted
                return _response(Answer(204, [(b"cache-control", b"no-store")], b""))
            return _response(answer_beacon_sync(self.guard, *_beacon_parts(request)))
        try:
            response = self.get_response(request)
        except BaseException:
            admission = request.__dict__.pop(_ADMISSION, None)
            if admission is not None:
                release_sync(self.guard, admission.finished(raised=True))
            raise
        admission = request.__dict__.pop(_ADMISSION, None)
        if admission is not None:
            self._give_headers(admission, response)
            if self._responded(admission, response):
                release_sync(self.guard, admission.finished())
        return response

    async def __acall__(self, request: Any) -> Any:
        if self._is_beacon(request):
            if request.method == "HEAD":  # answered, never counted
                return _response(Answer(204, [(b"cache-control", b"no-store")], b""))
            return _response(await answer_beacon(self.guard, *_beacon_parts(request)))
        try:
            response = await self.get_response(request)
        except BaseException:  # also a cancelled request (the client went away)
            admission = request.__dict__.pop(_ADMISSION, None)
            if admission is not None:
                await release(self.guard, admission.finished(raised=True))
            raise
        admission = request.__dict__.pop(_ADMISSION, None)
        if admission is not None:
            self._give_headers(admission, response)
            if self._responded(admission, response):
                await release(self.guard, admission.finished())
        return response

    def _is_beacon(self, request: Any) -> bool:
        """An impression beacon: the middleware answers it (``record_on="beacon"``)."""
        guard = self.guard
        return (
            guard.beacons
            and request.method in ("GET", "HEAD")
            and request.path == guard.beacon_path
        )

    def _responded(self, admission: Admission, response: Any) -> bool:
        """Report the view's response; True when the request is over now. A plain response is
        done once the view returned it (WSGI gives no way to see whether the client got it); a
        streaming one that may be kept is done when its body is (see :class:`_Body`)."""
        admission.response_started(response.status_code)
        if response.streaming and admission.may_keep:
            body = _Body(self.guard, admission, self.async_mode)
            content = response.streaming_content
            if getattr(response, "is_async", False):
                response.streaming_content = _AsyncBody(content, body)
            else:
                response.streaming_content = _SyncBody(content, body)
            return False
        admission.response_completed()
        return True

    def _give_headers(self, admission: Admission, response: Any) -> None:
        """An id assigned while deciding (``ANONYMOUS: "assign"``) goes to the browser, next
        to the view's own cookies; so do the opt-in debug headers."""
        for name, value in admission.details:
            response.headers[name.decode()] = value.decode("latin-1")
        if admission.assigned is None:
            return
        s = self.guard.settings
        response.set_cookie(
            s.user_cookie,
            admission.assigned,
            max_age=s.cookie_max_age,
            path=s.cookie_path,
            domain=s.cookie_domain,
            secure=s.cookie_secure,
            httponly=s.cookie_httponly,
            samesite=s.cookie_samesite.capitalize(),
        )


def _headers(request: Any) -> list[tuple[bytes, bytes]]:
    meta = request.META
    return [
        # Django's ASGI handler joins repeated Cookie headers with ","; a cookie value may not
        # contain one (RFC 6265), so it separates cookies here.
        (b"cookie", _COOKIE_JOIN.sub(b";", _raw(meta.get("HTTP_COOKIE", "")))),
        (b"sec-gpc", _raw(meta.get("HTTP_SEC_GPC", ""))),
    ]


def _beacon_parts(request: Any) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    meta = request.META
    return _raw(meta.get("QUERY_STRING", "")), [(b"accept", _raw(meta.get("HTTP_ACCEPT", "")))]


def _taken(request: Any, step: Answer | Decision | None) -> HttpResponse | None:
    """What ``process_view`` returns: a response instead of the view, or None to run it."""
    if isinstance(step, Answer):
        return _response(step)
    if step is not None:
        request.xsp = step
    return None


def _raw(text: str) -> bytes:
    """A META string back to its bytes: WSGI (PEP 3333) and Django's ASGI request give
    headers as latin-1; Django's ASGI request decodes the query string as UTF-8."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


def _response(answer: Answer) -> HttpResponse:
    response = HttpResponse(answer.body, status=answer.status)
    if not answer.body:
        del response["Content-Type"]  # a 204 no-fill carries only its decision
    for name, value in answer.headers:
        response[name.decode("latin-1")] = value.decode("latin-1")
    return response


class _Body:
    """A streaming response's end: its body ran to the end (kept), raised or was closed early
    (released); the admission answers only the first."""

    __slots__ = ("admission", "async_mode", "guard")

    def __init__(self, guard: Guard, admission: Admission, async_mode: bool) -> None:
        self.guard = guard
        self.admission = admission
        self.async_mode = async_mode

    def ended(self) -> None:
        self.admission.response_completed()
        self.admission.finished()  # kept: nothing to release

    def stopped(self, raised: bool) -> None:
        release_sync(self.guard, self.admission.finished(raised))

    async def astopped(self) -> None:
        if not self.async_mode:  # an async body served by WSGI (Django's async_to_sync)
            self.stopped(True)
            return
        await release(self.guard, self.admission.finished(raised=True))


class _SyncBody:
    """A sync streaming body: releases when it raises part-way or is closed before its end.

    Django calls ``close()`` through ``response.close()``, which every server calls once the
    response is done (after the last chunk, or early when the client went away).
    """

    __slots__ = ("_body", "_it")

    def __init__(self, content: Iterable[bytes], body: _Body) -> None:
        self._it = iter(content)
        self._body = body

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._it)
        except StopIteration:
            self._body.ended()
            raise
        except BaseException:
            self._body.stopped(True)
            raise

    def close(self) -> None:
        self._body.stopped(False)  # a no-op once the body ended


class _AsyncBody:
    """An async streaming body (ASGI): the same, releasing on the asyncio store when it raises
    part-way (or is cancelled). Django's ``close()`` is synchronous (run in a thread by its ASGI
    handler), so an early close releases on the blocking store."""

    __slots__ = ("_body", "_it")

    def __init__(self, content: AsyncIterable[bytes], body: _Body) -> None:
        self._it = aiter(content)
        self._body = body

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await anext(self._it)
        except StopAsyncIteration:
            self._body.ended()
            raise
        except BaseException:
            await self._body.astopped()
            raise

    def close(self) -> None:
        self._body.stopped(False)
