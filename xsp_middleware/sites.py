"""What the package's own small apps (the preferences app, the dashboard) share about a
request: where a state-changing one comes from, its path below the mount, and its body.

A browser says where a request comes from in ``Sec-Fetch-Site`` (every current browser) and
``Origin`` (on every POST, PUT and DELETE). A request is refused as cross-site when
``Sec-Fetch-Site`` says anything but ``same-origin`` or ``none`` (typed in, a bookmark), or when
an ``Origin`` is not the request's own (its scheme and ``Host``); an ``Origin`` listed as
allowed passes both. A request with neither header (curl, a script) passes: it is no browser
carrying someone's cookies.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection
from typing import Literal

from .types import Headers, Receive, Scope

__all__ = [
    "BodyProblem",
    "BodyTooLarge",
    "ClientGone",
    "cross_site",
    "is_loopback",
    "mounted_path",
    "normal_origin",
    "own_origin",
    "read_body",
]

_DEFAULT_PORTS = {"http": ":80", "https": ":443"}


def normal_origin(origin: str) -> str:
    """``scheme://host[:port]`` in lower case, without the scheme's default port."""
    scheme, sep, rest = origin.strip().lower().partition("://")
    default = _DEFAULT_PORTS.get(scheme)
    if sep and default is not None and rest.endswith(default):
        rest = rest[: -len(default)]
    return f"{scheme}{sep}{rest}"


def is_loopback(host: str) -> bool:
    """``host`` (an address, or ``localhost``) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def own_origin(scope: Scope, headers: Headers) -> str | None:
    """The request's own origin: the scope's scheme and the Host header."""
    for k, v in headers:
        if k == b"host":
            host = v.decode("latin-1").strip().lower()
            if not host:
                return None
            return normal_origin(f"{scope.get('scheme') or 'http'}://{host}")
    return None


def cross_site(
    scope: Scope, headers: Headers, allowed: Collection[str] = ()
) -> Literal["sec-fetch-site", "origin"] | None:
    """Which header shows the request to come from another site, or None when it does not.
    ``allowed``: origins (normalized, see :func:`normal_origin`) that may send it anyway."""
    origins = [normal_origin(v.decode("latin-1")) for k, v in headers if k == b"origin"]
    if origins and all(o in allowed for o in origins):
        return None
    sites = [v.decode("latin-1").strip().lower() for k, v in headers if k == b"sec-fetch-site"]
    if any(site not in ("same-origin", "none") for site in sites):
        return "sec-fetch-site"
    own = own_origin(scope, headers)
    if any(o != own for o in origins):
        return "origin"
    return None


def mounted_path(scope: Scope) -> str:
    """The path below the mount. Starlette's Mount keeps the full path in ``path`` and adds the
    mount to ``root_path``; other servers strip it. Either way, strip ``root_path`` once."""
    path = str(scope.get("path") or "")
    root = str(scope.get("root_path") or "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path


class BodyProblem(Exception):
    """A request body that cannot be read whole."""


class BodyTooLarge(BodyProblem):
    """More than the limit: by its Content-Length, or as it arrived."""


class ClientGone(BodyProblem):
    """The client disconnected before the body was complete."""


async def read_body(receive: Receive, headers: Headers, limit: int) -> bytes:
    """The whole body, at most ``limit`` bytes. Raises :class:`BodyTooLarge` or
    :class:`ClientGone`."""
    for k, v in headers:
        if k == b"content-length":
            try:
                if int(v) > limit:
                    raise BodyTooLarge(f"the body may hold at most {limit} bytes")
            except ValueError:
                pass  # the server frames the body; what arrives is counted below
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone("the client disconnected before the body was complete")
        chunk = message.get("body") or b""
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"the body may hold at most {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
