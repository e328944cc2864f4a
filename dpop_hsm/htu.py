"""Every URL rule in one place: ``htu`` normalization, origins, loopback, the https rule.

``htu`` (RFC 9449 §4.2, §4.3; RFC 3986 §6.2.2, §6.2.3): clients send the request URI without
query and fragment, with a lowercase scheme and host, no default port, ``/`` for an empty path,
and dot segments removed (RFC 3986 §5.2.4 — requests/urllib3 and httpx remove them before
sending, so the path on the wire has none); the rest of the path is kept exactly as it goes on
the wire, percent-encoding included, because that is what the server sees. Characters no URI
may hold raw (RFC 3986 §2: ``" < > ` { }`` and non-ASCII) are percent-encoded as UTF-8 with
uppercase hex, as requests, httpx and aiohttp (yarl) all encode them before sending, so a
proof made from an unencoded URL names the path the server receives. ``| ^ [ ]`` are left as
given: the transports disagree (requests and yarl encode them, httpx sends them raw), and the
adapters sign the URL their transport sends. Verifiers additionally compare percent-encoding
case-insensitively, decode unreserved characters (RFC 3986 §6.2.2.1, §6.2.2.2) and treat
``| ^ [ ]`` in a path as their encodings, via :func:`comparable_htu`, so proofs from clients
on any of the three transports compare equal to the path they sent.

Parser differentials: ``urllib.parse`` and the transports (urllib3, httpx) disagree on URLs
with a backslash (``http://evil.example\\@127.0.0.1/`` is host 127.0.0.1 to urllib, host
evil.example to urllib3), on embedded TAB/CR/LF (urllib silently deletes them) and on other
whitespace and control characters; Python and the transports' IDNA libraries map some
non-ASCII host names to different hosts. A URL we judge — loopback or not, same origin or not, the
``htu`` a proof names — must be the URL the transport sends to, so such URLs are refused
outright, as are URLs with userinfo (``user:pass@``): credentials for our endpoints never go in
a URL, and an ``@`` is the classic way to make a URL look like it goes elsewhere.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from urllib.parse import SplitResult, urlsplit

from .errors import ConfigurationError, InsecureEndpointError
from .logs import loggable_url

__all__ = [
    "comparable_htu",
    "is_loopback_host",
    "normalize_htu",
    "origin_of",
    "require_https",
    "safe_url",
]

_DEFAULT_PORTS = {"http": 80, "https": 443}
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Whitespace, C0 controls, DEL and the backslash: parsers disagree on every one of them.
_DIFFERENTIAL = re.compile(r"[\x00-\x20\x7f\\\ud800-\udfff]")
_MAX_URL = 8192
_HOST_NAME = re.compile(r"[a-z0-9._-]+")  # LDH labels (and IPv4 literals), lowercased
# Never raw in a URI (RFC 3986 §2); every transport percent-encodes them alike (docstring).
_NEVER_RAW = re.compile(r"[\x22<>\x60{}\x80-\U0010ffff]")
# Not allowed raw in a path either, but sent raw by httpx and encoded by requests and yarl.
_DISPUTED = re.compile(r"[|^\[\]]")


def _percent_encode(match: re.Match[str]) -> str:
    return "".join(f"%{byte:02X}" for byte in match.group().encode())


def safe_url(url: object) -> str:
    """``url`` as an error message may show it: no userinfo, secret query fields masked.

    Never raises: a URL too broken to parse is shown by its length only.
    """
    if not isinstance(url, str):
        return f"<{type(url).__name__}>"
    try:
        shown = loggable_url(url[:_MAX_URL])
    except ValueError:
        return f"<unparsable URL, {len(url)} characters>"
    return repr(shown[:200])


def _check_transport_safe(url: str) -> None:
    """Refuse what urllib and the transports would read differently (module docstring)."""
    if len(url) > _MAX_URL:
        raise ConfigurationError(f"URL longer than {_MAX_URL} characters")
    bad = _DIFFERENTIAL.search(url)
    if bad is not None:
        char = bad.group()
        if "\ud800" <= char <= "\udfff":
            raise ConfigurationError("URL contains a lone surrogate, which no transport can encode")
        what = "a backslash" if char == "\\" else "whitespace or a control character"
        raise ConfigurationError(f"URL contains {what}, which HTTP libraries parse differently")


def _split(url: str, *, strict: bool) -> tuple[SplitResult, str, str]:
    if not isinstance(url, str):
        raise ConfigurationError("URL must be a string")
    if strict:
        _check_transport_safe(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # its text may quote parts of the URL: say what, not the details
        raise ConfigurationError(
            f"malformed URL {safe_url(url)} (bad port or IPv6 literal)"
        ) from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ConfigurationError(f"URL scheme must be http or https, not {parts.scheme[:20]!r}")
    if strict and "@" in parts.netloc:
        raise ConfigurationError(
            "URL has userinfo (user:password@); credentials never go in a URL here"
        )
    host = (parts.hostname or "").lower()
    if not host:
        raise ConfigurationError("URL has no host")
    if strict and not host.isascii():
        # IDNA 2003 (Python) and IDNA 2008 (the idna package requests uses) map some names to
        # different hosts ("faß" → "fass" or "xn--fa-hia"): only the A-label is unambiguous.
        raise ConfigurationError("URL host is not ASCII: give its IDNA A-label (xn--...)")
    if strict and ":" not in host and not _HOST_NAME.fullmatch(host):
        # Percent-escapes and sub-delimiters in a host name: urllib keeps them, urllib3
        # decodes some ("%7e" -> "~"), so the two would name different hosts.
        raise ConfigurationError("URL host has characters a DNS name or IP literal cannot have")
    if ":" in host:  # IPv6 literal keeps its brackets
        host = f"[{host}]"
    authority = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    return parts, scheme, authority


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, for absolute paths (the only kind an http(s) URL has)."""
    if "." not in path:
        return path
    output: list[str] = []
    segments = path.split("/")
    for i, segment in enumerate(segments[1:], start=1):
        last = i == len(segments) - 1
        if segment == ".":
            if last:
                output.append("")
        elif segment == "..":
            if output:
                output.pop()
            if last:
                output.append("")
        else:
            output.append(segment)
    return "/" + "/".join(output)


def _cut_query(url: str) -> str:
    """``url`` without query and fragment (both are outside ``htu``, RFC 9449 §4.2)."""
    # Everything before the first "?" or "#", whichever comes first: two C calls.
    return url.partition("?")[0].partition("#")[0]


@lru_cache(maxsize=512)
def _normalize(base: str) -> str:
    parts, scheme, authority = _split(base, strict=True)
    path = _remove_dot_segments(parts.path or "/")
    if _NEVER_RAW.search(path) is not None:
        path = _NEVER_RAW.sub(_percent_encode, path)
    return f"{scheme}://{authority}{path}"


def normalize_htu(url: str) -> str:
    """The ``htu`` value for a request to ``url``: scheme://authority/path, nothing else.

    Raises :class:`ConfigurationError` for anything but an absolute http(s) URL the transports
    parse the same way we do (see the module docstring). On the proof hot path: the
    transport-safety check is one regex scan, and the parse is cached per URL without its
    query, so paging through ``?page=N`` does not defeat the cache.
    """
    if not isinstance(url, str):
        raise ConfigurationError("URL must be a string")
    _check_transport_safe(url)
    return _normalize(_cut_query(url))


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` with defaults dropped: the key of per-server nonce state.

    Lenient on purpose (it only names a server, it never decides where a request goes), so it
    works on any URL a transport reports back. Cached twice: the nonce store asks for every
    request, so the first lookup is by the whole URL (one C-level cache hit); a miss (paging
    through ``?page=N``) falls through to the parse, cached by the URL without its query.
    """
    if not isinstance(url, str):
        raise ConfigurationError("URL must be a string")
    return _origin_of_url(url)


@lru_cache(maxsize=512)
def _origin_of_url(url: str) -> str:
    return _origin(_cut_query(url))


@lru_cache(maxsize=512)
def _origin(base: str) -> str:
    _, scheme, authority = _split(base, strict=False)
    return f"{scheme}://{authority}"


def _pct_normalize(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def comparable_htu(url: str) -> str:
    """Server-side comparison form: :func:`normalize_htu` plus percent-encoding normalization.

    Dot segments are removed again after decoding, so ``/a/%2E%2E/b`` compares equal to
    ``/b`` (RFC 3986 §6.2.2.2 then §6.2.2.3). URLs with userinfo, whitespace, control
    characters or a backslash never compare equal to anything: they raise.
    """
    normalized = normalize_htu(url)
    scheme, _, rest = normalized.partition("://")
    authority, slash, path = rest.partition("/")
    if _DISPUTED.search(path) is not None:
        normalized = f"{scheme}://{authority}/{_DISPUTED.sub(_percent_encode, path)}"
    if "%" not in normalized:
        return normalized
    decoded = _PCT.sub(_pct_normalize, normalized)
    scheme, _, rest = decoded.partition("://")
    authority, slash, path = rest.partition("/")
    return f"{scheme}://{authority}{_remove_dot_segments(slash + path)}"


def is_loopback_host(url: str) -> bool:
    """True only for a loopback IP literal (127.0.0.0/8, ::1) or the name ``localhost`` itself.

    ``*.localhost`` is not trusted: many resolvers send it to DNS. A URL the transports could
    parse differently (module docstring) is never loopback. Never raises.
    """
    try:
        parts, _, _ = _split(url, strict=True)
    except ConfigurationError:
        return False
    host = (parts.hostname or "").lower()
    if host == "localhost":
        return True
    # A real IP literal only: "127.999.0.1" or "127.².0.1" would go to DNS as a host name.
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_https(url: str, what: str) -> str:
    """``url`` unless it is plain http to a non-loopback host (InsecureEndpointError).

    Tokens and proofs over plain http can be read and replayed by anyone on the path; loopback
    is allowed for local test servers. Raises :class:`ConfigurationError` for URLs the
    transports would parse differently (module docstring); messages never show userinfo or
    secret query parameters.
    """
    normalize_htu(url)  # raises ConfigurationError on junk and parser differentials
    if url[:8].lower() == "https://":
        return url
    if is_loopback_host(url):
        return url
    raise InsecureEndpointError(
        f"{what} must use https (plain http only for loopback): {safe_url(url)}"
    )
