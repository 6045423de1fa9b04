"""Logs that never grow with traffic and never block a request.

Everything the middleware reports while serving goes through :func:`event`. Per kind of event
(``release_failed``, ``circuit_opened``...), at most one record is written per ``INTERVAL``
seconds, carrying how many such events happened::

    xsp_event=release_failed count=1 in the last 0 s: could not release a reservation ...
    xsp_event=release_failed count=1523 in the last 10 s: could not release a reservation ...

The first event of a quiet kind is written at once; the ones that follow within the interval are
counted, and their count is written when the interval ends, with the latest message.

Records are written by a daemon thread of this module, never by the caller: a log handler that
blocks (stderr a pipe that nobody reads, a slow disk) stalls that thread, not the event loop or
a request thread, and the counts keep accumulating meanwhile. Each record is an ordinary
``logging`` record of the ``xsp_middleware`` logger, with ``xsp_event`` and ``count`` as
attributes (``extra``), so structured handlers see them as fields.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from dataclasses import dataclass, field

logger = logging.getLogger("xsp_middleware")

INTERVAL = 10.0
"""Seconds between two records of one kind."""


@dataclass(slots=True)
class _Kind:
    level: int
    message: str
    args: tuple[object, ...]
    error: BaseException | None = None
    """The latest event's exception, written with its traceback."""
    count: int = 0
    """Events not yet written."""
    first_at: float = 0.0
    """When the oldest of them happened."""
    written_at: float = field(default=-INTERVAL)
    """When the last record of this kind was written (the interval runs from then)."""


class _Writer:
    """The counts per kind, and the thread that writes them."""

    def __init__(self) -> None:
        self._kinds: dict[str, _Kind] = {}
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None

    def event(
        self,
        kind: str,
        level: int,
        message: str,
        args: tuple[object, ...],
        error: BaseException | None,
    ) -> None:
        now = time.monotonic()
        with self._cond:
            entry = self._kinds.get(kind)
            if entry is None:
                entry = self._kinds[kind] = _Kind(level, message, args)
            entry.level, entry.message, entry.args, entry.error = level, message, args, error
            if not entry.count:
                entry.first_at = now
            entry.count += 1
            if entry.count == 1:
                self._cond.notify()  # the writer works out when this kind is due
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="xsp-middleware-logs", daemon=True
                )
                self._thread.start()

    def _due(self, now: float, *, everything: bool) -> tuple[list[tuple[str, _Kind, float]], float]:
        """Take the records to write now, and how long until the next one is due."""
        records = []
        wait = INTERVAL
        for kind, entry in self._kinds.items():
            if not entry.count:
                continue
            due = entry.written_at + INTERVAL
            if everything or now >= due:
                span = now - entry.first_at
                records.append(
                    (
                        kind,
                        _Kind(entry.level, entry.message, entry.args, entry.error, entry.count),
                        span,
                    )
                )
                entry.count = 0
                entry.error = None
                entry.written_at = now
            else:
                wait = min(wait, due - now)
        return records, wait

    def _run(self) -> None:
        while True:
            with self._cond:
                records, wait = self._due(time.monotonic(), everything=False)
                if not records:
                    self._cond.wait(wait)
                    continue
            _write(records)

    def flush(self) -> None:
        """Write every pending count now, in the calling thread."""
        with self._cond:
            records, _ = self._due(time.monotonic(), everything=True)
        _write(records)

    def reset(self) -> None:
        with self._cond:
            self._kinds.clear()


def _write(records: list[tuple[str, _Kind, float]]) -> None:
    for kind, entry, span in records:
        logger.log(
            entry.level,
            "xsp_event=%s count=%d in the last %.0f s: " + entry.message,
            kind,
            entry.count,
            span,
            *entry.args,
            exc_info=entry.error,
            extra={"xsp_event": kind, "count": entry.count},
        )


_writer = _Writer()


def event(
    kind: str, level: int, message: str, *args: object, error: BaseException | None = None
) -> None:
    """Report one event of ``kind`` (``message % args`` describes the latest, ``error`` is its
    exception, written with its traceback). Never blocks on a log handler, and costs one lock
    and a dict lookup."""
    _writer.event(kind, level, message, args, error)


def internal_error(doing: str, exc: BaseException) -> None:
    """A bug of ours while ``doing`` something (``"deciding"``, ``"releasing a
    reservation"``): reported with its traceback, at most once per interval; the request goes
    on under the failure policy, never as a 500."""
    event(
        "internal_error",
        logging.ERROR,
        "xsp_middleware: unexpected error while %s: %r",
        doing,
        exc,
        error=exc,
    )


def flush() -> None:
    """Write the pending counts of every kind now, from the calling thread (tests, shutdown)."""
    _writer.flush()


def reset() -> None:
    """Forget every count and interval (tests)."""
    _writer.reset()


def _flush_at_exit() -> None:
    # On a thread that may not finish: a handler blocked at exit must not hang the process.
    thread = threading.Thread(target=flush, name="xsp-middleware-logs-exit", daemon=True)
    thread.start()
    thread.join(1.0)


atexit.register(_flush_at_exit)
