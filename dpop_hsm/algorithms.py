"""JWS algorithms dpop_hsm signs and verifies, and what each needs from a key (RFC 7518).

One table, so signers, the verifier and the CLI agree on which hash, curve and signature size go
with an ``alg``; adding an algorithm is one row here plus a branch in each backend.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes

__all__ = ["ALGORITHMS", "DEFAULT_ALG", "AlgorithmInfo", "algorithm"]

DEFAULT_ALG = "ES256"


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
        return {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}[
            self.hash_name or "sha256"
        ]


ALGORITHMS: dict[str, AlgorithmInfo] = {
    "ES256": AlgorithmInfo("ES256", "EC", "P-256", "sha256", 32),
    "ES384": AlgorithmInfo("ES384", "EC", "P-384", "sha384", 48),
    "ES512": AlgorithmInfo("ES512", "EC", "P-521", "sha512", 66),
    "EdDSA": AlgorithmInfo("EdDSA", "OKP", "Ed25519", None, 0),
    "PS256": AlgorithmInfo("PS256", "RSA", None, "sha256", 0, pss=True),
    "RS256": AlgorithmInfo("RS256", "RSA", None, "sha256", 0),
}

# EC curve name -> alg, for deriving the alg from a key.
EC_CURVE_ALGS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}

MIN_RSA_BITS = 2048


def algorithm(name: str) -> AlgorithmInfo:
    """Look up an alg, raising our typed error for anything we do not support."""
    from .errors import UnsupportedKeyError

    try:
        return ALGORITHMS[name]
    except (KeyError, TypeError):
        raise UnsupportedKeyError(
            f"algorithm {name!r} is not supported; use one of {', '.join(ALGORITHMS)}"
        ) from None
