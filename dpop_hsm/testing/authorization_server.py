"""The local authorization server: token endpoint with DPoP (RFC 9449 §5, §8), JWKS, echo.

``POST /connect/token`` client_credentials with any registered client authentication; a DPoP
proof is required on every token request (§5) and, when nonces are on, a current nonce (§8:
400 ``use_dpop_nonce``). ``GET /jwks`` publishes the token signing key; ``GET /echo`` reports
which credential headers arrived (for redirect tests).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

from ..errors import ConfigurationError, VerificationError
from ..verify import ReplayCache, verify_proof
from .clients import ClientAuthenticator, ClientRegistration
from .plumbing import (
    JSON_HEADERS,
    Counters,
    Handler,
    LoopbackServer,
    Nonces,
    Reject,
    Settings,
    json_bytes,
    proof_rejection,
    target_path,
)
from .tokens import TokenIssuer

__all__ = ["TOKEN_PATH", "AuthorizationServer"]

TOKEN_PATH = "/connect/token"  # noqa: S105 - a path, not a secret
JWKS_PATH = "/jwks"


class AuthorizationServer:
    """Answers the AS's requests; state shared with the RS comes in through the arguments."""

    role = "as"

    def __init__(
        self,
        settings: Settings,
        *,
        counters: Counters,
        issuer: TokenIssuer,
        nonces: Nonces,
        seen: deque[dict[str, Any]],
    ) -> None:
        self.settings = settings
        self.counters = counters
        self.issuer = issuer
        self.nonces = nonces
        self.seen = seen
        self.clients: dict[str, ClientRegistration] = {}
        self.server: LoopbackServer | None = None
        self._proof_replays = ReplayCache()
        self.client_auth = ClientAuthenticator(
            self.clients, now=settings.now, audiences=lambda: (self.token_endpoint, self.url)
        )

    @property
    def url(self) -> str:
        """The issuer: ``http://host:port`` of the bound socket."""
        if self.server is None:
            raise ConfigurationError(
                "servers are not started: call start() or use them as a context manager"
            )
        return self.server.url

    @property
    def token_endpoint(self) -> str:
        return self.url + TOKEN_PATH

    def handle(self, h: Handler, body: bytes) -> None:
        path = target_path(h.path)
        self.seen.append(
            {
                "server": "as",
                "path": path,
                "authorization": "Authorization" in h.headers,
                "dpop": "DPoP" in h.headers,
            }
        )
        if path == JWKS_PATH and h.command == "GET":
            h.send(200, json_bytes({"keys": [self.issuer.public_jwk()]}), JSON_HEADERS)
            return
        if path == "/echo":
            out = {k: self.seen[-1][k] for k in ("authorization", "dpop")}
            h.send(200, json_bytes(out), JSON_HEADERS)
            return
        if path != TOKEN_PATH:
            h.send(404, b"not found", [("Content-Type", "text/plain")])
            return
        if h.command != "POST":
            h.send(405, b"", [("Allow", "POST")])
            return
        self._token_endpoint(h, body)

    def _token_endpoint(self, h: Handler, body: bytes) -> None:
        self.counters.add("token_requests")
        headers: list[tuple[str, str]] = [*JSON_HEADERS, ("Pragma", "no-cache")]
        if self.settings.as_nonce:
            headers.append(("DPoP-Nonce", self.nonces.current()))
        behavior = self.settings.as_behavior
        if behavior == "error_500":
            h.send(500, b"upstream exploded", [("Content-Type", "text/plain")])
            return
        if behavior == "not_json":
            h.send(200, b"<html>login</html>", [("Content-Type", "text/html")])
            return
        try:
            answer = self._token_response(h, body)
        except Reject as r:
            self.counters.reject(r.reason)
            if r.nonce:
                self.counters.add("as_nonce_challenges")
                if not any(k == "DPoP-Nonce" for k, _ in headers):
                    headers.append(("DPoP-Nonce", self.nonces.current()))
            if r.status == 401:
                headers.append(("WWW-Authenticate", 'Basic realm="dpop_hsm"'))
            err = {"error": r.error, "error_description": r.description}
            h.send(r.status, json_bytes(err), headers)
            return
        h.send(200, json_bytes(answer), headers)

    def _form(self, h: Handler, body: bytes) -> dict[str, str]:
        if "application/x-www-form-urlencoded" not in h.headers.get("Content-Type", ""):
            raise Reject(400, "content_type", "invalid_request", "form body expected")
        try:
            pairs = parse_qsl(
                body.decode("ascii"), keep_blank_values=True, strict_parsing=bool(body)
            )
        except (UnicodeDecodeError, ValueError) as e:
            raise Reject(400, "form", "invalid_request", "malformed form body") from e
        form: dict[str, str] = {}
        for k, v in pairs:
            if k in form and k != "resource":
                raise Reject(400, "form", "invalid_request", f"repeated parameter {k}")
            form[k] = v
        return form

    def _token_response(self, h: Handler, body: bytes) -> dict[str, Any]:
        form = self._form(h, body)
        if form.get("grant_type") != "client_credentials":
            raise Reject(400, "grant_type", "unsupported_grant_type", "client_credentials only")
        client = self.client_auth.authenticate(h.headers.get("Authorization", ""), form)
        # RFC 9449 §5: a proof on every token request.
        proofs = h.headers.get_all("DPoP") or []
        if len(proofs) != 1:
            raise Reject(400, "proof_missing", "invalid_dpop_proof", "exactly one DPoP header")
        if self.settings.as_behavior == "always_nonce":
            raise Reject(400, "use_dpop_nonce", "use_dpop_nonce", "nonce required", nonce=True)
        try:
            verified = verify_proof(
                proofs[0],
                htm="POST",
                htu=self.token_endpoint,
                nonce=self.nonces.accepts if self.settings.as_nonce else None,
                replay_cache=self._proof_replays,
                max_age=self.settings.proof_max_age,
                now=self.settings.now(),
            )
        except VerificationError as e:
            # RFC 9449 §5, §8: the AS answers 400 with a JSON error.
            raise proof_rejection(
                e, 400, "Authorization server requires nonce in DPoP proof"
            ) from e
        scope = form.get("scope", client.scope)
        if not set(scope.split()) <= set(client.scope.split()):
            raise Reject(400, "scope", "invalid_scope", "scope not allowed for this client")
        self.counters.add("tokens_issued")
        lifetime = max(1, round(self.settings.token_lifetime))
        access_token, _ = self.issuer.issue(
            issuer=self.url,
            client_id=client.client_id,
            jkt=verified.jkt,
            scope=scope,
            lifetime=self.settings.token_lifetime,
        )
        answer: dict[str, Any] = {
            "access_token": access_token,
            "expires_in": lifetime,
            "token_type": "DPoP",
            "scope": scope,
        }
        return self._misbehave(answer)

    def _misbehave(self, answer: Mapping[str, Any]) -> dict[str, Any]:
        """Apply the ``as_behavior`` knob to a good token response (failure tests)."""
        out = dict(answer)
        if self.settings.as_behavior == "no_access_token":
            del out["access_token"]
        elif self.settings.as_behavior == "bearer":
            out["token_type"] = "Bearer"  # noqa: S105 - not a secret
        elif self.settings.as_behavior == "bad_expires":
            out["expires_in"] = "soon"
        return out
