"""Smoke tests of the Redis Cluster / Sentinel test helpers themselves (redis_topologies.py).

With ``XSP_REQUIRE_REDIS=1`` (CI) these fail when redis-server cannot be started; otherwise
they are skipped, as the tests on conftest.py's ``redis_server`` fixture are.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.sentinel import Sentinel
from redis_topologies import SLOTS, RedisClusterNodes, RedisSentinelSetup

REQUIRE_REDIS = os.environ.get("XSP_REQUIRE_REDIS") == "1"

T = TypeVar("T")


def _no_redis(why: str) -> None:
    if REQUIRE_REDIS:
        pytest.fail(f"XSP_REQUIRE_REDIS=1 but no Redis could be started: {why}")
    pytest.skip(f"no Redis available: {why}")


def _start(make: Callable[[], T]) -> T:
    """Start the processes, or skip / fail (XSP_REQUIRE_REDIS=1) when there is no Redis."""
    try:
        return make()
    except (RuntimeError, OSError) as exc:
        _no_redis(str(exc))
        raise  # unreachable: _no_redis raises


def _node(port: int) -> redis.Redis:
    return redis.Redis(port=port, decode_responses=True, socket_timeout=2)


@pytest.fixture(scope="module")
def cluster_nodes() -> Iterator[RedisClusterNodes]:
    cluster = _start(RedisClusterNodes)
    try:
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(cluster_nodes: RedisClusterNodes) -> RedisClusterNodes:
    """The module's cluster, every node up (a failed test may have left one killed), empty."""
    for index in range(len(cluster_nodes.nodes)):
        if not cluster_nodes.alive(index):
            cluster_nodes.restart(index)
    cluster_nodes.flushall()
    return cluster_nodes


@pytest.fixture(scope="module")
def sentinel_setup() -> Iterator[RedisSentinelSetup]:
    setup = _start(RedisSentinelSetup)
    try:
        setup.wait_ready()
        yield setup
    finally:
        setup.stop()


def test_cluster_layout_url_and_slot_owners(cluster: RedisClusterNodes) -> None:
    assert len(cluster.nodes) == 3
    assert cluster.ports == [node.port for node in cluster.nodes]
    assert cluster.url == "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in cluster.ports)
    assert cluster.node_for_slot(0) is cluster.nodes[0]
    assert cluster.node_for_slot(SLOTS - 1) is cluster.nodes[2]
    # Every node agrees with the helper about who owns what.
    for node in cluster.nodes:
        owners = {
            (lo, hi): port
            for lo, hi, (_, port, *_) in _node(node.port).execute_command("CLUSTER", "SLOTS")
        }
        assert sum(hi - lo + 1 for lo, hi in owners) == SLOTS
        for (lo, hi), port in owners.items():
            assert cluster.node_for_slot(lo).port == port == cluster.node_for_slot(hi).port
    with pytest.raises(ValueError):
        cluster.node_for_slot(SLOTS)


def test_cluster_hash_tags_spread_over_all_nodes(cluster: RedisClusterNodes) -> None:
    keys = [f"{{user{n}}}:cap" for n in range(30)]
    owners = {key: cluster.node_for_key(key) for key in keys}
    assert {cluster.nodes.index(node) for node in owners.values()} == {0, 1, 2}
    # Same hash tag, same node, whatever follows the tag.
    assert cluster.node_for_key("{user0}:budget") is owners["{user0}:cap"]
    assert key_slot(b"{user0}:budget") == key_slot(b"user0")

    for key, node in owners.items():
        assert _node(node.port).set(key, "1")  # the owner serves it: no MOVED
        other = cluster.nodes[(cluster.nodes.index(node) + 1) % 3]
        with pytest.raises(redis.exceptions.MovedError, match=f"127.0.0.1:{node.port}$"):
            _node(other.port).execute_command("GET", key)

    # A real cluster client, given the hosts of the url, sees the same placement.
    client = RedisCluster(
        startup_nodes=[ClusterNode("127.0.0.1", port) for port in cluster.ports],
        decode_responses=True,
    )
    try:
        assert all(client.get(key) == "1" for key in keys)
        for key in keys:
            assert client.get_node_from_key(key).port == owners[key].port
    finally:
        client.close()

    cluster.flushall()
    assert [_node(port).dbsize() for port in cluster.ports] == [0, 0, 0]


def test_cluster_kill_and_restart(cluster: RedisClusterNodes) -> None:
    keys = [cluster.key_on(index) for index in range(3)]
    for key in keys:
        _node(cluster.node_for_key(key).port).set(key, "before")

    cluster.kill(1)
    assert not cluster.alive(1)
    assert cluster.alive(0) and cluster.alive(2)
    assert not cluster.nodes[1].ping()  # nothing listens on its port any more
    # require-full-coverage no: the other masters go on serving their own slots.
    for index in (0, 2):
        assert _node(cluster.nodes[index].port).get(keys[index]) == "before"
        assert _node(cluster.nodes[index].port).set(keys[index], "during")
    cluster.wait_ok(5)  # the live nodes still report cluster_state:ok

    seconds = cluster.restart(1)
    assert cluster.alive(1)
    assert seconds < 15
    restarted = _node(cluster.nodes[1].port)
    assert restarted.get(keys[1]) is None  # nothing persisted: it comes back empty
    assert restarted.set(keys[1], "after")  # and serves its slots again
    assert [_node(cluster.nodes[i].port).get(keys[i]) for i in range(3)] == [
        "during",
        "after",
        "during",
    ]
    with pytest.raises(RuntimeError, match="still running"):
        cluster.restart(1)


def test_sentinel_write_reaches_replica_after_wait(sentinel_setup: RedisSentinelSetup) -> None:
    setup = sentinel_setup
    assert setup.url == f"redis+sentinel://127.0.0.1:{setup.sentinel_port}/mymaster"
    assert setup.master_port() == setup.master.port
    assert Sentinel([("127.0.0.1", setup.sentinel_port)]).discover_master("mymaster") == (
        "127.0.0.1",
        setup.master.port,
    )

    master = _node(setup.master.port)  # WAIT is per connection: same one as the write
    master.set("k", "v")
    assert master.execute_command("WAIT", 1, 1000) == 1
    replica = _node(setup.replica.port)
    assert replica.get("k") == "v"
    with pytest.raises(redis.exceptions.ReadOnlyError):
        replica.set("k", "w")

    setup.flushall()
    assert replica.dbsize() == 0


def test_sentinel_failover_promotes_the_replica() -> None:
    setup = _start(RedisSentinelSetup)  # its own: a failover would break a shared one
    try:
        setup.wait_ready()
        master = _node(setup.master.port)
        master.set("k", "v")
        assert master.execute_command("WAIT", 1, 1000) == 1

        assert setup.kill_master() == setup.master.port
        new_port = setup.wait_failover()
        assert new_port == setup.replica.port == setup.master_port()
        assert setup.last_promotion_seconds is not None and setup.last_failover_seconds
        assert setup.last_promotion_seconds <= setup.last_failover_seconds < 20
        promoted = _node(new_port)
        assert promoted.execute_command("ROLE")[0] == "master"
        assert promoted.get("k") == "v"
        assert promoted.set("k", "w")
        assert Sentinel([("127.0.0.1", setup.sentinel_port)]).discover_master("mymaster") == (
            "127.0.0.1",
            new_port,
        )
        setup.flushall()  # no replica left to WAIT for: must not hang
        assert promoted.dbsize() == 0
    finally:
        setup.stop()
    servers = [setup.master, setup.replica, setup.sentinel]
    assert all(server.proc is None and not server.dir.exists() for server in servers)
    assert not any(server.ping() for server in servers)
