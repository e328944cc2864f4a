"""Access tokens of the local servers: JWTs (``typ: at+jwt``) bound to a key by ``cnf.jkt``.

The authorization server issues them; the resource server checks them with the same object,
as a real RS would with the AS's published key. Revocation is a shared set of ``jti`` values.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import DPoPError
from ..jose import b64url_encode, compact_json
from ..signers.software import SoftwareSigner
from ..verify import public_key_from_jwk, verify_jws_signature
from .plumbing import Reject, decode_jws

__all__ = ["TokenIssuer"]


class TokenIssuer:
    """Signs access tokens with its own ES256 key, remembers them, and revokes them.

    ``now`` is the servers' clock (wall time plus the test's offset).
    """

    def __init__(self, *, now: Callable[[], float]) -> None:
        self._key = SoftwareSigner.generate("ES256")
        self.kid = self._key.thumbprint
        self._now = now
        self._lock = threading.Lock()
        self._issued: set[str] = set()
        self._revoked: set[str] = set()

    def public_jwk(self) -> dict[str, str]:
        """The verification key as published at ``/jwks``."""
        return {**self._key.public_jwk, "kid": self.kid, "alg": "ES256", "use": "sig"}

    def issue(
        self,
        *,
        issuer: str,
        client_id: str,
        jkt: str,
        scope: str,
        lifetime: float,
        sub: str | None = None,
    ) -> tuple[str, str]:
        """A JWT access token bound to ``jkt`` (RFC 9449 §6.1) and its ``jti``."""
        now = self._now()
        header = {"alg": "ES256", "typ": "at+jwt", "kid": self.kid}
        jti = b64url_encode(os.urandom(16))
        claims: dict[str, Any] = {
            "iss": issuer,
            "nbf": int(now),
            "iat": int(now),
            # NumericDate is whole seconds: round exp UP so the token lives at least
            # expires_in seconds (truncating would cut up to 1 s off a 2 s token).
            "exp": math.ceil(now + max(1, round(lifetime))),
            "aud": "api",
            "cnf": {"jkt": jkt},
            "scope": scope,
            "client_id": client_id,
            "jti": jti,
        }
        if sub is not None:
            claims["sub"] = sub
        with self._lock:
            self._issued.add(jti)
        signing_input = (
            b64url_encode(compact_json(header)) + "." + b64url_encode(compact_json(claims))
        )
        token = signing_input + "." + b64url_encode(self._key.sign(signing_input.encode()))
        return token, jti

    def revoke(self, jtis: Iterable[str]) -> None:
        """Revoke the tokens with these ``jti`` values (the RS then answers ``invalid_token``)."""
        with self._lock:
            self._revoked.update(jtis)

    def revoke_all(self) -> int:
        """Revoke every token issued so far; the number of revoked tokens."""
        with self._lock:
            self._revoked |= self._issued
            return len(self._revoked)

    def decode(self, token: str) -> dict[str, Any] | None:
        """The claims of a token this issuer signed (expired or revoked too); None otherwise."""
        try:
            header, claims, signature, signing_input = decode_jws(token)
            if header.get("alg") != "ES256" or header.get("kid") != self.kid:
                return None
            verify_jws_signature(
                public_key_from_jwk(self._key.public_jwk), "ES256", signature, signing_input
            )
        except (ValueError, DPoPError):
            return None
        return claims

    def claims(self, token: str) -> dict[str, Any]:
        """The claims of a token this issuer signed, still valid and not revoked.

        Raises :class:`~dpop_hsm.testing.plumbing.Reject` (401 ``invalid_token``) otherwise.
        """
        claims = self.decode(token)
        if claims is None:
            raise Reject(401, "token_invalid", "invalid_token", "token not issued here")
        with self._lock:
            revoked = claims.get("jti") in self._revoked
        if revoked:
            raise Reject(401, "token_revoked", "invalid_token", "token revoked")
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or exp <= self._now():
            raise Reject(401, "token_expired", "invalid_token", "token expired")
        return claims
