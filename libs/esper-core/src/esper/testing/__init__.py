"""Test infrastructure shared by Esper's packages: a real redis-server and pytest fixtures."""

from esper.testing.redis_server import RedisServer, find_redis_server, free_port

__all__ = ["RedisServer", "find_redis_server", "free_port"]
