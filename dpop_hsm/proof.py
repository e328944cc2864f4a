"""DPoP proof creation (RFC 9449 §4): the hot path of every request.

The header ``{typ, alg, jwk}`` is encoded once per signer; per proof only the claims are built,
serialized and signed. Everything here is hand-rolled on purpose (no JOSE library): a general
library spends several times the signature cost on dict copies, re-serializing the header and
validation we do once. ``scripts/bench`` keeps this honest as a ratio to the raw signing rate.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Mapping
from functools import lru_cache
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
_b2a = binascii.b2a_base64
_URLSAFE = bytes.maketrans(b"+/", b"-_")
_urandom = os.urandom


def _b64(data: bytes) -> bytes:
    """base64url without padding, as bytes: the hot-path twin of ``jose.b64url_encode``."""
    return _b2a(data, newline=False).rstrip(b"=").translate(_URLSAFE)


@lru_cache(maxsize=512)
def _htu_member(url: str) -> bytes:
    """``,"htu":"<normalized>"`` as JSON bytes, cached like :func:`normalize_htu` itself."""
    return b',"htu":' + _json_dumps(normalize_htu(url)).encode()


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
    ``Date`` header when the local clock is off and servers have short windows (Keycloak
    accepts a proof for ~10 s, RFC 9449 §11.1).
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
        self._header_prefix = _b64(compact_json(header)) + b"."
        self._last_token: tuple[str | None, bytes] = (None, b"")

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
        # The payload is assembled from pre-encoded pieces (measured in scripts/bench: the
        # generic JSON encoder and base64 wrappers cost ~1/4 of an ES256 signature). Member
        # order and bytes are what ``compact_json`` of the same claims would give.
        jti = _b64(_urandom(16))  # 128 random bits (§4.2 asks for >= 96)
        payload = b'{"jti":"' + jti + b'","htm":"' + htm.encode() + b'"' + _htu_member(htu)
        payload += b',"iat":%d' % int(self._clock() + self.clock_offset)
        if access_token is not None:
            last = self._last_token  # read once: another thread may replace it
            if access_token is last[0]:  # the same token, request after request
                ath = last[1]
            else:
                ath = access_token_hash(access_token).encode()
                self._last_token = (access_token, ath)  # one tuple store: thread-safe
            payload += b',"ath":"' + ath + b'"'
        if nonce is not None:
            if not isinstance(nonce, str) or not nonce:
                raise ConfigurationError("nonce must be a non-empty string")
            payload += b',"nonce":' + _json_dumps(nonce).encode()
        if extra_claims:
            clash = _RESERVED_CLAIMS.intersection(extra_claims)
            if clash:
                raise ConfigurationError(f"extra_claims may not set {sorted(clash)}")
            try:
                extra = _json_dumps(dict(extra_claims)).encode()
            except (TypeError, ValueError) as e:
                raise ConfigurationError(
                    "extra_claims must be JSON values (no NaN/Infinity, bytes or objects)"
                ) from e
            payload += b"," + extra[1:]
        else:
            payload += b"}"
        signing_input = self._header_prefix + _b64(payload)
        return (signing_input + b"." + _b64(self._sign(signing_input))).decode("ascii")

    def __repr__(self) -> str:
        return f"ProofFactory(alg={self._signer.alg!r}, jkt={self._signer.thumbprint!r})"
