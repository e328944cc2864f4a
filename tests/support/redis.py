"""A real ``redis-server`` for the shared-cache tests: its own config in a temp dir, no
persistence, a free 127.0.0.1 port, torn down after. Missing redis-server (or redis-py) skips
with the reason, and fails under ``DPOP_HSM_REQUIRE_HARDWARE=1`` (CI), like SoftHSM2 and swtpm.

:class:`RedisServer` can also stop, restart (same port) and freeze (SIGSTOP) the server, for the
degraded-mode tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.hardware import unavailable


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process on 127.0.0.1 with a config file of its own."""

    def __init__(self, base: Path, *, extra_config: str = "") -> None:
        self.base = base
        self.port = _free_port()
        self.extra_config = extra_config
        self.process: subprocess.Popen[bytes] | None = None
        self.frozen = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _write_config(self) -> Path:
        conf = self.base / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {self.port}",
                    "protected-mode yes",
                    "save ''",
                    "appendonly no",
                    f"dir {self.base}",
                    f"logfile {self.base / 'redis.log'}",
                    "daemonize no",
                    "databases 2",
                    self.extra_config,
                ]
            )
            + "\n",
            encoding="utf-8",
        )
        return conf

    def start(self) -> RedisServer:
        for _attempt in range(5):
            conf = self._write_config()
            self.process = subprocess.Popen(
                ["redis-server", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._wait_ready():
                return self
            self.process.kill()
            self.process.wait()
            self.port = _free_port()  # the port was taken in between: try another
        log = (self.base / "redis.log").read_text(errors="replace")[-2000:]
        raise AssertionError(f"redis-server did not start:\n{log}")

    def _wait_ready(self) -> bool:
        import redis

        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except redis.RedisError:
                    time.sleep(0.02)
            return False
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is None:
            return
        if self.frozen:
            self.resume()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        """Start again on the same port (empty: there is no persistence)."""
        self.stop()
        conf = self._write_config()
        self.process = subprocess.Popen(
            ["redis-server", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if not self._wait_ready():
            raise AssertionError("redis-server did not restart on its port")

    def freeze(self) -> None:
        """SIGSTOP: the port still accepts connections, nothing answers (a hung server)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        self.frozen = True

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)
        self.frozen = False

    def client(self, **options: Any) -> Any:
        import redis

        return redis.Redis(port=self.port, socket_timeout=5, **options)

    def dump(self) -> dict[bytes, bytes]:
        """Every string key and its value (what a test inspects for secrets)."""
        client = self.client()
        try:
            out: dict[bytes, bytes] = {}
            for key in client.scan_iter(count=1000):
                if client.type(key) == b"string":
                    value = client.get(key)
                    if value is not None:
                        out[key] = value
            return out
        finally:
            client.close()


def _require_redis() -> None:
    if shutil.which("redis-server") is None:
        unavailable("redis-server not installed (apt-get install redis-server)")
    try:
        import redis  # noqa: F401
    except ImportError:
        unavailable("redis-py not installed (pip install 'dpop_hsm[redis]')")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the run; tests use their own key prefixes (see ``redis_prefix``)."""
    _require_redis()
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone: to stop, restart or freeze."""
    _require_redis()
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix no other test uses, so tests on the shared server never see each other."""
    return f"t{abs(hash(request.node.nodeid)) % 10**12}:{os.getpid()}:"
