"""The local resource server: a DPoP-protected API (RFC 9449 §7) with nonces (§9).

``/api/dpop/test`` returns the token's claims like a demo API (never the proof); it rejects
Bearer use of a bound token, replays, wrong htm/htu/ath, a key that does not match ``cnf.jkt``
and (when nonces are on) a missing or stale nonce, each with ``WWW-Authenticate: DPoP
error="…"`` and ``algs`` (§7.1, §9). ``/redirect?to=…`` answers 307 (for redirect tests).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ..errors import ConfigurationError, VerificationError
from ..verify import verify_proof
from .plumbing import (
    Handler,
    LoopbackServer,
    Reject,
    json_bytes,
    local_replay_cache,
    proof_rejection,
    target_path,
)
from .role import ServerRole

__all__ = ["API_PATH", "ResourceServer"]

API_PATH = "/api/dpop/test"


class ResourceServer(ServerRole):
    """Answers the RS's requests; tokens are checked with the AS's :class:`TokenIssuer`."""

    role = "rs"

    def _setup(self) -> None:
        self.server: LoopbackServer | None = None
        self._proof_replays = local_replay_cache()

    @property
    def url(self) -> str:
        """``http://host:port`` of the bound socket: this server's origin."""
        if self.server is None:
            raise ConfigurationError(
                "servers are not started: call start() or use them as a context manager"
            )
        return self.server.url

    def _challenge(self, error: str | None, description: str | None) -> str:
        parts = [f'algs="{" ".join(sorted(self.settings.dpop_signing_algs))}"']
        if error:
            parts.append(f'error="{error}"')
        if description:
            parts.append('error_description="' + description.replace('"', "'") + '"')
        dpop = "DPoP " + ", ".join(parts)
        return f'Bearer realm="dpop_hsm", {dpop}' if self.settings.multi_challenge else dpop

    def handle(self, h: Handler, body: bytes) -> None:
        path = self.record(h)
        headers: list[tuple[str, str]] = [("Content-Type", "application/json")]
        if self.settings.rs_nonce:
            headers.append(("DPoP-Nonce", self.nonces.current()))
        if path == "/redirect":
            target = dict(parse_qsl(urlsplit(h.path).query)).get("to", API_PATH)
            h.send(307, b"", [("Location", target), *headers])
            return
        if path != API_PATH and not path.startswith(API_PATH + "/"):  # the API and below
            h.send(404, b"not found", [("Content-Type", "text/plain")])
            return
        self.counters.add("api_requests")
        try:
            claims = self._authorize(h)
        except Reject as r:
            self.counters.reject(r.reason)
            if r.nonce:
                self.counters.add("rs_nonce_challenges")
            if r.retry_after is not None:  # at capacity: not a challenge to the client
                headers.append(("Retry-After", str(r.retry_after)))
            else:
                headers.append(
                    ("WWW-Authenticate", self._challenge(r.error or None, r.description or None))
                )
            h.send(r.status, json_bytes({"error": r.error} if r.error else {}), headers)
            return
        self.counters.add("api_ok")
        out = [
            {"type": k, "value": v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))}
            for k, v in claims.items()
        ]
        out.append({"type": "authorization_scheme", "value": "DPoP"})
        out.append({"type": "body_length", "value": str(len(body))})
        h.send(200, json_bytes(out), headers)

    def _authorize(self, h: Handler) -> dict[str, Any]:
        authz = h.headers.get_all("Authorization") or []
        if not authz:
            raise Reject(401, "missing_token", "", "")
        if len(authz) > 1:
            raise Reject(400, "multiple_authorization", "invalid_request", "one Authorization")
        scheme, _, token = authz[0].partition(" ")
        token = token.strip()
        claims = self.issuer.claims(token)
        if scheme.lower() == "bearer":
            # RFC 9449 §7.2: a DPoP-bound token presented as Bearer is refused.
            raise Reject(401, "bearer_bound", "invalid_token", "DPoP-bound token used as Bearer")
        if scheme.lower() != "dpop":
            raise Reject(401, "scheme", "invalid_token", "unsupported scheme")
        if self.settings.rs_behavior == "reject":
            raise Reject(401, "policy", "invalid_token", "token revoked by policy")
        proofs = h.headers.get_all("DPoP") or []
        if len(proofs) != 1:
            raise Reject(401, "proof_missing", "invalid_dpop_proof", "exactly one DPoP header")
        if self.settings.rs_behavior == "always_nonce":
            raise Reject(401, "use_dpop_nonce", "use_dpop_nonce", "nonce, please", nonce=True)
        # RFC 9449 §4.3 item 9: htu must match the URI of the request as this server is
        # reached: its own configured origin, never the client-controlled Host header or an
        # absolute-form request target (a proof made for another origin must not pass here).
        htu = self.url + target_path(h.path)
        cnf = claims.get("cnf")
        jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
        if not isinstance(jkt, str):
            raise Reject(401, "unbound_token", "invalid_token", "token has no cnf.jkt")
        try:
            verify_proof(
                proofs[0],
                htm=h.command,
                htu=htu,
                access_token=token,
                nonce=self.nonces.accepts if self.settings.rs_nonce else None,
                expected_jkt=jkt,
                algorithms=self.settings.dpop_signing_algs,
                replay_cache=self._proof_replays,
                max_age=self.settings.proof_max_age,
                now=self.settings.now(),
            )
        except VerificationError as e:
            # RFC 9449 §7.1, §9: the RS answers 401 with a DPoP challenge.
            # The comma inside the quoted description is deliberate: clients must parse
            # WWW-Authenticate per RFC 9110 §11.6.1, quoted strings included.
            raise proof_rejection(e, 401, "Resource server requires nonce, in DPoP proof") from e
        required = self.settings.required_scope
        if required and required not in str(claims.get("scope", "")).split():
            raise Reject(403, "insufficient_scope", "insufficient_scope", "scope missing")
        return claims
