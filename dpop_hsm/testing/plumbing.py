"""HTTP plumbing shared by the local authorization and resource servers.

A threaded stdlib HTTP server bound to loopback, a request handler that reads a bounded body
and hands it to the server's role object, JSON answers, thread-safe counters, rotating nonces,
and the one exception that turns a failed check into an HTTP answer. Nothing here knows OAuth.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from ..errors import ReplayCacheFullError, ReplayError, UseDPoPNonceError, VerificationError
from ..jose import b64url_decode, b64url_encode, split_compact
from ..replay import ReplayCache
from ..strict_json import loads_strict

__all__ = [
    "MAX_BODY",
    "ASBehavior",
    "BodyError",
    "Counters",
    "Handler",
    "LoopbackServer",
    "Nonces",
    "RSBehavior",
    "RefreshPolicy",
    "Reject",
    "Role",
    "Settings",
    "decode_jws",
    "json_bytes",
    "proof_rejection",
    "target_path",
]

log = logging.getLogger("dpop_hsm.testing")

ASBehavior = Literal[
    "normal", "error_500", "not_json", "no_access_token", "bearer", "always_nonce", "bad_expires"
]
RSBehavior = Literal["normal", "always_nonce", "reject"]
RefreshPolicy = Literal["always", "offline_access", "never"]
MAX_BODY = 64 * 1024
_MAX_LINE = 1024
_MAX_TRAILERS = 32
_DIGITS = re.compile(r"[0-9]{1,10}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,8}")
JSON_HEADERS = (("Content-Type", "application/json"),)


class Counters:
    """Thread-safe event counts, read as attributes (an unknown name reads 0).

    Token endpoint: ``token_requests``, ``tokens_issued`` (all grants) and per grant
    ``tokens_client_credentials``, ``tokens_authorization_code``, ``tokens_refresh_token``,
    ``tokens_device_code``; ``refreshes``, ``refresh_tokens_issued``, ``refresh_reuse``,
    ``code_replays``, ``grants_revoked``. Front channel: ``codes_issued``,
    ``authorizations_approved``, ``authorizations_denied``, ``par_requests``. Device grant:
    ``device_authorizations``, ``device_polls``, ``device_slow_downs``, ``device_approvals``,
    ``device_denials``. Revocation: ``revocation_requests``, ``revocations`` (tokens or grants
    actually revoked). Nonces: ``as_nonce_challenges``, ``rs_nonce_challenges``. RS:
    ``api_requests``, ``api_ok``. Every refusal: ``rejections[reason]``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def reject(self, reason: str) -> None:
        with self._lock:
            self.rejections[reason] += 1

    def __getattr__(self, name: str) -> int:
        if name.startswith("_"):
            raise AttributeError(name)
        with self._lock:
            return self._counts[name]

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
            self.rejections.clear()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**self._counts, "rejections": dict(self.rejections)}


class Nonces:
    """Current + previous nonce, rotated by age; both acceptable (RFC 9449 §8.2 leaves policy)."""

    def __init__(self, lifetime: float) -> None:
        self.lifetime = lifetime
        self._lock = threading.Lock()
        self._current = b64url_encode(os.urandom(16))
        self._previous: str | None = None
        self._born = time.monotonic()

    def current(self) -> str:
        with self._lock:
            if time.monotonic() - self._born >= self.lifetime:
                self._rotate()
            return self._current

    def _rotate(self) -> None:
        self._previous, self._current = self._current, b64url_encode(os.urandom(16))
        self._born = time.monotonic()

    def rotate(self) -> str:
        with self._lock:
            self._rotate()
            return self._current

    def accepts(self, nonce: str) -> bool:
        """Whether ``nonce`` (a proof's claim: any JSON string) is the current or previous one.

        Compared as bytes: ``hmac.compare_digest`` refuses non-ASCII ``str`` with a TypeError,
        which would turn a proof with ``"nonce": "é"`` into a 500 instead of the
        ``use_dpop_nonce`` answer RFC 9449 §8 and §9 call for.
        """
        sent = nonce.encode("utf-8", "surrogatepass")  # a lone "\ud800" is a mismatch
        current = self.current().encode()
        with self._lock:
            previous = self._previous
        return hmac.compare_digest(sent, current) or (
            previous is not None and hmac.compare_digest(sent, previous.encode())
        )


class BodyError(Exception):
    """The request cannot be read: its target or body framing is wrong, or the body too large;
    ``status`` is the answer to send (and the connection is closed after it)."""

    def __init__(self, status: int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.description = description


class Reject(Exception):  # noqa: N818 - internal control flow, becomes an HTTP answer
    """A failed check: the HTTP status, a counter ``reason`` and the OAuth error to send."""

    def __init__(
        self,
        status: int,
        reason: str,
        error: str,
        description: str,
        *,
        nonce: bool = False,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.error = error
        self.description = description
        self.nonce = nonce
        self.retry_after = retry_after


def proof_rejection(error: VerificationError, status: int, nonce_description: str) -> Reject:
    """The answer to a proof that failed ``verify_proof``, the same at the AS and the RS."""
    if isinstance(error, UseDPoPNonceError):
        return Reject(status, "use_dpop_nonce", "use_dpop_nonce", nonce_description, nonce=True)
    if isinstance(error, ReplayError):
        return Reject(status, "replay", "invalid_dpop_proof", "DPoP proof replayed")
    if isinstance(error, ReplayCacheFullError):
        # Not a verdict on the proof: the server is at capacity (RFC 9110 §15.6.4, §10.2.3).
        return Reject(
            503,
            error.code,
            "temporarily_unavailable",
            "replay cache full, try again later",
            retry_after=max(1, math.ceil(error.retry_after)),
        )
    return Reject(status, f"proof_{error.check}", error.oauth_error, f"DPoP proof: {error.check}")


def target_path(target: str) -> str:
    """The path of a request target (RFC 9112 §3.2): origin-form as sent, or the path of an
    absolute-form target, without query and fragment. The authority of an absolute-form
    target is ignored on purpose: each server knows its own origin."""
    if target.startswith("/"):
        return target.split("?", 1)[0].split("#", 1)[0]
    return urlsplit(target).path or "/"


def json_bytes(value: Any) -> bytes:
    """Compact JSON for a response body."""
    return json.dumps(value, separators=(",", ":")).encode()


def decode_jws(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """Header, claims, signature and signing input of a compact JWS (not verified here).

    Raises ``ValueError`` or :class:`~dpop_hsm.errors.DPoPError` for anything malformed.
    """
    h, p, s = split_compact(token)
    # RFC 8259 strictly: no NaN/Infinity (``exp: NaN`` compares false with every bound, which
    # would skip the expiry and replay checks), no duplicate members (parser differentials).
    header = loads_strict(b64url_decode(h))
    claims = loads_strict(b64url_decode(p))
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise ValueError("JWS parts are not objects")
    return header, claims, b64url_decode(s), f"{h}.{p}".encode("ascii")


class Settings(Protocol):
    """The knobs the servers read on every request; ``LocalDPoPServers`` holds them, so a
    test can change them while the servers run (see its docstring for each)."""

    as_nonce: bool
    rs_nonce: bool
    token_lifetime: float
    required_scope: str
    multi_challenge: bool
    proof_max_age: float
    as_behavior: ASBehavior
    rs_behavior: RSBehavior
    dpop_signing_algs: frozenset[str]
    require_par: bool
    refresh_tokens: RefreshPolicy
    refresh_token_lifetime: float
    code_lifetime: float
    par_lifetime: float
    login_lifetime: float
    device_code_lifetime: float
    device_interval: int
    revoke_access_tokens: bool
    metadata_overrides: dict[str, Any]
    token_delay: float
    issue_refresh_tokens: bool
    refresh_tokens_issued: list[str]
    tokens_issued_at: list[float]

    def now(self) -> float:
        """The servers' clock: wall time plus ``clock_offset``."""


class Role(Protocol):
    """What a :class:`LoopbackServer` serves: the authorization server or the resource server."""

    role: str

    def handle(self, handler: Handler, body: bytes) -> None:
        """Answer one request (``handler.send``); the body was already read and bounded."""


class LoopbackServer(ThreadingHTTPServer):
    """A threaded HTTP/1.1 server for one role, with quiet, logged error handling."""

    daemon_threads = True
    allow_reuse_address = True
    # The stdlib default backlog (5) drops SYNs under 32 concurrent clients: 1 s retransmits.
    request_queue_size = 128
    # Seconds the server waits for more of a request body once its headers arrived (per read,
    # an idle bound: a client that trickles a byte every few seconds is not cut off, which a
    # loopback test server does not need). A client whose Content-Length promises more than it
    # sends would otherwise hold a handler thread, and itself, until one side gives up; it
    # gets 408 instead (RFC 9110 §15.5.9). Idle keep-alive connections between requests are
    # not bounded by this.
    body_timeout = 10.0

    def __init__(self, app: Role, host: str, port: int) -> None:
        self.app = app
        self.role = app.role
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        """``http://host:port`` of the bound socket."""
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log through ``logging`` instead of printing a traceback to stderr.

        Clients that hang up mid-request are normal in failure tests (DEBUG); anything else is a
        bug in the test server and is logged as an error with its traceback.
        """
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            log.debug("%s client %s went away: %s", self.role, client_address, type(exc).__name__)
        else:
            log.error(
                "%s server failed on a request from %s", self.role, client_address, exc_info=True
            )


class Handler(BaseHTTPRequestHandler):
    """Reads the body (bounded), dispatches to the server's role, writes the answer."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without TCP_NODELAY, Nagle + delayed ACK stall
    # every keep-alive response by ~40 ms.
    disable_nagle_algorithm = True
    server: LoopbackServer
    server_version = "dpop_hsm-testing"

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.server.role, format % args)

    def _dispatch(self) -> None:
        try:
            self._check_target()
            self.connection.settimeout(self.server.body_timeout)
            try:
                body = self._read_body()
            except TimeoutError as e:
                raise BodyError(408, "request body not received in time") from e
            finally:
                self.connection.settimeout(None)
        except BodyError as e:
            self.close_connection = True  # the framing is lost: the next bytes mean nothing
            error = {"error": "invalid_request", "error_description": e.description}
            self.send(e.status, json_bytes(error), [*JSON_HEADERS, ("Connection", "close")])
            return
        try:
            self.server.app.handle(self, body)
        except (ConnectionError, TimeoutError):
            raise  # the client went away mid-answer: handle_error logs it at DEBUG
        except Exception:  # a test server must answer, not hang the client
            log.exception("local %s server failed", self.server.role)
            self.send(500, b"internal error", [("Content-Type", "text/plain")])

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _dispatch  # noqa: N815

    def _check_target(self) -> None:
        """RFC 9112 §3.2, §3.3: a request target the server cannot parse is a 400, not a crash
        in whatever code reads the path later (``http://[bad/…`` has no valid authority)."""
        try:
            target_path(self.path)
        except ValueError as e:
            raise BodyError(400, "malformed request target") from e

    def _read_body(self) -> bytes:
        """The request body, at most :data:`MAX_BODY` bytes, framed exactly (RFC 9112 §6).

        Content-Length must be plain digits and given once; Transfer-Encoding must be
        ``chunked`` alone and not combined with Content-Length (§6.1: the combination is how
        requests are smuggled past proxies). Chunk sizes are 1-8 hex digits, checked against
        the remaining budget before anything is read, so no size (negative, ``0x``-prefixed,
        with ``_`` or ``+``, or huge) can make the server read past the limit or wait for EOF.
        Raises :class:`BodyError`.
        """
        encodings = self.headers.get_all("Transfer-Encoding") or []
        lengths = self.headers.get_all("Content-Length") or []
        if encodings:
            if lengths:
                raise BodyError(400, "both Transfer-Encoding and Content-Length")
            if len(encodings) != 1 or encodings[0].strip().lower() != "chunked":
                raise BodyError(501, "only Transfer-Encoding: chunked is understood")
            return self._read_chunked()
        if not lengths:
            return b""
        if len(lengths) != 1 or not _DIGITS.fullmatch(lengths[0]):
            raise BodyError(400, "Content-Length must be one decimal number")
        length = int(lengths[0])
        if length > MAX_BODY:
            raise BodyError(413, f"body larger than {MAX_BODY} bytes")
        body = self.rfile.read(length) if length else b""
        if len(body) != length:
            raise BodyError(400, "body shorter than Content-Length")
        return body

    def _line(self) -> bytes:
        line = self.rfile.readline(_MAX_LINE + 1)
        if not line.endswith(b"\n") or len(line) > _MAX_LINE:
            raise BodyError(400, "chunk framing line missing or too long")
        return line.rstrip(b"\r\n")

    def _read_chunked(self) -> bytes:
        # RFC 9112 §7.1: chunk = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
        chunks: list[bytes] = []
        total = 0
        while True:
            size_text = self._line().split(b";", 1)[0].rstrip(b" \t")
            if not _HEX.fullmatch(size_text):
                raise BodyError(400, "chunk size must be 1 to 8 hex digits")
            size = int(size_text, 16)
            if size == 0:
                break
            if size > MAX_BODY - total:
                raise BodyError(413, f"body larger than {MAX_BODY} bytes")
            data = self.rfile.read(size)
            if len(data) != size or self.rfile.read(2) != b"\r\n":
                raise BodyError(400, "chunk data does not match its size")
            chunks.append(data)
            total += size
        for _ in range(_MAX_TRAILERS):  # RFC 9112 §7.1.2: trailer section, then CRLF
            if not self._line():
                return b"".join(chunks)
        raise BodyError(400, "too many trailer fields")

    def send(self, status: int, body: bytes, headers: Iterable[tuple[str, str]]) -> None:
        """Write one complete response; ``Content-Length`` and ``no-store`` are added."""
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def local_replay_cache() -> ReplayCache:
    """The replay cache of one local server: big, and with no per-key share.

    The local servers are one developer's or one test run's servers, usually with ONE key
    making every proof: the library default (a quarter of the cache per key, so one hostile
    key cannot crowd out the others on a shared verifier) would refuse a benchmark's or a
    fleet test's single key after ~25k proofs a minute. Capacity still fails closed.
    """
    return ReplayCache(max_entries=1_000_000, max_entries_per_key=1_000_000)
