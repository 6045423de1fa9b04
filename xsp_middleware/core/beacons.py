"""Impression beacons (``record_on="beacon"``): ``GET {beacon_path}?t=<token>``, answered by the
middleware itself in every integration.

A token names a campaign and a pending reservation, with an expiry, under an HMAC
(:func:`xsp_middleware.signing.make_beacon_token`). Its fetch confirms the reservation once:
the campaign's side of the store decides atomically, so a beacon fired twice, or fifty times
at once, counts one impression. Whatever happens, the answer is the same harmless ``204`` (or a
1x1 GIF to a request that accepts images): a forged, expired or other campaign's token, or a
failing store, only adds ``X-XSP-Beacon: rejected``. Nothing here raises into the response.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from .. import logs, observe
from ..errors import StoreUnavailable
from ..signing import BeaconToken, read_beacon_token
from ..store.protocol import BeaconReply
from .admission import Answer
from .guard import Guard
from .request import query_values

__all__ = [
    "GIF",
    "answer_beacon",
    "answer_beacon_sync",
    "beacon_answer",
    "origin_of",
    "server_address",
]

GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
"""A transparent 1x1 GIF."""


def beacon_token(guard: Guard, query: bytes) -> BeaconToken | None:
    """The request's valid token, or None (missing, forged, malformed, for another campaign
    than a ``campaign_id`` the URL also names)."""
    try:
        tokens, campaigns = query_values(query, "t", guard.reader.campaign_param)
    except (UnicodeDecodeError, ValueError):
        return None
    if len(tokens) != 1 or len(campaigns) > 1:
        return None
    token = read_beacon_token(guard.beacon_key, next(iter(tokens)))
    if token is None or (campaigns and campaigns != {token.campaign_id}):
        return None
    return token


def beacon_outcome(token: BeaconToken, reply: BeaconReply) -> str:
    """What the store's answer means for this token."""
    if reply.outcome == 1:
        return "confirmed"
    if reply.outcome == 2 or reply.now_ms >= token.expires_ms:
        return "expired"
    return "duplicate"  # confirmed before (or its campaign was reset): counted at most once


def beacon_answer(result: str, headers: Iterable[tuple[bytes, bytes]]) -> Answer:
    """The beacon's HTTP answer, and its count in the metrics."""
    if observe.current is not None:
        observe.current.beacon(result)
    answer: list[tuple[bytes, bytes]] = [(b"cache-control", b"no-store")]
    if result not in ("confirmed", "duplicate"):
        answer.append((b"x-xsp-beacon", b"rejected"))
    accept = b""
    for name, value in headers:
        if name == b"accept":
            accept += value
    if b"image/" in accept:
        answer += [(b"content-type", b"image/gif"), (b"content-length", b"%d" % len(GIF))]
        return Answer(200, answer, GIF)
    return Answer(204, answer, b"")


async def answer_beacon(
    guard: Guard, query: bytes, headers: Iterable[tuple[bytes, bytes]]
) -> Answer:
    """Confirm the beacon's reservation (asyncio store) and answer it."""
    token = beacon_token(guard, query)
    if token is None:
        return beacon_answer("rejected", headers)
    try:
        reply = await guard.store.confirm_beacon(token.campaign_id, token.rid)
    except Exception as exc:
        return beacon_answer(_failed(token, exc), headers)
    return beacon_answer(beacon_outcome(token, reply), headers)


def answer_beacon_sync(
    guard: Guard, query: bytes, headers: Iterable[tuple[bytes, bytes]]
) -> Answer:
    """:func:`answer_beacon` on the blocking store."""
    token = beacon_token(guard, query)
    if token is None:
        return beacon_answer("rejected", headers)
    try:
        reply = guard.sync_store.confirm_beacon(token.campaign_id, token.rid)
    except Exception as exc:
        return beacon_answer(_failed(token, exc), headers)
    return beacon_answer(beacon_outcome(token, reply), headers)


def origin_of(scheme: str, headers: Iterable[tuple[bytes, bytes]], server: str) -> str:
    """``scheme://host`` of a request, for its impression URL: the Host header (a hostile one
    only points the client's own beacon elsewhere), else the server's address."""
    for name, value in headers:
        if name == b"host":
            host = value.decode("latin-1")
            if host and all(c.isascii() and (c.isalnum() or c in "._-:[]") for c in host):
                return f"{scheme}://{host}"
            break
    default = ":443" if scheme == "https" else ":80"
    return f"{scheme}://{server.removesuffix(default)}"


def server_address(host: str, port: object) -> str:
    """``host:port`` of the server socket, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _failed(token: BeaconToken, exc: Exception) -> str:
    """The beacon could not be confirmed: the reservation stays pending, and expires back into
    the budget (under-delivery). A bug of ours is logged as one, never raised into a 500."""
    if not isinstance(exc, StoreUnavailable):
        logs.internal_error("confirming an impression beacon", exc)
        return "error"
    logs.event(
        "beacon_failed",
        logging.WARNING,
        "xsp_middleware: could not confirm an impression beacon of campaign %s: %s",
        token.campaign_id,
        exc,
    )
    return "error"
