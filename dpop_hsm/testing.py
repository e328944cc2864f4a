"""A real local authorization server and resource server that enforce RFC 9449.

For tests (ours and users'), the demo and ``dpop-hsm serve``: two stdlib
``ThreadingHTTPServer`` instances on 127.0.0.1 (port 0 by default), real sockets, proofs checked
with :func:`dpop_hsm.verify.verify_proof`. Not a production server: no TLS, in-memory state.

Authorization server (``as_url``):
  ``POST /connect/token`` client_credentials with client_secret_basic, client_secret_post,
  private_key_jwt (RFC 7523, registered public JWK, assertion jti replay-checked) or none; a
  DPoP proof is required (§5) and, when ``as_nonce``, a current nonce (§8: 400
  ``use_dpop_nonce``). Issues JWT access tokens (``typ: at+jwt``) signed with the server's own
  ES256 key, with ``cnf.jkt``, ``client_id``, ``scope``, ``exp``. ``GET /jwks`` publishes the key;
  ``GET /echo`` reports which credential headers arrived (for redirect tests).
Resource server (``rs_url``):
  ``/api/dpop/test`` returns the token's claims like the seed's demo API (never the proof);
  rejects Bearer use of a bound token, replays, wrong htm/htu/ath, a key that does not match
  ``cnf.jkt``, and (``rs_nonce``) a missing/stale nonce, each with
  ``WWW-Authenticate: DPoP error="…"`` and ``algs`` (§7.1, §9). ``/redirect?to=…`` answers 307.

Nonces rotate every ``nonce_lifetime`` seconds (the previous one stays acceptable) and are sent
on every response, 200s included. Counters are thread-safe; ``behavior`` knobs make the AS and
RS misbehave on purpose for failure tests.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import math
import os
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from .errors import (
    ConfigurationError,
    DPoPError,
    InvalidProofError,
    ReplayError,
    UseDPoPNonceError,
    VerificationError,
)
from .jose import b64url_decode, b64url_encode, compact_json, split_compact
from .signers.software import SoftwareSigner
from .verify import (
    DEFAULT_ALGORITHMS,
    ReplayCache,
    public_key_from_jwk,
    verify_jws_signature,
    verify_proof,
)

__all__ = [
    "ASBehavior",
    "ClientRegistration",
    "Counters",
    "LocalDPoPServers",
    "RSBehavior",
]

log = logging.getLogger("dpop_hsm.testing")

ASBehavior = Literal[
    "normal", "error_500", "not_json", "no_access_token", "bearer", "always_nonce", "bad_expires"
]
RSBehavior = Literal["normal", "always_nonce", "reject"]
_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_BODY = 64 * 1024
_ALGS = " ".join(sorted(DEFAULT_ALGORITHMS))


@dataclass(frozen=True)
class ClientRegistration:
    """A client the AS knows: its auth method and secret or public JWK, and allowed scopes."""

    client_id: str
    auth_method: str = "client_secret_basic"
    client_secret: str | None = field(default=None, repr=False)
    jwk: Mapping[str, str] | None = None
    scope: str = "api"


class Counters:
    """Thread-safe event counts: ``token_requests``, ``tokens_issued``, ``as_nonce_challenges``,
    ``rs_nonce_challenges``, ``api_requests``, ``api_ok`` and ``rejections[reason]``."""

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


class _Nonces:
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
        current = self.current()
        with self._lock:
            return hmac.compare_digest(nonce, current) or (
                self._previous is not None and hmac.compare_digest(nonce, self._previous)
            )


class _Reject(Exception):  # noqa: N818 - internal control flow, becomes an HTTP answer
    def __init__(
        self,
        status: int,
        reason: str,
        error: str,
        description: str,
        *,
        nonce: bool = False,
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.error = error
        self.description = description
        self.nonce = nonce


def _proof_rejection(error: VerificationError, status: int, nonce_description: str) -> _Reject:
    """The answer to a proof that failed ``verify_proof``, the same at the AS and the RS."""
    if isinstance(error, UseDPoPNonceError):
        return _Reject(
            status,
            "use_dpop_nonce",
            "use_dpop_nonce",
            nonce_description,
            nonce=True,
        )
    if isinstance(error, ReplayError):
        return _Reject(status, "replay", "invalid_dpop_proof", "DPoP proof replayed")
    return _Reject(status, f"proof_{error.check}", error.oauth_error, f"DPoP proof: {error.check}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # The stdlib default backlog (5) drops SYNs under 32 concurrent clients: 1 s retransmits.
    request_queue_size = 128

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

    def __init__(self, app: LocalDPoPServers, role: str, host: str, port: int) -> None:
        self.app = app
        self.role = role
        super().__init__((host, port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without TCP_NODELAY, Nagle + delayed ACK stall
    # every keep-alive response by ~40 ms.
    disable_nagle_algorithm = True
    server: _Server
    server_version = "dpop_hsm-testing"

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.server.role, format % args)

    def _dispatch(self) -> None:
        try:
            body = self._read_body()
        except ValueError:
            self._send(400, b'{"error":"invalid_request"}', [("Content-Type", "application/json")])
            self.close_connection = True
            return
        app = self.server.app
        try:
            if self.server.role == "as":
                app._handle_as(self, body)
            else:
                app._handle_rs(self, body)
        except (ConnectionError, TimeoutError):
            raise  # the client went away mid-answer: handle_error logs it at DEBUG
        except Exception:  # a test server must answer, not hang the client
            log.exception("local %s server failed", self.server.role)
            self._send(500, b"internal error", [("Content-Type", "text/plain")])

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _dispatch  # noqa: N815

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            total = 0
            while True:
                size_line = self.rfile.readline(1024).split(b";", 1)[0].strip()
                size = int(size_line, 16)
                if size == 0:
                    while self.rfile.readline(1024).strip():
                        pass
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY:
                    raise ValueError("body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(16)
        length = int(self.headers.get("Content-Length", "0") or 0)
        if length < 0 or length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, headers: Iterable[tuple[str, str]]) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _decode_jws(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    h, p, s = split_compact(token)
    header = json.loads(b64url_decode(h))
    claims = json.loads(b64url_decode(p))
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise ValueError("JWS parts are not objects")
    return header, claims, b64url_decode(s), f"{h}.{p}".encode("ascii")


class LocalDPoPServers:
    """Start an AS and an RS on loopback; a context manager; see the module docstring.

    ``clients`` registers clients up front (more with :meth:`register_client`);
    ``as_nonce``/``rs_nonce`` require nonces; ``token_lifetime`` (s) and ``clock_offset`` (s
    added to the servers' clock) can be changed while running, as can ``as_behavior``,
    ``rs_behavior``, ``required_scope``, ``token_delay`` (s the AS waits before answering a
    token request: a slow AS) and ``issue_refresh_tokens`` (each one also kept in
    ``refresh_tokens_issued``). ``tokens_issued_at`` has the ``time.monotonic()`` of every
    token issued.
    """

    def __init__(
        self,
        *,
        clients: Iterable[ClientRegistration] = (),
        as_nonce: bool = True,
        rs_nonce: bool = True,
        nonce_lifetime: float = 30.0,
        token_lifetime: float = 300.0,
        clock_offset: float = 0.0,
        required_scope: str = "api",
        multi_challenge: bool = True,
        host: str = "127.0.0.1",
        as_port: int = 0,
        rs_port: int = 0,
        proof_max_age: float = 60.0,
    ) -> None:
        self.clients: dict[str, ClientRegistration] = {}
        for client in clients:
            self.register_client(client)
        self.as_nonce = as_nonce
        self.rs_nonce = rs_nonce
        self.as_nonces = _Nonces(nonce_lifetime)
        self.rs_nonces = _Nonces(nonce_lifetime)
        self.token_lifetime = token_lifetime
        self.clock_offset = clock_offset
        self.required_scope = required_scope
        self.multi_challenge = multi_challenge
        self.proof_max_age = proof_max_age
        self.as_behavior: ASBehavior = "normal"
        self.token_delay = 0.0
        self.issue_refresh_tokens = False
        self.refresh_tokens_issued: list[str] = []
        self.tokens_issued_at: list[float] = []
        self.rs_behavior: RSBehavior = "normal"
        self.counters = Counters()
        self.seen: deque[dict[str, Any]] = deque(maxlen=1000)
        self._issued: set[str] = set()
        self._revoked: set[str] = set()
        self._state_lock = threading.Lock()
        self._proof_replays = ReplayCache()
        self._assertion_replays = ReplayCache()
        self._key = SoftwareSigner.generate("ES256")
        self.kid = self._key.thumbprint
        self._host, self._ports = host, (as_port, rs_port)
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> LocalDPoPServers:
        if self._servers:
            return self
        self._servers = [
            _Server(self, "as", self._host, self._ports[0]),
            _Server(self, "rs", self._host, self._ports[1]),
        ]
        for server in self._servers:
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"dpop_hsm-{server.role}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        # Shut both down in parallel: each shutdown() waits up to one poll interval.
        stoppers = [threading.Thread(target=server.shutdown) for server in self._servers]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join()
        for server in self._servers:
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers, self._threads = [], []

    def serve_forever(self) -> None:
        """Block until interrupted (Ctrl-C) — for ``dpop-hsm serve``."""
        self.start()
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def __enter__(self) -> LocalDPoPServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- endpoints ------------------------------------------------------------------------

    def _url(self, index: int) -> str:
        if not self._servers:
            raise ConfigurationError(
                "servers are not started: call start() or use them as a context manager"
            )
        host, port = self._servers[index].server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def as_url(self) -> str:
        return self._url(0)

    @property
    def rs_url(self) -> str:
        return self._url(1)

    @property
    def token_endpoint(self) -> str:
        return self.as_url + "/connect/token"

    @property
    def jwks_url(self) -> str:
        return self.as_url + "/jwks"

    @property
    def api_url(self) -> str:
        return self.rs_url + "/api/dpop/test"

    def endpoints(self) -> str:
        """Printable summary for people (``dpop-hsm serve``)."""
        lines = [
            f"token endpoint : {self.token_endpoint}",
            f"jwks           : {self.jwks_url}",
            f"api            : {self.api_url}",
            f"nonces         : AS {'required' if self.as_nonce else 'off'}, "
            f"RS {'required' if self.rs_nonce else 'off'}",
            f"token lifetime : {self.token_lifetime:g} s",
        ]
        for c in self.clients.values():
            lines.append(f"client         : {c.client_id} ({c.auth_method}, scope {c.scope!r})")
        return "\n".join(lines)

    def register_client(self, client: ClientRegistration) -> None:
        if client.auth_method in ("client_secret_basic", "client_secret_post"):
            if not client.client_secret:
                raise ConfigurationError(f"{client.auth_method} client needs a secret")
        elif client.auth_method == "private_key_jwt":
            if not client.jwk:
                raise ConfigurationError("private_key_jwt client needs a public JWK")
        elif client.auth_method != "none":
            raise ConfigurationError(f"unknown auth method {client.auth_method!r}")
        self.clients[client.client_id] = client

    def revoke_all(self) -> int:
        """Revoke every token issued so far (the RS then answers ``invalid_token``)."""
        with self._state_lock:
            self._revoked |= self._issued
            return len(self._revoked)

    def now(self) -> float:
        return time.time() + self.clock_offset

    def public_jwk(self) -> dict[str, str]:
        return {**self._key.public_jwk, "kid": self.kid, "alg": "ES256", "use": "sig"}

    def issue_token(self, *, client_id: str, jkt: str, scope: str) -> str:
        """A JWT access token bound to ``jkt`` (RFC 9449 §6.1), signed with the server key."""
        now = int(self.now())
        header = {"alg": "ES256", "typ": "at+jwt", "kid": self.kid}
        jti = b64url_encode(os.urandom(16))
        claims = {
            "iss": self.as_url,
            "nbf": now,
            "iat": now,
            # NumericDate is whole seconds: round exp UP so the token lives at least
            # expires_in seconds (truncating would cut up to 1 s off a 2 s token).
            "exp": math.ceil(self.now() + max(1, round(self.token_lifetime))),
            "aud": "api",
            "cnf": {"jkt": jkt},
            "scope": scope,
            "client_id": client_id,
            "jti": jti,
        }
        with self._state_lock:
            self._issued.add(jti)
        signing_input = (
            b64url_encode(compact_json(header)) + "." + b64url_encode(compact_json(claims))
        )
        return signing_input + "." + b64url_encode(self._key.sign(signing_input.encode()))

    # --- authorization server -------------------------------------------------------------

    def _handle_as(self, h: _Handler, body: bytes) -> None:
        path = urlsplit(h.path).path
        self.seen.append(
            {
                "server": "as",
                "path": path,
                "authorization": "Authorization" in h.headers,
                "dpop": "DPoP" in h.headers,
            }
        )
        if path == "/jwks" and h.command == "GET":
            h._send(
                200, _json({"keys": [self.public_jwk()]}), [("Content-Type", "application/json")]
            )
            return
        if path == "/echo":
            out = {k: self.seen[-1][k] for k in ("authorization", "dpop")}
            h._send(200, _json(out), [("Content-Type", "application/json")])
            return
        if path != "/connect/token":
            h._send(404, b"not found", [("Content-Type", "text/plain")])
            return
        if h.command != "POST":
            h._send(405, b"", [("Allow", "POST")])
            return
        self.counters.add("token_requests")
        if self.token_delay > 0:
            time.sleep(self.token_delay)
        headers: list[tuple[str, str]] = [
            ("Content-Type", "application/json"),
            ("Pragma", "no-cache"),
        ]
        if self.as_nonce:
            headers.append(("DPoP-Nonce", self.as_nonces.current()))
        behavior = self.as_behavior
        if behavior == "error_500":
            h._send(500, b"upstream exploded", [("Content-Type", "text/plain")])
            return
        if behavior == "not_json":
            h._send(200, b"<html>login</html>", [("Content-Type", "text/html")])
            return
        try:
            answer = self._token_response(h, body)
        except _Reject as r:
            self.counters.reject(r.reason)
            if r.nonce:
                self.counters.add("as_nonce_challenges")
                if not any(k == "DPoP-Nonce" for k, _ in headers):
                    headers.append(("DPoP-Nonce", self.as_nonces.current()))
            if r.status == 401:
                headers.append(("WWW-Authenticate", 'Basic realm="dpop_hsm"'))
            err = {"error": r.error, "error_description": r.description}
            h._send(r.status, _json(err), headers)
            return
        h._send(200, _json(answer), headers)

    def _token_response(self, h: _Handler, body: bytes) -> dict[str, Any]:
        if "application/x-www-form-urlencoded" not in h.headers.get("Content-Type", ""):
            raise _Reject(400, "content_type", "invalid_request", "form body expected")
        try:
            pairs = parse_qsl(
                body.decode("ascii"), keep_blank_values=True, strict_parsing=bool(body)
            )
        except (UnicodeDecodeError, ValueError) as e:
            raise _Reject(400, "form", "invalid_request", "malformed form body") from e
        form: dict[str, str] = {}
        for k, v in pairs:
            if k in form and k != "resource":
                raise _Reject(400, "form", "invalid_request", f"repeated parameter {k}")
            form[k] = v
        if form.get("grant_type") != "client_credentials":
            raise _Reject(400, "grant_type", "unsupported_grant_type", "client_credentials only")
        client = self._authenticate_client(h, form)
        # RFC 9449 §5: a proof on every token request.
        proofs = h.headers.get_all("DPoP") or []
        if len(proofs) != 1:
            raise _Reject(400, "proof_missing", "invalid_dpop_proof", "exactly one DPoP header")
        if self.as_behavior == "always_nonce":
            raise _Reject(400, "use_dpop_nonce", "use_dpop_nonce", "nonce required", nonce=True)
        try:
            verified = verify_proof(
                proofs[0],
                htm="POST",
                htu=self.token_endpoint,
                nonce=self.as_nonces.accepts if self.as_nonce else None,
                replay_cache=self._proof_replays,
                max_age=self.proof_max_age,
                now=self.now(),
            )
        except VerificationError as e:
            # RFC 9449 §5, §8: the AS answers 400 with a JSON error.
            raise _proof_rejection(
                e, 400, "Authorization server requires nonce in DPoP proof"
            ) from e
        scope = form.get("scope", client.scope)
        if not set(scope.split()) <= set(client.scope.split()):
            raise _Reject(400, "scope", "invalid_scope", "scope not allowed for this client")
        self.counters.add("tokens_issued")
        with self._state_lock:
            self.tokens_issued_at.append(time.monotonic())
        lifetime = max(1, round(self.token_lifetime))
        answer: dict[str, Any] = {
            "access_token": self.issue_token(
                client_id=client.client_id, jkt=verified.jkt, scope=scope
            ),
            "expires_in": lifetime,
            "token_type": "DPoP",
            "scope": scope,
        }
        if self.issue_refresh_tokens:
            refresh_token = b64url_encode(os.urandom(32))
            with self._state_lock:
                self.refresh_tokens_issued.append(refresh_token)
            answer["refresh_token"] = refresh_token
        if self.as_behavior == "no_access_token":
            del answer["access_token"]
        elif self.as_behavior == "bearer":
            answer["token_type"] = "Bearer"  # noqa: S105 - not a secret
        elif self.as_behavior == "bad_expires":
            answer["expires_in"] = "soon"
        return answer

    def _authenticate_client(self, h: _Handler, form: Mapping[str, str]) -> ClientRegistration:
        authz = h.headers.get("Authorization", "")
        if authz[:6].lower() == "basic ":
            try:
                decoded = base64.b64decode(authz[6:].strip(), validate=True).decode("utf-8")
                raw_id, _, raw_secret = decoded.partition(":")
                client_id, secret = unquote(raw_id), unquote(raw_secret)
            except (ValueError, UnicodeDecodeError) as e:
                raise _Reject(401, "client_auth", "invalid_client", "bad Basic header") from e
            return self._check_secret(client_id, secret, "client_secret_basic")
        client_id = form.get("client_id", "")
        if "client_assertion" in form:
            return self._check_assertion(client_id, form)
        if "client_secret" in form:
            return self._check_secret(client_id, form["client_secret"], "client_secret_post")
        client = self.clients.get(client_id)
        if client is None or client.auth_method != "none":
            raise _Reject(401, "client_auth", "invalid_client", "client authentication failed")
        return client

    def _check_secret(self, client_id: str, secret: str, method: str) -> ClientRegistration:
        client = self.clients.get(client_id)
        if (
            client is None
            or client.auth_method != method
            or client.client_secret is None
            or not hmac.compare_digest(secret.encode(), client.client_secret.encode())
        ):
            raise _Reject(401, "client_auth", "invalid_client", "client authentication failed")
        return client

    def _check_assertion(self, client_id: str, form: Mapping[str, str]) -> ClientRegistration:
        """RFC 7523 §3 checks; the jti replay check is what pitfall 6 trips over."""
        if form.get("client_assertion_type") != _ASSERTION_TYPE:
            raise _Reject(401, "client_auth", "invalid_client", "wrong client_assertion_type")
        try:
            header, claims, signature, signing_input = _decode_jws(form["client_assertion"])
        except (ValueError, DPoPError) as e:
            raise _Reject(401, "client_auth", "invalid_client", "malformed client assertion") from e
        client = self.clients.get(str(claims.get("iss", "")))
        if client is None or client.auth_method != "private_key_jwt" or client.jwk is None:
            raise _Reject(401, "client_auth", "invalid_client", "unknown client")
        if client_id and client_id != client.client_id:
            raise _Reject(401, "client_auth", "invalid_client", "client_id does not match iss")
        alg = header.get("alg")
        try:
            if not isinstance(alg, str) or alg not in DEFAULT_ALGORITHMS:
                raise InvalidProofError("alg", "unsupported")
            verify_jws_signature(public_key_from_jwk(client.jwk), alg, signature, signing_input)
        except VerificationError as e:
            raise _Reject(
                401, "assertion_signature", "invalid_client", "bad assertion signature"
            ) from e
        now = self.now()
        exp, iat, jti = claims.get("exp"), claims.get("iat"), claims.get("jti")
        if claims.get("sub") != client.client_id:
            raise _Reject(401, "assertion_claims", "invalid_client", "sub must be the client_id")
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        if self.token_endpoint not in auds and self.as_url not in auds:
            raise _Reject(401, "assertion_claims", "invalid_client", "wrong aud")
        if not isinstance(exp, int | float) or exp < now - 5:
            raise _Reject(401, "assertion_expired", "invalid_client", "assertion expired")
        if not isinstance(iat, int | float) or iat > now + 5:
            raise _Reject(401, "assertion_claims", "invalid_client", "iat in the future")
        if not isinstance(jti, str) or not self._assertion_replays.check_and_store(
            client.client_id + ":" + jti, float(exp) + 10, now
        ):
            raise _Reject(401, "assertion_replay", "invalid_client", "client assertion replayed")
        return client

    # --- resource server ------------------------------------------------------------------

    def _challenge(self, error: str | None, description: str | None) -> str:
        parts = [f'algs="{_ALGS}"']
        if error:
            parts.append(f'error="{error}"')
        if description:
            parts.append('error_description="' + description.replace('"', "'") + '"')
        dpop = "DPoP " + ", ".join(parts)
        return f'Bearer realm="dpop_hsm", {dpop}' if self.multi_challenge else dpop

    def _handle_rs(self, h: _Handler, body: bytes) -> None:
        split = urlsplit(h.path)
        path = split.path
        self.seen.append(
            {
                "server": "rs",
                "path": path,
                "authorization": "Authorization" in h.headers,
                "dpop": "DPoP" in h.headers,
            }
        )
        headers: list[tuple[str, str]] = [("Content-Type", "application/json")]
        if self.rs_nonce:
            headers.append(("DPoP-Nonce", self.rs_nonces.current()))
        if path == "/redirect":
            target = dict(parse_qsl(split.query)).get("to", "/api/dpop/test")
            h._send(307, b"", [("Location", target), *headers])
            return
        if path != "/api/dpop/test":
            h._send(404, b"not found", [("Content-Type", "text/plain")])
            return
        self.counters.add("api_requests")
        try:
            claims = self._authorize(h)
        except _Reject as r:
            self.counters.reject(r.reason)
            if r.nonce:
                self.counters.add("rs_nonce_challenges")
            headers.append(
                ("WWW-Authenticate", self._challenge(r.error or None, r.description or None))
            )
            h._send(r.status, _json({"error": r.error} if r.error else {}), headers)
            return
        self.counters.add("api_ok")
        out = [
            {"type": k, "value": v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))}
            for k, v in claims.items()
        ]
        out.append({"type": "authorization_scheme", "value": "DPoP"})
        out.append({"type": "body_length", "value": str(len(body))})
        h._send(200, _json(out), headers)

    def _authorize(self, h: _Handler) -> dict[str, Any]:
        authz = h.headers.get_all("Authorization") or []
        if not authz:
            raise _Reject(401, "missing_token", "", "")
        if len(authz) > 1:
            raise _Reject(400, "multiple_authorization", "invalid_request", "one Authorization")
        scheme, _, token = authz[0].partition(" ")
        token = token.strip()
        claims = self._token_claims(token)
        if scheme.lower() == "bearer":
            # RFC 9449 §7.2: a DPoP-bound token presented as Bearer is refused.
            raise _Reject(401, "bearer_bound", "invalid_token", "DPoP-bound token used as Bearer")
        if scheme.lower() != "dpop":
            raise _Reject(401, "scheme", "invalid_token", "unsupported scheme")
        if self.rs_behavior == "reject":
            raise _Reject(401, "policy", "invalid_token", "token revoked by policy")
        proofs = h.headers.get_all("DPoP") or []
        if len(proofs) != 1:
            raise _Reject(401, "proof_missing", "invalid_dpop_proof", "exactly one DPoP header")
        if self.rs_behavior == "always_nonce":
            raise _Reject(401, "use_dpop_nonce", "use_dpop_nonce", "nonce, please", nonce=True)
        host = h.headers.get("Host") or self.rs_url.split("//", 1)[1]
        htu = f"http://{host}{urlsplit(h.path).path}"
        cnf = claims.get("cnf")
        jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
        if not isinstance(jkt, str):
            raise _Reject(401, "unbound_token", "invalid_token", "token has no cnf.jkt")
        try:
            verify_proof(
                proofs[0],
                htm=h.command,
                htu=htu,
                access_token=token,
                nonce=self.rs_nonces.accepts if self.rs_nonce else None,
                expected_jkt=jkt,
                replay_cache=self._proof_replays,
                max_age=self.proof_max_age,
                now=self.now(),
            )
        except VerificationError as e:
            # RFC 9449 §7.1, §9: the RS answers 401 with a DPoP challenge.
            # The comma inside the quoted description is deliberate: clients must parse
            # WWW-Authenticate per RFC 9110 §11.6.1, quoted strings included.
            raise _proof_rejection(e, 401, "Resource server requires nonce, in DPoP proof") from e
        if self.required_scope and self.required_scope not in str(claims.get("scope", "")).split():
            raise _Reject(403, "insufficient_scope", "insufficient_scope", "scope missing")
        return claims

    def _token_claims(self, token: str) -> dict[str, Any]:
        try:
            header, claims, signature, signing_input = _decode_jws(token)
            if header.get("alg") != "ES256" or header.get("kid") != self.kid:
                raise InvalidProofError("alg", "not our token")
            verify_jws_signature(
                public_key_from_jwk(self._key.public_jwk), "ES256", signature, signing_input
            )
        except (ValueError, DPoPError) as e:
            raise _Reject(401, "token_invalid", "invalid_token", "token not issued here") from e
        with self._state_lock:
            revoked = claims.get("jti") in self._revoked
        if revoked:
            raise _Reject(401, "token_revoked", "invalid_token", "token revoked")
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or exp <= self.now():
            raise _Reject(401, "token_expired", "invalid_token", "token expired")
        return claims
