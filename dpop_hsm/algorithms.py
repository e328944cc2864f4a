"""JWS algorithms dpop_hsm signs and verifies, and what each needs from a key (RFC 7518).

One table, so signers, the verifier and the CLI agree on which hash, curve, padding and signature
size go with an ``alg``; curves come from the one curve table in :mod:`dpop_hsm.jwk`. Adding an
algorithm is one row here plus a branch in each backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from .ecdsa import raw_to_der
from .errors import SignatureEncodingError, UnsupportedKeyError
from .jwk import CURVES, MAX_RSA_BITS, MIN_RSA_BITS, curve_of_key

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALG",
    "EC_CURVE_ALGS",
    "MAX_RSA_BITS",
    "MIN_RSA_BITS",
    "AlgorithmInfo",
    "algorithm",
    "verify_signature",
]

DEFAULT_ALG = "ES256"

_HASHES: Mapping[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


@dataclass(frozen=True)
class AlgorithmInfo:
    """What an ``alg`` means: key type, curve, hash, and the signature length when fixed."""

    name: str
    kty: str  # JWK kty: EC, OKP, RSA
    crv: str | None  # JWK crv for EC/OKP
    hash_name: str | None  # hashlib name of the message digest (None: EdDSA hashes inside)
    coord_size: int  # EC coordinate bytes (raw signature = 2 * coord_size); 0 otherwise
    pss: bool = False

    def hash_algorithm(self) -> hashes.HashAlgorithm:
        """The ``cryptography`` hash object for this alg (ECDSA, RSA)."""
        return _HASHES[self.hash_name or "sha256"]()

    def rsa_padding(self) -> padding.AsymmetricPadding:
        """RSA padding: PSS with MGF1 of the same hash and a salt of the hash's length
        (RFC 7518 §3.5), or PKCS#1 v1.5 (§3.3)."""
        if self.pss:
            digest = self.hash_algorithm()
            return padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
        return padding.PKCS1v15()


def _ec(name: str, crv: str, hash_name: str) -> AlgorithmInfo:
    return AlgorithmInfo(name, "EC", crv, hash_name, CURVES[crv].size)


ALGORITHMS: dict[str, AlgorithmInfo] = {
    "ES256": _ec("ES256", "P-256", "sha256"),
    "ES384": _ec("ES384", "P-384", "sha384"),
    "ES512": _ec("ES512", "P-521", "sha512"),
    "EdDSA": AlgorithmInfo("EdDSA", "OKP", "Ed25519", None, 0),
    "PS256": AlgorithmInfo("PS256", "RSA", None, "sha256", 0, pss=True),
    "RS256": AlgorithmInfo("RS256", "RSA", None, "sha256", 0),
}

# EC curve name -> alg, for deriving the alg from a key.
EC_CURVE_ALGS = {c.crv: c.alg for c in CURVES.values() if c.kty == "EC"}


def algorithm(name: str) -> AlgorithmInfo:
    """Look up an alg, raising our typed error for anything we do not support."""
    try:
        return ALGORITHMS[name]
    except (KeyError, TypeError):
        raise UnsupportedKeyError(
            f"algorithm {name!r} is not supported; use one of {', '.join(ALGORITHMS)}"
        ) from None


def verify_signature(key: Any, alg: str, signature: bytes, data: bytes) -> None:
    """Check a JWS signature (ECDSA as raw ``r||s``, RFC 7518 §3.4) with ``cryptography``.

    Raises ``cryptography.exceptions.InvalidSignature`` when it does not verify,
    UnsupportedKeyError when ``key`` does not fit ``alg`` (type or curve) and
    SignatureEncodingError when an ECDSA signature has the wrong length or an r/s out of range.
    Callers map these to their own errors (a verifier: ``invalid_dpop_proof``).
    """
    info = algorithm(alg)
    if info.kty == "EC":
        if not isinstance(key, ec.EllipticCurvePublicKey) or curve_of_key(key).crv != info.crv:
            raise UnsupportedKeyError(f"{alg} needs an EC {info.crv} key")
        if len(signature) != 2 * info.coord_size:
            raise SignatureEncodingError(f"{alg} signature must be {2 * info.coord_size} bytes")
        key.verify(raw_to_der(signature), data, ec.ECDSA(info.hash_algorithm()))
    elif info.kty == "OKP":
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise UnsupportedKeyError(f"{alg} needs an Ed25519 key")
        key.verify(signature, data)
    else:
        if not isinstance(key, rsa.RSAPublicKey):
            raise UnsupportedKeyError(f"{alg} needs an RSA key")
        key.verify(signature, data, info.rsa_padding(), info.hash_algorithm())
