"""The ASGI and WSGI type aliases, defined once for the whole package.

The WSGI ones are typeshed's protocols (``_typeshed.wsgi``), which exist only for the type
checker: import them under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

__all__ = [
    "ASGIApp",
    "Headers",
    "Message",
    "Receive",
    "Scope",
    "Send",
]

if TYPE_CHECKING:  # typeshed's WSGI types exist only for the type checker
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    __all__ += ["OptExcInfo", "StartResponse", "WSGIApplication", "WSGIEnvironment"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

Headers = list[tuple[bytes, bytes]]
"""Raw HTTP headers, as ASGI carries them: lower-case names, latin-1 bytes."""
