"""Auto-pipelining: decisions that arrive in the same event-loop iteration share one write.

Each caller gets a future; a flush, scheduled with ``call_soon``, packs every queued script call
into one write on an idle connection and reads the replies in order. Light traffic pays no added
latency (the flush runs on the next loop iteration); heavy traffic gets fewer syscalls and
fewer connections. Each script is still atomic on the server, so exactness is unchanged.

Timeouts never cancel I/O: a caller's future fails at its deadline while the batch carries on,
so the connection never desyncs. A reply that arrives for a caller who already gave up is
handed to ``on_orphan`` (the store releases an orphaned reservation).

Per call, the hot path costs one future and a list append or two: the deadlines of all pending
calls are watched by one timer per pipeline (not one timer per call), and the replies of a
batch are parsed straight from the connection's hiredis reader, one socket read for many
replies (not one ``read_response`` coroutine, with its own timeout, per reply).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    NoScriptError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import StoreUnavailable

try:  # redis-py's own parser over hiredis, whose reader the pipeline feeds directly
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
    from redis._parsers.hiredis import _AsyncHiredisParser
except ImportError:  # pragma: no cover - another redis-py layout: read_response everywhere
    _AsyncHiredisParser = None  # type: ignore[assignment,misc]
    _NOT_ENOUGH_DATA = object()

_STOCK_READ_RESPONSE = AbstractConnection.read_response

logger = logging.getLogger("xsp_middleware")

Orphan = Callable[[Any, Any], None]
"""Called with (the call's context, reply) when a reply arrives after its caller gave up."""


class Script:
    """A Lua script, sent by SHA; re-sent whole when the server answers NOSCRIPT."""

    __slots__ = ("eval", "evalsha", "name", "retry_safe", "sha", "text")

    def __init__(self, name: str, text: str, *, retry_safe: bool) -> None:
        import hashlib

        self.retry_safe = retry_safe
        """Running it twice errs toward under-delivery (never an overspend)."""
        self.name = name
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()
        self.evalsha = pack_args(("EVALSHA", self.sha))
        self.eval = pack_args(("EVAL", text))


def pack_args(args: Sequence[str | int]) -> bytes:
    """RESP-encode command arguments (no array header). Callers pack the parts of a script
    call that do not change per request once, and reuse the bytes."""
    out = []
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Call:
    __slots__ = ("body", "context", "deadline", "future", "nargs", "on_orphan", "script")

    def __init__(
        self,
        script: Script,
        nargs: int,
        body: bytes,
        future: asyncio.Future[Any],
        on_orphan: Orphan | None,
        context: Any,
        deadline: float,
    ) -> None:
        self.script = script
        self.nargs = nargs
        self.body = body
        self.context = context
        self.future = future
        self.on_orphan = on_orphan
        self.deadline = deadline
        """Loop time at which the caller stops waiting."""

    def command(self, by_sha: bool) -> bytes:
        script = self.script
        # One RESP command: EVALSHA sha (or EVAL text) and the packed arguments. Cheaper than
        # redis-py's general packer, which was a fifth of the per-decision CPU.
        head = script.evalsha if by_sha else script.eval
        return b"*%d\r\n" % (self.nargs + 2) + head + self.body

    def resolve(self, reply: Any) -> None:
        future = self.future
        if not future.done():
            if isinstance(reply, BaseException):
                future.set_exception(reply)
            else:
                future.set_result(reply)
        elif self.on_orphan is not None and not isinstance(reply, BaseException):
            self.on_orphan(self.context, reply)


class Redirected(StoreUnavailable):
    """A cluster node answered MOVED, ASK, TRYAGAIN or CLUSTERDOWN: the script did not run
    (slots moved, or a failover is under way), so sending it again after re-learning the slot
    map is safe. ASK (a slot in the middle of a migration) is not followed with ASKING: such a
    call is sent once more to the slot's owner, and degrades if it is still migrating."""


class _StaleConnection(ConnectionError):
    """A reused connection failed before any reply: safe to retry on a fresh one."""


def _expire(future: asyncio.Future[Any], timeout: float) -> None:
    if not future.done():
        future.set_exception(StoreUnavailable(f"the store did not answer within {timeout}s"))


EARLY_FLUSH = 16
"""A queue this long goes out at once, on an idle connected connection, rather than at the end
of the loop iteration: the server runs it while the process prepares the next calls."""
WARM_SLOTS = 4
"""Connections the first batch opens (its own and three more, concurrently): enough batches in
flight for the overlap, few sockets per event loop. More open only when these break."""


class AutoPipeline:
    """Coalesces script calls on one event loop over at most ``slots`` connections."""

    def __init__(
        self,
        make_connection: Callable[[], AbstractConnection],
        *,
        slots: int,
        timeout: float,
        preload: Sequence[Script] = (),
    ) -> None:
        self._loop = asyncio.get_running_loop()
        # SCRIPT LOADs ride in the first write of every new connection (no extra round trip),
        # so a fresh or restarted server never answers our first EVALSHA with NOSCRIPT.
        self._preload = [b"*3\r\n" + pack_args(("SCRIPT", "LOAD", s.text)) for s in preload]
        self._preload.append(b"*3\r\n" + pack_args(("CLIENT", "SETNAME", "xsp-middleware")))
        self._idle = [make_connection() for _ in range(slots)]
        self._all = list(self._idle)
        self._queue: list[_Call] = []
        self._flush_scheduled = False
        self._timeout = timeout
        self._tasks: set[asyncio.Task[None]] = set()
        # Every call whose caller may still be waiting, oldest first. The timeout is the same
        # for all, so deadlines come in this order too: one timer, for the oldest, is enough.
        self._waiting: deque[_Call] = deque()
        self._watchdog: asyncio.TimerHandle | None = None
        self._warm = False
        """Whether the first batch has connected every slot (see _send)."""

    def call(
        self,
        script: Script,
        nargs: int,
        body: bytes,
        on_orphan: Orphan | None = None,
        context: Any = None,
    ) -> asyncio.Future[Any]:
        """Queue one script call: ``body`` is the packed numkeys, keys and argv (``nargs`` of
        them). The future fails with StoreUnavailable after the timeout; a reply that comes
        later goes to ``on_orphan(context, reply)``."""
        loop = self._loop
        future = loop.create_future()
        call = _Call(script, nargs, body, future, on_orphan, context, loop.time() + self._timeout)
        self._queue.append(call)
        waiting = self._waiting
        while waiting and waiting[0].future.done():  # answered already: forget them
            waiting.popleft()
        waiting.append(call)
        if self._watchdog is None:
            self._watchdog = loop.call_at(waiting[0].deadline, self._watch)
        if len(self._queue) >= EARLY_FLUSH or len(self._idle) == len(self._all):
            # A full queue, or a call while nothing is in flight (light traffic): it goes out
            # now rather than at the end of the loop iteration. While batches are in flight,
            # calls wait for the flush and share its write.
            for conn in self._idle:
                if conn.is_connected:
                    self._send_queue(conn)
                    return future
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _watch(self) -> None:
        """The oldest waiting call's deadline passed: fail every call whose deadline has. After
        a stall of the loop (a GC pause, a busy handler) asyncio runs expired timers before the
        reads that became ready meanwhile: each expiring call gets one more turn (``call_soon``)
        so a reply that already arrived still counts."""
        self._watchdog = None
        loop = self._loop
        waiting = self._waiting
        now = loop.time()
        while waiting:
            call = waiting[0]
            if not call.future.done():
                if call.deadline > now:  # (a timer may fire a clock tick early)
                    self._watchdog = loop.call_at(call.deadline, self._watch)
                    return
                loop.call_soon(_expire, call.future, self._timeout)
            waiting.popleft()

    def _flush(self) -> None:
        """Send the queued calls on an idle connection: written at once when it is connected,
        the replies read by a task of their own."""
        self._flush_scheduled = False
        if not self._idle:
            return  # a connection coming back re-schedules the flush
        for conn in self._idle:  # a connected one first: a new one costs a connect
            if conn.is_connected:
                break
        else:
            if any(c.is_connected for c in self._all if c not in self._idle):
                return  # all connected ones are busy: the first back takes the queue
        self._send_queue(conn)

    def _send_queue(self, conn: AbstractConnection) -> None:
        """Send the queued calls on ``conn`` (an idle connection)."""
        # Calls whose caller already gave up (timeout, cancellation) are never sent.
        batch = [c for c in self._queue if not c.future.done()]
        self._queue.clear()
        if not batch:
            return
        self._idle.remove(conn)
        commands = [c.command(True) for c in batch]
        written = False
        if conn.is_connected:
            streams = _hiredis_streams(conn)
            if streams is not None:
                # Written now, not on the task's first step (the next loop iteration). A
                # transport that refuses the write leaves it to the task, which reconnects.
                try:
                    streams[0].write(b"".join(commands))
                    written = True
                except (RuntimeError, OSError) as exc:
                    logger.debug("writing a batch at once failed: %s", exc)
        task = self._loop.create_task(self._send(conn, batch, commands, written))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(
        self,
        conn: AbstractConnection,
        batch: Sequence[_Call],
        commands: list[bytes],
        written: bool,
    ) -> None:
        """Send ``batch`` (its ``commands``, unless ``written`` already), read its replies and
        resolve every call."""
        replies: list[Any] = []
        try:
            try:
                if not self._warm:
                    # The first batch connects WARM_SLOTS - 1 more slots, concurrently (each
                    # with its SCRIPT LOADs in its first write): a full queue can then go out at
                    # once on another connected slot (EARLY_FLUSH) without a connect, or a
                    # preload, in the middle of traffic.
                    self._warm = True
                    cold = [c for c in self._idle if not c.is_connected][: WARM_SLOTS - 1]
                    for other in cold:
                        self._idle.remove(other)
                    try:
                        # Every connect is over before a slot goes back to the idle list.
                        first, *_ = await asyncio.gather(
                            self._round_trip(conn, commands, replies, written),
                            *(self._connect(other) for other in cold),
                            return_exceptions=True,
                        )
                    finally:
                        self._idle.extend(cold)
                    if isinstance(first, BaseException):
                        raise first
                else:
                    await self._round_trip(conn, commands, replies, written)
            except _StaleConnection:
                # An idle connection goes stale when Redis restarts or fails over: reconnect
                # once. The server may have run the batch before the connection broke, so only
                # scripts whose repetition errs toward under-delivery are sent again (a reserve
                # counted twice); a release run twice would refund twice, an overspend.
                await _discard(conn)
                gone = [c for c in batch if not c.script.retry_safe]
                for call in gone:
                    call.resolve(StoreUnavailable("connection lost; not retried (not idempotent)"))
                batch = [c for c in batch if c.script.retry_safe]
                await self._round_trip(conn, [c.command(True) for c in batch], replies)
            retry = [c for c, r in zip(batch, replies, strict=True) if isinstance(r, NoScriptError)]
            for call, reply in zip(batch, replies, strict=True):
                if not isinstance(reply, NoScriptError):
                    call.resolve(reply)
            if retry:
                # The server lost its script cache (restart, SCRIPT FLUSH): NOSCRIPT means the
                # script did not run, so sending it whole (which also caches it) is safe.
                logger.info(
                    "script cache miss; reloading scripts",
                    extra={"xsp_event": "script_reloaded", "scripts": len(retry)},
                )
                batch, replies = retry, []
                await self._round_trip(conn, [c.command(False) for c in retry], replies)
                for call, reply in zip(retry, replies, strict=True):
                    call.resolve(reply)
        except (TimeoutError, RedisError, OSError) as exc:
            await _discard(conn)
            # Replies that did arrive still count (a late reservation is released as an
            # orphan); the rest never will: their outcome is unknown, so their spend stays
            # counted if they ran (under-delivery, never an overspend).
            error = StoreUnavailable(f"{type(exc).__name__}: {exc}")
            for i, call in enumerate(batch):
                call.resolve(replies[i] if i < len(replies) else error)
        except asyncio.CancelledError:
            # The loop is shutting down: the connection may hold unread replies.
            await _discard(conn)
            for call in batch:
                call.resolve(StoreUnavailable("the store call was cancelled"))
            raise
        finally:
            self._idle.append(conn)
            if self._queue and not self._flush_scheduled and not self._loop.is_closed():
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)

    async def _connect(self, conn: AbstractConnection) -> None:
        """Connect an idle slot ahead of need (its preload rides in its first write)."""
        try:
            await self._round_trip(conn, [], [])
        except (TimeoutError, RedisError, OSError) as exc:
            await _discard(conn)  # connected again when a batch needs it
            logger.debug("connecting a store connection ahead of need failed: %s", exc)

    async def _round_trip(
        self,
        conn: AbstractConnection,
        commands: list[bytes],
        replies: list[Any],
        written: bool = False,
    ) -> None:
        """One write (already done if ``written``), then the replies in order, appended to
        ``replies`` (script errors as StoreUnavailable values). Raises _StaleConnection if a
        reused connection broke before any reply came back."""
        reused = written or conn.is_connected
        if not reused:
            await conn.connect()  # type: ignore[no-untyped-call]
            commands = self._preload + commands
        preloaded = len(self._preload) if not reused else 0
        try:
            streams = _hiredis_streams(conn)
            if streams is not None:
                payload = b"" if written else b"".join(commands)
                await self._exchange(conn, *streams, payload, len(commands), replies)
            else:  # another parser or connection class: redis-py's reads, one per reply
                await conn.send_packed_command(b"".join(commands))
                for _ in range(len(commands)):
                    try:
                        reply = await conn.read_response()
                    except ResponseError as exc:
                        reply = exc
                    replies.append(reply)
        except (ConnectionError, OSError) as exc:
            if reused and len(replies) <= preloaded:
                raise _StaleConnection from exc
            raise
        finally:
            if preloaded:
                for reply in replies[:preloaded]:
                    if isinstance(reply, BaseException):
                        logger.error("loading the xsp Lua scripts failed: %s", reply)
                del replies[:preloaded]
            for i, reply in enumerate(replies):
                if isinstance(reply, ResponseError):
                    replies[i] = _error_reply(reply)

    async def _exchange(
        self,
        conn: AbstractConnection,
        writer: asyncio.StreamWriter,
        stream: asyncio.StreamReader,
        reader: Any,
        read_size: int,
        payload: bytes,
        count: int,
        replies: list[Any],
    ) -> None:
        """Write ``payload`` (if any: it may be written already), then parse ``count`` replies
        with the connection's own hiredis reader, feeding it whole socket reads: a batch's
        replies usually arrive in one read.
        Errors as redis-py's ``read_response`` gives them: ConnectionError, TimeoutError (after
        the connection's ``socket_timeout`` without progress), error replies as values."""
        loop = self._loop
        timeout = conn.socket_timeout or None
        try:
            async with asyncio.timeout(timeout) as deadline:
                if payload:
                    writer.write(payload)
                await writer.drain()
                while len(replies) < count:
                    reply = reader.gets()
                    if reply is _NOT_ENOUGH_DATA or reply is False:
                        data = await stream.read(read_size)
                        if not data:
                            raise ConnectionError("Connection closed by server.")
                        reader.feed(data)
                        if timeout is not None:  # the timeout is per read, as redis-py's
                            deadline.reschedule(loop.time() + timeout)
                    elif isinstance(reply, ConnectionError):  # LOADING, NOAUTH...
                        raise reply
                    else:
                        replies.append(reply)
        except TimeoutError as exc:  # the builtin one: asyncio.timeout expired
            raise RedisTimeoutError(f"Timeout reading from {_peer(conn)}") from exc
        except OSError as exc:
            raise ConnectionError(f"Error while reading from {_peer(conn)} : {exc.args}") from exc

    async def aclose(self) -> None:
        for conn in self._all:
            await _discard(conn)


def _error_reply(exc: ResponseError) -> BaseException:
    """An error reply as the caller gets it: NOSCRIPT as is (the batch sends the script whole
    again), a cluster redirection as Redirected, anything else as StoreUnavailable."""
    if isinstance(exc, NoScriptError):
        return exc
    if isinstance(exc, AskError | TryAgainError | ClusterDownError):  # MovedError is an AskError
        return Redirected(f"the cluster redirected the call: {exc}")
    return StoreUnavailable(f"the store answered an error: {exc}")


def _hiredis_streams(
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


def _peer(conn: AbstractConnection) -> str:
    describe = getattr(conn, "_host_error", None)
    return str(describe()) if callable(describe) else "the store"


async def _discard(conn: AbstractConnection) -> None:
    try:
        await conn.disconnect()
    except (RedisError, OSError) as exc:  # already broken; nothing more to free
        logger.debug("discarding a broken store connection failed: %s", exc)
