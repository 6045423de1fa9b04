"""Throwaway Redis Cluster and Sentinel topologies from the ``redis-server`` binary.

Both helpers start in two steps, so a pytest session can launch them in the background:
``__init__`` starts the processes and kicks off the setup, then returns; ``wait_ready()``
blocks until the topology answers like a healthy one. ``started()`` does both.

Nothing is kept on disk except each process's temp dir (log, ``nodes.conf`` for a cluster
node, ``sentinel.conf`` for the sentinel); ``stop()`` kills every process and removes them.
"""

from __future__ import annotations

import atexit
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry
from redis_server import RedisServer, free_port

SLOTS = 16384
HOST = "127.0.0.1"


def _client(port: int, timeout: float = 1.0) -> redis.Redis:
    """A plain client to one process: no retries, so a dead port fails at once."""
    return redis.Redis(
        host=HOST,
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        decode_responses=True,
        protocol=2,
        retry=Retry(NoBackoff(), 0),
    )


def _call(port: int, *args: Any, timeout: float = 1.0) -> Any:
    """One command to one process; errors (MOVED, CLUSTERDOWN, refused) raise."""
    with _client(port, timeout) as client:
        return client.execute_command(*args)


def _info_fields(text: str | dict[str, Any]) -> dict[str, str]:
    """``CLUSTER INFO`` text (redis-py leaves it raw when sent this way) or a parsed ``INFO``
    reply as a dict of strings."""
    if isinstance(text, dict):
        return {str(k): str(v) for k, v in text.items()}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def _pairs(flat: list[Any]) -> dict[str, Any]:
    """A RESP2 flat ``[key, value, key, value, ...]`` list as a dict."""
    return {str(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def _distinct_free_ports(count: int, used: set[int]) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in used:
            used.add(port)
            ports.append(port)
    return ports


def _wait(
    what: str, timeout: float, problems: Callable[[], list[str]], interval: float = 0.05
) -> float:
    """Poll ``problems()`` until it returns nothing; the seconds it took, or RuntimeError."""
    start = time.monotonic()
    deadline = start + timeout
    found: list[str] = ["not checked yet"]
    while True:
        found = problems()
        if not found:
            return time.monotonic() - start
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{what} not ready after {timeout:.1f} s: " + "; ".join(found))
        time.sleep(interval)


class _Process(RedisServer):
    """A RedisServer that removes its temp dir when it cannot start, and can be cleaned up."""

    def __init__(self, *extra: str, port: int | None = None) -> None:
        # Both are set by RedisServer.__init__, unless redis-server is not even on PATH.
        self.dir = None  # type: ignore[assignment]
        self.proc = None
        try:
            super().__init__(*extra, port=port)
        except BaseException:
            self.stop()
            self.remove_dir()
            raise

    def remove_dir(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def _start_process(make: Callable[[int], _Process], attempts: int = 3) -> _Process:
    """Start a process on a free port, retrying when another process took the port first."""
    last: Exception | None = None
    for _ in range(attempts):
        try:
            return make(free_port())
        except RuntimeError as exc:  # "redis-server exited with 1": usually a port clash
            last = exc
    assert last is not None
    raise last


# --------------------------------------------------------------------------------------
# Cluster
# --------------------------------------------------------------------------------------


def _even_ranges(masters: int) -> list[tuple[int, int]]:
    """16384 slots as ``masters`` contiguous inclusive ranges, sizes differing by at most 1."""
    bounds = [SLOTS * i // masters for i in range(masters + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(masters)]


class RedisClusterNodes:
    """``masters`` cluster-enabled redis-server processes, no replicas, all slots assigned.

    ``nodes[i]`` owns the i-th contiguous slot range (``nodes[0]`` the lowest slots).
    ``cluster-require-full-coverage no``: when a master dies, the others keep serving their
    own slots and stay cluster_state:ok (the dead one is flagged fail? after ~1 s, fail
    ~0.3 s later); for the dead master's slots they answer MOVED to its address, where
    nothing listens. Only with a majority of masters dead do the survivors turn
    cluster_state:fail and answer CLUSTERDOWN for everything.
    """

    def __init__(self, masters: int = 3, *, node_timeout_ms: int = 1000) -> None:
        if masters < 1:
            raise ValueError("a cluster needs at least one master")
        self.masters = masters
        self.ranges = _even_ranges(masters)
        self.nodes: list[RedisServer] = []
        self.bus_ports: list[int] = []
        self.node_timeout_ms = node_timeout_ms
        self.started_at = time.monotonic()
        #: Seconds from __init__ to wait_ready() returning, and the last restart() took.
        self.ready_seconds: float | None = None
        self.last_restart_seconds: float | None = None
        self.killed_at: dict[int, float] = {}
        self._probe_keys = [self._key_in_range(lo, hi) for lo, hi in self.ranges]
        atexit.register(self.stop)  # no stray redis-servers when a script dies before stop()
        try:
            used: set[int] = set()
            for _ in range(masters):
                self.nodes.append(_start_process(lambda port: self._node(port, used)))
            ids = []
            for node, (lo, hi) in zip(self.nodes, self.ranges, strict=True):
                _call(node.port, "CLUSTER", "ADDSLOTSRANGE", lo, hi)
                ids.append(_call(node.port, "CLUSTER", "MYID"))
            for i, node in enumerate(self.nodes):
                for j, other in enumerate(self.nodes):
                    if i != j:
                        _call(node.port, "CLUSTER", "MEET", HOST, other.port, self.bus_ports[j])
            self.node_ids: list[str] = ids
        except BaseException as exc:
            self.stop()
            if isinstance(exc, redis.RedisError):
                raise RuntimeError(f"could not set up a Redis Cluster: {exc}") from exc
            raise

    def _node(self, port: int, used: set[int]) -> _Process:
        if port in used:
            raise RuntimeError("port already taken by this cluster")
        used.add(port)
        (bus,) = _distinct_free_ports(1, used)
        node = _Process(
            "--cluster-enabled",
            "yes",
            # Relative to --dir (which redis-server chdirs to first): <node.dir>/nodes.conf.
            "--cluster-config-file",
            "nodes.conf",
            # An explicit bus port: the default port+10000 may be taken or past 65535.
            "--cluster-port",
            str(bus),
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            "--cluster-require-full-coverage",
            "no",
            "--cluster-allow-reads-when-down",
            "no",
            port=port,
        )
        self.bus_ports.append(bus)
        return node

    @classmethod
    def started(
        cls, masters: int = 3, timeout: float = 15.0, *, node_timeout_ms: int = 1000
    ) -> RedisClusterNodes:
        """Start and wait until ready (stops everything if it never gets ready)."""
        cluster = cls(masters, node_timeout_ms=node_timeout_ms)
        try:
            cluster.wait_ready(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    # -- addresses ----------------------------------------------------------------------

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{port}" for port in self.ports)

    def index_for_slot(self, slot: int) -> int:
        if not 0 <= slot < SLOTS:
            raise ValueError(f"slot {slot} is not in 0..{SLOTS - 1}")
        for index, (lo, hi) in enumerate(self.ranges):
            if lo <= slot <= hi:
                return index
        raise AssertionError("slot ranges do not cover every slot")

    def node_for_slot(self, slot: int) -> RedisServer:
        return self.nodes[self.index_for_slot(slot)]

    def index_for_key(self, key: str) -> int:
        return self.index_for_slot(key_slot(key.encode()))

    def node_for_key(self, key: str) -> RedisServer:
        """The node owning ``key``'s slot ({hash tags} honoured)."""
        return self.nodes[self.index_for_key(key)]

    def key_on(self, index: int, prefix: str = "k") -> str:
        """A key (no hash tag) that lives on ``nodes[index]``."""
        lo, hi = self.ranges[index]
        return self._key_in_range(lo, hi, prefix)

    @staticmethod
    def _key_in_range(lo: int, hi: int, prefix: str = "probe") -> str:
        n = 0
        while not lo <= key_slot(f"{prefix}{n}".encode()) <= hi:
            n += 1
        return f"{prefix}{n}"

    # -- health -------------------------------------------------------------------------

    def alive(self, index: int) -> bool:
        proc = self.nodes[index].proc
        return proc is not None and proc.poll() is None

    def _problems(self) -> list[str]:
        """What stops the cluster from looking healthy, from every live node's point of view.

        Dead nodes are allowed (after kill()); each live node must report cluster_state:ok,
        know all ``masters`` nodes, see every live peer connected without a (P)FAIL flag,
        agree in CLUSTER SLOTS and CLUSTER SHARDS that the assigned ranges cover all 16384
        slots over ``masters`` masters, and serve a key in its own range.
        """
        problems: list[str] = []
        live = {i for i in range(len(self.nodes)) if self.alive(i)}
        expected = sorted((lo, hi, self.nodes[i].port) for i, (lo, hi) in enumerate(self.ranges))
        if not live:
            return ["no node is running"]
        for i in sorted(live):
            port = self.nodes[i].port
            try:
                info = _info_fields(_call(port, "CLUSTER", "INFO"))
                if info.get("cluster_state") != "ok":
                    problems.append(f"node {i} ({port}) cluster_state:{info.get('cluster_state')}")
                    continue
                if info.get("cluster_known_nodes") != str(self.masters):
                    problems.append(
                        f"node {i} ({port}) knows {info.get('cluster_known_nodes')} nodes"
                    )
                    continue
                for line in _call(port, "CLUSTER", "NODES").splitlines():
                    fields = line.split()
                    j = self.node_ids.index(fields[0]) if fields[0] in self.node_ids else -1
                    if j < 0 or j == i or j not in live:
                        continue
                    flags = fields[2].split(",")
                    if "master" not in flags or {"fail", "fail?", "handshake"} & set(flags):
                        problems.append(f"node {i} sees node {j} as {fields[2]}")
                    elif fields[7] != "connected":
                        problems.append(f"node {i} sees node {j} {fields[7]}")
                slots = sorted(
                    (int(entry[0]), int(entry[1]), int(entry[2][1]))
                    for entry in _call(port, "CLUSTER", "SLOTS")
                )
                if slots != expected:
                    problems.append(f"node {i} CLUSTER SLOTS {slots} != {expected}")
                    continue
                shards = [_pairs(shard) for shard in _call(port, "CLUSTER", "SHARDS")]
                covered = 0
                owners = 0
                for shard in shards:
                    ranges = [int(x) for x in shard["slots"]]
                    if not ranges:
                        continue
                    owners += 1
                    pairs = zip(ranges[::2], ranges[1::2], strict=True)
                    covered += sum(hi - lo + 1 for lo, hi in pairs)
                    for node in (_pairs(n) for n in shard["nodes"]):
                        j = self.ports.index(int(node["port"]))
                        if j in live and node["health"] != "online":
                            problems.append(f"node {i} CLUSTER SHARDS: node {j} {node['health']}")
                if covered != SLOTS or owners != self.masters:
                    problems.append(
                        f"node {i} CLUSTER SHARDS: {covered} slots over {owners} masters"
                    )
                _call(port, "EXISTS", self._probe_keys[i])  # MOVED / CLUSTERDOWN raise
            except (redis.RedisError, OSError, KeyError, IndexError, ValueError) as exc:
                problems.append(f"node {i} ({port}): {type(exc).__name__}: {exc}")
        return problems

    def wait_ready(self, timeout: float = 15.0) -> float:
        """Block until every node agrees on the full slot map; seconds since __init__."""
        _wait(f"Redis Cluster on ports {self.ports}", timeout, self._problems)
        self.ready_seconds = time.monotonic() - self.started_at
        return self.ready_seconds

    def wait_ok(self, timeout: float = 15.0) -> float:
        """Block until every live node reports cluster_state:ok and serves; seconds taken."""
        return _wait(f"Redis Cluster on ports {self.ports}", timeout, self._problems)

    # -- faults -------------------------------------------------------------------------

    def kill(self, index: int) -> None:
        """SIGKILL ``nodes[index]`` (its slots stop being served; the others carry on)."""
        self.nodes[index].stop()
        self.killed_at[index] = time.monotonic()

    def restart(self, index: int, timeout: float = 15.0) -> float:
        """Start a killed node again (same port, dir, nodes.conf) and wait until it serves.

        Returns the seconds taken: ~2 s, since a master that just started waits
        CLUSTER_WRITABLE_DELAY (2 s) before it turns cluster_state:ok, and until then it
        answers CLUSTERDOWN for its own slots. Its data is gone (nothing is persisted).
        """
        if self.alive(index):
            raise RuntimeError(f"cluster node {index} is still running")
        start = time.monotonic()
        self.nodes[index].start()
        _wait(
            f"restarted cluster node {index} on port {self.nodes[index].port}",
            timeout,
            self._problems,
        )
        self.last_restart_seconds = time.monotonic() - start
        return self.last_restart_seconds

    def flushall(self) -> None:
        """FLUSHALL on every live master."""
        for i, node in enumerate(self.nodes):
            if self.alive(i):
                _call(node.port, "FLUSHALL")

    def stop(self) -> None:
        """Kill every node and remove the temp dirs (idempotent)."""
        atexit.unregister(self.stop)
        for node in self.nodes:
            node.stop()
            shutil.rmtree(node.dir, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Sentinel
# --------------------------------------------------------------------------------------


class _Sentinel(_Process):
    """``redis-server <dir>/sentinel.conf --sentinel``: the config file must come first and
    be writable (sentinel rewrites it)."""

    name = "redis-server --sentinel"

    def __init__(self, config: str, port: int) -> None:
        self.config = config
        super().__init__(port=port)

    @property
    def config_file(self) -> Path:
        return self.dir / "sentinel.conf"

    def arguments(self) -> list[str]:
        if not self.config_file.exists():
            self.config_file.write_text(self.config)
        return [
            self.binary,
            str(self.config_file),
            "--sentinel",
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--dir",
            str(self.dir),
            "--logfile",
            str(self.dir / "log"),
        ]


class RedisSentinelSetup:
    """One master, one replica of it, one sentinel (quorum 1) monitoring ``service``.

    ``master`` / ``replica`` are the servers as started; after a failover the sentinel's
    current master is ``master_port()`` (normally ``replica.port``).
    """

    def __init__(self, service: str = "mymaster", *, down_after_ms: int = 1000) -> None:
        self.service = service
        self.started_at = time.monotonic()
        self.ready_seconds: float | None = None
        self.last_promotion_seconds: float | None = None
        self.last_failover_seconds: float | None = None
        self._killed_port: int | None = None
        self._killed_at: float | None = None
        self._owned: list[RedisServer] = []
        atexit.register(self.stop)  # no stray redis-servers when a script dies before stop()
        try:
            # Without --save the full sync is diskless, and a diskless sync first waits
            # repl-diskless-sync-delay (5 s by default) for more replicas to join it.
            sync = ("--repl-diskless-sync-delay", "0")
            self.master: RedisServer = self._own(
                _start_process(lambda port: _Process(*sync, port=port))
            )
            master_port = str(self.master.port)
            self.replica: RedisServer = self._own(
                _start_process(
                    lambda port: _Process(*sync, "--replicaof", HOST, master_port, port=port)
                )
            )
            config = (
                f"sentinel monitor {service} {HOST} {self.master.port} 1\n"
                f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
                f"sentinel failover-timeout {service} 5000\n"
                f"sentinel parallel-syncs {service} 1\n"
                # Known up front: otherwise the sentinel learns of the replica only from the
                # master's INFO, polled every 10 s; if the replica had not linked up yet at
                # the first poll (a loaded box), wait_ready() would take 10 s more.
                f"sentinel known-replica {service} {HOST} {self.replica.port}\n"
            )
            self.sentinel: RedisServer = self._own(
                _start_process(lambda port: _Sentinel(config, port))
            )
        except BaseException:
            self.stop()
            raise

    def _own(self, server: RedisServer) -> RedisServer:
        self._owned.append(server)
        return server

    @classmethod
    def started(
        cls, service: str = "mymaster", timeout: float = 15.0, *, down_after_ms: int = 1000
    ) -> RedisSentinelSetup:
        """Start and wait until ready (stops everything if it never gets ready)."""
        setup = cls(service, down_after_ms=down_after_ms)
        try:
            setup.wait_ready(timeout)
        except BaseException:
            setup.stop()
            raise
        return setup

    @property
    def sentinel_port(self) -> int:
        return self.sentinel.port

    @property
    def url(self) -> str:
        return f"redis+sentinel://{HOST}:{self.sentinel_port}/{self.service}"

    @property
    def servers(self) -> list[RedisServer]:
        """Master and replica as started (whichever the sentinel calls master now)."""
        return [self.master, self.replica]

    def master_port(self) -> int:
        """The master's port as the sentinel currently reports it."""
        _host, port = _call(self.sentinel_port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return int(port)

    def server_on(self, port: int) -> RedisServer:
        for server in self.servers:
            if server.port == port:
                return server
        raise LookupError(f"no server of this setup listens on {port}")

    def _problems(self) -> list[str]:
        problems: list[str] = []
        try:
            info = _info_fields(_call(self.replica.port, "INFO", "replication"))
            if info.get("master_link_status") != "up":
                problems.append(f"replica link {info.get('master_link_status')}")
            if self.master_port() != self.master.port:
                problems.append(f"sentinel reports master on {self.master_port()}")
            replicas = [
                _pairs(r) for r in _call(self.sentinel_port, "SENTINEL", "REPLICAS", self.service)
            ]
            mine = [r for r in replicas if int(r["port"]) == self.replica.port]
            if not mine:
                problems.append(f"sentinel knows replicas {replicas}, not {self.replica.port}")
            elif mine[0]["flags"] != "slave" or mine[0].get("master-link-status") != "ok":
                problems.append(
                    f"sentinel sees the replica as {mine[0]['flags']}, "
                    f"link {mine[0].get('master-link-status')}"
                )
        except (redis.RedisError, OSError, KeyError, ValueError) as exc:
            problems.append(f"{type(exc).__name__}: {exc}")
        return problems

    def wait_ready(self, timeout: float = 15.0) -> float:
        """Block until the replica is linked and acknowledges writes, and the sentinel knows
        master and replica."""
        _wait(f"Redis Sentinel on port {self.sentinel_port}", timeout, self._problems)
        # After a diskless full sync the master streams nothing until the replica's first ACK
        # (up to a second): a master killed before then takes every write with it.
        _wait(f"the replica of {self.master.port} to acknowledge", timeout, self._unacknowledged)
        self.ready_seconds = time.monotonic() - self.started_at
        return self.ready_seconds

    def _unacknowledged(self) -> list[str]:
        try:
            with _client(self.master_port(), timeout=3.0) as client:
                client.set("xsp-test:ready", "1")
                if int(client.execute_command("WAIT", 1, 1000)) < 1:
                    return ["the replica has not acknowledged a write"]
                client.delete("xsp-test:ready")
        except (redis.RedisError, OSError) as exc:
            return [f"{type(exc).__name__}: {exc}"]
        return []

    def kill_master(self) -> int:
        """SIGKILL the server the sentinel reports as master; returns its port."""
        port = self.master_port()
        self.server_on(port).stop()
        self._killed_port = port
        self._killed_at = time.monotonic()
        return port

    def wait_failover(self, timeout: float = 20.0, old_port: int | None = None) -> int:
        """Block until the sentinel reports another master that answers ROLE as master,
        and the sentinel's own view of it has settled; returns the new master's port.

        Settled means ``SENTINEL MASTER`` shows the new address with flags exactly
        ``master`` and an answered PING. ``GET-MASTER-ADDR-BY-NAME`` flips as soon as the
        replica is promoted, but ``SENTINEL MASTERS`` (what redis-py's Sentinel client
        reads) still shows the old master as s_down until +switch-master ~0.1 s later;
        and with down-after-milliseconds 1000 the sentinel's new link to the new master
        may only connect after 1 s, so it is sometimes marked s_down again for ~0.1 s
        (redis-py: MasterNotFoundError) about a second after the switch.

        ``old_port`` defaults to the one kill_master() killed (else the master as started).
        ``last_promotion_seconds`` (address flipped, ROLE master) and
        ``last_failover_seconds`` (settled) are measured from kill_master() (else from
        this call).
        """
        old = old_port if old_port is not None else self._killed_port or self.master.port
        since = self._killed_at if self._killed_at is not None else time.monotonic()
        new_port: list[int] = []
        self.last_promotion_seconds = None

        def problems() -> list[str]:
            try:
                port = self.master_port()
                if port == old:
                    return [f"sentinel still reports the master on {port}"]
                role = _call(port, "ROLE")
                if role[0] != "master":
                    return [f"{port} answers ROLE {role[0]}"]
                if self.last_promotion_seconds is None:
                    self.last_promotion_seconds = time.monotonic() - since
                state = _pairs(_call(self.sentinel_port, "SENTINEL", "MASTER", self.service))
                if int(state["port"]) != port or state["flags"] != "master":
                    return [f"sentinel sees {state['port']} as {state['flags']}"]
                if state["last-ping-sent"] != "0":
                    return [f"sentinel has no PONG from {port} yet"]
            except (redis.RedisError, OSError, KeyError, ValueError) as exc:
                return [f"{type(exc).__name__}: {exc}"]
            new_port[:] = [port]
            return []

        _wait(f"failover away from {old}", timeout, problems, interval=0.02)
        self.last_failover_seconds = time.monotonic() - since
        self._killed_port = self._killed_at = None
        return new_port[0]

    def flushall(self) -> None:
        """FLUSHALL on the current master, then wait for a connected replica to catch up."""
        # One connection throughout: WAIT waits for *this connection's* last write (a fresh
        # connection has written nothing, so its WAIT returns at once).
        with _client(self.master_port(), timeout=3.0) as client:
            client.execute_command("FLUSHALL")
            if int(client.info("replication").get("connected_slaves", 0)) > 0:
                client.execute_command("WAIT", 1, 1000)

    def stop(self) -> None:
        """Kill sentinel, replica and master and remove their temp dirs (idempotent)."""
        atexit.unregister(self.stop)
        for server in reversed(self._owned):
            server.stop()
            shutil.rmtree(server.dir, ignore_errors=True)
