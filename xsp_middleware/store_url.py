"""Store URLs: one server, a Cluster, Sentinel or the embedded store. Parsing only: no I/O,
no client (``store/topology.py`` builds those), so settings can validate a URL early.


* ``redis://`` and ``rediss://`` (TLS), ``unix://``: one server (redis-py's own URL syntax).
* ``redis+cluster://[user:password@]host:port[,host:port...][?options]``: Redis Cluster; the
  nodes are seeds, the rest is discovered. ``rediss+cluster://`` for TLS.
* ``redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db][?options]``:
  the master Sentinel names for ``service_name``, found again after a failover.
  ``rediss+sentinel://`` for TLS to the master. ``sentinel_username`` and
  ``sentinel_password`` options authenticate to the sentinels themselves.
* ``memory://[name]``: the embedded store.

Credentials and the other options (``ssl_cert_reqs``, ``ssl_ca_certs``, ...) are the ones
redis-py's ``from_url`` reads from a ``redis://`` URL, and apply to every data node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

from .errors import ConfigError

_KINDS = {
    "redis": ("standalone", False),
    "rediss": ("standalone", True),
    "unix": ("standalone", False),
    "memory": ("memory", False),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
}
SCHEMES = tuple(f"{scheme}://" for scheme in _KINDS)
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")


@dataclass(frozen=True, slots=True)
class StoreURL:
    """A parsed store URL. ``nodes`` are the cluster seeds or the sentinels."""

    url: str
    kind: str
    """``memory``, ``standalone``, ``cluster`` or ``sentinel``."""
    tls: bool = False
    nodes: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    userinfo: str = ""
    db: int = 0
    query: str = ""
    sentinel_auth: tuple[tuple[str, str], ...] = ()

    def node_url(self, host: str, port: int) -> str:
        """The ``redis://`` URL of one data node, with this URL's credentials and options: what
        redis-py's ``parse_url`` turns into connection arguments."""
        scheme = "rediss" if self.tls else "redis"
        auth = f"{self.userinfo}@" if self.userinfo else ""
        where = f"[{host}]" if ":" in host else host
        query = f"?{self.query}" if self.query else ""
        return f"{scheme}://{auth}{where}:{port}/{self.db}{query}"

    def connection_kwargs(self, *, asyncio: bool) -> dict[str, Any]:
        """redis-py connection arguments (credentials, TLS, options) for every data node."""
        if asyncio:
            from redis.asyncio.connection import parse_url
        else:
            from redis.connection import parse_url
        host, port = self.nodes[0] if self.nodes else ("127.0.0.1", 6379)
        kwargs = dict(parse_url(self.node_url(host, port)))
        for name in ("host", "port", "path"):
            kwargs.pop(name, None)
        return kwargs

    def cluster_kwargs(self, *, asyncio: bool) -> dict[str, Any]:
        """Connection arguments as RedisCluster takes them (``ssl=True``, no database)."""
        kwargs = self.connection_kwargs(asyncio=asyncio)
        kwargs.pop("db", None)
        if kwargs.pop("connection_class", None) is not None and self.tls:
            kwargs["ssl"] = True
        return kwargs

    def sentinel_master_kwargs(self, ssl_class: type, *, asyncio: bool) -> dict[str, Any]:
        """Connection arguments for the master Sentinel names (its own TLS connection class)."""
        kwargs = self.connection_kwargs(asyncio=asyncio)
        kwargs.pop("connection_class", None)
        if self.tls:
            kwargs["connection_class"] = ssl_class
        return kwargs

    @property
    def sentinel_kwargs(self) -> dict[str, str]:
        return {name.removeprefix("sentinel_"): value for name, value in self.sentinel_auth}

    def describe(self) -> str:
        """The topology in words, without credentials (for logs and ``doctor``)."""
        hosts = ",".join(f"{h}:{p}" for h, p in self.nodes)
        if self.kind == "cluster":
            return f"Redis Cluster (seeds {hosts})"
        if self.kind == "sentinel":
            return f"Redis Sentinel service {self.service!r} (sentinels {hosts})"
        if self.kind == "memory":
            return "embedded in-memory store"
        return "standalone Redis"


def parse_store_url(url: object) -> StoreURL:
    """Parse and validate a store URL; raises :class:`ConfigError` naming what is wrong."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"redis_url: {redacted(str(url))[:60]!r} {_expected()}")
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in _KINDS:
        raise ConfigError(f"redis_url: {redacted(url)[:60]!r} {_expected()}")
    kind, tls = _KINDS[scheme.lower()]
    if kind == "memory":
        return StoreURL(url=url, kind=kind, tls=tls)
    _check_options(url, rest.partition("?")[2], kind, tls)
    if kind == "standalone":
        _check_with_redis_py(url, url)
        return StoreURL(url=url, kind=kind, tls=tls)
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    default_port = 26379 if kind == "sentinel" else 6379
    nodes = tuple(_host_port(part, default_port, url) for part in hosts.split(","))
    options = parse_qsl(query, keep_blank_values=True)
    sentinel_auth = tuple((k, v) for k, v in options if k in _SENTINEL_OPTIONS)
    query = urlencode([(k, v) for k, v in options if k not in _SENTINEL_OPTIONS])
    parts = [p for p in path.split("/") if p]
    service: str | None = None
    if kind == "sentinel":
        if not parts:
            raise ConfigError(
                f"redis_url: {redacted(url)!r} names no service: "
                "redis+sentinel://host:port[,host:port...]/service_name"
            )
        service, parts = parts[0], parts[1:]
    db = 0
    if parts:
        if len(parts) > 1 or not parts[0].isdigit():
            raise ConfigError(f"redis_url: {redacted(url)!r}: unexpected path {path!r}")
        db = int(parts[0])
    db_option = dict(options).get("db")
    if db_option is not None:
        if parts or not db_option.isdigit():
            raise ConfigError(f"redis_url: {redacted(url)!r}: give the database once, as a number")
        db = int(db_option)
    if kind == "cluster" and db != 0:
        raise ConfigError("redis_url: Redis Cluster has only database 0")
    parsed = StoreURL(
        url=url,
        kind=kind,
        tls=tls,
        nodes=nodes,
        service=service,
        userinfo=userinfo,
        db=db,
        query=query,
        sentinel_auth=sentinel_auth,
    )
    host, port = nodes[0]
    _check_with_redis_py(url, parsed.node_url(host, port))
    return parsed


# What a store URL may carry beyond host, port and database: credentials and TLS settings for
# every data node. Timeouts, retries and the protocol are ours (store_timeout): a decision's
# deadline depends on them.
_OPTIONS = {"db", "username", "password", "client_name", "socket_keepalive"}
_TLS_OPTIONS = {
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_ca_data",
    "ssl_ca_path",
    "ssl_check_hostname",
    "ssl_password",
    "ssl_min_version",
    "ssl_ciphers",
}
_OURS = {
    "socket_timeout",
    "socket_connect_timeout",
    "timeout",
    "health_check_interval",
    "protocol",
    "retry",
    "retry_on_timeout",
    "retry_on_error",
    "max_connections",
    "decode_responses",
}


def _check_options(url: str, query: str, kind: str, tls: bool) -> None:
    if "@" in query:  # a password with an unencoded '?': name none of its pieces
        raise ConfigError(
            f"redis_url: {redacted(url)!r} cannot be parsed: percent-encode '/', '?', '#' and "
            "'@' in the password"
        )
    allowed = _OPTIONS | (_TLS_OPTIONS if tls else set())
    if kind == "sentinel":
        allowed |= set(_SENTINEL_OPTIONS)
    for name, _ in parse_qsl(query, keep_blank_values=True):
        if name in _OURS:
            raise ConfigError(
                f"redis_url: option {name!r} is set by xsp-middleware itself (store_timeout, no "
                "retries, RESP2): remove it from the URL"
            )
        if name not in allowed:
            hint = " (TLS options need rediss://)" if name in _TLS_OPTIONS else ""
            raise ConfigError(f"redis_url: unknown option {name!r}{hint} in {redacted(url)!r}")


def _check_with_redis_py(url: str, node_url: str) -> None:
    """What redis-py will make of the URL, found out now rather than on every request."""
    from redis.connection import parse_url

    try:
        parse_url(node_url)  # type: ignore[no-untyped-call]
    except ValueError:
        # redis-py's message may quote a fragment of the password: say what to check instead.
        raise ConfigError(
            f"redis_url: {redacted(url)!r} cannot be parsed: check the host, the port and the "
            "options, and percent-encode '/', '?', '#' and '@' in the password"
        ) from None


def _host_port(text: str, default_port: int, url: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):  # [IPv6]:port
        host, closed, tail = text[1:].partition("]")
        if not closed or (tail and not tail.startswith(":")):
            raise ConfigError(f"redis_url: {redacted(url)!r}: malformed IPv6 address")
        port_text = tail.removeprefix(":")
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ConfigError(f"redis_url: {redacted(url)!r}: a node has no host")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ConfigError(f"redis_url: {redacted(url)!r}: bad port {port_text!r}") from None
    if not 0 < port < 65536:
        raise ConfigError(f"redis_url: {redacted(url)!r}: bad port {port}")
    return host, port


def _expected() -> str:
    return "must start with " + ", ".join(SCHEMES)


def redacted(url: str) -> str:
    """The URL without its credentials: everything up to the last ``@`` (a password may hold
    an unencoded ``/``, ``?`` or ``@``), and the value of any ``*password*`` option."""
    scheme, sep, rest = url.partition("://")
    if not sep:  # not even a URL: show nothing that could be a secret
        scheme, rest = "", url
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    rest, qmark, query = rest.partition("?")
    if qmark:
        query = "&".join(
            f"{name}=***" if "password" in name.lower() else f"{name}{eq}{value}"
            for name, eq, value in (part.partition("=") for part in query.split("&"))
        )
    return f"{scheme}{sep}{rest}{qmark}{query}"
