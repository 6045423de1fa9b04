"""What the middleware tells an observer (Prometheus metrics, see ``metrics.py``).

The core calls these hooks at each event; with no observer installed (the default) each call
is one ``is None`` check. One observer per process: ``install(observer)``.
"""

from __future__ import annotations

from typing import Protocol


class Observer(Protocol):
    def decision(self, outcome: str, reason: str, campaign_id: str) -> None:
        """outcome ``served``, ``denied`` or ``invalid``; reason: the decision reason, or the
        offending field of an invalid request."""

    def store_call(self, seconds: float) -> None:
        """One reserve round trip that answered, and how long it took."""

    def store_error(self, kind: str) -> None:
        """kind ``timeout``, ``connection``, ``error`` (the store answered one) or
        ``circuit_open`` (not even tried)."""

    def degraded(self, check: str) -> None:
        """A decision the failure policy took: check ``budget`` or ``frequency``."""

    def circuit(self, is_open: bool) -> None:
        """The store circuit opened or closed."""

    def released(self, why: str) -> None:
        """A reservation given back: why ``status`` (not 2xx), ``exception``, ``disconnect``,
        ``incomplete`` (the body did not finish) or ``late_reply``."""

    def beacon(self, result: str) -> None:
        """An impression beacon answered: ``confirmed``, ``duplicate``, ``rejected`` (forged,
        malformed, another campaign's), ``expired`` or ``error`` (the store failed)."""

    # Optional (an observer without it still works): ``candidates(evaluated: int)``, how many
    # candidates a decision that named several evaluated.


current: Observer | None = None


def install(observer: Observer | None) -> None:
    """Make ``observer`` receive every event of this process (None: stop)."""
    global current
    current = observer


def error_kind(message: str) -> str:
    """The ``store_error`` kind of a StoreUnavailable's message (see ``StoreUnavailable.kind``)."""
    from .errors import _kind_of

    return _kind_of(message)
