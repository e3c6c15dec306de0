"""The local stack's supervisor (claas.supervisor) with real child processes: a child that dies is restarted and
healthy again; one that keeps dying stops the stack with an error naming it; stop ends every child."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import pytest

from claas.processes import free_port
from claas.supervisor import Service, ServiceBroken, Supervisor


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_crashed_child_is_restarted_and_healthy_again(tmp_path: Path) -> None:
    port = free_port()
    started: list[int] = []
    web = Service("web", [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], dict(os.environ),
                  health_url=f"http://127.0.0.1:{port}/", start_timeout_s=60, after_start=lambda: started.append(1))
    clock = Clock()
    supervisor = Supervisor([web], tmp_path / "logs", clock=clock)
    try:
        supervisor.start_all()
        assert web.process is not None
        first = web.process.pid
        web.process.kill()
        web.process.wait()
        supervisor.check()  # notices the exit, schedules the restart (1 s backoff)
        assert web.process.pid == first and supervisor.restarts == 0
        clock.now += 1.0
        supervisor.check()
        assert supervisor.restarts == 1 and web.process.pid != first and len(started) == 2
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200
        assert (tmp_path / "logs" / "web.log").exists()
    finally:
        supervisor.stop_all()
    assert web.process.poll() is not None


def test_a_child_that_keeps_crashing_stops_the_stack(tmp_path: Path) -> None:
    dying = Service("dying", [sys.executable, "-c", "import sys; sys.exit(3)"], dict(os.environ))
    clock = Clock()
    supervisor = Supervisor([dying], tmp_path / "logs", max_restarts=2, window_s=600, clock=clock)
    supervisor.start_all()
    with pytest.raises(ServiceBroken, match="dying exited 3 times"):
        for _ in range(20):
            assert dying.process is not None
            dying.process.wait()
            supervisor.check()
            clock.now += 10  # past every backoff, inside the window
    assert supervisor.restarts == 2
