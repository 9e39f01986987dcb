"""A real `redis-server` for tests and benchmarks: `esper.processes.redis_server`, which the
local stack runs on too, under the name tests have always imported."""

from esper.processes.control import free_port
from esper.processes.redis_server import RedisServer, find_redis_server, ping

__all__ = ["RedisServer", "find_redis_server", "free_port", "ping"]
