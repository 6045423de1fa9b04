"""Every use of redis-py's private or undocumented internals, behind one seam.

Checked on redis-py 5.0.8 and 8.1.0, the lowest and highest versions ``pyproject.toml`` allows
(``redis[hiredis]>=5.0,<9``); CI runs the store tests on both. ``tests/integration/
test_redis_compat.py`` checks on every run, against a real ``redis-server`` and a real cluster,
that each accessor here still finds what it looks for, and that a decision takes the fast path.

What is reached into, and what happens where it is not there:

* **a connection's hiredis reader and streams** (``hiredis_streams``, ``waiting_on_us``,
  ``peer``): the auto-pipeline parses a batch's replies straight from whole socket reads, and
  its deadlines look at what waits unread. Absent (another parser, another connection class
  such as fakeredis's): redis-py's public ``read_response``, and no direct evidence.
* **a cluster's node bookkeeping** (``SlotMap``, ``node_connection_factory``,
  ``set_cluster_retry``): the slot map alone, a slot's master, a master's connection options.
  Absent: :class:`RedisCompatError` when the client is built, never an AttributeError in a
  request.
* **the asyncio cluster's COMMAND lookup** (``ask_any_master_for_commands``). Absent: redis-py's
  own behaviour (it asks the master of slot 0).
* **calls whose signature changed across the supported versions** (``NO_DRIVER_INFO``,
  ``checkout``, ``read_reply_within``, ``server_address``): one form chosen at import.
"""

from __future__ import annotations

import asyncio
import inspect
import select
from collections.abc import Callable
from typing import Any

import redis
from redis.asyncio.connection import AbstractConnection
from redis.connection import Connection as SyncConnection
from redis.connection import ConnectionPool
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import XSPError

try:  # redis-py's own parser over hiredis, whose reader the pipeline feeds directly
    from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
except ImportError:  # pragma: no cover - another redis-py layout: read_response everywhere
    _AsyncHiredisParser = None  # type: ignore[assignment,misc]
    NOT_ENOUGH_DATA = object()

try:
    from redis.driver_info import DriverInfo
except ImportError:  # redis-py before 7.1
    DriverInfo = None  # type: ignore[assignment,misc]

__all__ = [
    "NOT_ENOUGH_DATA",
    "NO_DRIVER_INFO",
    "REDIS_VERSION",
    "RedisCompatError",
    "SlotMap",
    "ask_any_master_for_commands",
    "checkout",
    "fast_path_available",
    "hiredis_streams",
    "node_connection_factory",
    "peer",
    "read_reply_within",
    "server_address",
    "set_cluster_retry",
    "waiting_on_us",
]

REDIS_VERSION: tuple[int, ...] = tuple(
    int(part) for part in redis.__version__.split(".")[:3] if part.isdigit()
)
"""The installed redis-py, as numbers (``(8, 1, 0)``)."""


class RedisCompatError(XSPError, RuntimeError):
    """The installed redis-py lacks an internal this package needs: a redis-py outside the
    supported range (``redis[hiredis]>=5.0,<9``)."""


def _missing(what: str) -> RedisCompatError:
    return RedisCompatError(
        f"redis-py {redis.__version__} has no {what}; xsp-middleware supports "
        "redis[hiredis]>=5.0,<9"
    )


# -- a connection's hiredis reader: the auto-pipeline's fast path (asyncio) -----------------

_STOCK_READ_RESPONSE = AbstractConnection.read_response


def fast_path_available() -> bool:
    """Whether the installed redis-py and hiredis let the auto-pipeline parse replies itself:
    redis-py's asyncio hiredis parser is importable and hiredis is installed (redis-py then
    gives every new connection that parser). False: every reply is read through
    ``read_response``, correct but slower."""
    from redis.utils import HIREDIS_AVAILABLE

    return _AsyncHiredisParser is not None and bool(HIREDIS_AVAILABLE)


def hiredis_streams(
    conn: AbstractConnection,
) -> tuple[asyncio.StreamWriter, asyncio.StreamReader, Any, int] | None:
    """The connected socket streams and hiredis reader of a stock redis-py asyncio connection
    (what its ``read_response`` uses): ``(writer, stream, reader, read_size)``. Called once per
    batch, not per call; the streams are new on every connect, so they are not kept.

    Reads ``conn._parser``, ``conn._writer``, ``parser._stream``, ``parser._reader`` and
    ``parser._read_size`` (redis-py 5.0.8, 8.1.0). None: another parser, a connection class of
    its own (fakeredis), a disconnected connection, or a redis-py where these moved; the caller
    then reads through ``read_response``."""
    if _AsyncHiredisParser is None or type(conn).read_response is not _STOCK_READ_RESPONSE:
        return None
    parser = getattr(conn, "_parser", None)
    if not isinstance(parser, _AsyncHiredisParser):
        return None
    writer = getattr(conn, "_writer", None)
    stream = getattr(parser, "_stream", None)
    reader = getattr(parser, "_reader", None)
    if writer is None or stream is None or reader is None:
        return None
    return writer, stream, reader, getattr(parser, "_read_size", 65536)


def waiting_on_us(conn: AbstractConnection) -> bool | None:
    """Whether something on ``conn`` waits for this process rather than for the store: reply
    bytes not yet read or parsed, or request bytes not yet on the wire. None: this connection
    cannot be inspected (another connection class), so there is no direct evidence.

    Looks at ``conn._writer``, ``conn._reader`` (its ``_buffer``) and the hiredis reader's
    ``has_data`` (redis-py 5.0.8, 8.1.0), as redis-py's own ``can_read`` does, and polls the
    socket without blocking. Absent: None."""
    writer = getattr(conn, "_writer", None)
    stream = getattr(conn, "_reader", None)
    if not isinstance(stream, asyncio.StreamReader) or writer is None:
        return None
    if getattr(stream, "_buffer", None) or stream.at_eof():
        return True  # read from the socket, not parsed yet (or closed: the reader will see it)
    parser_reader = getattr(getattr(conn, "_parser", None), "_reader", None)
    has_data = getattr(parser_reader, "has_data", None)
    if callable(has_data) and has_data():
        return True  # part of a reply in hiredis's buffer
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN | select.POLLOUT)
        events = poller.poll(0)  # never blocks
    except (OSError, ValueError):
        return None
    mask = events[0][1] if events else 0
    if mask & (select.POLLIN | select.POLLERR | select.POLLHUP):
        return True  # the kernel holds reply bytes (or an EOF, which the reader will see)
    # Request bytes still in the transport's buffer while the socket would take them: the loop
    # has not got round to writing them. (A socket that takes nothing more is the store not
    # reading: evidence about the store, not about us.)
    return bool(transport.get_write_buffer_size()) and bool(mask & select.POLLOUT)


def peer(conn: Any) -> str:
    """How redis-py names the server of ``conn`` in its own errors (``_host_error``, redis-py
    5.0.8, 8.1.0), for ours to read the same. Absent: "the store"."""
    describe = getattr(conn, "_host_error", None)
    return str(describe()) if callable(describe) else "the store"


# -- connection options and calls whose signature changed ------------------------------------

NO_DRIVER_INFO: dict[str, Any] = (
    {"driver_info": DriverInfo(name=None, lib_version=None)}
    if DriverInfo is not None
    else {"lib_name": None, "lib_version": None}
)
"""Connection options that make redis-py send no CLIENT SETINFO on connect: ``driver_info``
from redis-py 7.1 (which deprecates ``lib_name``/``lib_version``), those two before."""


def _takes_no_command_name() -> bool:
    parameter = inspect.signature(ConnectionPool.get_connection).parameters.get("command_name")
    return parameter is None or parameter.default is not inspect.Parameter.empty


if _takes_no_command_name():  # redis-py 5.3 and later deprecate the argument

    def checkout(pool: Any) -> Any:
        return pool.get_connection()

else:

    def checkout(pool: Any) -> Any:
        return pool.get_connection("EVALSHA")


checkout.__doc__ = """A connection from a sync redis-py connection pool (give it back with
``pool.release``). redis-py before 5.3 requires a command name, which it ignores; 5.3 and later
deprecate passing one. The form is chosen once, at import."""

_READ_WITHIN_DOC = """The next reply on a sync connection, waiting up to ``timeout`` seconds for
it rather than the connection's ``socket_timeout``. Raises redis-py's TimeoutError when none
comes (the connection disconnected, unless ``disconnect_on_error`` is False: a late reply can
then still be read from it), its ResponseError for an error reply. redis-py 8.1.0 takes
``read_response(timeout=)``; 5.0.8 has no such argument, and the wait is then
``can_read(timeout)`` before the read (the form is chosen once, at import)."""

if "timeout" in inspect.signature(SyncConnection.read_response).parameters:

    def read_reply_within(conn: Any, timeout: float, *, disconnect_on_error: bool = True) -> Any:
        return conn.read_response(disconnect_on_error=disconnect_on_error, timeout=timeout)

else:

    def read_reply_within(conn: Any, timeout: float, *, disconnect_on_error: bool = True) -> Any:
        if not conn.can_read(timeout=timeout):
            if disconnect_on_error:
                conn.disconnect()
            raise RedisTimeoutError(f"Timeout reading from {peer(conn)}")
        return conn.read_response(disconnect_on_error=disconnect_on_error)


read_reply_within.__doc__ = _READ_WITHIN_DOC


def server_address(client: Any) -> str:
    """``host:port`` (or the socket path) a standalone client connects to, from its pool's
    ``connection_kwargs`` (redis-py 5.0.8, 8.1.0; fakeredis's too). Absent: "the store"."""
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None)
    if not isinstance(kwargs, dict):
        return "the store"
    return str(kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}")


# -- Redis Cluster: redis-py's node bookkeeping ---------------------------------------------


class SlotMap:
    """A RedisCluster's slot map (``cluster.nodes_manager``), sync or asyncio, resolved once
    per client: building one checks that every part it uses is there (redis-py 5.0.8, 8.1.0)
    and raises :class:`RedisCompatError` if not, so a request never meets an AttributeError.

    ``master_of(slot)`` is redis-py's own bound ``get_node_from_slot`` (no lookup of ours per
    call); it raises SlotNotCoveredError and friends for a slot no master serves."""

    __slots__ = ("_manager", "master_of")

    def __init__(self, cluster: Any) -> None:
        manager: Any = getattr(cluster, "nodes_manager", None)
        for name in ("initialize", "get_node_from_slot", "nodes_cache"):
            if not hasattr(manager, name):
                raise _missing(f"RedisCluster.nodes_manager.{name}")
        self._manager = manager
        self.master_of: Callable[[int], Any] = manager.get_node_from_slot

    def node(self, name: str) -> Any:
        """The ClusterNode called ``name`` (``host:port``) in the slot map; KeyError if the
        map does not hold it."""
        return self._manager.nodes_cache[name]

    async def read(self) -> None:
        """Re-read the slot map of an asyncio cluster, and only it: redis-py's full
        ``RedisCluster.initialize()`` also asks COMMAND of one master, which fails when that
        one master is down, while the slot map comes from any of them."""
        await self._manager.initialize()

    def read_blocking(self) -> None:
        """Re-read the slot map of a sync cluster (as :meth:`read`)."""
        self._manager.initialize()


def node_connection_factory(node: Any) -> Callable[[], AbstractConnection]:
    """New connections to one asyncio ClusterNode, with its own connection options
    (``node.connection_class`` and ``node.connection_kwargs``, redis-py 5.0.8, 8.1.0) and no
    retries: the auto-pipeline decides what is safe to send again. Raises RedisCompatError if
    the node keeps them elsewhere."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    cls = getattr(node, "connection_class", None)
    options = getattr(node, "connection_kwargs", None)
    if cls is None or not isinstance(options, dict):
        raise _missing("ClusterNode.connection_class/connection_kwargs")
    kwargs = dict(options)
    kwargs["retry"] = Retry(NoBackoff(), 0)
    return lambda: cls(**kwargs)


def ask_any_master_for_commands(cluster: Any) -> None:
    """redis-py's asyncio RedisCluster asks COMMAND of the master owning slot 0 when it first
    initializes, so with that one master down no admin command works at all, even for slots
    the other masters serve. Make it ask the next master that answers instead (and make that
    one the default node for keyless commands).

    Wraps ``cluster.commands_parser.initialize(node)`` and sets ``nodes_manager.default_node``
    (redis-py 5.0.8, 8.1.0). Absent: nothing is changed, and redis-py asks slot 0's master."""
    from redis.exceptions import ConnectionError, TimeoutError

    parser: Any = getattr(cluster, "commands_parser", None)
    ask = getattr(parser, "initialize", None)
    manager: Any = getattr(cluster, "nodes_manager", None)
    if (
        ask is None
        or not inspect.iscoroutinefunction(ask)
        or not hasattr(manager, "get_nodes_by_server_type")
        or not hasattr(manager, "default_node")
    ):
        return

    async def initialize(node: Any = None) -> None:
        failure: BaseException | None = None
        for candidate in [node, *manager.get_nodes_by_server_type("primary")]:
            if candidate is None:
                continue
            try:
                await ask(candidate)
            except (ConnectionError, TimeoutError, OSError) as exc:
                failure = exc
                continue
            manager.default_node = candidate
            return
        raise failure or ConnectionError("no cluster master answers")

    parser.initialize = initialize


def set_cluster_retry(cluster: Any, retry: Any) -> None:
    """Give a built sync RedisCluster ``retry`` everywhere: the client, the options of nodes
    it meets later (``nodes_manager.connection_kwargs``), and the connections of the nodes it
    knows (``node.redis_connection``), redis-py 5.0.8, 8.1.0. Raises RedisCompatError if the
    options of later nodes are kept elsewhere (they would keep the build's retries)."""
    options = getattr(getattr(cluster, "nodes_manager", None), "connection_kwargs", None)
    if not isinstance(options, dict):
        raise _missing("RedisCluster.nodes_manager.connection_kwargs")
    cluster.set_retry(retry)
    options["retry"] = retry
    for node in cluster.get_nodes():
        connection = getattr(node, "redis_connection", None)
        if connection is not None:
            connection.set_retry(retry)
