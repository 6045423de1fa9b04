"""The blocking driver of the store, for sync callers (WSGI, Django under WSGI): the plans of
``plans.py`` over redis-py's thread-safe sync connection pools. One decision is one EVALSHA:
no event loop per request, no ``async_to_sync``. It shares its async store's planner, so both
see the same keys, learned config and circuit breakers."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import (
    AskError,
    ClusterDownError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TimeoutError,
    TryAgainError,
)

from .. import logs, observe
from ..breaker import DENIED
from ..errors import StoreUnavailable
from ..settings import CampaignConfig
from . import memory
from .aio import Store
from .calls import Answer, Batch, Call
from .choice import COUNT_INTERVAL, Candidates, ChoiceFailed
from .halves import compensation_failed
from .pipeline import Redirected
from .plans import drive
from .protocol import BeaconReply, Choice, Reservation, beacon_reply, reservation_from, text
from .redis_compat import SlotMap, checkout, read_reply_within
from .scripts import RESERVE, RESERVE_ANY, Script
from .topology import connection_options, sync_client

LATE_REPLY_SECONDS = 5.0
"""How long a timed-out reserve's reply is still awaited (on a thread) to release it."""


class SyncStore:
    """Blocking reserve and release on the same store as an async :class:`Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.planner = store.planner
        self._options = connection_options(store.timeout, blocking=True)
        self._cluster: Any = None
        self._slot_map: SlotMap | None = None
        self._cluster_lock = threading.Lock()
        self._count_timer: threading.Timer | None = None
        """Writes the tallied denial counts of candidates (see _send_later)."""
        self._refreshed_at = 0.0
        client: Any = None
        if store.is_memory:
            client = memory.sync_client(store.url)
        elif not store.is_cluster:
            client = sync_client(store.topology, self._options)
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
                        cluster = sync_client(self.store.topology, self._options)
                        self._slot_map = SlotMap(cluster)
                        self._cluster = cluster
                    except (RedisError, RedisClusterException, OSError) as exc:
                        raise StoreUnavailable(f"cannot reach the cluster: {exc}") from exc
        return self._cluster

    # -- the plans, driven ------------------------------------------------------------------

    def reserve(
        self,
        campaign_id: str,
        user_key: str | None,
        cost_units: int | None,
        rule: CampaignConfig,
        *,
        counts_impression: bool = True,
        nonce: tuple[str, int] | None = None,
    ) -> Reservation:
        """Check and reserve in one round trip. Raises StoreUnavailable on failure or timeout.
        ``nonce``: a signed price's (nonce, expiry ms), used once (checked in the same call)."""
        planner = self.planner
        ticket = planner.admit()
        context = (campaign_id, user_key, counts_impression)
        extras = planner.extras(rule, nonce, counts_impression)
        if not self.store.is_cluster:
            started = time.monotonic()
            tz = planner.zones.get(campaign_id, rule.timezone)
            step = planner.reserve_call(
                campaign_id, user_key, cost_units, rule, counts_impression, tz, extras
            )
            for last in (False, True):
                try:
                    raw = self._call(RESERVE, *step, context)
                except StoreUnavailable as exc:
                    planner.call_failed(exc, ticket)
                    raise
                answer = planner.answered(
                    context, raw, cost_units, rule, started, ticket, last, extras
                )
                if isinstance(answer, Reservation):
                    return answer
                step = answer
            raise AssertionError("the last try answers a Reservation or raises")
        try:
            self.cluster_client()
        except StoreUnavailable as exc:
            planner.call_failed(exc, ticket)  # the store-wide breaker: no dead-cluster wait
            raise
        split = planner.split(context, cost_units, rule, ticket, extras)
        return drive(split, lambda batch: self._run_batch(batch, context))

    def reserve_any(
        self,
        candidates: Candidates,
        user_key: str | None,
        cost_units: int | None,
        *,
        weighted: bool = False,
    ) -> Choice:
        """:meth:`Store.reserve_any <xsp_middleware.store.Store.reserve_any>`, blocking."""
        planner = self.planner
        chooser = planner.chooser
        ticket = planner.admit()
        if not self.store.is_cluster:
            started = time.monotonic()

            def late(reply: Any) -> Reservation | None:
                return chooser.late_reservation(candidates, user_key, reply)

            for _ in range(3):
                step = chooser.any_call(candidates, user_key, cost_units, True, weighted)
                try:
                    raw = self._call(RESERVE_ANY, *step, late=late)
                except StoreUnavailable as exc:
                    planner.call_failed(exc, ticket)
                    raise
                made = chooser.answered(candidates, user_key, True, raw, started, ticket)
                if made is not None:
                    self._send_later(chooser.flush_due())
                    return made
            raise StoreUnavailable("the candidates' time zones keep changing")
        try:
            self.cluster_client()
        except StoreUnavailable as exc:
            planner.call_failed(exc, ticket)
            raise
        context = (candidates[0][0], user_key, True)
        plan = chooser.split(candidates, user_key, cost_units, True, weighted, ticket)
        try:
            choice = drive(plan, lambda batch: self._run_batch(batch, context))
        except ChoiceFailed as exc:
            self._send_later(exc.later)
            raise
        self._send_later(choice.later)
        return choice

    def _send_later(self, calls: list[Call]) -> None:
        """After a choice: denial counts and releases (their failures logged); and, while
        denials are tallied but not written, a timer that writes them within COUNT_INTERVAL even
        if no decision follows (see ``Chooser.count``)."""
        if self.planner.chooser.tally and self._count_timer is None:
            with self._cluster_lock:
                if self._count_timer is None:
                    self._count_timer = threading.Timer(COUNT_INTERVAL, self._counts_due)
                    self._count_timer.daemon = True
                    self._count_timer.start()
        if not calls:
            return
        if not self.store.is_cluster:
            for call in calls:
                try:
                    self._call(call.script, call.nargs, call.body)
                except StoreUnavailable as exc:
                    compensation_failed("campaign", exc)
            return
        for _, _, result in self._run_batch(Batch(calls, False), None):
            if isinstance(result, StoreUnavailable):
                compensation_failed("campaign", result)

    def _counts_due(self) -> None:
        self._count_timer = None
        try:
            self._send_later(self.planner.chooser.flush_due(force=True))
        except Exception as exc:  # a timer thread: report, never raise into nothing
            logs.internal_error("writing the denial counts of candidates", exc)

    def release(self, reservation: Reservation) -> None:
        """Give back a reservation's spend and impression. Raises StoreUnavailable."""
        if not self.store.is_cluster:
            for _, script, nargs, body in self.planner.release_calls(reservation):
                self._call(script, nargs, body)
            return
        # A cluster reservation's two halves, both sent before either is read.
        calls = [Call(*call) for call in self.planner.halves.releases(reservation)]
        for _, _, result in self._run_batch(Batch(calls, False), None):
            if isinstance(result, StoreUnavailable):
                raise result

    def confirm_beacon(self, campaign_id: str, rid: str) -> BeaconReply:
        """:meth:`Store.confirm_beacon <xsp_middleware.store.aio.Store.confirm_beacon>`,
        blocking."""
        planner = self.planner
        reply = beacon_reply(self._one(*planner.beacon_call(campaign_id, rid, "confirm")))
        if reply.outcome == 1 and reply.user_key:
            self._one(*planner.beacon_user_call(text(reply.user_key), campaign_id, rid, "confirm"))
        return reply

    def _one(self, slot: int, script: Script, nargs: int, body: bytes) -> Any:
        """One script call, on one server or on a cluster slot's master."""
        if not self.store.is_cluster:
            return self._call(script, nargs, body)
        ((_, _, result),) = self._run_batch(Batch([Call(slot, script, nargs, body)], False), None)
        if isinstance(result, StoreUnavailable):
            raise result
        return result

    # -- one server -------------------------------------------------------------------------

    def _call(
        self,
        script: Script,
        nargs: int,
        body: bytes,
        context: Any = None,
        *,
        late: Callable[[Any], Reservation | None] | None = None,
    ) -> Any:
        """One script call. With ``context`` (a reserve) or ``late`` (what a reply reserved), a
        reply that comes after the timeout is still read, on a thread, and released: a late
        reservation never stays behind."""
        if late is None and context is not None:

            def late(reply: Any) -> Reservation | None:
                return reservation_from(context, reply)

        pool = self._pool
        try:
            conn = checkout(pool)
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        handed_off = False
        try:
            _send(conn, script, nargs, body)
            try:
                return _read(conn, script, nargs, body, None)
            except TimeoutError:
                if late is None:
                    raise
                # The script may yet run, or have run: its reply decides, on a thread.
                handed_off = True
                threading.Thread(
                    target=self._drain_late_reply, args=(pool, conn, late), daemon=True
                ).start()
                raise
        except RedisError as exc:
            # Unknown outcome: the connection may hold a late reply, so it is not reused.
            if not handed_off and not isinstance(exc, ResponseError):
                conn.disconnect()
            raise _unavailable(exc) from exc
        except OSError as exc:
            if not handed_off:
                conn.disconnect()
            raise _unavailable(exc) from exc
        finally:
            if not handed_off:
                pool.release(conn)

    def _drain_late_reply(
        self, pool: Any, conn: Any, late: Callable[[Any], Reservation | None]
    ) -> None:
        try:
            reply = read_reply_within(conn, LATE_REPLY_SECONDS)
            reservation = late(reply)
            if reservation is not None and reservation.reserved:
                if observe.current is not None:
                    observe.current.released("late_reply")
                # On this connection, with the same patience: the store is slow right now.
                for _, script, nargs, body in self.planner.release_calls(reservation):
                    _send(conn, script, nargs, body)
                    _read(conn, script, nargs, body, time.monotonic() + LATE_REPLY_SECONDS)
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

    # -- Redis Cluster: the calls of a batch all sent before any is read --------------------

    def _run_batch(self, batch: Batch, context: Any) -> list[Answer]:
        """Send each call to its slot's master, then read every reply, in order. A redirected
        call (it did not run) is sent once more after re-learning the slot map."""
        if batch.context is not None:
            context = batch.context
        answers = self._send_and_read(batch.calls, batch.decision, context)
        moved = [i for i, (_, _, r) in enumerate(answers) if isinstance(r, Redirected)]
        if moved:
            self._refresh_map()
            again = self._send_and_read([batch.calls[i] for i in moved], batch.decision, context)
            for i, answer in zip(moved, again, strict=True):
                answers[i] = answer
        if any(isinstance(r, StoreUnavailable) for _, _, r in answers):
            self._refresh_soon()  # a master may have failed over: find where its slots went
        return answers

    def _send_and_read(self, calls: list[Call], decision: bool, context: Any) -> list[Answer]:
        # (node, ticket, pool, conn) or (node, ticket, None, error)
        sent: list[tuple[str, int, Any, Any]] = []
        for call in calls:
            try:
                node, pool = self._node_pool(call.slot)
            except StoreUnavailable as exc:
                sent.append(("?", DENIED, None, exc))
                continue
            ticket = self.planner.breaker_for(node).admit(decision=decision)
            if ticket == DENIED:
                error = StoreUnavailable(
                    f"the circuit of shard {node} is open (recent failures)", "circuit_open"
                )
                sent.append((node, DENIED, None, error))
                continue
            try:
                conn = checkout(pool)
            except (RedisError, OSError) as exc:
                sent.append((node, ticket, None, _unavailable(exc)))
                continue
            try:
                _send(conn, call.script, call.nargs, call.body)
            except (RedisError, OSError) as exc:
                conn.disconnect()
                pool.release(conn)
                sent.append((node, ticket, None, _unavailable(exc)))
                continue
            sent.append((node, ticket, pool, conn))
        answers: list[Answer] = []
        deadline = time.monotonic() + self.store.timeout
        for (node, ticket, pool, conn), call in zip(sent, calls, strict=True):
            if pool is None:
                answers.append((node, ticket, conn))
            else:
                answers.append((node, ticket, self._read_half(pool, conn, call, context, deadline)))
        return answers

    def _read_half(self, pool: Any, conn: Any, call: Call, context: Any, deadline: float) -> Any:
        """The reply of a call sent on ``conn`` (or its StoreUnavailable, as a value), waited
        for until ``deadline`` (shared by the calls sent together: one timeout, not two). A
        reservation's half that times out is read on, on a thread, and released if it passed."""
        handed_off = False
        try:
            try:
                return _read(conn, call.script, call.nargs, call.body, deadline)
            except TimeoutError:
                if call.late is not None:
                    handed_off = True
                    threading.Thread(
                        target=self._drain_half, args=(pool, conn, context, call), daemon=True
                    ).start()
                raise
        except (AskError, TryAgainError, ClusterDownError) as exc:
            return Redirected(f"the cluster redirected the call: {exc}")
        except RedisError as exc:
            if not handed_off and not isinstance(exc, ResponseError):
                conn.disconnect()
            return _unavailable(exc)
        except OSError as exc:
            if not handed_off:
                conn.disconnect()
            return _unavailable(exc)
        finally:
            if not handed_off:
                pool.release(conn)

    def _drain_half(self, pool: Any, conn: Any, context: Any, call: Call) -> None:
        """A timed-out half's reply, read on a thread: a half that passed is released."""
        assert call.late is not None
        try:
            undo = call.late(context, read_reply_within(conn, LATE_REPLY_SECONDS))
            if undo is not None:
                if observe.current is not None:
                    observe.current.released("late_reply")
                self._run_batch(Batch([Call(*undo)], False), None)
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

    def _node_pool(self, slot: int) -> tuple[str, Any]:
        """The connection pool of the master serving ``slot``."""
        cluster = self.cluster_client()
        assert self._slot_map is not None
        try:
            node = self._slot_map.master_of(slot)
            return str(node.name), cluster.get_redis_connection(node).connection_pool
        except (RedisError, RedisClusterException, OSError) as exc:
            raise StoreUnavailable(f"slot {slot} is not served: {exc}") from exc

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
            self.cluster_client()
            assert self._slot_map is not None
            self._slot_map.read_blocking()
        except (RedisError, RedisClusterException, OSError, StoreUnavailable) as exc:
            logs.event(
                "slot_map_refresh_failed",
                logging.WARNING,
                "re-learning the cluster's slot map failed: %s",
                exc,
            )


def _left(deadline: float) -> float:
    return max(0.001, deadline - time.monotonic())


def _send(conn: Any, script: Script, nargs: int, body: bytes) -> None:
    # A list of chunks: redis-py would iterate a bare bytes object into ints.
    conn.send_packed_command([b"*%d\r\n" % (nargs + 2) + script.evalsha + body])


def _read(conn: Any, script: Script, nargs: int, body: bytes, deadline: float | None) -> Any:
    """The reply of the call sent on ``conn``; on NOSCRIPT (a restarted or flushed script
    cache: the script did not run) the script is sent whole and that reply read."""
    try:
        return _reply(conn, deadline)
    except NoScriptError:
        conn.send_packed_command([b"*%d\r\n" % (nargs + 2) + script.eval + body])
        return _reply(conn, deadline)


def _reply(conn: Any, deadline: float | None) -> Any:
    if deadline is None:  # the connection's socket_timeout: store_timeout
        return conn.read_response(disconnect_on_error=False)
    return read_reply_within(conn, _left(deadline), disconnect_on_error=False)


def _unavailable(exc: BaseException) -> StoreUnavailable:
    """What a redis-py failure means to a decision."""
    if isinstance(exc, ResponseError):
        return StoreUnavailable(f"the store answered an error: {exc}")
    return StoreUnavailable(f"{type(exc).__name__}: {exc}")
