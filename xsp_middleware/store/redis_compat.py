"""The one place that reaches into redis-py's private connection internals.

The auto-pipeline feeds a connection's own hiredis reader from whole socket reads (one read for
a batch's replies), and its deadline checks look at what is waiting unread on a connection.
Both need redis-py's stream, parser and transport. ``tests/integration/test_seam.py`` checks on every run,
against a real ``redis-server``, that these internals are still where this module looks; where
they are not (another parser, another connection class such as fakeredis's), the callers fall
back to redis-py's public ``read_response`` and to judging without direct evidence.
"""

from __future__ import annotations

import asyncio
import select
from typing import Any

from redis.asyncio.connection import AbstractConnection

try:  # redis-py's own parser over hiredis, whose reader the pipeline feeds directly
    from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
except ImportError:  # pragma: no cover - another redis-py layout: read_response everywhere
    _AsyncHiredisParser = None  # type: ignore[assignment,misc]
    NOT_ENOUGH_DATA = object()

__all__ = ["NOT_ENOUGH_DATA", "hiredis_streams", "peer", "waiting_on_us"]

_STOCK_READ_RESPONSE = AbstractConnection.read_response


def hiredis_streams(
    conn: AbstractConnection,
) -> tuple[asyncio.StreamWriter, asyncio.StreamReader, Any, int] | None:
    """The connected socket streams and hiredis reader of a stock redis-py connection (what its
    ``read_response`` uses), or None: another parser, or a connection class of its own
    (fakeredis), is read through ``read_response``."""
    if _AsyncHiredisParser is None or type(conn).read_response is not _STOCK_READ_RESPONSE:
        return None
    parser = getattr(conn, "_parser", None)
    if not isinstance(parser, _AsyncHiredisParser):
        return None
    writer = getattr(conn, "_writer", None)
    stream = getattr(parser, "_stream", None)
    reader = getattr(parser, "_reader", None)
    if writer is None or stream is None or reader is None:
        return None
    return writer, stream, reader, getattr(parser, "_read_size", 65536)


def waiting_on_us(conn: AbstractConnection) -> bool | None:
    """Whether something on ``conn`` waits for this process rather than for the store: reply
    bytes not yet read or parsed, or request bytes not yet on the wire. None: this connection
    cannot be inspected (another connection class), so there is no direct evidence.

    This looks at redis-py's stream and parser (as redis-py's own ``can_read`` does) and polls
    the socket without blocking."""
    writer = getattr(conn, "_writer", None)
    stream = getattr(conn, "_reader", None)
    if not isinstance(stream, asyncio.StreamReader) or writer is None:
        return None
    if getattr(stream, "_buffer", None) or stream.at_eof():
        return True  # read from the socket, not parsed yet (or closed: the reader will see it)
    parser_reader = getattr(getattr(conn, "_parser", None), "_reader", None)
    has_data = getattr(parser_reader, "has_data", None)
    if callable(has_data) and has_data():
        return True  # part of a reply in hiredis's buffer
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN | select.POLLOUT)
        events = poller.poll(0)  # never blocks
    except (OSError, ValueError):
        return None
    mask = events[0][1] if events else 0
    if mask & (select.POLLIN | select.POLLERR | select.POLLHUP):
        return True  # the kernel holds reply bytes (or an EOF, which the reader will see)
    # Request bytes still in the transport's buffer while the socket would take them: the loop
    # has not got round to writing them. (A socket that takes nothing more is the store not
    # reading: evidence about the store, not about us.)
    return bool(transport.get_write_buffer_size()) and bool(mask & select.POLLOUT)


def peer(conn: AbstractConnection) -> str:
    describe = getattr(conn, "_host_error", None)
    return str(describe()) if callable(describe) else "the store"
