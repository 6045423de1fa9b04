"""The store for sync callers (WSGI, Django under WSGI): the same scripts, keys and arguments as
:class:`~xsp_middleware.store.Store`, over redis-py's thread-safe sync connection pool. One
decision is one EVALSHA: no event loop per request, no ``async_to_sync``."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from redis.exceptions import (
    ConnectionError,
    NoScriptError,
    RedisError,
    ResponseError,
    TimeoutError,
)
from redis.retry import Retry

from . import observe
from .errors import StoreUnavailable
from .pipeline import Script
from .settings import CampaignConfig
from .store import (
    _NO_DRIVER_INFO,
    RELEASE,
    RESERVE,
    Reservation,
    Store,
    _memory_server,
    reservation_from,
)

logger = logging.getLogger("xsp_middleware")

LATE_REPLY_SECONDS = 5.0
"""How long a timed-out reserve's reply is still awaited (on a thread) to release it."""


class SyncStore:
    """Blocking reserve and release on the same store as an async :class:`Store`."""

    def __init__(self, store: Store) -> None:
        from redis.backoff import NoBackoff

        self.store = store
        if store.is_memory:
            import fakeredis

            client: Any = fakeredis.FakeRedis(server=_memory_server(store.url))
        else:
            client = redis.Redis.from_url(
                store.url,
                socket_connect_timeout=store.timeout,
                socket_timeout=store.timeout,
                retry=Retry(NoBackoff(), 0),
                health_check_interval=0,
                protocol=2,
                **_NO_DRIVER_INFO,
            )
        self.client = client
        self._pool = client.connection_pool

    def _call(self, script: Script, nargs: int, body: bytes, context: Any = None) -> Any:
        """One script call. With ``context`` (a reserve), a reply that comes after the timeout
        is still read, on a thread, and released: a late reservation never stays behind."""
        try:
            conn = self._pool.get_connection()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
        head = b"*%d\r\n" % (nargs + 2)
        handed_off = False
        try:
            # A list of chunks: redis-py would iterate a bare bytes object into ints.
            conn.send_packed_command([head + script.evalsha + body])
            try:
                return conn.read_response(disconnect_on_error=False)
            except NoScriptError:
                # A restarted or flushed script cache: NOSCRIPT means it did not run.
                conn.send_packed_command([head + script.eval + body])
                return conn.read_response(disconnect_on_error=False)
            except TimeoutError:
                if context is None:
                    raise
                # The script may yet run, or have run: its reply decides, on a thread.
                handed_off = True
                threading.Thread(
                    target=self._drain_late_reply, args=(conn, context), daemon=True
                ).start()
                raise
        except ResponseError as exc:
            raise StoreUnavailable(f"the store answered an error: {exc}") from exc
        except (ConnectionError, RedisError, OSError) as exc:
            # Unknown outcome: the connection may hold a late reply, so it is not reused.
            if not handed_off:
                conn.disconnect()
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
        finally:
            if not handed_off:
                self._pool.release(conn)

    def _drain_late_reply(self, conn: Any, context: Any) -> None:
        try:
            reply = conn.read_response(timeout=LATE_REPLY_SECONDS)
            reservation = reservation_from(context, reply)
            if reservation.reserved:
                if observe.current is not None:
                    observe.current.released("late_reply")
                # On this connection, with the same patience: the store is slow right now.
                nargs, body = self.store.release_call(reservation)
                head = b"*%d\r\n" % (nargs + 2)
                conn.send_packed_command([head + RELEASE.evalsha + body])
                try:
                    conn.read_response(timeout=LATE_REPLY_SECONDS)
                except NoScriptError:
                    conn.send_packed_command([head + RELEASE.eval + body])
                    conn.read_response(timeout=LATE_REPLY_SECONDS)
        except (RedisError, OSError, StoreUnavailable) as exc:
            # No reply, or no release: the spend stays counted (under-delivery, not overspend).
            logger.warning("a late reservation could not be released: %s", exc)
            conn.disconnect()
        finally:
            self._pool.release(conn)

    def reserve(
        self,
        campaign_id: str,
        user_key: str | None,
        cost_units: int | None,
        rule: CampaignConfig,
        *,
        counts_impression: bool = True,
    ) -> Reservation:
        """Check and reserve in one round trip. Raises StoreUnavailable on failure or timeout."""
        store = self.store
        store.admit_call()
        tz = store._zones.get(campaign_id, rule.timezone)
        context = (campaign_id, user_key, counts_impression)
        started = time.monotonic()
        for _ in range(2):
            nargs, body = store.reserve_call(
                campaign_id, user_key, cost_units, rule, counts_impression, tz
            )
            try:
                reply = self._call(RESERVE, nargs, body, context)
            except StoreUnavailable as exc:
                store.call_failed(exc)
                raise
            if reply[1] != 9:
                break
            tz = store.learn_zone(campaign_id, reply)
        else:
            raise StoreUnavailable(f"campaign {campaign_id}: its time zone keeps changing")
        return store.reserved(context, reply, started)

    def release(self, reservation: Reservation) -> None:
        """Give back a reservation's spend and impression. Raises StoreUnavailable."""
        self._call(RELEASE, *self.store.release_call(reservation))
