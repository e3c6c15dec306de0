"""Keep a few child processes running: start them in order (each healthy before the next), restart one that exits,
stop them all in reverse order. Used by scripts/openclaw-local/stack.py (model server or vLLM, API, OpenClaw).

A crashed child is restarted after a backoff (1 s, doubling up to 30 s); one that crashes `max_restarts` times within
`window_s` is considered broken and the whole stack stops with an error, instead of looping forever. Children's
output goes to one log file each (appended across restarts).

Not here: what the services are (the script), process helpers (claas.processes).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from claas.processes import stop_process, wait_until_healthy

logger = logging.getLogger(__name__)


class ServiceBroken(RuntimeError):
    """A service kept crashing."""


@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict[str, str]
    health_url: str | None = None  # GET answering 200 = ready
    start_timeout_s: float = 600.0
    cwd: Path | None = None
    stop_signal: int = signal.SIGTERM
    after_start: Callable[[], None] | None = None  # e.g. create adapters once the API is up (each start)
    process: subprocess.Popen[bytes] | None = None
    crashes: deque[float] = field(default_factory=deque)
    restart_at: float | None = None


class Supervisor:
    def __init__(self, services: list[Service], log_dir: Path, *, max_restarts: int = 5, window_s: float = 120.0,
                 backoff_max_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.services = services
        self.log_dir = log_dir
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.backoff_max_s = backoff_max_s
        self.clock = clock
        self.restarts = 0  # total, for reporting and tests

    def log_path(self, service: Service) -> Path:
        return self.log_dir / f"{service.name}.log"

    def start_all(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for service in self.services:
            self._start(service)

    def _start(self, service: Service) -> None:
        with self.log_path(service).open("ab") as log:
            service.process = subprocess.Popen(service.argv, env=service.env, cwd=service.cwd, stdout=log,
                                               stderr=subprocess.STDOUT)
        logger.info("started %s (pid %d), log %s", service.name, service.process.pid, self.log_path(service))
        if service.health_url:
            wait_until_healthy(service.health_url, service.process, name=service.name,
                               timeout_s=service.start_timeout_s)
        if service.after_start is not None:
            service.after_start()

    def check(self) -> None:
        """One supervision round: schedule restarts of exited children, run those that are due."""
        now = self.clock()
        for service in self.services:
            process = service.process
            if process is not None and process.poll() is not None and service.restart_at is None:
                service.crashes.append(now)
                while service.crashes and now - service.crashes[0] > self.window_s:
                    service.crashes.popleft()
                if len(service.crashes) > self.max_restarts:
                    raise ServiceBroken(f"{service.name} exited {len(service.crashes)} times in {self.window_s:.0f} s;"
                                        f" see {self.log_path(service)}")
                delay = min(self.backoff_max_s, 2.0 ** (len(service.crashes) - 1))
                logger.warning("%s exited with %s; restarting in %.0f s", service.name, process.returncode, delay)
                service.restart_at = now + delay
            if service.restart_at is not None and now >= service.restart_at:
                service.restart_at = None
                self.restarts += 1
                self._start(service)

    def run(self, poll_s: float = 1.0) -> None:
        """Start everything, then supervise until interrupted (Ctrl-C / SIGTERM) or a service is broken."""
        try:
            self.start_all()
            while True:
                self.check()
                time.sleep(poll_s)
        finally:
            self.stop_all()

    def stop_all(self) -> None:
        for service in reversed(self.services):
            if service.process is not None:
                stop_process(service.process, sig=service.stop_signal, timeout_s=20)
