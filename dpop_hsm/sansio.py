"""Sans-IO HTTP values: what every layer below the transport adapters speaks.

The token-endpoint protocol, the resource-server decision and the login flows never touch an
HTTP library: they build an :class:`HttpRequest` and read an :class:`HttpResponse`. A
:data:`Sender` is whatever turns one into the other — the requests, httpx and aiohttp adapters
send through the caller's own session or client, so proxies, TLS settings, mounts and test
transports apply to token requests too. Only when no adapter is involved
(``TokenClient.get_token()`` called directly) does a private default sender built on
``requests`` do the sending.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = ["Headers", "HttpRequest", "HttpResponse", "Sender", "header_values"]

Headers = tuple[tuple[str, str], ...]


def header_values(headers: Iterable[tuple[str, str]], name: str) -> list[str]:
    """Every value of header ``name`` in order.

    Names compare case-insensitively (RFC 9110 §5.1): HTTP/2 and many proxies lowercase them,
    so a ``DPoP-Nonce`` read case-sensitively is a nonce silently missed.
    """
    wanted = name.lower()
    return [v for k, v in headers if k.lower() == wanted]


@dataclass(frozen=True)
class HttpRequest:
    """One request to send: method, absolute URL, header fields and the (form) body bytes.

    ``repr`` never shows header values or the body: they hold proofs and client secrets.
    """

    method: str
    url: str
    headers: Headers
    body: bytes = b""

    def header(self, name: str) -> str | None:
        values = header_values(self.headers, name)
        return values[-1] if values else None

    def __repr__(self) -> str:
        names = ", ".join(k for k, _ in self.headers)
        return f"HttpRequest({self.method} {self.url}, headers=[{names}], body={len(self.body)}B)"


@dataclass(frozen=True)
class HttpResponse:
    """What the adapters hand back: status, every header field (repeats kept) and the body."""

    status: int
    headers: Headers
    body: bytes = b""
    url: str = ""

    def header(self, name: str) -> str | None:
        values = header_values(self.headers, name)
        return values[-1] if values else None

    def __repr__(self) -> str:
        return f"HttpResponse({self.status}, {len(self.body)}B)"


Sender = Callable[[HttpRequest], HttpResponse]
"""Sends one request and returns its response; raises ``TransportError`` when it cannot."""
