"""Auto-pipelining: decisions that arrive in the same event-loop iteration share one write.

Each caller gets a future; a flush, scheduled with ``call_soon``, packs every queued script call
into one write on an idle connection and reads the replies in order. Light traffic pays no added
latency (a call made while nothing is in flight is written at once); heavy traffic gets fewer
syscalls and fewer connections. Each script is still atomic on the server, so exactness is
unchanged.

**Deadlines judge the store, not the process.** A call fails (``StoreUnavailable``) only on
evidence about the store:

* a connection error or an error reply;
* no reply within ``timeout`` of the call reaching the wire (its batch written to the socket),
  or of the last reply bytes that came back on its connection (a batch's later replies wait in
  the store behind its earlier calls, ours), and no reply bytes waiting to be read when that is
  checked: a reply that arrived in time is on time however late the event loop gets to it;
* for a call still queued in this process, every connection it waits for has gone silent (no
  reply bytes for ``timeout`` while the store owes replies);
* for a call riding a connect, the connect failing: refused at once, or not done within the
  connection's ``socket_connect_timeout`` (the store gives it ``max(1 s, 10 x timeout)``).

Time a call spends waiting for this process (a burst, a GC pause, a CPU-bound handler, the
queue itself) is the app's lag and never fails it. One timer per pipeline (not one per call)
checks all of this; a check that finds reply bytes waiting, or that ran late and has no direct
evidence, looks again a moment later instead of failing anything.

Timeouts never cancel I/O: a caller's future fails while the batch carries on, so the connection
never desyncs. A reply that arrives for a caller who already gave up is handed to ``on_orphan``
(the store releases an orphaned reservation).

Per call, the hot path costs one future and a list append or two, and the replies of a batch are
parsed straight from the connection's hiredis reader, one socket read for many replies. That
reader, and what waits unread, come from ``redis_compat`` (the one place that reaches into
redis-py's connection internals); where it finds none, replies come through ``read_response``.
"""

from __future__ import annotations

import asyncio
import logging
import math
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

from .. import logs
from ..errors import StoreUnavailable
from . import redis_compat
from .redis_compat import NOT_ENOUGH_DATA, peer, waiting_on_us
from .scripts import Script, pack_args

logger = logging.getLogger("xsp_middleware")

Orphan = Callable[[Any, Any], None]
"""Called with (the call's context, reply) when a reply arrives after its caller gave up."""


class _Call:
    __slots__ = ("body", "context", "future", "nargs", "on_orphan", "queued_at", "script")

    def __init__(
        self,
        script: Script,
        nargs: int,
        body: bytes,
        future: asyncio.Future[Any],
        on_orphan: Orphan | None,
        context: Any,
        queued_at: float,
    ) -> None:
        self.script = script
        self.nargs = nargs
        self.body = body
        self.context = context
        self.future = future
        self.on_orphan = on_orphan
        self.queued_at = queued_at
        """Loop time the call was made (store silence counts against it only from then)."""

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


class _Batch:
    """Calls handed to one connection together, and what the store owes on it."""

    __slots__ = ("calls", "heard_at", "sent_at", "started_at")

    def __init__(self, calls: list[_Call], now: float) -> None:
        self.calls = calls
        self.started_at = now
        """When the batch got its connection (a connect may come before the write)."""
        self.sent_at: float | None = None
        """When its commands were written to the socket: None while connecting."""
        self.heard_at = 0.0
        """When reply bytes last arrived for it."""

    def unanswered(self) -> bool:
        return any(not call.future.done() for call in self.calls)


def _expire(future: asyncio.Future[Any], message: str) -> None:
    if not future.done():
        future.set_exception(StoreUnavailable(message, "timeout"))


EARLY_FLUSH = 16
"""A queue this long goes out at once, on an idle connected connection, rather than at the end
of the loop iteration: the server runs it while the process prepares the next calls."""
WARM_SLOTS = 4
"""Connections the first batch opens (its own and three more, concurrently): enough batches in
flight for the overlap, few sockets per event loop. More open only when these break."""
RECHECK = 0.001
"""Seconds before a deadline check that found no verdict (reply bytes waiting, or a late check
without direct evidence) looks again."""
TRUSTED_LAG = 0.25
"""A check without direct evidence (a connection whose socket cannot be inspected, such as the
embedded store's) is trusted only if the event loop ran it within this share of the timeout of
when it was due: a loop that ran late may not yet have processed what the store already did."""


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
        self._trusted_lag = timeout * TRUSTED_LAG
        self._patience = max(1.0, 10 * timeout)
        """How long past its deadline a call may wait on evidence that the reader will see."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._busy: dict[int, tuple[AbstractConnection, _Batch]] = {}
        """Batches on their connections (by the connection's id), until every reply is read."""
        self._watchdog: asyncio.TimerHandle | None = None
        self._watch_due = 0.0
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
        them). The future fails with StoreUnavailable on evidence that the store failed it (see
        the module's docstring); a reply that comes later goes to ``on_orphan(context, reply)``."""
        loop = self._loop
        future = loop.create_future()
        now = loop.time()
        self._queue.append(_Call(script, nargs, body, future, on_orphan, context, now))
        if self._watchdog is None:
            # Any deadline already watched is due no later than this call's earliest one.
            self._arm(now + self._timeout)
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

    # -- deadlines ------------------------------------------------------------------------

    def _arm(self, due: float) -> None:
        loop = self._loop
        self._watch_due = max(due, loop.time())
        self._watchdog = loop.call_at(self._watch_due, self._watch)

    def _watch(self) -> None:
        """Fail the calls the store has failed (see the module's docstring) and arm the next
        check. Runs on the one timer of this pipeline."""
        self._watchdog = None
        now = self._loop.time()
        # Ran on time: what the loop has not yet processed is at most a moment old.
        trusted = now - self._watch_due <= self._trusted_lag
        queued = any(not call.future.done() for call in self._queue)
        due = math.inf
        silent = bool(self._busy)
        for conn, batch in self._busy.values():
            quiet, then = self._judge(conn, batch, now, trusted, queued)
            silent = silent and quiet
            due = min(due, then)
        if queued:
            if silent:
                # Every connection the queue waits for owes replies and has sent nothing for a
                # whole timeout: the store has stalled, whatever this process is doing.
                for call in self._queue:
                    if call.future.done():
                        continue
                    if now - call.queued_at < self._timeout:
                        due = min(due, call.queued_at + self._timeout)
                        break
                    _expire(
                        call.future,
                        f"the store did not answer within {self._timeout}s "
                        "(no reply on any connection)",
                    )
            elif not self._busy:  # a flush is on its way: look again after a timeout
                due = min(due, now + self._timeout)
        if due < math.inf:
            self._arm(due)

    def _judge(
        self, conn: AbstractConnection, batch: _Batch, now: float, trusted: bool, queued: bool
    ) -> tuple[bool, float]:
        """Fail what the store has failed in one batch. Returns whether its connection has gone
        silent (owes replies, none for a timeout) and when to look at it again."""
        timeout = self._timeout
        if batch.sent_at is None:
            # Still connecting: a connect takes several turns of the event loop (a Sentinel
            # asks for the master first, TLS shakes hands), so a busy loop slows it down
            # whatever the store does. Its own timeout (socket_connect_timeout) judges it: a
            # refused connection fails at once, an unreachable host after that timeout.
            return False, math.inf
        unanswered = batch.unanswered()
        if not unanswered and not queued:
            return True, math.inf  # nobody is waiting on this connection
        # A batch's replies come in order, the later ones after the store has run the calls
        # before them (ours too): a connection that keeps answering is a live store, so the
        # deadline runs from its last reply bytes, or from the write.
        due = max(batch.sent_at, batch.heard_at) + timeout
        if now < due:
            return False, due
        waiting = waiting_on_us(conn)
        if (waiting or (waiting is None and not trusted)) and now < due + self._patience:
            # Reply bytes (or our own request bytes) wait in this process: the store may well
            # have answered in time. The reader parses them first; then look again. (Never
            # past the patience: a reader that makes no progress on them is stuck anyway.)
            return False, now + RECHECK
        if unanswered:
            for call in batch.calls:
                _expire(call.future, f"the store did not answer within {timeout}s")
        return True, math.inf

    # -- sending and reading --------------------------------------------------------------

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
        calls = [c for c in self._queue if not c.future.done()]
        self._queue.clear()
        if not calls:
            return
        self._idle.remove(conn)
        batch = _Batch(calls, self._loop.time())
        self._busy[id(conn)] = (conn, batch)
        commands = [c.command(True) for c in calls]
        written = False
        if conn.is_connected:
            streams = redis_compat.hiredis_streams(conn)
            if streams is not None:
                # Written now, not on the task's first step (the next loop iteration). A
                # transport that refuses the write leaves it to the task, which reconnects.
                try:
                    streams[0].write(b"".join(commands))
                    self._wrote(batch)
                    written = True
                except (RuntimeError, OSError) as exc:
                    logger.debug("writing a batch at once failed: %s", exc)
        task = self._loop.create_task(self._send(conn, batch, commands, written))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(
        self,
        conn: AbstractConnection,
        batch: _Batch,
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
                            self._round_trip(conn, commands, replies, written, batch),
                            *(self._connect(other) for other in cold),
                            return_exceptions=True,
                        )
                    finally:
                        self._idle.extend(cold)
                    if isinstance(first, BaseException):
                        raise first
                else:
                    await self._round_trip(conn, commands, replies, written, batch)
            except _StaleConnection:
                # An idle connection goes stale when Redis restarts or fails over: reconnect
                # once. The server may have run the batch before the connection broke, so only
                # scripts whose repetition errs toward under-delivery are sent again (a reserve
                # counted twice); a release run twice would refund twice, an overspend.
                await _discard(conn)
                for call in batch.calls:
                    if not call.script.retry_safe:
                        call.resolve(
                            StoreUnavailable(
                                "connection lost; not retried (not idempotent)", "connection"
                            )
                        )
                self._restart(batch, [c for c in batch.calls if c.script.retry_safe])
                await self._round_trip(
                    conn, [c.command(True) for c in batch.calls], replies, batch=batch
                )
            calls = batch.calls
            retry = [c for c, r in zip(calls, replies, strict=True) if isinstance(r, NoScriptError)]
            for call, reply in zip(calls, replies, strict=True):
                if not isinstance(reply, NoScriptError):
                    call.resolve(reply)
            if retry:
                # The server lost its script cache (restart, SCRIPT FLUSH): NOSCRIPT means the
                # script did not run, so sending it whole (which also caches it) is safe.
                logs.event(
                    "script_reloaded",
                    logging.INFO,
                    "script cache miss; reloading scripts (%d calls)",
                    len(retry),
                )
                self._restart(batch, retry)
                replies = []
                await self._round_trip(
                    conn, [c.command(False) for c in retry], replies, batch=batch
                )
                for call, reply in zip(retry, replies, strict=True):
                    call.resolve(reply)
        except (TimeoutError, RedisError, OSError) as exc:
            await _discard(conn)
            # Replies that did arrive still count (a late reservation is released as an
            # orphan); the rest never will: their outcome is unknown, so their spend stays
            # counted if they ran (under-delivery, never an overspend).
            kind = "timeout" if isinstance(exc, TimeoutError | RedisTimeoutError) else None
            error = StoreUnavailable(f"{type(exc).__name__}: {exc}", kind)
            for i, call in enumerate(batch.calls):
                call.resolve(replies[i] if i < len(replies) else error)
        except asyncio.CancelledError:
            # The loop is shutting down: the connection may hold unread replies.
            await _discard(conn)
            for call in batch.calls:
                call.resolve(StoreUnavailable("the store call was cancelled", "cancelled"))
            raise
        finally:
            self._busy.pop(id(conn), None)
            self._idle.append(conn)
            if self._queue and not self._flush_scheduled and not self._loop.is_closed():
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)

    def _wrote(self, batch: _Batch) -> None:
        """The batch is on the wire: its deadline runs from now, and the timer must be there to
        see it (after a connect, nothing else may have armed it)."""
        batch.sent_at = now = self._loop.time()
        if self._watchdog is None:
            self._arm(now + self._timeout)

    def _restart(self, batch: _Batch, calls: list[_Call]) -> None:
        """The batch goes out again (reconnected, or its scripts sent whole): its deadline
        counts from the new write."""
        batch.calls = calls
        batch.started_at = self._loop.time()
        batch.sent_at = None

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
        batch: _Batch | None = None,
    ) -> None:
        """One write (already done if ``written``), then the replies in order, appended to
        ``replies`` (script errors as StoreUnavailable values). ``batch`` learns when the write
        happened and when replies arrive. Raises _StaleConnection if a reused connection broke
        before any reply came back."""
        reused = written or conn.is_connected
        if not reused:
            await conn.connect()  # type: ignore[no-untyped-call]
            commands = self._preload + commands
        preloaded = len(self._preload) if not reused else 0
        try:
            streams = redis_compat.hiredis_streams(conn)
            if streams is not None:
                payload = b"" if written else b"".join(commands)
                await self._exchange(conn, *streams, payload, len(commands), replies, batch)
            else:  # another parser or connection class: redis-py's reads, one per reply
                await conn.send_packed_command(b"".join(commands))
                loop = self._loop
                if batch is not None:
                    self._wrote(batch)
                for _ in range(len(commands)):
                    try:
                        reply = await conn.read_response()
                    except ResponseError as exc:
                        reply = exc
                    replies.append(reply)
                    if batch is not None:
                        batch.heard_at = loop.time()
        except (ConnectionError, OSError) as exc:
            if reused and len(replies) <= preloaded:
                raise _StaleConnection from exc
            raise
        finally:
            if preloaded:
                for reply in replies[:preloaded]:
                    if isinstance(reply, BaseException):
                        logs.event(
                            "script_load_failed",
                            logging.ERROR,
                            "loading the xsp Lua scripts failed: %s",
                            reply,
                        )
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
        batch: _Batch | None,
    ) -> None:
        """Write ``payload`` (if any: it may be written already), then parse ``count`` replies
        with the connection's own hiredis reader, feeding it whole socket reads: a batch's
        replies usually arrive in one read.
        Errors as redis-py's ``read_response`` gives them: ConnectionError, TimeoutError (after
        the connection's ``socket_timeout`` with nothing from the store), error replies as
        values."""
        loop = self._loop
        timeout = conn.socket_timeout or None
        extended = False
        try:
            if payload:
                writer.write(payload)
                if batch is not None:
                    self._wrote(batch)
            while True:
                try:
                    async with asyncio.timeout(timeout) as deadline:
                        await writer.drain()
                        while len(replies) < count:
                            reply = reader.gets()
                            if reply is NOT_ENOUGH_DATA or reply is False:
                                data = await stream.read(read_size)
                                if not data:
                                    raise ConnectionError("Connection closed by server.")
                                reader.feed(data)
                                if batch is not None:
                                    batch.heard_at = loop.time()
                                if timeout is not None:  # per read, as redis-py's
                                    deadline.reschedule(loop.time() + timeout)
                            elif isinstance(reply, ConnectionError):  # LOADING, NOAUTH...
                                raise reply
                            else:
                                replies.append(reply)
                    return
                except TimeoutError as exc:  # the builtin one: asyncio.timeout expired
                    if not extended and waiting_on_us(conn):
                        extended = True  # the loop was late, not the store: read what came
                        continue
                    raise RedisTimeoutError(f"Timeout reading from {peer(conn)}") from exc
        except OSError as exc:
            raise ConnectionError(f"Error while reading from {peer(conn)} : {exc.args}") from exc

    async def aclose(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
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


async def _discard(conn: AbstractConnection) -> None:
    try:
        await conn.disconnect()
    except (RedisError, OSError) as exc:  # already broken; nothing more to free
        logger.debug("discarding a broken store connection failed: %s", exc)
