"""The comparator for ``benchmarks/overhead.py``: the public tutorial's approach as ASGI middleware.

``TutorialMiddleware`` does, per request, what the tutorial's ``FullUpstreamSession.request``
does, with one shared ``redis.asyncio.Redis`` client (hiredis parser; a connection pool of up to
``max_connections``, 64 by default: each request holds at most one connection at a time, so 64
concurrent requests never wait for one. redis-py's plain ``ConnectionPool`` measured about 10%
faster here than ``BlockingConnectionPool``, whose waiting the benchmark never needs):

1. ``check_frequency_cap``: ``GET freq:{user}:{campaign}``; deny if the count is >= the cap (3).
2. ``track_budget``: ``GET budget:limit:{campaign}`` (unset means the default limit),
   ``GET budget:{campaign}``; deny if spent + cost > limit, otherwise
   ``INCRBYFLOAT budget:{campaign} cost`` with ``cost = Decimal(cpm) / 1000`` passed as a float,
   as the tutorial does.
3. run the handler (the tutorial's ``upstream.fetch``);
4. record the impression (after a 2xx): one pipeline of ``INCR freq:...`` +
   ``EXPIRE freq:... 3600`` (redis-py's default pipeline, MULTI/EXEC, one round trip).

That is four sequential round trips before the handler and one after it. It is check-then-act:
concurrent requests can all pass the checks before any of them writes, so caps and budgets can be
exceeded, and the budget is kept as a float. That is deliberate: it is the approach the benchmark
compares XSPMiddleware against, not a bug to fix here. Denials answer 204 (a no-fill), like
XSPMiddleware's default.

The default budget limit is very large so a benchmark run never exhausts it (the tutorial's
default is "1000.00").
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

import redis.asyncio as aredis

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

FREQUENCY_CAP = 3
FREQUENCY_WINDOW_SECONDS = 3600
DEFAULT_CPM = "2.00"
DEFAULT_BUDGET_LIMIT = "900000000.00"


def _cookie(headers: Any, name: bytes) -> str | None:
    for key, value in headers:
        if key != b"cookie":
            continue
        for part in value.split(b";"):
            k, sep, v = part.partition(b"=")
            if sep and k.strip() == name:
                return v.strip().decode("latin-1")
    return None


class TutorialMiddleware:
    """Frequency cap and budget checks done the tutorial's way (check, then act)."""

    def __init__(
        self,
        app: ASGIApp,
        redis_url: str,
        *,
        max_connections: int = 64,
        frequency_cap: int = FREQUENCY_CAP,
        default_budget_limit: str = DEFAULT_BUDGET_LIMIT,
    ) -> None:
        self.app = app
        self.frequency_cap = frequency_cap
        self.default_budget_limit = Decimal(default_budget_limit)
        # More concurrent requests than max_connections would fail with "Too many connections":
        # give it at least the concurrency you drive it with.
        pool = aredis.ConnectionPool.from_url(redis_url, max_connections=max_connections)
        self.redis = aredis.Redis(connection_pool=pool)

    async def aclose(self) -> None:
        await self.redis.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        params = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        campaign_id = params.get("campaign_id")
        if not campaign_id:
            await self.app(scope, receive, send)
            return
        user_id = _cookie(scope.get("headers", ()), b"user_id")
        r = self.redis

        # check_frequency_cap(user_id, campaign_id)
        freq_key = f"freq:{user_id}:{campaign_id}"
        if user_id is not None:
            count = await r.get(freq_key)
            if count is not None and int(count) >= self.frequency_cap:
                await _no_fill(send, b"frequency_capped")
                return

        # track_budget(campaign_id, cost)
        cost = Decimal(params.get("cpm", DEFAULT_CPM)) / 1000
        limit_raw = await r.get(f"budget:limit:{campaign_id}")
        limit = Decimal(limit_raw.decode()) if limit_raw is not None else self.default_budget_limit
        spent_raw = await r.get(f"budget:{campaign_id}")
        spent = Decimal(spent_raw.decode()) if spent_raw is not None else Decimal(0)
        if spent + cost > limit:
            await _no_fill(send, b"budget_exhausted")
            return
        await r.incrbyfloat(f"budget:{campaign_id}", float(cost))

        # upstream.fetch(...)
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, send_status)

        # record the impression
        if user_id is not None and 200 <= status < 300:
            async with r.pipeline() as pipe:
                pipe.incr(freq_key)
                pipe.expire(freq_key, FREQUENCY_WINDOW_SECONDS)
                await pipe.execute()


async def _no_fill(send: Send, reason: bytes) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": [(b"x-decision", reason)]})
    await send({"type": "http.response.body", "body": b""})
