"""``htu`` normalization (RFC 9449 §4.2, §4.3; RFC 3986 §6.2.2, §6.2.3).

Clients send the request URI without query and fragment, with a lowercase scheme and host,
no default port, and ``/`` for an empty path; the path itself is kept exactly as it goes on the
wire, percent-encoding included, because that is what the server sees (pitfall 4).
Verifiers additionally compare percent-encoding case-insensitively and decode unreserved
characters (RFC 3986 §6.2.2.1, §6.2.2.2) via :func:`comparable_htu`.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from urllib.parse import SplitResult, urlsplit

from .errors import ConfigurationError

__all__ = ["comparable_htu", "is_loopback_host", "normalize_htu", "origin_of"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _split(url: str) -> tuple[SplitResult, str, str]:
    if not isinstance(url, str):
        raise ConfigurationError("URL must be a string")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ConfigurationError(f"malformed URL {url[:200]!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ConfigurationError(f"URL scheme must be http or https, not {parts.scheme[:20]!r}")
    host = (parts.hostname or "").lower()
    if not host:
        raise ConfigurationError("URL has no host")
    if ":" in host:  # IPv6 literal keeps its brackets
        host = f"[{host}]"
    authority = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    return parts, scheme, authority


@lru_cache(maxsize=512)
def normalize_htu(url: str) -> str:
    """The ``htu`` value for a request to ``url``: scheme://authority/path, nothing else.

    Cached: the same few URLs are signed over and over on the proof hot path.
    """
    parts, scheme, authority = _split(url)
    return f"{scheme}://{authority}{parts.path or '/'}"


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` with defaults dropped: the key of per-server nonce state."""
    _, scheme, authority = _split(url)
    return f"{scheme}://{authority}"


def _pct_normalize(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def comparable_htu(url: str) -> str:
    """Server-side comparison form: :func:`normalize_htu` plus percent-encoding normalization."""
    normalized = normalize_htu(url)
    return _PCT.sub(_pct_normalize, normalized)


def is_loopback_host(url: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost`` — the only hosts allowed over plain HTTP."""
    try:
        host = (urlsplit(url).hostname or "").lower()
    except ValueError:  # malformed authority ("http://]"): nothing we can vouch for
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    # A real IP literal only: "127.999.0.1" or "127.².0.1" would go to DNS as a host name.
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
