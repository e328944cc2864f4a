"""A real ``redis-server`` for the shared-cache tests: its own config in a temp dir, no
persistence, a free 127.0.0.1 port, torn down after. Missing redis-server (or redis-py) skips
with the reason, and fails under ``DPOP_HSM_REQUIRE_HARDWARE=1`` (CI), like SoftHSM2 and swtpm.

:class:`RedisServer` can also stop, restart (same port) and freeze (SIGSTOP) the server, for the
degraded-mode tests, and listen the ways an application's client may connect: with a password
(``requirepass``), on a unix socket and on a TLS port (certificates from a throwaway CA of its
own, made with ``cryptography``) beside the plain port the harness pings.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
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

    def __init__(
        self,
        base: Path,
        *,
        extra_config: str = "",
        password: str | None = None,
        unix_socket: bool = False,
        tls: bool = False,
    ) -> None:
        self.base = base
        self.port = _free_port()
        self.extra_config = extra_config
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None
        self.frozen = False
        # A unix socket path is limited to ~107 bytes: a short directory of its own, not base.
        self._socket_dir = tempfile.mkdtemp(prefix="dpop-redis-") if unix_socket else None
        self.socket_path = None if self._socket_dir is None else f"{self._socket_dir}/redis.sock"
        self.tls_port = _free_port() if tls else None
        self.ca_file = base / "ca.pem" if tls else None
        if tls:
            _write_tls_files(base)

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
                    *self._listeners(),
                    self.extra_config,
                ]
            )
            + "\n",
            encoding="utf-8",
        )
        return conf

    def _listeners(self) -> list[str]:
        lines = [] if self.password is None else [f"requirepass {self.password}"]
        if self.socket_path is not None:
            lines += [f"unixsocket {self.socket_path}", "unixsocketperm 700"]
        if self.tls_port is not None:
            lines += [
                f"tls-port {self.tls_port}",
                f"tls-cert-file {self.base / 'server.pem'}",
                f"tls-key-file {self.base / 'server.key'}",
                f"tls-ca-cert-file {self.ca_file}",
                "tls-auth-clients no",
            ]
        return lines

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
            self.port = _free_port()  # a port was taken in between: try others
            if self.tls_port is not None:
                self.tls_port = _free_port()
        log = (self.base / "redis.log").read_text(errors="replace")[-2000:]
        raise AssertionError(f"redis-server did not start:\n{log}")

    def _wait_ready(self) -> bool:
        import redis

        client = redis.Redis(
            port=self.port, password=self.password, socket_timeout=1, socket_connect_timeout=1
        )
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

    def close(self) -> None:
        """Stop for good: also remove the unix socket's directory (``stop`` keeps it for
        ``restart``)."""
        self.stop()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

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

        options.setdefault("password", self.password)
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


def _write_tls_files(base: Path) -> None:
    """ca.pem (a throwaway CA) and server.pem/server.key (for 127.0.0.1, signed by it)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dpop_hsm test redis CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (base / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (base / "server.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file = base / "server.key"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)


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
