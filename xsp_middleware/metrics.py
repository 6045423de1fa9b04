"""Prometheus metrics for xsp-middleware (the optional extra ``xsp-middleware[metrics]``).

``enable_metrics()`` installs an :mod:`~xsp_middleware.observe` observer that turns the events
the core reports into these metrics:

========================================  ==========================================================
``xsp_decisions_total{outcome,reason}``   every decision: outcome ``served``, ``denied`` or
                                          ``invalid``; reason: the decision reason (``served``,
                                          ``frequency_capped``...), or the offending field of an
                                          invalid request (``campaign_id``, ``cpm``)
``xsp_store_latency_seconds``             histogram of the reserve round trips that answered
``xsp_store_errors_total{kind}``          ``timeout``, ``connection``, ``error``, ``circuit_open``
``xsp_degraded_decisions_total{check}``   decisions the failure policy took: ``budget``,
                                          ``frequency``
``xsp_circuit_open``                      gauge: 1 while the store circuit is open, else 0
``xsp_reservations_released_total{why}``  ``status``, ``exception``, ``disconnect``,
                                          ``incomplete``, ``late_reply``
``xsp_beacons_total{result}``             ``confirmed``, ``duplicate``, ``rejected``,
                                          ``expired``, ``error`` (the store failed)
``xsp_candidates_evaluated``              histogram of the candidates evaluated by each decision
                                          that named several (``campaign_id=a,b,c``)
========================================  ==========================================================

``enable_metrics(campaign_label=True)`` adds a ``campaign`` label to ``xsp_decisions_total``.
It is off by default: every campaign id becomes a time series. At most ``max_campaigns``
distinct campaigns get their own series; later ones are counted under ``campaign="__other__"``
(campaign ids never start with ``_``), so a flood of made-up campaign ids cannot blow up the
scrape.

Example (run as a doctest by the tests)::

    >>> import asyncio, httpx
    >>> from prometheus_client import CollectorRegistry
    >>> from starlette.applications import Starlette
    >>> from starlette.responses import Response
    >>> from starlette.routing import Route
    >>> from xsp_middleware import XSPMiddleware
    >>> from xsp_middleware.metrics import enable_metrics, mount_metrics
    >>> async def ad(request):
    ...     return Response("<VAST/>", media_type="application/xml")
    >>> registry = CollectorRegistry()    # leave it out to use prometheus_client's REGISTRY
    >>> observer = enable_metrics(registry=registry)
    >>> app = Starlette(routes=[Route("/ad", ad)])
    >>> route = mount_metrics(app, registry=registry)          # GET /metrics
    >>> async def visit():
    ...     transport = httpx.ASGITransport(XSPMiddleware(app, redis_url="memory://docs"))
    ...     async with httpx.AsyncClient(transport=transport, base_url="http://ads") as client:
    ...         user = {"cookie": "user_id=u1"}
    ...         served = await client.get("/ad?campaign_id=c1&cpm=2.50", headers=user)
    ...         return served, await client.get("/metrics")
    >>> served, scrape = asyncio.run(visit())
    >>> served.status_code, scrape.headers["content-type"]
    (200, 'text/plain; version=0.0.4; charset=utf-8')
    >>> 'xsp_decisions_total{outcome="served",reason="served"} 1.0' in scrape.text
    True
    >>> from xsp_middleware import observe
    >>> observe.install(None)             # stop observing (only this example needs to)

With FastAPI it is the same two calls, once per process, before serving::

    app = FastAPI()
    app.add_middleware(XSPMiddleware, settings=Settings.from_env(redis_url="redis://127.0.0.1:6379/0"))
    enable_metrics()
    mount_metrics(app)            # GET /metrics; metrics_app() is the bare ASGI app

**Several worker processes** (gunicorn, ``uvicorn --workers``): set ``PROMETHEUS_MULTIPROC_DIR``
to an empty directory *before* the workers start (prometheus_client reads it when it is first
imported). Each worker then writes its metrics there, and ``metrics_app`` answers every scrape,
whichever worker gets it, with the merged values of all workers
(``prometheus_client.multiprocess.MultiProcessCollector`` on a fresh ``CollectorRegistry``; the
``registry`` argument is then not used). ``xsp_circuit_open`` is merged with ``livemax``: 1
while any live worker's circuit is open. Empty the directory when the server starts, and call
``prometheus_client.multiprocess.mark_process_dead(pid)`` when a worker exits (gunicorn's
``child_exit`` hook) so a dead worker's gauge stops counting.

A metrics failure never breaks a request: every observer method catches and logs its errors.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

from . import observe
from .errors import ConfigError
from .types import Receive, Scope, Send


class MetricsUnavailable(ConfigError, ImportError):
    """The ``metrics`` extra is not installed (prometheus_client is missing)."""


try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client import values as _values
    from prometheus_client.exposition import generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector
except ImportError as _exc:  # pragma: no cover - exercised with prometheus_client hidden
    raise MetricsUnavailable(
        "xsp_middleware.metrics needs prometheus_client, which the optional extra provides: "
        "pip install 'xsp-middleware[metrics]'"
    ) from _exc

__all__ = [
    "CONTENT_TYPE",
    "LATENCY_BUCKETS",
    "MetricsApp",
    "MetricsUnavailable",
    "PrometheusObserver",
    "enable_metrics",
    "metrics_app",
    "mount_metrics",
]

logger = logging.getLogger("xsp_middleware")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format, which every Prometheus version scrapes."""

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
)
"""Seconds: a reserve round trip takes well under a millisecond on a nearby Redis; the
default ``store_timeout`` is 50 ms, and anything slower than 100 ms lands in ``+Inf``."""

CANDIDATE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)
"""``xsp_candidates_evaluated`` buckets: up to ``max_candidates``' highest value."""

OTHER_CAMPAIGN = "__other__"
"""The ``campaign`` label of campaigns beyond ``max_campaigns`` (no campaign id starts with _)."""

# What the core documents for each event (observe.py, decision.py): their series exist from
# the start at 0, so a rate() over them works before the first occurrence.
_DENIAL_REASONS = (
    "frequency_capped",
    "budget_exhausted",
    "campaign_paused",
    "campaign_inactive",
    "paced",
    "user_blocked",
    "no_consent",
    "anonymous",
    "store_unavailable",
    "no_eligible_campaign",
)
_ERROR_KINDS = ("timeout", "connection", "error", "circuit_open")
_CHECKS = ("budget", "frequency")
_RELEASE_REASONS = ("status", "exception", "disconnect", "incomplete", "late_reply")
_BEACON_RESULTS = ("confirmed", "duplicate", "rejected", "expired", "error")


class PrometheusObserver:
    """An :class:`~xsp_middleware.observe.Observer` that updates Prometheus metrics.

    Build it with :func:`enable_metrics`. Its methods never raise.
    """

    def __init__(
        self, registry: CollectorRegistry, *, campaign_label: bool, max_campaigns: int
    ) -> None:
        self.registry = registry
        self.campaign_label = campaign_label
        self.max_campaigns = max_campaigns
        self._campaigns: set[str] = set()
        self._lock = threading.Lock()
        self._failures: set[str] = set()
        created: list[Any] = []

        def make(metric: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            created.append(metric(*args, registry=registry, **kwargs))
            return created[-1]

        try:
            self.decisions = make(
                Counter,
                "xsp_decisions",
                "Ad request decisions, by outcome (served, denied, invalid) and reason (the "
                "decision reason, or the invalid field).",
                ("outcome", "reason", "campaign") if campaign_label else ("outcome", "reason"),
            )
            self.store_latency = make(
                Histogram,
                "xsp_store_latency_seconds",
                "Duration of the reserve round trips that the store answered.",
                buckets=LATENCY_BUCKETS,
            )
            self.store_errors = make(
                Counter,
                "xsp_store_errors",
                "Reserve calls that failed, by kind (timeout, connection, error, circuit_open).",
                ("kind",),
            )
            self.degraded_decisions = make(
                Counter,
                "xsp_degraded_decisions",
                "Decisions taken by the failure policy because the store failed, by check "
                "(budget, frequency).",
                ("check",),
            )
            self.circuit_open = make(
                Gauge,
                "xsp_circuit_open",
                "1 while the store circuit breaker is open, else 0.",
                multiprocess_mode="livemax",
            )
            self.reservations_released = make(
                Counter,
                "xsp_reservations_released",
                "Reservations given back, by why (status, exception, disconnect, incomplete, "
                "late_reply).",
                ("why",),
            )
            self.beacons = make(
                Counter,
                "xsp_beacons",
                "Impression beacons answered, by result (confirmed, duplicate, rejected, "
                "expired, error).",
                ("result",),
            )
            self.candidates_evaluated = make(
                Histogram,
                "xsp_candidates_evaluated",
                "Candidates evaluated per decision that named several.",
                buckets=CANDIDATE_BUCKETS,
            )
        except ValueError as exc:  # "Duplicated timeseries": someone else registered them
            for metric in created:
                registry.unregister(metric)
            raise ConfigError(
                f"enable_metrics: this registry already holds xsp metrics not made by "
                f"enable_metrics ({exc}); pass another registry"
            ) from exc

        self.circuit_open.set(0)
        if not campaign_label:
            self.decisions.labels("served", "served")
            for reason in _DENIAL_REASONS:
                self.decisions.labels("denied", reason)
        for kind in _ERROR_KINDS:
            self.store_errors.labels(kind)
        for check in _CHECKS:
            self.degraded_decisions.labels(check)
        for why in _RELEASE_REASONS:
            self.reservations_released.labels(why)
        for result in _BEACON_RESULTS:
            self.beacons.labels(result)
        self._decision_children: dict[tuple[str, str], Any] = {}

    # -- the Observer protocol ---------------------------------------------------------------

    def decision(self, outcome: str, reason: str, campaign_id: str) -> None:
        try:
            if self.campaign_label:
                self.decisions.labels(outcome, reason, self._campaign(campaign_id)).inc()
                return
            child = self._decision_children.get((outcome, reason))
            if child is None:
                child = self.decisions.labels(outcome, reason)
                if len(self._decision_children) < 10_000:
                    self._decision_children[(outcome, reason)] = child
            child.inc()
        except Exception:
            self._failed("decision")

    def store_call(self, seconds: float) -> None:
        try:
            self.store_latency.observe(seconds)
        except Exception:
            self._failed("store_call")

    def store_error(self, kind: str) -> None:
        try:
            self.store_errors.labels(kind).inc()
        except Exception:
            self._failed("store_error")

    def degraded(self, check: str) -> None:
        try:
            self.degraded_decisions.labels(check).inc()
        except Exception:
            self._failed("degraded")

    def circuit(self, is_open: bool) -> None:
        try:
            self.circuit_open.set(1 if is_open else 0)
        except Exception:
            self._failed("circuit")

    def released(self, why: str) -> None:
        try:
            self.reservations_released.labels(why).inc()
        except Exception:
            self._failed("released")

    def beacon(self, result: str) -> None:
        try:
            self.beacons.labels(result).inc()
        except Exception:
            self._failed("beacon")

    def candidates(self, evaluated: int) -> None:
        try:
            self.candidates_evaluated.observe(evaluated)
        except Exception:
            self._failed("candidates")

    # -- helpers ------------------------------------------------------------------------------

    def _campaign(self, campaign_id: str) -> str:
        campaigns = self._campaigns
        if campaign_id in campaigns:
            return campaign_id
        with self._lock:
            if len(campaigns) >= self.max_campaigns:
                return OTHER_CAMPAIGN
            campaigns.add(campaign_id)
        return campaign_id

    def _failed(self, event: str) -> None:
        # Never raise into a request; say so loudly once per event, then quietly.
        if event in self._failures:
            logger.debug("xsp_middleware: metrics failed on %s", event, exc_info=True)
            return
        self._failures.add(event)
        logger.exception("xsp_middleware: metrics failed on %s (later failures: debug)", event)


_observers: weakref.WeakKeyDictionary[CollectorRegistry, PrometheusObserver] = (
    weakref.WeakKeyDictionary()
)
_observers_lock = threading.Lock()


def enable_metrics(
    campaign_label: bool = False,
    registry: CollectorRegistry | None = None,
    *,
    max_campaigns: int = 1000,
) -> PrometheusObserver:
    """Register the xsp metrics in ``registry`` (default: prometheus_client's ``REGISTRY``) and
    install their observer for this process; return it.

    Idempotent per registry: calling it again returns (and installs) the same observer. Asking
    the same registry for another ``campaign_label`` or ``max_campaigns`` is a
    :class:`ConfigError`. A process has one observer: enabling another registry replaces it.
    """
    if not isinstance(campaign_label, bool):
        raise ConfigError("enable_metrics: campaign_label must be True or False")
    if isinstance(max_campaigns, bool) or not isinstance(max_campaigns, int) or max_campaigns < 1:
        raise ConfigError("enable_metrics: max_campaigns must be a positive integer")
    target = REGISTRY if registry is None else registry
    with _observers_lock:
        observer = _observers.get(target)
        if observer is None:
            observer = PrometheusObserver(
                target, campaign_label=campaign_label, max_campaigns=max_campaigns
            )
            _observers[target] = observer
        elif (observer.campaign_label, observer.max_campaigns) != (campaign_label, max_campaigns):
            raise ConfigError(
                f"enable_metrics: this registry already has the xsp metrics with "
                f"campaign_label={observer.campaign_label}, "
                f"max_campaigns={observer.max_campaigns}"
            )
    if _multiprocess_dir() is not None and _values.ValueClass is _values.MutexValue:
        logger.warning(
            "xsp_middleware: PROMETHEUS_MULTIPROC_DIR was set after prometheus_client was "
            "imported, so this process's metrics are not shared with the other workers. Set "
            "it before the server starts."
        )
    observe.install(observer)
    return observer


def _multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class MetricsApp:
    """An ASGI app answering ``GET`` and ``HEAD`` with the metrics in the Prometheus text
    format. With ``PROMETHEUS_MULTIPROC_DIR`` set, each scrape merges every process's files."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry

    def render(self) -> bytes:
        """The exposition text, as served."""
        path = _multiprocess_dir()
        if path is not None:
            merged = CollectorRegistry()
            collector: Any = MultiProcessCollector  # untyped in some prometheus_client versions
            collector(merged, path=path)
            return generate_latest(merged)
        return generate_latest(REGISTRY if self.registry is None else self.registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":  # served on its own (uvicorn ...:metrics): nothing to set up
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if kind != "http":
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1000})
            return
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            await _answer(send, 405, b"Method Not Allowed\n", [(b"allow", b"GET, HEAD")], method)
            return
        try:
            body = self.render()
        except Exception:
            logger.exception("xsp_middleware: could not render the metrics")
            await _answer(send, 500, b"could not render the metrics\n", [], method)
            return
        await _answer(send, 200, body, [(b"content-type", CONTENT_TYPE.encode())], method)


async def _answer(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]], method: str
) -> None:
    if not any(name == b"content-type" for name, _ in headers):
        headers = [*headers, (b"content-type", b"text/plain; charset=utf-8")]
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})


def metrics_app(registry: CollectorRegistry | None = None) -> MetricsApp:
    """An ASGI app serving the metrics (text/plain; version=0.0.4) of ``registry`` (default:
    prometheus_client's ``REGISTRY``), or of every process in multiprocess mode."""
    return MetricsApp(registry)


def mount_metrics(
    app: Any, path: str = "/metrics", registry: CollectorRegistry | None = None
) -> Any:
    """Serve the metrics at ``path`` on a Starlette or FastAPI app (or its router, or a
    middleware wrapping one, such as ``XSPMiddleware``); return the added route.

    The route answers exactly ``path`` (no redirect), comes before the app's own routes, and
    stays out of FastAPI's OpenAPI schema. Mounting the same path and registry again returns
    the route already there.
    """
    try:
        from starlette.routing import Route
    except ImportError as exc:
        raise ConfigError(
            "mount_metrics needs Starlette or FastAPI; serve metrics_app() otherwise"
        ) from exc
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigError(f"mount_metrics: path must start with '/', not {path!r}")
    router = _router_of(app)
    if router is None:
        raise ConfigError(
            f"mount_metrics: {type(app).__name__} is not a Starlette or FastAPI app; "
            "mount metrics_app() with your framework instead"
        )
    for route in router.routes:
        if (
            isinstance(route, Route)
            and route.path == path
            and isinstance(route.endpoint, MetricsApp)
            and route.endpoint.registry is registry
        ):
            return route
    route = Route(
        path,
        metrics_app(registry),
        methods=["GET", "HEAD"],
        name="xsp_metrics",
        include_in_schema=False,
    )
    router.routes.insert(0, route)
    return route


def _router_of(app: Any) -> Any:
    from starlette.routing import Router

    for _ in range(32):  # down a middleware chain: each holds the next in ``.app``
        if isinstance(app, Router):
            return app
        router = getattr(app, "router", None)
        if isinstance(router, Router):
            return router
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None
