"""The test Redis itself: it must start, persist with AOF, survive kill/restart, and clean up."""

from __future__ import annotations

import os
from collections.abc import Callable

import redis

from esper.testing import RedisServer, find_redis_server
from esper.testing.redis_server import ping


def test_binary_is_found_and_executable() -> None:
    path = find_redis_server()
    assert os.access(path, os.X_OK)


def test_fixture_server_answers(redis_server: RedisServer, redis_url: str) -> None:
    assert redis_url == redis_server.url and redis_server.running
    client = redis.Redis.from_url(redis_url)
    assert client.ping()
    assert client.xadd("s", {"f": "v"})
    client.close()


def test_aof_server_keeps_acknowledged_writes_across_a_kill(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory(appendonly=True)
    client = redis.Redis.from_url(server.url)
    ids = [client.xadd("s", {"n": n}) for n in range(50)]
    client.close()
    port = server.port
    server.kill()
    assert not server.running and not ping(port)
    server.restart()
    assert server.port == port and server.running
    client = redis.Redis.from_url(server.url)
    assert [e[0] for e in client.xrange("s")] == ids
    client.close()


def test_server_without_aof_forgets_on_restart(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory()
    client = redis.Redis.from_url(server.url)
    client.set("k", "v")
    client.close()
    server.restart(kill=True)
    client = redis.Redis.from_url(server.url)
    assert client.get("k") is None
    client.close()


def test_context_manager_stops_and_removes_its_directory() -> None:
    with RedisServer() as server:
        directory = server.directory
        port = server.port
        assert ping(port) and directory.is_dir()
    assert not server.running and not ping(port)
    assert not directory.exists()


def test_two_servers_get_different_ports(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    a = redis_server_factory()
    b = redis_server_factory()
    assert a.port != b.port and a.running and b.running
