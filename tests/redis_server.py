"""A real ``redis-server`` on a free loopback port, for the Redis tests and benchmarks.

No mocks: the shared limits are Lua scripts whose behaviour only Redis can show.
When the binary is missing the tests skip with the install command, unless
``DREAMO_REQUIRE_REDIS=1`` (set by ``.ci/run``) makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["INSTALL_HINT", "RedisServer", "free_port", "redis_server_binary"]

INSTALL_HINT = (
    "redis-server not found: the Redis tests need it. Install it with "
    "`sudo apt-get install redis-server` (Debian/Ubuntu) or `brew install redis` (macOS); "
    "set DREAMO_REQUIRE_REDIS=1 to make its absence a failure"
)


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process: no persistence (a restart forgets everything)."""

    def __init__(self, binary: str, port: int | None = None) -> None:
        self.binary = binary
        self.port = port or free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="dreamo-redis-"))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self._dir),
                "--loglevel", "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10.0
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING within 10 s")
            time.sleep(0.01)

    def stop(self) -> None:
        """Kill the server (SIGKILL: nothing is saved, clients see a dead socket)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        if down_for:
            time.sleep(down_for)
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


def require_redis_binary() -> str:
    """The binary, or skip (fail under ``DREAMO_REQUIRE_REDIS=1``) with the install hint."""
    import pytest

    binary = redis_server_binary()
    if binary is None:
        if os.environ.get("DREAMO_REQUIRE_REDIS") == "1":
            pytest.fail(INSTALL_HINT)
        pytest.skip(INSTALL_HINT)
    return binary
