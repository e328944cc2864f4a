"""The only place ECDSA signature encodings change (RFC 7518 §3.4: raw, fixed-length r||s).

JWS wants raw ``r||s``, each integer left-padded to the curve's byte size (32, 48, 66).
``cryptography`` returns DER, PKCS#11 ``CKM_ECDSA`` returns raw, TPMs return ``r`` and ``s``;
some HSMs return DER. Each backend *declares* its format and calls one function here: we never
guess an encoding from the bytes, because a wrong guess fails about one signature in 256.

DER parsing uses ``cryptography``'s Rust decoder (strict DER, fast enough for the hot path);
what it does not check — the range of ``r`` and ``s`` against the curve order and the fixed raw
length — is checked here.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from .errors import SignatureEncodingError
from .jwk import CURVES

__all__ = ["CURVE_ORDERS", "der_to_raw", "raw_to_der", "rs_to_raw"]

# Group orders n of the curves JWS names, keyed by coordinate byte size (the curve table).
CURVE_ORDERS: dict[int, int] = {c.size: c.order for c in CURVES.values() if c.kty == "EC"}


def _order(size: int) -> int:
    try:
        return CURVE_ORDERS[size]
    except KeyError:
        raise SignatureEncodingError(
            f"curve size {size} is not one of {sorted(CURVE_ORDERS)} (P-256, P-384, P-521)"
        ) from None


def rs_to_raw(r: int, s: int, size: int) -> bytes:
    """``(r, s)`` -> raw ``r||s``, each left-padded to ``size`` bytes; both must be in [1, n-1]."""
    n = _order(size)
    if not 0 < r < n or not 0 < s < n:
        raise SignatureEncodingError(f"ECDSA r or s out of range for a {size}-byte curve")
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def der_to_raw(der: bytes, size: int) -> bytes:
    """Strict DER ``Ecdsa-Sig-Value`` -> raw ``r||s`` of exactly ``2 * size`` bytes.

    Rejects trailing bytes, bad lengths, non-minimal or negative integers, and ``r``/``s``
    outside [1, n-1].
    """
    try:
        r, s = decode_dss_signature(der)
    except (ValueError, TypeError) as e:
        raise SignatureEncodingError(
            "ECDSA signature is not a strict DER SEQUENCE of two INTEGERs"
        ) from e
    return rs_to_raw(r, s, size)


def raw_to_der(raw: bytes) -> bytes:
    """Raw ``r||s`` (64, 96 or 132 bytes) -> DER, for verifiers and devices that want DER."""
    if len(raw) % 2 or len(raw) // 2 not in CURVE_ORDERS:
        raise SignatureEncodingError(
            f"raw ECDSA signature has {len(raw)} bytes; "
            "expected 64 (ES256), 96 (ES384) or 132 (ES512)"
        )
    size = len(raw) // 2
    r = int.from_bytes(raw[:size], "big")
    s = int.from_bytes(raw[size:], "big")
    n = _order(size)
    if not 0 < r < n or not 0 < s < n:
        raise SignatureEncodingError(f"ECDSA r or s out of range for a {size}-byte curve")
    return encode_dss_signature(r, s)
