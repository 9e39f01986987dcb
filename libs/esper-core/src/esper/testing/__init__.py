"""Test infrastructure shared by Esper's packages: a real redis-server, services as real
processes, and pytest fixtures."""

from esper.testing.redis_server import RedisServer, find_redis_server, free_port
from esper.testing.service_process import ServiceProcess, ServiceStartError

__all__ = ["RedisServer", "ServiceProcess", "ServiceStartError", "find_redis_server", "free_port"]
