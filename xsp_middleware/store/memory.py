"""The embedded store (``memory://``): fakeredis running the same Lua, in this process. No
server to run, state lost at exit; for development, tests and single-process deployments."""

from __future__ import annotations

import threading
from typing import Any

from ..errors import ConfigError

_servers: dict[str, Any] = {}
_lock = threading.Lock()


def memory_server(url: str) -> Any:
    """One fakeredis server per ``memory://`` URL per process, shared by every store on it."""
    import fakeredis

    with _lock:
        if url not in _servers:
            _servers[url] = fakeredis.FakeServer()
        return _servers[url]


def require_lua() -> None:
    """The embedded store runs our Lua through lupa; without it fakeredis has no EVAL at all,
    and every decision would fail. Fail loudly at start-up instead."""
    try:
        import lupa  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        raise ConfigError(
            "the embedded store (memory://) needs Lua support: pip install 'fakeredis[lua]'"
        ) from None


def async_client(url: str) -> Any:
    import fakeredis

    return fakeredis.FakeAsyncRedis(server=memory_server(url))


def sync_client(url: str) -> Any:
    import fakeredis

    return fakeredis.FakeRedis(server=memory_server(url))
