"""A service as a real process: `python -m <module>` on a free (or a fixed) port.

`esper up` runs the stack's services with it; tests talk to it over real HTTP. The port stays
fixed for the object's life, so `restart()` (after a `stop()` or a `kill()`) brings the service
back at the same URL, the way a crashed container comes back; its stdout and stderr go to a log
file whose tail is shown when it fails to start.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from esper.processes import control
from esper.processes.control import free_port


class ServiceStartError(RuntimeError):
    pass


class ServiceProcess(control.ChildProcess):
    """`env` is added to this process's environment; `port_env` names the variable the service
    reads its port from (e.g. `URZA_PORT`). Variables of this process's environment that start
    with one of `drop_inherited` (e.g. `("URZA_", "ESPER_BUS_")`) are not passed on, so that a
    developer's shell cannot change what a test expects; `env` and the port always are."""

    stop_timeout_s = 15.0

    def __init__(
        self,
        module: str,
        *,
        port_env: str,
        env: Mapping[str, str] | None = None,
        ready_path: str = "/healthz",
        startup_timeout_s: float = 60.0,
        log_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        drop_inherited: Sequence[str] = (),
        death_signal: int | None = None,
    ) -> None:
        self.death_signal = death_signal  # see ChildProcess.death_signal
        self.module = module
        self.port = port if port is not None else free_port()
        dropped = tuple(drop_inherited)
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
        self.env = {**inherited, **(env or {}), port_env: str(self.port)}
        self.ready_path = ready_path
        self.startup_timeout_s = startup_timeout_s
        directory = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="esper-svc-"))
        self.log_path = directory / f"{module.replace('.', '_')}-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServiceProcess:
        if self.running:
            return self
        with open(self.log_path, "ab") as log:
            self._adopt(
                self._popen(
                    [sys.executable, "-m", self.module],
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a Ctrl-C in the test run does not reach it first
                )
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = self._proc.returncode if self._proc else None
                raise ServiceStartError(
                    f"{self.module} exited with {code} while starting:\n{self.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + self.ready_path, timeout=1.0).status_code == 200:
                    return
            time.sleep(0.1)
        self.kill()
        raise ServiceStartError(
            f"{self.module} not ready at {self.url}{self.ready_path} after "
            f"{self.startup_timeout_s} s:\n{self.log_tail()}"
        )

    def restart(self, *, kill: bool = False) -> ServiceProcess:
        self.kill() if kill else self.stop()
        return self.start()

    def __repr__(self) -> str:
        return (
            f"ServiceProcess({self.module}, {self.url}, {'running' if self.running else 'stopped'})"
        )
