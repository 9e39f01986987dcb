"""Local processes: a real `redis-server` and the services as `python -m <service>` processes.

`esper up` runs the stack on them, and the test helpers hand the same classes to tests and
benchmarks, so what a test starts is what a person starts.
"""

from esper.processes.control import free_port, kill, terminate
from esper.processes.redis_server import RedisServer, find_redis_server, ping
from esper.processes.service import ServiceProcess, ServiceStartError

__all__ = [
    "RedisServer",
    "ServiceProcess",
    "ServiceStartError",
    "find_redis_server",
    "free_port",
    "kill",
    "ping",
    "terminate",
]
