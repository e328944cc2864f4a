"""Sans-IO HTTP values shared by the token client and the transport adapters.

The token client never owns an HTTP library (design.md "Tokens"): it builds an
:class:`HttpRequest` and parses an :class:`HttpResponse`; the requests and httpx adapters send
the request through the caller's own session or client, so proxies, TLS settings, mounts and
test transports apply to token requests too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Headers", "HttpRequest", "HttpResponse", "header_values"]

Headers = tuple[tuple[str, str], ...]


def header_values(headers: Iterable[tuple[str, str]], name: str) -> list[str]:
    """Every value of header ``name`` in order; names compare case-insensitively (pitfall 3)."""
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
