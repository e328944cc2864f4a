"""The entry a shared token cache stores for one cache key: encoding and strict validation.

One JSON object per entry: the cache key it belongs to (to refuse entries written for another
key), the access token and its type, scope and lifetime, the issuer's wall-clock times, and the
non-secret members of the token response; a refresh token only when the caller opted in. No
key material, PIN or client secret ever gets in: the encoder takes a :class:`Token`, which
holds none, and filters the response members by name as the session log does. Entries are
ASCII (JSON escapes for the rest): a store tells ours from foreign bytes without parsing them,
and no client that decodes replies as text can choke on one.

Every read is validated (:func:`decode_entry`) as untrusted input: strict JSON, the exact
cache key, a header-safe DPoP token (RFC 9449 §5: never a Bearer downgrade), a JWT access
token's ``cnf.jkt`` equal to ours (RFC 9449 §6.1), finite times within the lifetime.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .jose import b64url_decode, compact_json
from .logs import SECRET_FIELDS
from .strict_json import StrictJsonError, loads_strict
from .token import CacheKey, Token

__all__ = [
    "ENTRY_KIND",
    "ENTRY_VERSION",
    "MAX_ENTRY",
    "MAX_LIFETIME",
    "Decoded",
    "decode_entry",
    "digest",
    "encode_entry",
    "entry_id",
    "store_json",
]

ENTRY_KIND = "dpop_hsm.token"
ENTRY_VERSION = 1
MAX_ENTRY = 64 * 1024
MAX_ACCESS_TOKEN = 16 * 1024
# The longest a shared entry lives: an entry claiming more is corrupt, and a token the AS gave a
# longer life is shared for this long (its store TTL stays within what Redis accepts).
MAX_LIFETIME = 366 * 86400.0


def store_json(value: Any) -> bytes:
    """Compact, ASCII-only JSON: what a shared store holds (entries, nonces)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def entry_id(key: CacheKey) -> str:
    """A fixed-length name for ``key`` in a shared store (no raw endpoint or scope in names)."""
    material = compact_json([ENTRY_KIND, ENTRY_VERSION, *_key_fields(key)])
    return hashlib.sha256(material).hexdigest()


def _key_fields(key: CacheKey) -> list[Any]:
    return [key.token_endpoint, key.client_id, key.scope, list(key.resource), key.jkt]


def encode_entry(key: CacheKey, token: Token, *, refresh_token: str | None = None) -> bytes:
    """The shared form of ``token``: wall-clock times on the issuing host's clock.

    ``expires_at`` is absolute (``time.time()`` of this host), ``renew_before`` relative; a
    store with a clock of its own (Redis' key TTL) makes readers independent of host clocks.
    Lifetimes beyond :data:`MAX_LIFETIME` are shared as that long. Raises ``ValueError`` for a
    token that must not or cannot be shared (not DPoP, bound to another key, expired, members
    that are not JSON).
    """
    if not token.is_dpop:
        raise ValueError("only DPoP tokens are shared")
    if token.jkt != key.jkt:
        raise ValueError("token is bound to another key than the cache key says")
    now_mono, now_wall = time.monotonic(), time.time()
    expires_in = min(token.expires_at - now_mono, MAX_LIFETIME)
    if not expires_in > 0:
        raise ValueError("token has expired")
    lifetime = min(token.lifetime, MAX_LIFETIME)
    entry: dict[str, Any] = {
        "v": ENTRY_VERSION,
        "kind": ENTRY_KIND,
        "key": _key_fields(key),
        "access_token": token.access_token,
        "token_type": token.token_type,
        "scope": token.scope,
        "lifetime": lifetime,
        "issued_at": token.issued_at,
        "expires_at": now_wall + expires_in,
        "renew_before": min(lifetime, max(0.0, token.expires_at - token.renew_at)),
        # Only the response's non-secret members; the secret ones never got into ``extra``,
        # and this filter keeps it so for tokens built by hand.
        "extra": {k: v for k, v in token.extra.items() if k not in SECRET_FIELDS},
    }
    if refresh_token is not None:
        entry["refresh_token"] = refresh_token
    try:
        raw = store_json(entry)
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError("token members are not JSON") from e
    if len(raw) > MAX_ENTRY:
        raise ValueError("token entry too large to share")
    return raw


@dataclass(frozen=True)
class Decoded:
    """A validated entry: the token on this process's monotonic clock, and its refresh token
    (only when the reader accepts refresh tokens)."""

    token: Token
    refresh_token: str | None = None


def _number(entry: dict[str, Any], name: str) -> float:
    value = entry.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"entry member {name} is not a finite number")
    return float(value)


def _token_jkt(access_token: str) -> str | None:
    """``cnf.jkt`` of a JWT access token (RFC 9449 §6.1), unverified; None for opaque tokens."""
    parts = access_token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = loads_strict(b64url_decode(parts[1]))
    except (ValueError, UnicodeError):
        return None
    cnf = claims.get("cnf") if isinstance(claims, dict) else None
    jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
    return jkt if isinstance(jkt, str) else ""


def decode_entry(
    key: CacheKey,
    raw: bytes,
    *,
    remaining: float | None = None,
    accept_refresh_token: bool = False,
) -> Decoded | None:
    """Validate ``raw`` as the entry of ``key``; None when it has expired.

    ``remaining`` is the lifetime left according to the store's own clock (Redis' PTTL);
    without it, the issuer's wall-clock ``expires_at`` is compared with this host's clock
    (right on one host; a clock stepped back cannot stretch a token past its lifetime).
    Raises ``ValueError`` naming what is wrong with a corrupt or foreign entry (never its
    content), so the caller ignores it and overwrites it.
    """
    now_mono, now_wall = time.monotonic(), time.time()
    if not raw:
        raise ValueError("entry is empty")
    if len(raw) > MAX_ENTRY:
        raise ValueError("entry too large")
    try:
        entry = loads_strict(raw)
    except StrictJsonError as e:
        raise ValueError(f"entry is not strict JSON: {e}") from e
    if not isinstance(entry, dict):
        raise ValueError("entry is not a JSON object")
    if entry.get("kind") != ENTRY_KIND or entry.get("v") != ENTRY_VERSION:
        raise ValueError("entry is not a dpop_hsm token entry of this version")
    if entry.get("key") != _key_fields(key):
        raise ValueError("entry belongs to another cache key")
    access_token = entry.get("access_token")
    if (
        not isinstance(access_token, str)
        or not 0 < len(access_token) <= MAX_ACCESS_TOKEN
        or not access_token.isascii()
        or not access_token.isprintable()
        or " " in access_token
    ):
        raise ValueError("entry access_token is not a header-safe string")
    token_type = entry.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "dpop":
        raise ValueError("entry token_type is not DPoP")  # RFC 9449 §5: no downgrade
    jkt = _token_jkt(access_token)
    if jkt is not None and jkt != key.jkt:
        raise ValueError("entry access token is bound to another key (cnf.jkt)")
    scope = entry.get("scope")
    if scope is not None and not isinstance(scope, str):
        raise ValueError("entry scope is not a string")
    extra = entry.get("extra")
    if not isinstance(extra, dict) or SECRET_FIELDS.intersection(extra):
        raise ValueError("entry extra is not an object of non-secret members")
    refresh = entry.get("refresh_token")
    if refresh is not None and not isinstance(refresh, str):
        raise ValueError("entry refresh_token is not a string")
    lifetime = _number(entry, "lifetime")
    issued_at = _number(entry, "issued_at")
    expires_at = _number(entry, "expires_at")
    renew_before = _number(entry, "renew_before")
    if not 0 < lifetime <= MAX_LIFETIME or not 0 <= renew_before <= lifetime:
        raise ValueError("entry lifetime or renew_before out of range")
    expires_in = expires_at - now_wall if remaining is None else remaining
    expires_in = min(expires_in, lifetime)
    if expires_in <= 0:
        return None
    token = Token(
        access_token=access_token,
        token_type=token_type,
        expires_at=now_mono + expires_in,
        renew_at=now_mono + expires_in - renew_before,
        issued_at=issued_at,
        lifetime=lifetime,
        jkt=key.jkt,
        scope=scope,
        extra=MappingProxyType(extra),
    )
    return Decoded(token, refresh if accept_refresh_token else None)


def digest(access_token: str) -> str:
    """A stand-in for a token in memory (which tokens were refused), never the token."""
    return hashlib.sha256(access_token.encode("ascii", "replace")).hexdigest()
