"""The store-URL contract (every topology's scheme, validated at start-up, credentials never in
an error) and ``xsp-middleware doctor`` on each topology, run as a user runs it: a subprocess
reading ``XSP_REDIS_URL``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from conftest import SECRET
from processes import cli
from redis_server import RedisServer
from redis_topologies import RedisClusterNodes, RedisSentinelSetup
from starlette.applications import Starlette

from xsp_middleware import Settings, XSPMiddleware
from xsp_middleware.errors import ConfigError
from xsp_middleware.store_url import SCHEMES, parse_store_url

PASSWORD = "hunter2-s3cret"

# -- every scheme is accepted ---------------------------------------------------------------

VALID_URLS = [
    "redis://127.0.0.1:6379/0",
    "redis://:p%40ss@127.0.0.1:6379/2",
    "rediss://user:pw@cache.example.com:6380/0?ssl_cert_reqs=none",
    "unix:///var/run/redis/redis.sock?db=1",
    "memory://",
    "memory://tenant-a",
    "redis+cluster://127.0.0.1:7000",
    "redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002",
    "redis+cluster://user:p%40ss@127.0.0.1:7000,127.0.0.1:7001",
    "rediss+cluster://user:pw@node-1.example.com:7000,node-2.example.com?ssl_cert_reqs=none",
    "redis+cluster://[::1]:7000,[::1]:7001",
    "redis+cluster://127.0.0.1:7000/0",
    "redis+sentinel://127.0.0.1:26379/mymaster",
    "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380,127.0.0.1:26381/mymaster/2",
    "redis+sentinel://user:p%40ss@s1:26379,s2/mymaster?sentinel_password=sp",
    "rediss+sentinel://user:pw@s1:26379/mymaster/1?ssl_cert_reqs=none",
]


@pytest.mark.parametrize("url", VALID_URLS)
def test_settings_and_env_accept_every_scheme(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(redis_url=url).redis_url == url
    monkeypatch.setenv("XSP_REDIS_URL", url)
    assert Settings.from_env().redis_url == url
    assert Settings.from_env(environ={"XSP_REDIS_URL": url}).redis_url == url
    # The middleware takes it too (no connection is made at construction).
    XSPMiddleware(Starlette(), redis_url=url, secret_key=SECRET)


def test_every_documented_scheme_is_in_the_valid_list() -> None:
    assert {u.split("://")[0] + "://" for u in VALID_URLS} == set(SCHEMES)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+cluster://user:p%40ss@127.0.0.1:7000,127.0.0.1:7001",
            {
                "kind": "cluster",
                "tls": False,
                "nodes": (("127.0.0.1", 7000), ("127.0.0.1", 7001)),
                "service": None,
                "db": 0,
            },
        ),
        (
            "rediss+cluster://h1:7000,h2?ssl_cert_reqs=none",
            {
                "kind": "cluster",
                "tls": True,
                "nodes": (("h1", 7000), ("h2", 6379)),  # a cluster node's default port
                "service": None,
                "db": 0,
            },
        ),
        (
            "REDIS+CLUSTER://[::1]:7000",  # schemes are case-insensitive; IPv6 in brackets
            {"kind": "cluster", "tls": False, "nodes": (("::1", 7000),), "service": None, "db": 0},
        ),
        (
            "redis+sentinel://s1:26379,s2:26380,s3/mymaster/2",
            {
                "kind": "sentinel",
                "tls": False,
                "nodes": (("s1", 26379), ("s2", 26380), ("s3", 26379)),  # sentinel default
                "service": "mymaster",
                "db": 2,
            },
        ),
        (
            "rediss+sentinel://user:pw@s1/other-service?ssl_cert_reqs=none&sentinel_password=sp",
            {
                "kind": "sentinel",
                "tls": True,
                "nodes": (("s1", 26379),),
                "service": "other-service",
                "db": 0,
            },
        ),
        ("redis://127.0.0.1:6379/3", {"kind": "standalone", "tls": False}),
        ("rediss://h:6380/0?ssl_cert_reqs=none", {"kind": "standalone", "tls": True}),
        ("unix:///tmp/redis.sock", {"kind": "standalone", "tls": False}),
        ("memory://x", {"kind": "memory", "tls": False}),
    ],
)
def test_parse_store_url(url: str, expected: dict[str, Any]) -> None:
    parsed = parse_store_url(url)
    assert parsed.url == url
    assert {name: getattr(parsed, name) for name in expected} == expected


def test_parsed_credentials_and_options_reach_every_data_node() -> None:
    cluster = parse_store_url("redis+cluster://user:p%40ss@127.0.0.1:7000,127.0.0.1:7001")
    kwargs = cluster.connection_kwargs(asyncio=True)
    assert (kwargs["username"], kwargs["password"]) == ("user", "p@ss")  # %-decoded
    assert "host" not in kwargs and "port" not in kwargs  # per node, not from the first seed
    assert cluster.node_url("127.0.0.1", 7001) == "redis://user:p%40ss@127.0.0.1:7001/0"
    assert PASSWORD not in cluster.describe() and "p%40ss" not in cluster.describe()
    assert "Redis Cluster" in cluster.describe()

    tls = parse_store_url("rediss+cluster://h:7000?ssl_cert_reqs=none")
    assert tls.connection_kwargs(asyncio=False)["ssl_cert_reqs"] == "none"
    assert tls.node_url("h", 7000).startswith("rediss://")

    sentinel = parse_store_url(
        f"rediss+sentinel://user:{PASSWORD}@s1/mymaster/1?sentinel_password=sp&ssl_cert_reqs=none"
    )
    # sentinel_* authenticate to the sentinels; the rest apply to the master.
    assert sentinel.sentinel_kwargs == {"password": "sp"}
    assert sentinel.query == "ssl_cert_reqs=none"
    kwargs = sentinel.connection_kwargs(asyncio=True)
    assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("user", PASSWORD, 1)
    assert PASSWORD not in sentinel.describe() and "'mymaster'" in sentinel.describe()


# -- bad URLs are refused at start-up, saying why ---------------------------------------------

BAD_URLS = [
    ("mongodb://x", "must start with redis://"),
    ("127.0.0.1:6379", "must start with redis://"),
    ("redis+sentinel://127.0.0.1:26379", "names no service"),
    ("redis+sentinel://127.0.0.1:26379/", "names no service"),
    ("redis+sentinel://127.0.0.1:26379/mymaster/x", "unexpected path"),
    ("redis+cluster://127.0.0.1:notaport", "bad port 'notaport'"),
    ("redis+cluster://127.0.0.1:7000,127.0.0.1:70000", "bad port 70000"),
    ("redis+sentinel://127.0.0.1:0/mymaster", "bad port 0"),
    ("redis+cluster://127.0.0.1:7000/3", "only database 0"),
    ("redis+cluster://", "no host"),
    ("redis+cluster://127.0.0.1:7000,", "no host"),
    # Options: ones that would fail every request, refused at start-up instead.
    ("redis+cluster://127.0.0.1:7000?socket_timeout=5", "set by xsp-middleware itself"),
    ("redis://127.0.0.1:6379/0?protocol=3", "set by xsp-middleware itself"),
    ("redis+cluster://127.0.0.1:7000?foo=1", "unknown option 'foo'"),
    ("redis+sentinel://s1/mymaster?ssl_cert_reqs=none", "TLS options need rediss://"),
    ("redis+cluster://127.0.0.1:7000?db=3", "only database 0"),
    ("redis+sentinel://s1/mymaster/3?db=5", "give the database once"),
    ("redis+cluster://[::1:7000", "malformed IPv6"),
    ("redis://127.0.0.1:notaport/0", "check the host, the port"),
]


@pytest.mark.parametrize(("url", "problem"), BAD_URLS)
def test_bad_urls_are_refused_naming_the_problem(
    url: str, problem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="redis_url") as settings_error:
        Settings(redis_url=url)
    assert problem in str(settings_error.value)
    monkeypatch.setenv("XSP_REDIS_URL", url)
    with pytest.raises(ConfigError) as env_error:
        Settings.from_env()
    assert problem in str(env_error.value)
    with pytest.raises(ConfigError) as parse_error:
        parse_store_url(url)
    assert problem in str(parse_error.value)
    with pytest.raises(ConfigError):
        XSPMiddleware(Starlette(), redis_url=url, secret_key=SECRET)


def test_unknown_scheme_error_lists_the_accepted_schemes() -> None:
    with pytest.raises(ConfigError) as error:
        Settings(redis_url="mongodb://x")
    message = str(error.value)
    assert "mongodb://x" in message
    assert all(scheme in message for scheme in SCHEMES)


def test_the_cli_refuses_a_bad_url_in_one_line() -> None:
    result = cli("doctor", redis_url="redis+sentinel://127.0.0.1:26379")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "names no service" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_standalone_url_with_a_bad_port_is_refused_at_start_up() -> None:
    try:
        Settings(redis_url="redis://127.0.0.1:notaport/0")
    except ConfigError as exc:
        assert "port" in str(exc)
    else:
        raise AssertionError("Settings accepted redis://127.0.0.1:notaport/0")


# -- credentials never appear in an error -----------------------------------------------------

REDACTED_URLS = [
    f"redis+cluster://user:{PASSWORD}@127.0.0.1:notaport",
    f"redis+cluster://user:{PASSWORD}@127.0.0.1:7000,127.0.0.1:70000",
    f"redis+cluster://user:{PASSWORD}@127.0.0.1:7000/3",
    f"redis+cluster://user:{PASSWORD}@:7000",
    f"rediss+cluster://:{PASSWORD}@127.0.0.1:0",
    f"redis+sentinel://user:{PASSWORD}@127.0.0.1:26379",
    f"redis+sentinel://user:{PASSWORD}@127.0.0.1:26379/mymaster/x",
    f"rediss+sentinel://user:{PASSWORD}@127.0.0.1:99999/mymaster",
    # A password with an unencoded '@' or ':' in it.
    f"redis+cluster://user:a@b:{PASSWORD}@127.0.0.1:notaport",
    f"mongodb://user:{PASSWORD}@db:27017",
    f"redis:/user:{PASSWORD}@host:6379",
    f"redis+sentinel://127.0.0.1:26379?sentinel_password={PASSWORD}",
    f"redis+sentinel://127.0.0.1:26379/mymaster/x?password={PASSWORD}",
    # Unencoded '/' or '?' in the password: the parse fails, and nothing of it may show.
    f"redis+cluster://:{PASSWORD}/x@127.0.0.1:7000",
    f"redis://:{PASSWORD}?x@127.0.0.1:6379/0",
    f"redis://:x/{PASSWORD}@127.0.0.1:6379/0",
]


@pytest.mark.parametrize("url", REDACTED_URLS)
def test_config_errors_never_show_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as error:
        Settings(redis_url=url)
    assert PASSWORD not in str(error.value), str(error.value)
    result = cli("doctor", redis_url=url)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert PASSWORD not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "template",
    [
        "redis://:{pw}@127.0.0.1:{port}/0",
        "redis+cluster://user:{pw}@127.0.0.1:{port}",
    ],
)
def test_doctor_on_an_unreachable_store_never_shows_the_password(template: str) -> None:
    dead = RedisServer()
    port = dead.port
    dead.stop()  # nothing listens there any more
    result = cli("doctor", "--json", redis_url=template.format(pw=PASSWORD, port=port))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "fail" in {c["level"] for c in json.loads(result.stdout) if c["check"] == "store"}
    assert PASSWORD not in result.stdout + result.stderr


def test_doctor_on_a_standalone_url_with_a_bad_port_prints_no_traceback() -> None:
    result = cli("doctor", redis_url="redis://127.0.0.1:notaport/0")
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.returncode in (1, 2)


# -- doctor, as a user runs it --------------------------------------------------------------


def doctor(url: str) -> tuple[int, list[dict[str, str]]]:
    result = cli("doctor", "--json", redis_url=url)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode in (0, 1), (result.returncode, result.stderr)
    checks: list[dict[str, str]] = json.loads(result.stdout)
    assert all(set(c) == {"level", "check", "detail"} for c in checks), checks
    assert all(c["level"] in ("ok", "warn", "fail") for c in checks), checks
    # The exit code says whether anything failed.
    assert result.returncode == (1 if any(c["level"] == "fail" for c in checks) else 0)
    return result.returncode, checks


def named(checks: list[dict[str, str]], name: str) -> list[dict[str, str]]:
    return [c for c in checks if c["check"] == name]


def one(checks: list[dict[str, str]], name: str) -> dict[str, str]:
    found = named(checks, name)
    assert len(found) == 1, (name, checks)
    return found[0]


def master_of(check: dict[str, str], ports: list[int]) -> int:
    """The port of the one master a per-master check's detail names ("host:port: ...")."""
    hits = [p for p in ports if check["detail"].startswith(f"127.0.0.1:{p}: ")]
    assert len(hits) == 1, (check, ports)
    return hits[0]


@contextmanager
def config_set(port: int, name: str, value: str) -> Iterator[None]:
    """CONFIG SET on one server, restored afterwards whatever happens."""
    with redis.Redis(port=port, decode_responses=True, socket_timeout=5) as server:
        old = server.config_get(name)[name]
        server.config_set(name, value)
        try:
            yield
        finally:
            server.config_set(name, old)


def test_doctor_on_standalone_redis(redis_url: str) -> None:
    code, checks = doctor(redis_url)
    assert code == 0, checks
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    assert one(checks, "topology")["detail"] == f"standalone Redis at 127.0.0.1:{port}"
    assert one(checks, "topology")["level"] == "ok"
    assert one(checks, "store")["level"] == "ok"
    assert one(checks, "eviction") == {
        "level": "ok",
        "check": "eviction",
        "detail": "maxmemory-policy noeviction",
    }
    assert one(checks, "persistence")["level"] == "warn"  # the test server keeps nothing
    assert one(checks, "version")["level"] == "ok"
    assert not named(checks, "coverage")


def test_doctor_on_a_cluster_checks_every_master(cluster: RedisClusterNodes) -> None:
    code, checks = doctor(cluster.url)
    assert code == 0, checks  # persistence is only a warning
    topology = one(checks, "topology")
    assert topology["level"] == "ok"
    assert "Redis Cluster with 3 masters" in topology["detail"]
    assert all(f"127.0.0.1:{port}" in topology["detail"] for port in cluster.ports)
    assert one(checks, "store")["level"] == "ok"
    assert one(checks, "scripts")["level"] == "ok"
    for name, level in (("version", "ok"), ("eviction", "ok"), ("persistence", "warn")):
        per_master = named(checks, name)
        assert len(per_master) == 3, (name, checks)
        assert {c["level"] for c in per_master} == {level}, per_master
        assert sorted(master_of(c, cluster.ports) for c in per_master) == sorted(cluster.ports)
    assert not named(checks, "coverage")  # the fixture runs with require-full-coverage no


@pytest.mark.parametrize("index", [0, 1, 2])
def test_doctor_fails_exactly_the_master_that_may_evict(
    cluster: RedisClusterNodes, index: int
) -> None:
    port = cluster.ports[index]
    with config_set(port, "maxmemory-policy", "allkeys-lru"):
        code, checks = doctor(cluster.url)
    assert code == 1, checks
    eviction = named(checks, "eviction")
    assert len(eviction) == 3, checks
    failed = [c for c in eviction if c["level"] == "fail"]
    assert [master_of(c, cluster.ports) for c in failed] == [port], eviction
    assert "allkeys-lru" in failed[0]["detail"] and "noeviction" in failed[0]["detail"]
    assert all(c["level"] == "ok" for c in eviction if c not in failed)
    assert [c["check"] for c in checks if c["level"] == "fail"] == ["eviction"]
    # Restored: healthy again.
    assert doctor(cluster.url)[0] == 0


def test_doctor_warns_about_full_coverage_on_the_master_that_has_it(
    cluster: RedisClusterNodes,
) -> None:
    port = cluster.ports[2]
    with config_set(port, "cluster-require-full-coverage", "yes"):
        code, checks = doctor(cluster.url)
    assert code == 0, checks  # a warning, not a failure
    coverage = one(checks, "coverage")
    assert coverage["level"] == "warn"
    assert master_of(coverage, cluster.ports) == port


def test_doctor_through_sentinel(sentinel: RedisSentinelSetup) -> None:
    code, checks = doctor(sentinel.url)
    assert code == 0, checks
    topology = one(checks, "topology")
    assert topology["level"] == "ok"
    detail = topology["detail"]
    assert "Sentinel" in detail
    assert f"'{sentinel.service}'" in detail
    assert f"127.0.0.1:{sentinel.master_port()}" in detail
    assert "1 sentinel" in detail
    assert one(checks, "store")["level"] == "ok"
    # One master: no "host:port: " prefix.
    assert one(checks, "eviction") == {
        "level": "ok",
        "check": "eviction",
        "detail": "maxmemory-policy noeviction",
    }
    assert one(checks, "persistence")["level"] == "warn"


def test_doctor_through_sentinel_fails_a_master_that_may_evict(
    sentinel: RedisSentinelSetup,
) -> None:
    with config_set(sentinel.master_port(), "maxmemory-policy", "volatile-lru"):
        code, checks = doctor(sentinel.url)
    assert code == 1
    assert one(checks, "eviction")["level"] == "fail"
    assert "volatile-lru" in one(checks, "eviction")["detail"]


# Last in the file: the cluster fixture restarts a killed master (~2 s) for the next test.


@pytest.mark.parametrize("index", [0, 1, 2])
def test_doctor_with_a_dead_master_fails_the_store_and_checks_the_others(
    cluster: RedisClusterNodes, index: int
) -> None:
    dead = cluster.ports[index]
    live = [p for p in cluster.ports if p != dead]
    cluster.kill(index)
    result = cli("doctor", "--json", redis_url=cluster.url)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 1, result.stdout
    checks = json.loads(result.stdout)
    store = one(checks, "store")
    assert store["level"] == "fail"
    assert f"127.0.0.1:{dead}" in store["detail"]
    assert "1 of 3 masters" in store["detail"], store
    assert "Redis Cluster with 3 masters" in one(checks, "topology")["detail"]
    eviction = named(checks, "eviction")
    assert sorted(master_of(c, cluster.ports) for c in eviction) == sorted(live), checks
    assert {c["level"] for c in eviction} == {"ok"}
    assert sorted(master_of(c, cluster.ports) for c in named(checks, "version")) == sorted(live)
    # The plain-text output says the same, without a traceback either.
    text = cli("doctor", redis_url=cluster.url)
    assert text.returncode == 1 and "Traceback" not in text.stderr
    assert any(
        line.startswith("FAIL  store:") and f"127.0.0.1:{dead}" in line
        for line in text.stdout.splitlines()
    ), text.stdout
