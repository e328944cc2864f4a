"""PKCE (RFC 7636) for the authorization code grant: S256 only, a fresh verifier per login.

``plain`` exists for clients that cannot hash (RFC 7636 §4.2); we always can, so we never send
it: with ``plain`` the challenge an eavesdropper sees on the authorization request *is* the
verifier. RFC 8252 §8.1 makes PKCE mandatory for native apps.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from .errors import PkceError
from .jose import b64url_encode

__all__ = [
    "DEFAULT_VERIFIER_LENGTH",
    "Pkce",
    "new_pkce",
    "s256_challenge",
    "validate_verifier",
    "verifier_matches",
]

DEFAULT_VERIFIER_LENGTH = 64
MIN_VERIFIER_LENGTH = 43  # RFC 7636 §4.1
MAX_VERIFIER_LENGTH = 128
# RFC 7636 §4.1: code-verifier = 43*128unreserved; unreserved = ALPHA / DIGIT / "-" / "." /
# "_" / "~" (RFC 3986 §2.3). ASCII only: str.isalnum() would also accept "é" or "٣".
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def validate_verifier(verifier: str) -> str:
    """``verifier`` if it is an RFC 7636 §4.1 code verifier, else :class:`PkceError`.

    The message says what is wrong, never the verifier itself (it is a one-time secret).
    """
    if not isinstance(verifier, str):
        raise PkceError("code_verifier must be a string")
    if not MIN_VERIFIER_LENGTH <= len(verifier) <= MAX_VERIFIER_LENGTH:
        raise PkceError(
            f"code_verifier must be {MIN_VERIFIER_LENGTH}-{MAX_VERIFIER_LENGTH} characters, "
            f"not {len(verifier)} (RFC 7636 §4.1)"
        )
    if not _UNRESERVED.issuperset(verifier):
        raise PkceError("code_verifier may contain only A-Z a-z 0-9 - . _ ~ (RFC 7636 §4.1)")
    return verifier


def s256_challenge(verifier: str) -> str:
    """``BASE64URL(SHA256(ASCII(verifier)))`` (RFC 7636 §4.2), after validating the verifier."""
    validate_verifier(verifier)
    return b64url_encode(hashlib.sha256(verifier.encode("ascii")).digest())


def verifier_matches(verifier: str, challenge: str, method: str = "S256") -> bool:
    """Server-side check (RFC 7636 §4.6) for S256 only, compared in constant time.

    Any other ``method`` raises :class:`PkceError`; a malformed verifier returns False.
    """
    if method != "S256":
        raise PkceError(f"code_challenge_method must be S256, not {method[:20]!r}")
    try:
        expected = s256_challenge(verifier)
    except PkceError:
        return False
    return hmac.compare_digest(expected.encode("ascii"), challenge.encode("utf-8", "replace"))


@dataclass(frozen=True)
class Pkce:
    """One login's PKCE values. ``repr`` hides the verifier, which only the token request sees."""

    verifier: str = field(repr=False)
    challenge: str
    method: str = "S256"

    def __post_init__(self) -> None:
        if self.method != "S256":
            raise PkceError("only the S256 code challenge method is supported (RFC 7636 §4.2)")
        if s256_challenge(self.verifier) != self.challenge:
            raise PkceError("code_challenge does not match the code_verifier")


def new_pkce(length: int = DEFAULT_VERIFIER_LENGTH) -> Pkce:
    """A fresh verifier of ``length`` unreserved characters from the OS CSPRNG and its S256.

    RFC 7636 §7.1 asks for at least 256 bits of entropy: 43 base64url characters carry 258.
    """
    if isinstance(length, bool) or not isinstance(length, int):
        raise PkceError("verifier length must be an integer")
    if not MIN_VERIFIER_LENGTH <= length <= MAX_VERIFIER_LENGTH:
        raise PkceError(
            f"verifier length must be {MIN_VERIFIER_LENGTH}-{MAX_VERIFIER_LENGTH} (RFC 7636 §4.1)"
        )
    # token_urlsafe yields base64url characters, a subset of "unreserved"; 96 bytes -> 128 chars.
    verifier = secrets.token_urlsafe(96)[:length]
    return Pkce(verifier=verifier, challenge=s256_challenge(verifier))
