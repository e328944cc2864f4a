"""What every endpoint of the local authorization server shares: its origin, clients, grant
store, nonces, proof checking, form parsing and the shape of its JSON answers."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from ..errors import ConfigurationError, VerificationError
from ..verify import VerifiedProof, verify_proof
from .clients import ClientAuthenticator, ClientRegistration
from .grants import GrantStore
from .plumbing import (
    JSON_HEADERS,
    Counters,
    Handler,
    LoopbackServer,
    Nonces,
    Reject,
    Settings,
    json_bytes,
    local_replay_cache,
    proof_rejection,
)
from .tokens import TokenIssuer

__all__ = [
    "AUTHORIZE_PATH",
    "DEVICE_AUTHORIZATION_PATH",
    "DEVICE_PATH",
    "JWKS_PATH",
    "METADATA_PATHS",
    "PAR_PATH",
    "REVOKE_PATH",
    "TOKEN_PATH",
    "ASContext",
]

TOKEN_PATH = "/connect/token"  # noqa: S105 - a path, not a secret
JWKS_PATH = "/jwks"
AUTHORIZE_PATH = "/authorize"
PAR_PATH = "/par"
DEVICE_AUTHORIZATION_PATH = "/device_authorization"
DEVICE_PATH = "/device"
REVOKE_PATH = "/revoke"
# RFC 8414 §3 (issuer without a path) and OpenID Connect Discovery 1.0 §4.
METADATA_PATHS = ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration")
NONCE_DESCRIPTION = "Authorization server requires nonce in DPoP proof"


FORM_MEDIA_TYPE = "application/x-www-form-urlencoded"
# RFC 8707 §2: a client names several resources with several ``resource`` parameters, in the
# authorization request (and PAR), the device authorization request and the token request.
REPEATABLE = ("resource",)


def parse_pairs(text: str, *, repeatable: Iterable[str] = REPEATABLE) -> dict[str, str]:
    """``application/x-www-form-urlencoded`` pairs, read as RFC 6749 §3.1 says.

    Each name at most once unless ``repeatable`` (§3.1, §3.2: "parameters MUST NOT be included
    more than once"; a repeated ``resource`` keeps its last value: this server ignores it);
    a parameter sent without a value is treated as omitted (§3.1), so ``scope=`` asks for the
    default scope and ``state=`` is no state; percent-escapes must decode to UTF-8 (Appendix B).

    Raises :class:`Reject` (400 ``invalid_request``).
    """
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text), errors="strict")
    except ValueError as e:  # UnicodeDecodeError included
        raise Reject(400, "form", "invalid_request", "malformed form body") from e
    allowed = set(repeatable)
    seen: set[str] = set()
    out: dict[str, str] = {}
    for k, v in pairs:
        if k in seen and k not in allowed:
            raise Reject(400, "form", "invalid_request", f"repeated parameter {k[:40]}")
        seen.add(k)
        if v:
            out[k] = v
    return out


def media_type(h: Handler) -> str | None:
    """The request's media type (RFC 9110 §8.3.1: type/subtype, case-insensitive, parameters
    dropped), or None when there is no ``Content-Type`` or more than one."""
    values = h.headers.get_all("Content-Type") or []
    if len(values) != 1:
        return None
    return values[0].split(";", 1)[0].strip(" \t").lower()


class ASContext:
    """State and helpers shared by the authorization server's endpoints."""

    def __init__(
        self,
        settings: Settings,
        *,
        counters: Counters,
        issuer: TokenIssuer,
        nonces: Nonces,
        clients: Mapping[str, ClientRegistration],
    ) -> None:
        self.settings = settings
        self.counters = counters
        self.issuer = issuer
        self.nonces = nonces
        self.clients = clients
        self.store = GrantStore()
        self.server: LoopbackServer | None = None
        self._proof_replays = local_replay_cache()
        self.client_auth = ClientAuthenticator(
            clients, now=settings.now, audiences=lambda: (self.url, self.endpoint(TOKEN_PATH))
        )

    @property
    def url(self) -> str:
        """The issuer: ``http://host:port`` of the bound socket."""
        if self.server is None:
            raise ConfigurationError(
                "servers are not started: call start() or use them as a context manager"
            )
        return self.server.url

    def endpoint(self, path: str) -> str:
        return self.url + path

    # --- requests -------------------------------------------------------------------------

    def form(
        self, h: Handler, body: bytes, *, repeatable: Iterable[str] = REPEATABLE
    ) -> dict[str, str]:
        """The form body of a POST; Reject 400 unless it is a well-formed urlencoded form.

        The media type is compared exactly, not searched for: ``text/plain;
        x=application/x-www-form-urlencoded`` is not a form (RFC 6749 §3.2, §4.1.3).
        """
        if media_type(h) != FORM_MEDIA_TYPE:
            raise Reject(
                400, "content_type", "invalid_request", f"one Content-Type: {FORM_MEDIA_TYPE}"
            )
        try:
            text = body.decode("ascii")
        except UnicodeDecodeError as e:  # urlencoded bodies are ASCII by construction
            raise Reject(400, "form", "invalid_request", "malformed form body") from e
        return parse_pairs(text, repeatable=repeatable)

    def client(self, h: Handler, form: Mapping[str, str], path: str) -> ClientRegistration:
        """The authenticated client of a back-channel request to ``path``.

        Two ``Authorization`` fields are two credentials (RFC 6749 §5.2 ``invalid_request``);
        reading only the first would let the second slip past unexamined.
        """
        authorization = h.headers.get_all("Authorization") or []
        if len(authorization) > 1:
            raise Reject(400, "client_auth_methods", "invalid_request", "one Authorization field")
        return self.client_auth.authenticate(
            authorization[0] if authorization else "", form, endpoint=self.endpoint(path)
        )

    def proof(self, h: Handler, path: str, *, required: bool) -> VerifiedProof | None:
        """The request's verified DPoP proof for POST ``path``, or None when absent and not
        ``required``. With nonces on, the proof must carry a current one (RFC 9449 §8).

        Raises :class:`Reject` (400 ``invalid_dpop_proof`` / ``use_dpop_nonce``).
        """
        proofs = h.headers.get_all("DPoP") or []
        if not proofs and not required:
            return None
        if len(proofs) != 1:  # RFC 9449 §4.3: exactly one DPoP header
            raise Reject(400, "proof_missing", "invalid_dpop_proof", "exactly one DPoP header")
        try:
            return verify_proof(
                proofs[0],
                htm="POST",
                htu=self.endpoint(path),
                nonce=self.nonces.accepts if self.settings.as_nonce else None,
                algorithms=self.settings.dpop_signing_algs,
                replay_cache=self._proof_replays,
                max_age=self.settings.proof_max_age,
                now=self.settings.now(),
            )
        except VerificationError as e:
            # RFC 9449 §5, §8: the AS answers 400 with a JSON error.
            raise proof_rejection(e, 400, NONCE_DESCRIPTION) from e

    # --- answers --------------------------------------------------------------------------

    def json_headers(self) -> list[tuple[str, str]]:
        """JSON, not cacheable (RFC 6749 §5.1), and the current nonce when nonces are on."""
        headers = [*JSON_HEADERS, ("Pragma", "no-cache")]
        if self.settings.as_nonce:
            headers.append(("DPoP-Nonce", self.nonces.current()))
        return headers

    def answer(self, h: Handler, status: int, payload: Mapping[str, Any]) -> None:
        h.send(status, json_bytes(payload), self.json_headers())

    def refuse(self, h: Handler, r: Reject) -> None:
        """The JSON error answer for ``r`` (RFC 6749 §5.2), counted by reason."""
        self.counters.reject(r.reason)
        headers = self.json_headers()
        if r.nonce:
            self.counters.add("as_nonce_challenges")
            if not any(k == "DPoP-Nonce" for k, _ in headers):
                headers.append(("DPoP-Nonce", self.nonces.current()))
        if r.status == 401:
            headers.append(("WWW-Authenticate", 'Basic realm="dpop_hsm"'))
        if r.retry_after is not None:
            headers.append(("Retry-After", str(r.retry_after)))
        err = {"error": r.error, "error_description": r.description}
        h.send(r.status, json_bytes(err), headers)

    def issue_access_token(
        self, *, client_id: str, jkt: str, scope: str, sub: str | None = None
    ) -> tuple[str, str]:
        """A new access token bound to ``jkt`` and its ``jti``; counted as issued."""
        self.counters.add("tokens_issued")
        self.settings.tokens_issued_at.append(time.monotonic())
        return self.issuer.issue(
            issuer=self.url,
            client_id=client_id,
            jkt=jkt,
            scope=scope,
            lifetime=self.settings.token_lifetime,
            sub=sub,
        )
