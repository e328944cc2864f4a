"""The one place JWS bytes and JWK thumbprints are made (RFC 7515, RFC 7517, RFC 7638).

Hand-written on purpose: a general JOSE library costs 3-5x the signature itself on the proof hot
path (measured in ``scripts/bench``); the compact serialization is three base64url strings and two
dots, and the thumbprint is a fixed member list, so there is little to get wrong and we test it
against the RFC vectors.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from .errors import InvalidProofError, UnsupportedKeyError

__all__ = [
    "b64url_decode",
    "b64url_encode",
    "compact_json",
    "jwk_thumbprint",
    "split_compact",
]

_B64URL_CHARS = re.compile(rb"[A-Za-z0-9_-]*")

# RFC 7638 §3.2: the required members, in lexicographic order, per key type.
_THUMBPRINT_MEMBERS: dict[str, tuple[str, ...]] = {
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
    "RSA": ("e", "kty", "n"),
}


def b64url_encode(data: bytes) -> str:
    """Base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str | bytes) -> bytes:
    """Strict base64url: no padding, no whitespace, no characters outside the URL alphabet.

    Strictness matters for a verifier: two spellings of one signature would let a replayed proof
    pass a ``jti``-less comparison, and lenient decoders hide client bugs.
    Raises ``ValueError`` (callers wrap it in their own typed error).
    """
    raw = text.encode("ascii", "strict") if isinstance(text, str) else text
    if not _B64URL_CHARS.fullmatch(raw) or len(raw) % 4 == 1:
        raise ValueError("not base64url")
    try:
        decoded = base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
    except binascii.Error as e:  # pragma: no cover - the regex above already rejects these
        raise ValueError("not base64url") from e
    # Non-canonical trailing bits would give a second spelling of the same bytes.
    if b64url_encode(decoded).encode("ascii") != raw:
        raise ValueError("non-canonical base64url")
    return decoded


def compact_json(value: Any) -> bytes:
    """JSON with no insignificant whitespace; UTF-8; keys in insertion order."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def split_compact(token: str) -> tuple[str, str, str]:
    """Split a compact JWS into its three parts, checking only the shape."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        raise InvalidProofError("syntax", "not a compact JWS (header.payload.signature)")
    return parts[0], parts[1], parts[2]


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint, base64url: the ``jkt`` that binds a token to a key.

    Only the required public members take part, so ``kid``, ``alg`` or ``use`` never change it.
    A JWK with private members is refused: a thumbprint is for public keys.
    """
    kty = jwk.get("kty")
    if not isinstance(kty, str) or kty not in _THUMBPRINT_MEMBERS:
        raise UnsupportedKeyError(f"JWK kty {kty!r} is not one of EC, OKP, RSA")
    if "d" in jwk:
        raise UnsupportedKeyError("JWK holds a private key; a thumbprint takes the public key only")
    members = _THUMBPRINT_MEMBERS[kty]
    subset: dict[str, str] = {}
    for name in members:
        value = jwk.get(name)
        if not isinstance(value, str) or not value:
            raise UnsupportedKeyError(f"{kty} JWK lacks the string member {name!r}")
        subset[name] = value
    digest = hashlib.sha256(compact_json(subset)).digest()
    return b64url_encode(digest)
