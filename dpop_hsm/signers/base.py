"""The Signer contract: anything with ``alg``, ``public_jwk``, ``thumbprint`` and ``sign()``.

A structural ``Protocol`` rather than a base class, so a cloud KMS client or a test double is a
Signer without importing us. ``sign()`` returns JWS signature bytes — for ECDSA the fixed-length
raw ``r||s`` (RFC 7518 §3.4) — so the proof layer never knows which device signed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

__all__ = ["Signer"]


@runtime_checkable
class Signer(Protocol):
    """A private key that can sign JWS input; its public half as a JWK and its RFC 7638 jkt."""

    @property
    def alg(self) -> str:
        """JWS ``alg``: ES256, ES384, ES512, EdDSA, PS256 or RS256."""
        ...

    @property
    def public_jwk(self) -> Mapping[str, str]:
        """Public members only; EC coordinates at full length (RFC 7518 §6.2.1.2)."""
        ...

    @property
    def thumbprint(self) -> str:
        """RFC 7638 SHA-256 thumbprint of ``public_jwk``: the token's ``cnf.jkt``."""
        ...

    def sign(self, signing_input: bytes) -> bytes:
        """Sign the JWS signing input; ECDSA results are raw ``r||s``."""
        ...
