"""Raw-socket HTTP/1.1 for hostile tests: a server on 127.0.0.1 (threads, no framework), and
:func:`send_raw`, a client that sends bytes no HTTP library would (two fields of one name,
malformed request targets, lying framing) to a real server and parses its answer.

Its handler writes bytes, so it can do what no well-behaved framework would: close mid-response,
never answer, stream an endless body, send two ``DPoP-Nonce`` fields, loop redirects. Every
request it reads is kept as a :class:`Seen`, in order, for the test to assert on.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from tests.support.verifier import b64d

__all__ = ["Handler", "RawServer", "Seen", "response", "send_raw"]


@dataclass
class Seen:
    """One request as the hostile server received it."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        found = [v for k, v in self.headers if k.lower() == name.lower()]
        return found[-1] if found else None

    def proof_claims(self) -> dict[str, Any]:
        proof = self.header("DPoP")
        assert proof is not None, "request carried no DPoP proof"
        return dict(json.loads(b64d(proof.split(".")[1])))


Handler = Callable[[Seen, socket.socket, int], None]


@dataclass
class RawServer:
    """A one-thread-per-connection HTTP/1.1 server whose handler writes raw bytes."""

    handler: Handler
    seen: list[Seen] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    bytes_sent: int = 0

    def __post_init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        buffer = b""
        try:
            while not self.stop.is_set():
                while b"\r\n\r\n" not in buffer:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = [tuple(x.strip() for x in ln.split(":", 1)) for ln in lines[1:]]
                length = int(next((v for k, v in headers if k.lower() == "content-length"), 0))
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                body, buffer = buffer[:length], buffer[length:]
                seen = Seen(method, path, headers, body)  # type: ignore[arg-type]
                self.seen.append(seen)
                self.handler(seen, conn, len(self.seen) - 1)
        except OSError:
            return
        finally:
            conn.close()

    def send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        self.bytes_sent += len(data)

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def response(
    status: int,
    body: bytes = b"",
    headers: list[tuple[str, str]] | None = None,
    *,
    content_type: str = "application/json",
) -> bytes:
    lines = [f"HTTP/1.1 {status} X"]
    all_headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    lines += [f"{k}: {v}" for k, v in all_headers + (headers or [])]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def send_raw(
    url: str, raw: bytes, *, close_write: bool = False, method: str = "GET"
) -> tuple[http.client.HTTPResponse, bytes]:
    """Send ``raw`` bytes to the server of ``url``; its parsed response and body (5 s to
    answer). ``close_write`` half-closes after sending; ``method`` says whether a body follows
    (none for HEAD)."""
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(raw)
        if close_write:
            sock.shutdown(socket.SHUT_WR)
        answer = http.client.HTTPResponse(sock, method=method)
        answer.begin()
        return answer, answer.read()
