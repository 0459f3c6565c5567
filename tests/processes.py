"""Helpers for tests that start several local processes (jax.distributed over loopback)."""

from __future__ import annotations

import socket
import subprocess


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Wait for every process (killing one that outlives ``timeout`` s); one message per failure."""
    errors = []
    for pid, p in enumerate(procs):
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        if p.returncode != 0:
            errors.append(f"process {pid} exited {p.returncode}:\n{err[-3000:]}")
    return errors
