"""Server-side DPoP proof verification (RFC 9449 §4.3, §7.1, §8, §11).

For resource servers and authorization servers written in Python, and for our own local test
servers. Every check raises a typed error naming the check; nothing returns False. Checks run
cheapest-first, and the replay cache is only written after the signature verified, so unsigned
junk cannot fill it. Replay checking is on unless a caller writes ``NO_REPLAY_CHECK``.

Everything that arrives with the request — the proof, the access token, the token's
``cnf.jkt`` — fails as a :class:`VerificationError`, so a server never answers hostile input
with a 500; the proof's JSON is read strictly (``strict_json``) and its key is bounded before
any signature is checked with it.
"""

from __future__ import annotations

import hmac
import re
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidSignature

from .algorithms import ALGORITHMS, verify_signature
from .errors import (
    ConfigurationError,
    DPoPError,
    InvalidProofError,
    ReplayError,
    SignatureEncodingError,
    TokenBindingError,
    UnsupportedKeyError,
    UseDPoPNonceError,
)
from .htu import comparable_htu
from .jose import b64url_decode, jwk_thumbprint, split_compact
from .jwk import PRIVATE_MEMBERS, PublicKey
from .jwk import public_key_from_jwk as public_key_of_jwk
from .proof import access_token_hash
from .replay import (
    NO_REPLAY_CHECK,
    ReplayCache,
    ReplayCheck,
    ReplayStore,
    default_replay_cache,
)
from .strict_json import StrictJsonError, loads_strict

__all__ = [
    "DEFAULT_ALGORITHMS",
    "NO_REPLAY_CHECK",
    "ReplayCache",
    "ReplayCheck",
    "ReplayStore",
    "VerifiedProof",
    "default_replay_cache",
    "public_key_from_jwk",
    "verify_jws_signature",
    "verify_proof",
]

DEFAULT_ALGORITHMS: frozenset[str] = frozenset(ALGORITHMS)
MAX_PROOF_LENGTH = 8192
_KEY_MEMBERS = ("crv", "e", "kty", "n", "x", "y")  # the members a public key is built from


@dataclass(frozen=True)
class VerifiedProof:
    """What a verified proof tells the server: its claims, header and the key's thumbprint."""

    claims: Mapping[str, Any]
    header: Mapping[str, Any]
    jkt: str


def _decode_part(part: str, what: str) -> dict[str, Any]:
    """A base64url JSON object, parsed strictly (RFC 8259 §8.1 UTF-8, unique names, finite
    numbers): another parser must not read a different header or claims from the same bytes."""
    try:
        value = loads_strict(b64url_decode(part))
    except StrictJsonError as e:
        raise InvalidProofError("syntax", f"{what}: {e}") from e
    except ValueError as e:
        raise InvalidProofError("syntax", f"{what} is not base64url") from e
    if not isinstance(value, dict):
        raise InvalidProofError("syntax", f"{what} is not a JSON object")
    return value


@lru_cache(maxsize=1024)
def _public_key_cached(members: tuple[tuple[str, str], ...]) -> PublicKey:
    return _build_public_key(dict(members))


def public_key_from_jwk(jwk: Mapping[str, Any]) -> PublicKey:
    """A ``cryptography`` public key from a public JWK; private members are refused.

    Raises InvalidProofError (check ``jwk``) for anything that is not a supported public key
    within the bounds below, before any signature is checked with it.
    """
    if not isinstance(jwk, Mapping):
        raise InvalidProofError("jwk", "jwk header is not a JSON object")
    private = PRIVATE_MEMBERS.intersection(jwk)
    if private:
        raise InvalidProofError("jwk", f"jwk carries private key members {sorted(private)}")
    members = []
    for name in _KEY_MEMBERS:
        if name in jwk:
            value = jwk[name]
            if not isinstance(value, str):  # RFC 7517 §4, RFC 7518 §6: all strings
                raise InvalidProofError("jwk", f"jwk member {name!r} is not a string")
            members.append((name, value))
    return _public_key_cached(tuple(members))


def _build_public_key(jwk: Mapping[str, Any]) -> PublicKey:
    # The jwk is unauthenticated input and sets the cost of the signature check: jwk.py bounds
    # it (EC coordinates at full length and on the curve; RSA 2048..8192-bit odd n and odd
    # 2^16 < e < 2^256, NIST SP 800-56B Rev. 2 §6.2.1 — a 3071-bit e costs ~100x a normal
    # check) before anything is verified with it.
    try:
        return public_key_of_jwk(jwk)
    except UnsupportedKeyError as e:
        raise InvalidProofError("jwk", e.message) from e


def verify_jws_signature(key: PublicKey, alg: str, signature: bytes, signing_input: bytes) -> None:
    """Check a JWS signature for ``alg`` (ECDSA as raw ``r||s``); raise InvalidProofError if bad.

    Public so servers can check other JWTs they receive (client assertions, access tokens)
    with the same strict rules as proofs.
    """
    if not isinstance(alg, str) or alg not in ALGORITHMS:
        raise InvalidProofError("alg", f"alg {str(alg)[:20]!r} is not supported")
    try:
        verify_signature(key, alg, signature, signing_input)
    except UnsupportedKeyError as e:
        raise InvalidProofError("alg", f"{alg} does not match the jwk's key type/curve") from e
    except SignatureEncodingError as e:
        raise InvalidProofError("signature", e.message) from e
    except InvalidSignature as e:
        raise InvalidProofError("signature", "signature does not verify with the jwk") from e


NonceCheck = str | Collection[str] | Callable[[str], bool]
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")  # RFC 9110 §11.2


def _short(value: object) -> str:
    """A caller-supplied value for a message: repr, bounded (it may come from a request)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_nonce(claims: Mapping[str, Any], nonce: NonceCheck | None) -> None:
    if nonce is None:
        return
    sent = claims.get("nonce")
    if sent is None:
        raise UseDPoPNonceError("nonce", "the server requires a nonce and the proof has none")
    if not isinstance(sent, str):
        raise InvalidProofError("nonce", "nonce claim is not a string")
    if isinstance(nonce, str):
        # surrogatepass: a JSON "\ud800" in a signed claim is a mismatch, not a crash
        ok = hmac.compare_digest(sent.encode("utf-8", "surrogatepass"), nonce.encode())
    elif callable(nonce):
        ok = bool(nonce(sent))
    else:
        ok = sent in nonce
    if not ok:
        raise UseDPoPNonceError("nonce", "the proof's nonce is not current")


def verify_proof(
    proof: str,
    *,
    htm: str,
    htu: str,
    access_token: str | None = None,
    nonce: NonceCheck | None = None,
    expected_jkt: str | None = None,
    algorithms: Collection[str] = DEFAULT_ALGORITHMS,
    max_age: float = 60.0,
    leeway: float = 5.0,
    replay_cache: ReplayStore | ReplayCheck | None = None,
    now: float | None = None,
) -> VerifiedProof:
    """Verify one DPoP proof for one request; raise the error of the first failed check.

    ``htm``/``htu`` are the request's method and URL (query and fragment are ignored);
    ``access_token`` makes ``ath`` mandatory; ``nonce`` is the current nonce, a collection of
    acceptable ones or a predicate; ``expected_jkt`` is the bound token's ``cnf.jkt``.
    ``iat`` must lie in [now - max_age - leeway, now + leeway].

    Replays are refused by default (RFC 9449 §11.1): ``replay_cache`` is where seen (jkt, jti)
    pairs are kept — None (the default) means the process-wide :func:`default_replay_cache`;
    pass a :class:`ReplayCache` of your own to size it or to keep servers apart, or any
    :class:`ReplayStore` (a store shared by worker processes). Only
    ``replay_cache=NO_REPLAY_CHECK`` turns the check off. A ``jti`` enters the cache only after
    every other check passed, so junk and proofs for another request cannot fill it.

    Raises InvalidProofError (check: syntax, typ, alg, jwk, signature, htm, htu, iat, jti, ath),
    ReplayError, UseDPoPNonceError (check: nonce), TokenBindingError (check: cnf, or token when
    the access token is not token68) and ReplayCacheFullError / ReplayKeyQuotaError (the cache
    refuses rather than forget a live ``jti``: answer 503). ConfigurationError only for the
    caller's own mistakes (a replay_cache that is no store, an access_token that is no str).
    """
    if (
        replay_cache is not None
        and replay_cache is not NO_REPLAY_CHECK
        and not callable(getattr(replay_cache, "check_and_store", None))
    ):
        raise ConfigurationError(
            "replay_cache must be a ReplayCache, None (the process-wide cache) or NO_REPLAY_CHECK"
        )
    if access_token is not None:
        if not isinstance(access_token, str):
            raise ConfigurationError("access_token must be a str (the token68 the request sent)")
        # RFC 9449 §7.1: "Authorization: DPoP token68"; the token is the request's, so a
        # malformed one is the client's error (invalid_token), never the server's.
        if not _TOKEN68.fullmatch(access_token):
            raise TokenBindingError("token", "the access token is not token68 (RFC 9110 §11.2)")
    if not isinstance(proof, str):
        raise InvalidProofError("syntax", "proof is not a string")
    if len(proof) > MAX_PROOF_LENGTH:
        raise InvalidProofError("syntax", f"proof is longer than {MAX_PROOF_LENGTH} characters")
    if not proof.isascii():
        raise InvalidProofError("syntax", "proof has non-ASCII characters")
    header_b64, payload_b64, signature_b64 = split_compact(proof)
    header = _decode_part(header_b64, "header")
    claims = _decode_part(payload_b64, "payload")
    try:
        signature = b64url_decode(signature_b64)
    except ValueError as e:
        raise InvalidProofError("syntax", "signature is not base64url") from e

    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() != "dpop+jwt":
        raise InvalidProofError("typ", "typ header must be 'dpop+jwt'")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALGORITHMS or alg not in algorithms:
        allowed = ", ".join(sorted(set(algorithms) & set(ALGORITHMS)))
        raise InvalidProofError("alg", f"alg {str(alg)[:20]!r} is not allowed (allowed: {allowed})")
    if "crit" in header:
        raise InvalidProofError("syntax", "crit header parameters are not understood")
    jwk = header.get("jwk")
    if not isinstance(jwk, dict):
        raise InvalidProofError("jwk", "jwk header is missing or not a JSON object")
    key = public_key_from_jwk(jwk)
    if not signature:
        raise InvalidProofError("signature", "signature is empty")
    verify_jws_signature(key, alg, signature, (header_b64 + "." + payload_b64).encode("ascii"))
    try:
        jkt = jwk_thumbprint(jwk)
    except (DPoPError, ValueError) as e:
        raise InvalidProofError("jwk", "jwk has no RFC 7638 thumbprint") from e

    method = claims.get("htm")
    if not isinstance(method, str) or method != htm:
        raise InvalidProofError("htm", f"htm does not match the request method {_short(htm)}")
    sent_htu = claims.get("htu")
    if not isinstance(sent_htu, str):
        raise InvalidProofError("htu", "htu claim missing or not a string")
    # Both sides are normalized (RFC 9449 §4.3, RFC 3986 §6.2). The request URI comes from the
    # request line and Host header, i.e. from the client too: one that cannot be normalized is
    # a rejected request, not a server fault.
    try:
        request_htu = comparable_htu(htu)
    except (ConfigurationError, ValueError) as e:
        raise InvalidProofError("htu", "the request URI is not an http(s) URI") from e
    try:
        matches = comparable_htu(sent_htu) == request_htu
    except (ConfigurationError, ValueError) as e:
        raise InvalidProofError("htu", "htu is not an http(s) URI") from e
    if not matches:
        raise InvalidProofError("htu", "htu does not match the request URI")

    iat = claims.get("iat")
    if isinstance(iat, bool) or not isinstance(iat, int | float):
        raise InvalidProofError("iat", "iat claim missing or not a number")
    current = time.time() if now is None else now
    if iat > current + leeway:
        raise InvalidProofError("iat", "iat is in the future (check the client's clock)")
    if iat < current - max_age - leeway:
        raise InvalidProofError("iat", f"proof is older than {max_age:g}s")

    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti or len(jti) > 256:
        raise InvalidProofError("jti", "jti claim missing, empty or too long")

    if access_token is not None:
        ath = claims.get("ath")
        if not isinstance(ath, str):
            raise InvalidProofError("ath", "ath claim is required with an access token")
        sent_ath = ath.encode("utf-8", "surrogatepass")  # lone surrogates: mismatch, not crash
        if not hmac.compare_digest(sent_ath, access_token_hash(access_token).encode()):
            raise InvalidProofError("ath", "ath does not match the access token")
    # cnf.jkt comes from the token's claims: a non-string is a bad token, not a crash.
    if expected_jkt is not None and (
        not isinstance(expected_jkt, str)
        or not hmac.compare_digest(expected_jkt.encode("utf-8", "surrogatepass"), jkt.encode())
    ):
        raise TokenBindingError("cnf", "the proof's key does not match the token's cnf.jkt")

    _check_nonce(claims, nonce)

    # RFC 9449 §11.1: a jti is accepted once per key for as long as its iat passes the window.
    if replay_cache is not NO_REPLAY_CHECK:
        cache = default_replay_cache() if replay_cache is None else replay_cache
        expires_at = float(iat) + max_age + 2 * leeway
        if not cache.check_and_store(jkt + ":" + jti, expires_at, current, owner=jkt):
            raise ReplayError("jti", "proof was already used (jti replay)")
    return VerifiedProof(claims=claims, header=header, jkt=jkt)
