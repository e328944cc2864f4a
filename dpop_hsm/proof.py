"""DPoP proof creation (RFC 9449 §4): the hot path of every request.

The header ``{typ, alg, jwk}`` is encoded once per signer; per proof only the claims are built,
serialized and signed. Everything here is hand-rolled on purpose (no JOSE library): a general
library spends several times the signature cost on dict copies, re-serializing the header and
validation we do once. ``scripts/bench`` keeps this honest as a ratio to the raw signing rate.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from .errors import ConfigurationError
from .htu import normalize_htu
from .jose import b64url_encode, compact_json
from .signers.base import Signer

__all__ = ["ProofFactory", "access_token_hash"]

_RESERVED_CLAIMS = frozenset({"jti", "htm", "htu", "iat", "ath", "nonce"})
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})  # RFC 7518 §6
_json_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_b64encode = b64url_encode
_METHOD_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32}")  # RFC 9110 §9.1 method token


def access_token_hash(access_token: str) -> str:
    """``ath``: base64url(SHA-256(ASCII token)) (RFC 9449 §4.2)."""
    try:
        raw = access_token.encode("ascii")
    except UnicodeEncodeError:
        raise ConfigurationError("access token must be ASCII (RFC 6750 token68)") from None
    return _b64encode(hashlib.sha256(raw).digest())


class ProofFactory:
    """Makes fresh, single-use DPoP proofs with one signer.

    ``clock_offset`` (seconds) is added to the local clock for ``iat``: set it from a server's
    ``Date`` header when the local clock is off and servers have short windows (pitfall 5).
    Thread-safe: no per-proof state is kept.
    """

    def __init__(
        self,
        signer: Signer,
        *,
        clock_offset: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        jwk = dict(signer.public_jwk)
        if _PRIVATE_MEMBERS.intersection(jwk):  # RFC 9449 §4.2: MUST NOT contain a private key
            raise ConfigurationError(
                "signer.public_jwk holds private members; refusing to publish it"
            )
        self._signer = signer
        self._sign = signer.sign
        self.clock_offset = clock_offset
        self._clock = clock
        header = {"typ": "dpop+jwt", "alg": signer.alg, "jwk": jwk}
        self._header_prefix = _b64encode(compact_json(header)) + "."

    @property
    def signer(self) -> Signer:
        return self._signer

    @property
    def thumbprint(self) -> str:
        """The jkt a token bound to this factory's key carries in ``cnf.jkt``."""
        return self._signer.thumbprint

    def create(
        self,
        htm: str,
        htu: str,
        *,
        access_token: str | None = None,
        nonce: str | None = None,
        extra_claims: Mapping[str, Any] | None = None,
    ) -> str:
        """A new compact proof for one request: new ``jti`` and ``iat`` every call (§4.2, §11.1).

        ``htu`` may be the full request URL: query and fragment are dropped and the rest
        normalized. ``access_token`` adds ``ath``; ``nonce`` the server's nonce.
        """
        if not isinstance(htm, str) or not _METHOD_TOKEN.fullmatch(htm):
            raise ConfigurationError(f"htm must be an HTTP method token, not {str(htm)[:20]!r}")
        claims: dict[str, Any] = {
            # 128 random bits, base64url (§4.2 asks for >= 96).
            "jti": _b64encode(os.urandom(16)),
            "htm": htm,
            "htu": normalize_htu(htu),
            "iat": int(self._clock() + self.clock_offset),
        }
        if access_token is not None:
            claims["ath"] = access_token_hash(access_token)
        if nonce is not None:
            if not isinstance(nonce, str) or not nonce:
                raise ConfigurationError("nonce must be a non-empty string")
            claims["nonce"] = nonce
        if extra_claims:
            clash = _RESERVED_CLAIMS.intersection(extra_claims)
            if clash:
                raise ConfigurationError(f"extra_claims may not set {sorted(clash)}")
            claims.update(extra_claims)
        try:
            payload = _json_dumps(claims).encode()
        except (TypeError, ValueError) as e:  # only extra_claims can hold non-JSON values
            raise ConfigurationError(
                "extra_claims must be JSON values (no NaN/Infinity, bytes or objects)"
            ) from e
        signing_input = self._header_prefix + _b64encode(payload)
        signature = self._sign(signing_input.encode("ascii"))
        return signing_input + "." + _b64encode(signature)

    def __repr__(self) -> str:
        return f"ProofFactory(alg={self._signer.alg!r}, jkt={self._signer.thumbprint!r})"
