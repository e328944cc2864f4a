"""Per-origin DPoP nonces (RFC 9449 §8, §9) and the one "is this a nonce challenge" predicate.

A server may hand out a new nonce on ANY response, 200s included, so every response feeds the
store (RFC 9449 §8.2); header names are matched case-insensitively (RFC 9110 §5.1; HTTP/2
lowercases them). Nonces are only valid at the server that issued them; we treat the origin
as the server.

Two ``DPoP-Nonce`` fields in one response: the LAST one wins. §8.1 allows commas inside a
nonce, so fields cannot be split or merged safely; the last field is the one closest to the
server's final word (proxies append), and a wrong guess costs exactly one ``use_dpop_nonce``
retry, never a loop. Values that are not ``1*NQCHAR`` (§8.1) are ignored.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable

from . import _fork
from .challenges import find_challenge
from .errors import ConfigurationError
from .htu import origin_of
from .sansio import header_values

__all__ = [
    "DEFAULT_MAX_ORIGINS",
    "NonceStore",
    "is_nonce_challenge",
    "is_valid_nonce",
    "nonce_from_headers",
]

DEFAULT_MAX_ORIGINS = 1024
MAX_NONCE_LENGTH = 1024


def is_valid_nonce(value: str) -> bool:
    """RFC 9449 §8.1: ``nonce = 1*NQCHAR``, NQCHAR = %x21 / %x23-5B / %x5D-7E."""
    if not value or len(value) > MAX_NONCE_LENGTH:
        return False
    return all(0x21 <= ord(c) <= 0x7E and c not in '"\\' for c in value)


def nonce_from_headers(headers: Iterable[tuple[str, str]]) -> str | None:
    """The nonce a response hands out: the last valid ``DPoP-Nonce`` field, if any."""
    values = [v.strip() for v in header_values(headers, "dpop-nonce")]
    valid = [v for v in values if is_valid_nonce(v)]
    return valid[-1] if valid else None


def is_nonce_challenge(
    status: int, headers: Iterable[tuple[str, str]], body: bytes | None = None
) -> bool:
    """True when a response asks us to retry with the server's nonce.

    AS (§8): HTTP 400 with a JSON body whose ``error`` is ``use_dpop_nonce``.
    RS (§9): HTTP 401 with a ``WWW-Authenticate`` ``DPoP`` challenge whose ``error`` is
    ``use_dpop_nonce`` (among possibly several challenges, RFC 9110 §11.6.1).
    """
    headers = tuple(headers)
    if status == 401:
        challenge = find_challenge(header_values(headers, "www-authenticate"), "DPoP")
        return challenge is not None and challenge.params.get("error") == "use_dpop_nonce"
    if status == 400 and body:
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return False
        return isinstance(parsed, dict) and parsed.get("error") == "use_dpop_nonce"
    return False


class NonceStore:
    """Latest nonce per origin; LRU-bounded so a client talking to many hosts stays small.

    Thread-safe. ``observe`` is called with every response; ``get`` before every proof.
    """

    def __init__(self, *, max_origins: int = DEFAULT_MAX_ORIGINS) -> None:
        if max_origins < 1:
            raise ConfigurationError("max_origins must be positive")
        self._max = max_origins
        self._nonces: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        _fork.register(self)

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock (a parent thread may have held it at fork time)."""
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._nonces)

    def get(self, url: str) -> str | None:
        """The latest nonce of ``url``'s origin, or None if that server never sent one."""
        origin = origin_of(url)
        # Per request: the read alone needs no lock (one dict lookup is atomic), and an origin
        # without a nonce (most resource servers) takes none. Only the LRU update locks.
        nonce = self._nonces.get(origin)
        if nonce is not None:
            with self._lock:
                if origin in self._nonces:  # forget() or eviction may have run meanwhile
                    self._nonces.move_to_end(origin)
        return nonce

    def put(self, url: str, nonce: str) -> None:
        if not is_valid_nonce(nonce):
            raise ConfigurationError("nonce is not 1*NQCHAR (RFC 9449 §8.1)")
        origin = origin_of(url)
        with self._lock:
            self._nonces[origin] = nonce
            self._nonces.move_to_end(origin)
            while len(self._nonces) > self._max:
                self._nonces.popitem(last=False)

    def observe(self, url: str, headers: Iterable[tuple[str, str]]) -> str | None:
        """Record the nonce a response from ``url`` carries; returns it (or None)."""
        nonce = nonce_from_headers(headers)
        if nonce is not None:
            self.put(url, nonce)
        return nonce

    def forget(self, url: str) -> None:
        with self._lock:
            self._nonces.pop(origin_of(url), None)

    def __repr__(self) -> str:
        return f"NonceStore(origins={len(self._nonces)}, max_origins={self._max})"
