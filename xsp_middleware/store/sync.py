"""The store for sync callers (WSGI, Django under WSGI): the same scripts, keys and arguments as
:class:`~xsp_middleware.store.Store`, over redis-py's thread-safe sync connection pool. One
decision is one EVALSHA: no event loop per request, no ``async_to_sync``."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TimeoutError,
    TryAgainError,
)
from redis.retry import Retry

from .. import logs, observe
from ..breaker import DENIED
from ..errors import StoreUnavailable
from ..settings import CampaignConfig
from .aio import (
    _NO_DRIVER_INFO,
    Store,
    _memory_server,
)
from .halves import compensation_failed
from .pipeline import Redirected
from .protocol import Context, Reason, Reservation, campaign_reply, reservation_from
from .scripts import RELEASE, RESERVE, RESERVE_CAMPAIGN, RESERVE_USER, Script
from .topology import sync_client

LATE_REPLY_SECONDS = 5.0
"""How long a timed-out reserve's reply is still awaited (on a thread) to release it."""


class SyncStore:
    """Blocking reserve and release on the same store as an async :class:`Store`."""

    def __init__(self, store: Store) -> None:
        from redis.backoff import NoBackoff

        self.store = store
        options: dict[str, Any] = {
            "socket_connect_timeout": store.timeout,
            "socket_timeout": store.timeout,
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
            "protocol": 2,
            **_NO_DRIVER_INFO,
        }
        self._options = options
        self._cluster: Any = None
        self._cluster_lock = threading.Lock()
        self._refreshed_at = 0.0
        client: Any = None
        if store.is_memory:
            import fakeredis

            client = fakeredis.FakeRedis(server=_memory_server(store.url))
        elif not store.is_cluster:
            client = sync_client(store.topology, options)
        self._client = client
        self._pool: Any = None if client is None else client.connection_pool

    @property
    def client(self) -> Any:
        """The sync redis-py client of this store (on a cluster, its RedisCluster)."""
        return self.cluster_client() if self.store.is_cluster else self._client

    def cluster_client(self) -> Any:
        """redis-py's sync RedisCluster, created on first use (it reads the slot map at once,
        which must not fail the constructor of an app whose cluster is still starting)."""
        if self._cluster is None:
            with self._cluster_lock:
                if self._cluster is None:
                    try:
                        self._cluster = sync_client(self.store.topology, self._options)
                    except (RedisError, RedisClusterException, OSError) as exc:
                        raise StoreUnavailable(f"cannot reach the cluster: {exc}") from exc
        return self._cluster

    def _refresh_soon(self) -> None:
        """Re-learn the slot map on a thread, at most once a second."""
        now = time.monotonic()
        with self._cluster_lock:
            if now - self._refreshed_at < 1.0:
                return
            self._refreshed_at = now
        threading.Thread(target=self._refresh_map, daemon=True).start()

    def _refresh_map(self) -> None:
        try:
            self.cluster_client().nodes_manager.initialize()
        except (RedisError, RedisClusterException, OSError, StoreUnavailable) as exc:
            logs.event(
                "slot_map_refresh_failed",
                logging.WARNING,
                "re-learning the cluster's slot map failed: %s",
                exc,
            )

    def _node_pool(self, slot: int) -> tuple[str, Any]:
        """The connection pool of the master serving ``slot``."""
        cluster = self.cluster_client()
        try:
            node = cluster.nodes_manager.get_node_from_slot(slot)
            return str(node.name), cluster.get_redis_connection(node).connection_pool
        except (RedisError, RedisClusterException, OSError) as exc:
            raise StoreUnavailable(f"slot {slot} is not served: {exc}") from exc

    def _call(self, script: Script, nargs: int, body: bytes, context: Any = None) -> Any:
        """One script call. With ``context`` (a reserve), a reply that comes after the timeout
        is still read, on a thread, and released: a late reservation never stays behind."""
        pool = self._pool
        try:
            conn = pool.get_connection()
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
                    target=self._drain_late_reply, args=(pool, conn, context), daemon=True
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
                pool.release(conn)

    def _drain_late_reply(self, pool: Any, conn: Any, context: Any) -> None:
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
            logs.event(
                "late_reply_release_failed",
                logging.WARNING,
                "a late reservation could not be released: %s",
                exc,
            )
            conn.disconnect()
        finally:
            pool.release(conn)

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
        ticket = store.admit_call()
        tz = store._zones.get(campaign_id, rule.timezone)
        context = (campaign_id, user_key, counts_impression)
        if store.is_cluster:
            return self._reserve_split(context, cost_units, rule, tz, ticket)
        started = time.monotonic()
        for _ in range(2):
            nargs, body = store.reserve_call(
                campaign_id, user_key, cost_units, rule, counts_impression, tz
            )
            try:
                reply = campaign_reply(self._call(RESERVE, nargs, body, context))
            except StoreUnavailable as exc:
                store.call_failed(exc, ticket)
                raise
            if reply.reason != Reason.TZ_RETRY:
                break
            tz = store.learn_zone(campaign_id, reply)
        else:
            raise StoreUnavailable(f"campaign {campaign_id}: its time zone keeps changing")
        return store.reserved(context, reply, started, ticket)

    def release(self, reservation: Reservation) -> None:
        """Give back a reservation's spend and impression. Raises StoreUnavailable."""
        if not self.store.is_cluster:
            self._call(RELEASE, *self.store.release_call(reservation))
            return
        self._release_split(reservation)

    def _release_split(self, reservation: Reservation) -> None:
        """A cluster reservation's two halves released, both sent before either is read."""
        calls = self.store.halves.releases(reservation)
        results = self._run_slots([(slot, s, n, b, None, None) for slot, s, n, b in calls])
        for _, _, result in results:
            if isinstance(result, StoreUnavailable):
                raise result

    # -- Redis Cluster: both halves sent before either is read (one round trip of latency) --

    def _run_slots(
        self, calls: list[tuple[int, Script, int, bytes, Any, Any]], *, decision: bool = False
    ) -> list[tuple[str, int, Any]]:
        """Send each (slot, script, count, args, context, orphan) to its slot's master, then
        read every reply: (node, its breaker's ticket, reply or StoreUnavailable) in order. A
        MOVED reply re-learns the slot map and sends that call once more (it did not run).
        Only a ``decision`` may be a half-open circuit's probe (see Shards.send)."""
        results = self._send_and_read(calls, decision)
        moved = [i for i, (_, _, r) in enumerate(results) if isinstance(r, Redirected)]
        if moved:
            self._refresh_map()
            again = self._send_and_read([calls[i] for i in moved], decision)
            for i, result in zip(moved, again, strict=True):
                results[i] = result
        return results

    def _send_and_read(
        self, calls: list[tuple[int, Script, int, bytes, Any, Any]], decision: bool
    ) -> list[tuple[str, int, Any]]:
        # (node, ticket, pool, conn) or (node, ticket, None, error)
        sent: list[tuple[str, int, Any, Any]] = []
        for slot, script, nargs, body, _, _ in calls:
            try:
                node, pool = self._node_pool(slot)
            except StoreUnavailable as exc:
                sent.append(("?", DENIED, None, exc))
                continue
            ticket = self.store.breaker_for(node).admit(decision=decision)
            if ticket == DENIED:
                error = StoreUnavailable(
                    f"the circuit of shard {node} is open (recent failures)", "circuit_open"
                )
                sent.append((node, DENIED, None, error))
                continue
            try:
                conn = pool.get_connection()
            except (RedisError, OSError) as exc:
                error = StoreUnavailable(f"{type(exc).__name__}: {exc}")
                sent.append((node, ticket, None, error))
                continue
            try:
                conn.send_packed_command([b"*%d\r\n" % (nargs + 2) + script.evalsha + body])
            except (RedisError, OSError) as exc:
                conn.disconnect()
                pool.release(conn)
                error = StoreUnavailable(f"{type(exc).__name__}: {exc}")
                sent.append((node, ticket, None, error))
                continue
            sent.append((node, ticket, pool, conn))
        results: list[tuple[str, int, Any]] = []
        deadline = time.monotonic() + self.store.timeout
        for (node, ticket, pool, conn), (_, script, nargs, body, context, orphan) in zip(
            sent, calls, strict=True
        ):
            if pool is None:
                results.append((node, ticket, conn))
                continue
            read = self._read(pool, conn, script, nargs, body, context, orphan, deadline)
            results.append((node, ticket, read))
        return results

    def _read(
        self,
        pool: Any,
        conn: Any,
        script: Script,
        nargs: int,
        body: bytes,
        context: Any,
        orphan: Any,
        deadline: float,
    ) -> Any:
        """The reply of a call sent on ``conn`` (or its StoreUnavailable, as a value), waited
        for until ``deadline`` (shared by the calls sent together: one timeout, not two)."""
        handed_off = False
        try:
            try:
                wait = max(0.001, deadline - time.monotonic())
                return conn.read_response(disconnect_on_error=False, timeout=wait)
            except NoScriptError:
                conn.send_packed_command([b"*%d\r\n" % (nargs + 2) + script.eval + body])
                wait = max(0.001, deadline - time.monotonic())
                return conn.read_response(disconnect_on_error=False, timeout=wait)
            except TimeoutError:
                if orphan is not None:
                    handed_off = True
                    threading.Thread(
                        target=self._drain_half, args=(pool, conn, context, orphan), daemon=True
                    ).start()
                raise
        except (AskError, TryAgainError, ClusterDownError) as exc:
            return Redirected(f"the cluster redirected the call: {exc}")
        except ResponseError as exc:
            return StoreUnavailable(f"the store answered an error: {exc}")
        except (ConnectionError, RedisError, OSError) as exc:
            if not handed_off:
                conn.disconnect()
            return StoreUnavailable(f"{type(exc).__name__}: {exc}")
        finally:
            if not handed_off:
                pool.release(conn)

    def _drain_half(self, pool: Any, conn: Any, context: Any, orphan: Any) -> None:
        """A timed-out half's reply, read on a thread: a half that passed is released."""
        try:
            reply = conn.read_response(timeout=LATE_REPLY_SECONDS)
            undo = orphan(context, reply)
            if undo is not None:
                if observe.current is not None:
                    observe.current.released("late_reply")
                self._run_slots([(*undo, None, None)])
        except (RedisError, OSError, StoreUnavailable) as exc:
            logs.event(
                "late_reply_release_failed",
                logging.WARNING,
                "a late reservation half could not be released: %s",
                exc,
            )
            conn.disconnect()
        finally:
            pool.release(conn)

    def _compensate(self, undo: list[tuple[str, int, Script, int, bytes]]) -> None:
        """Release the halves that passed when the other denied (the deny path only)."""
        results = self._run_slots([(slot, s, n, b, None, None) for _, slot, s, n, b in undo])
        for (what, *_), (_, _, result) in zip(undo, results, strict=True):
            if isinstance(result, StoreUnavailable):
                compensation_failed(what, result)

    def _reserve_split(
        self,
        context: Context,
        cost_units: int | None,
        rule: CampaignConfig,
        tz: str,
        ticket: int,
    ) -> Reservation:
        store = self.store
        campaign_id, user_key, counts = context
        started = time.monotonic()
        try:
            self.cluster_client()
        except StoreUnavailable as exc:
            store.call_failed(exc, ticket)  # the store-wide breaker: no waiting on a dead cluster
            raise
        store.breaker.record(ticket, False)
        for _ in range(3):
            c_slot, (c_n, c_body), user_call = store.halves.calls(
                campaign_id, user_key, cost_units, rule, counts, tz
            )
            calls: list[tuple[int, Script, int, bytes, Any, Any]] = [
                (c_slot, RESERVE_CAMPAIGN, c_n, c_body, context, store.halves.late_campaign_undo)
            ]
            if user_call is not None:
                calls.append(
                    (
                        *user_call[:1],
                        RESERVE_USER,
                        *user_call[1:],
                        context,
                        store.halves.late_user_undo,
                    )
                )
            results = self._run_slots(calls, decision=True)
            failures: list[StoreUnavailable] = []
            for node, node_ticket, result in results:
                store.halves.outcome(node, node_ticket, result, failures)
            if failures:  # a master may have failed over: find where its slots went
                self._refresh_soon()
            campaign = results[0][2]
            user = results[1][2] if user_call is not None else None
            split, undo = store.halves.combine(context, campaign, user, cost_units, rule)
            if undo:
                self._compensate(undo)
            outcome = store.halves.result(context, split, failures, started, rule)
            if isinstance(outcome, Reservation):
                return outcome
            tz = outcome
        raise StoreUnavailable(f"campaign {campaign_id}: its stored config keeps changing")
