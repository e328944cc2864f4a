"""The back channel of the local authorization server: the token endpoint with its four
grants, the device authorization endpoint and revocation.

``POST /connect/token`` — every grant needs client authentication (or ``client_id`` for a
public client) and exactly one DPoP proof (RFC 9449 §5), with a current nonce when nonces are
on (§8), checked before the grant is looked at, so a nonce retry never burns a code:

- ``client_credentials`` (RFC 6749 §4.4) ``[scope]``;
- ``authorization_code`` (RFC 6749 §4.1.3) ``code``, ``redirect_uri``, ``code_verifier``:
  single use (a replay fails and revokes what the code produced, §4.1.2), PKCE S256 (RFC 7636
  §4.6), the proof's key must be the code's ``dpop_jkt`` (RFC 9449 §10);
- ``refresh_token`` (RFC 6749 §6) ``refresh_token``, ``[scope]``: rotated on every use, the
  old one dead (reuse revokes the grant, RFC 9700 §4.14.2); a public client's is bound to its
  key (RFC 9449 §5);
- ``urn:ietf:params:oauth:grant-type:device_code`` (RFC 8628 §3.4) ``device_code``:
  ``authorization_pending``, ``slow_down`` (+5 s), ``access_denied``, ``expired_token``.

``POST /device_authorization`` (RFC 8628 §3.1) ``[scope]`` → ``device_code``, ``user_code``,
``verification_uri``, ``verification_uri_complete``, ``expires_in``, ``interval``.
``POST /revoke`` (RFC 7009) ``token``, ``[token_type_hint]`` → 200, also for unknown tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..jose import b64url_encode
from ..verify import VerifiedProof
from .clients import DEVICE_CODE_GRANT, GRANT_TYPES, ClientRegistration, allowed_scopes
from .context import DEVICE_AUTHORIZATION_PATH, DEVICE_PATH, REVOKE_PATH, TOKEN_PATH, ASContext
from .grants import Grant
from .plumbing import Handler, Reject

__all__ = ["TokenEndpoint"]

_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")  # RFC 7636 §4.1

Answer = dict[str, Any]


def _invalid_grant(reason: str, description: str) -> Reject:
    return Reject(400, reason, "invalid_grant", description)


def _s256(verifier: str) -> str:
    return b64url_encode(hashlib.sha256(verifier.encode("ascii")).digest())


class TokenEndpoint:
    """Grants at the token endpoint, device authorization and revocation."""

    def __init__(self, ctx: ASContext) -> None:
        self.ctx = ctx
        self._grants: dict[
            str, Callable[[Mapping[str, str], ClientRegistration, VerifiedProof], Answer]
        ] = {
            "client_credentials": self._client_credentials,
            "authorization_code": self._authorization_code,
            "refresh_token": self._refresh_token,
            DEVICE_CODE_GRANT: self._device_code,
        }

    # --- /connect/token ---------------------------------------------------------------------

    def token(self, h: Handler, body: bytes) -> None:
        ctx = self.ctx
        ctx.counters.add("token_requests")
        if ctx.settings.token_delay > 0:  # a slow AS, for single-flight and lease tests
            time.sleep(ctx.settings.token_delay)
        behavior = ctx.settings.as_behavior
        if behavior == "error_500":
            h.send(500, b"upstream exploded", [("Content-Type", "text/plain")])
            return
        if behavior == "not_json":
            h.send(200, b"<html>login</html>", [("Content-Type", "text/html")])
            return
        try:
            answer = self._token(h, body)
        except Reject as r:
            ctx.refuse(h, r)
            return
        ctx.answer(h, 200, self._misbehave(answer))

    def _token(self, h: Handler, body: bytes) -> Answer:
        ctx = self.ctx
        form = ctx.form(h, body)  # resource may repeat (RFC 8707 §2)
        grant_type = form.get("grant_type")
        if not grant_type:
            raise Reject(400, "grant_type", "invalid_request", "grant_type is required")
        if grant_type not in GRANT_TYPES:
            raise Reject(400, "grant_type", "unsupported_grant_type", "grant type not supported")
        client = ctx.client(h, form, TOKEN_PATH)
        if not client.allows(grant_type):
            raise Reject(400, "unauthorized_client", "unauthorized_client", "grant not allowed")
        # RFC 9449 §5: a proof on every token request, whatever the grant.
        if len(h.headers.get_all("DPoP") or []) != 1:
            raise Reject(400, "proof_missing", "invalid_dpop_proof", "exactly one DPoP header")
        if ctx.settings.as_behavior == "always_nonce":
            raise Reject(400, "use_dpop_nonce", "use_dpop_nonce", "nonce required", nonce=True)
        verified = ctx.proof(h, TOKEN_PATH, required=True)
        assert verified is not None  # required=True never returns None
        return self._grants[grant_type](form, client, verified)

    def _misbehave(self, answer: Answer) -> Answer:
        """Apply the ``as_behavior`` knob to a good token response (failure tests)."""
        behavior = self.ctx.settings.as_behavior
        if behavior == "no_access_token":
            del answer["access_token"]
        elif behavior == "bearer":
            answer["token_type"] = "Bearer"  # noqa: S105 - not a secret
        elif behavior == "bad_expires":
            answer["expires_in"] = "soon"
        return answer

    def _access(
        self, client: ClientRegistration, jkt: str, scope: str, sub: str | None = None
    ) -> tuple[Answer, str]:
        token, jti = self.ctx.issue_access_token(
            client_id=client.client_id, jkt=jkt, scope=scope, sub=sub
        )
        answer: Answer = {
            "access_token": token,
            "expires_in": max(1, round(self.ctx.settings.token_lifetime)),
            "token_type": "DPoP",
            "scope": scope,
        }
        return answer, jti

    def _client_credentials(
        self, form: Mapping[str, str], client: ClientRegistration, proof: VerifiedProof
    ) -> Answer:
        scope = form.get("scope", client.scope)
        if not set(scope.split()) <= set(client.scope.split()):
            raise Reject(400, "scope", "invalid_scope", "scope not allowed for this client")
        self.ctx.counters.add("tokens_client_credentials")
        answer = self._access(client, proof.jkt, scope)[0]
        if self.ctx.settings.issue_refresh_tokens:
            # Not redeemable (RFC 6749 §4.4.3 says not to issue one here): it exists so tests
            # can check that caches never store a refresh token they were not asked to.
            refresh = b64url_encode(os.urandom(32))
            self.ctx.settings.refresh_tokens_issued.append(refresh)
            answer["refresh_token"] = refresh
        return answer

    def _user_tokens(
        self, grant: Grant, client: ClientRegistration, proof: VerifiedProof, grant_type: str
    ) -> Answer:
        """Access token (and, by policy, a refresh token) for a user's grant."""
        ctx = self.ctx
        answer, jti = self._access(client, proof.jkt, grant.scope, sub=grant.user)
        if not ctx.store.add_access_token(grant, jti):
            ctx.issuer.revoke([jti])
            raise _invalid_grant("grant_revoked", "the grant was revoked")
        policy = ctx.settings.refresh_tokens
        wants = policy == "always" or (
            policy == "offline_access" and "offline_access" in grant.scope.split()
        )
        if wants and client.allows("refresh_token"):
            expires_at = ctx.settings.now() + ctx.settings.refresh_token_lifetime
            refresh = ctx.store.new_refresh_token(grant, expires_at)
            if refresh is not None:
                answer["refresh_token"] = refresh
                ctx.counters.add("refresh_tokens_issued")
        ctx.counters.add(f"tokens_{grant_type}")
        return answer

    def _revoke_grant(self, grant: Grant | None) -> None:
        if grant is not None:
            self.ctx.issuer.revoke(self.ctx.store.revoke_grant(grant))
            self.ctx.counters.add("grants_revoked")

    def _authorization_code(
        self, form: Mapping[str, str], client: ClientRegistration, proof: VerifiedProof
    ) -> Answer:
        ctx = self.ctx
        code = form.get("code")
        if not code:
            raise Reject(400, "code_missing", "invalid_request", "code is required")
        record, replayed = ctx.store.redeem_code(code, client.client_id)
        if record is None:
            raise _invalid_grant("code_unknown", "unknown authorization code")
        if replayed:
            # RFC 6749 §4.1.2 and §10.5: deny, and revoke what the code already produced.
            ctx.counters.add("code_replays")
            self._revoke_grant(record.grant)
            raise _invalid_grant("code_replay", "authorization code already used")
        if ctx.settings.now() >= record.expires_at:
            raise _invalid_grant("code_expired", "authorization code expired")
        request = record.request
        # RFC 6749 §4.1.3: the same redirect_uri as in the authorization request, exactly.
        if form.get("redirect_uri") != request.redirect_uri:
            raise _invalid_grant("code_redirect_uri", "redirect_uri does not match")
        verifier = form.get("code_verifier")
        if verifier is None or not _VERIFIER.fullmatch(verifier):
            raise Reject(400, "pkce", "invalid_request", "code_verifier missing or malformed")
        if not hmac.compare_digest(_s256(verifier), request.code_challenge):  # RFC 7636 §4.6
            raise _invalid_grant("pkce", "code_verifier does not match code_challenge")
        if request.dpop_jkt is not None and request.dpop_jkt != proof.jkt:
            # RFC 9449 §10: the code is bound to the key named by dpop_jkt.
            raise _invalid_grant("code_dpop_jkt", "DPoP key does not match dpop_jkt")
        grant = Grant(
            client_id=client.client_id,
            user=record.user,
            scope=request.scope,
            jkt=proof.jkt if client.public else None,  # RFC 9449 §5
        )
        answer = self._user_tokens(grant, client, proof, "authorization_code")
        if not ctx.store.attach_grant(record, grant):  # replayed while we were issuing
            self._revoke_grant(grant)
            raise _invalid_grant("code_replay", "authorization code already used")
        return answer

    def _refresh_token(
        self, form: Mapping[str, str], client: ClientRegistration, proof: VerifiedProof
    ) -> Answer:
        ctx = self.ctx
        presented = form.get("refresh_token")
        if not presented:
            raise Reject(400, "refresh_missing", "invalid_request", "refresh_token is required")
        found = ctx.store.find_refresh(presented, ctx.settings.now())
        grant = found.grant
        # RFC 6749 §6: the refresh token is bound to the client it was issued to.
        if grant is None or grant.client_id != client.client_id:
            raise _invalid_grant("refresh_unknown", "unknown refresh token")
        if found.outcome == "reused":
            # RFC 9700 §4.14.2: a rotated-out token came back; someone has a copy.
            ctx.counters.add("refresh_reuse")
            self._revoke_grant(grant)
            raise _invalid_grant("refresh_reuse", "refresh token already used")
        if found.outcome != "ok":
            raise _invalid_grant(f"refresh_{found.outcome}", f"refresh token {found.outcome}")
        if grant.jkt is not None and not hmac.compare_digest(grant.jkt, proof.jkt):
            # RFC 9449 §5: a public client's refresh token works only with its own key.
            raise _invalid_grant("refresh_dpop_key", "refresh token is bound to another key")
        scope = form.get("scope") or grant.scope
        if not set(scope.split()) <= set(grant.scope.split()):
            raise Reject(400, "scope", "invalid_scope", "scope exceeds the original grant")
        expires_at = ctx.settings.now() + ctx.settings.refresh_token_lifetime
        rotated = ctx.store.new_refresh_token(grant, expires_at, replacing=presented)
        if rotated is None:  # a concurrent refresh with the same token won
            ctx.counters.add("refresh_reuse")
            self._revoke_grant(grant)
            raise _invalid_grant("refresh_reuse", "refresh token already used")
        answer, jti = self._access(client, proof.jkt, scope, sub=grant.user)
        if not ctx.store.add_access_token(grant, jti):
            ctx.issuer.revoke([jti])
            raise _invalid_grant("grant_revoked", "the grant was revoked")
        answer["refresh_token"] = rotated
        ctx.counters.add("refreshes")
        ctx.counters.add("refresh_tokens_issued")
        ctx.counters.add("tokens_refresh_token")
        return answer

    def _device_code(
        self, form: Mapping[str, str], client: ClientRegistration, proof: VerifiedProof
    ) -> Answer:
        ctx = self.ctx
        device_code = form.get("device_code")
        if not device_code:
            raise Reject(400, "device_missing", "invalid_request", "device_code is required")
        record = ctx.store.device(device_code)
        if record is None or record.client_id != client.client_id:
            raise _invalid_grant("device_unknown", "unknown device_code")
        now = ctx.settings.now()
        if now >= record.expires_at:
            raise Reject(400, "device_expired", "expired_token", "the device code expired")
        ctx.counters.add("device_polls")
        too_fast, status = ctx.store.poll(record, now)
        if too_fast:  # RFC 8628 §3.5: and the interval grows by 5 s from now on
            ctx.counters.add("device_slow_downs")
            raise Reject(400, "device_slow_down", "slow_down", "polling too fast")
        if status == "pending":
            raise Reject(400, "device_pending", "authorization_pending", "not approved yet")
        if status == "denied":
            raise Reject(400, "device_denied", "access_denied", "the user denied access")
        if status == "redeemed":
            raise _invalid_grant("device_redeemed", "device code already used")
        grant = Grant(
            client_id=client.client_id,
            user=record.user or "",
            scope=record.scope,
            jkt=proof.jkt if client.public else None,  # RFC 9449 §5
        )
        return self._user_tokens(grant, client, proof, "device_code")

    # --- /device_authorization (RFC 8628 §3.1, §3.2) ----------------------------------------

    def device_authorization(self, h: Handler, body: bytes) -> None:
        ctx = self.ctx
        try:
            form = ctx.form(h, body)
            client = ctx.client(h, form, DEVICE_AUTHORIZATION_PATH)
            if not client.allows(DEVICE_CODE_GRANT):
                raise Reject(400, "unauthorized_client", "unauthorized_client", "no device grant")
            scope = form.get("scope") or client.scope
            if not set(scope.split()) <= allowed_scopes(client):
                raise Reject(400, "scope", "invalid_scope", "scope not allowed for this client")
            lifetime = max(1, round(ctx.settings.device_code_lifetime))
            record = ctx.store.start_device(
                client.client_id,
                " ".join(scope.split()),
                ctx.settings.now() + lifetime,
                max(1, ctx.settings.device_interval),
            )
        except Reject as r:
            ctx.refuse(h, r)
            return
        ctx.counters.add("device_authorizations")
        verification_uri = ctx.endpoint(DEVICE_PATH)
        ctx.answer(
            h,
            200,
            {
                "device_code": record.device_code,
                "user_code": record.user_code,
                "verification_uri": verification_uri,
                "verification_uri_complete": f"{verification_uri}?user_code={record.user_code}",
                "expires_in": lifetime,
                "interval": record.interval,
            },
        )

    # --- /revoke (RFC 7009) -----------------------------------------------------------------

    def revoke(self, h: Handler, body: bytes) -> None:
        ctx = self.ctx
        ctx.counters.add("revocation_requests")
        try:
            form = ctx.form(h, body)
            client = ctx.client(h, form, REVOKE_PATH)
            token = form.get("token")
            if not token:
                raise Reject(400, "revoke_token", "invalid_request", "token is required")
            # RFC 7009 §2.1: token_type_hint is only a hint; both kinds are looked up.
            self._revoke_token(token, client)
        except Reject as r:
            ctx.refuse(h, r)
            return
        # RFC 7009 §2.2: 200 whether or not the token was known (or already revoked).
        h.send(200, b"", [(k, v) for k, v in ctx.json_headers() if k != "Content-Type"])

    def _revoke_token(self, token: str, client: ClientRegistration) -> None:
        ctx = self.ctx
        found = ctx.store.find_refresh(token, ctx.settings.now())
        if found.grant is not None and found.outcome != "reused":
            if found.grant.client_id != client.client_id:
                raise Reject(400, "revoke_client", "invalid_request", "token of another client")
            if found.outcome != "revoked":
                # RFC 7009 §2.1: revoking a refresh token revokes its grant's access tokens.
                self._revoke_grant(found.grant)
                ctx.counters.add("revocations")
            return
        claims = ctx.issuer.decode(token)
        if claims is None:
            return  # unknown: nothing to do (RFC 7009 §2.2)
        if not ctx.settings.revoke_access_tokens:
            # RFC 7009 §2.2.1: this server does not revoke access tokens.
            raise Reject(
                400, "revoke_unsupported", "unsupported_token_type", "access tokens not revoked"
            )
        if claims.get("client_id") != client.client_id:
            raise Reject(400, "revoke_client", "invalid_request", "token of another client")
        jti = claims.get("jti")
        if isinstance(jti, str):
            ctx.issuer.revoke([jti])
            ctx.counters.add("revocations")
