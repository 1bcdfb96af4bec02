"""Waiting in tests for something another process or thread does: poll, and fail naming what never came."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], *, timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll `condition()` until it returns something truthy and return that; after `timeout` seconds fail
    the test with an AssertionError that says what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def bind_when_free(sock: socket.socket, port: int, *, timeout: float = 60) -> None:
    """Bind `sock` to 127.0.0.1:`port` as soon as the port is free (a killed server's may linger a moment)."""

    def bound() -> bool:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True

    wait_for(bound, timeout=timeout, what=f"port {port} to free")
