"""Child processes for `claas up`, the tests and the benchmarks: a free loopback port, waiting until a child's
health URL answers, and stopping a child.

Not for the API: the gateway never starts, stops or restarts the inference server (it only talks HTTP to it).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time

import httpx


class ServiceStartError(RuntimeError):
    """A child process exited, or did not become healthy in time."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(
    url: str, process: subprocess.Popen, *, name: str, timeout_s: float, poll_s: float = 0.25
) -> None:
    """Return once GET `url` answers 200; ServiceStartError if `process` exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServiceStartError(f"{name} exited with code {process.returncode}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(poll_s)
    raise ServiceStartError(f"{name} did not become healthy at {url} within {timeout_s:.0f}s")


def stop_process(process: subprocess.Popen, *, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> None:
    """Send `sig`, wait up to `timeout_s`, then kill."""
    if process.poll() is None:
        process.send_signal(sig)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
