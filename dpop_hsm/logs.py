"""The ``dpop_hsm.http`` session log: a DEBUG trace of every exchange, with every secret masked.

Request line, ``Host``, headers and body; status line, headers and body. Values of credential
headers and credential fields in form and JSON bodies become ``****``, whatever content type
the server claims, and a text body that names a credential field in some other shape is
shown by its size only: the log is meant to be pasted into bug reports. Nothing is formatted
unless DEBUG is enabled, so the hot path pays one ``isEnabledFor`` call.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit

__all__ = [
    "MASK",
    "SECRET_FIELDS",
    "SECRET_HEADERS",
    "http_logger",
    "log_request",
    "log_response",
    "loggable_url",
    "mask_body",
    "mask_headers",
]

http_logger = logging.getLogger("dpop_hsm.http")

MASK = "****"
SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "dpop", "cookie", "set-cookie", "x-api-key"}
)
SECRET_FIELDS = frozenset(
    {
        "client_secret",
        "client_assertion",
        "access_token",
        "refresh_token",
        "id_token",
        "password",
        "pin",
        "assertion",
        "subject_token",
        "actor_token",
        "code",
        "code_verifier",
        "device_code",  # RFC 8628 §3.4: whoever holds it can redeem the approved login
        "token",  # RFC 7009 §2.1: the token being revoked
    }
)
MAX_LOGGED_BODY = 4096


def mask_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, MASK if k.lower() in SECRET_HEADERS else v) for k, v in headers]


def _mask_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: (MASK if isinstance(k, str) and k.lower() in SECRET_FIELDS else _mask_json(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_mask_json(v) for v in value]
    return value


def mask_body(body: bytes | str | None, content_type: str | None) -> str:
    """The body as logged: form and JSON with secret fields masked, anything else summarized."""
    if body is None:
        return ""
    raw = body.encode("utf-8") if isinstance(body, str) else body
    if not raw:
        return ""
    ctype = (content_type or "").lower()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return f"[{len(raw)} bytes of binary data]"
    # Anything that looks like JSON is masked as JSON whatever its declared type: some servers
    # send token responses as text/plain or text/html, some with a byte-order mark in front.
    probe = text.lstrip("\ufeff \t\r\n")
    if "json" in ctype or probe[:1] in ("{", "["):
        try:
            return json.dumps(_mask_json(json.loads(probe)), separators=(",", ":"))[
                :MAX_LOGGED_BODY
            ]
        except (ValueError, RecursionError):
            return f"[{len(raw)} bytes, not valid JSON]"
    pairs = parse_qsl(probe, keep_blank_values=True)
    if "x-www-form-urlencoded" in ctype or any(k.lower() in SECRET_FIELDS for k, _ in pairs):
        masked = [(k, MASK if k.lower() in SECRET_FIELDS else v) for k, v in pairs]
        return urlencode(masked, safe="*")[:MAX_LOGGED_BODY]
    if ctype.startswith("text/"):
        lowered = text.lower()
        if any(name in lowered for name in SECRET_FIELDS if len(name) > 4):
            # Some shape we cannot mask field by field: never risk printing a credential.
            return f"[{len(raw)} bytes of text naming a credential field]"
        return text[:MAX_LOGGED_BODY]
    # Unknown types may hold anything (a token echoed back): log the size only.
    return f"[{len(raw)} bytes, {ctype or 'no content type'}]"


def _content_type(headers: Iterable[tuple[str, str]]) -> str | None:
    return next((v for k, v in headers if k.lower() == "content-type"), None)


def _masked_query(query: str) -> str:
    if not query:
        return ""
    # RFC 6750 §2.3 puts tokens in queries; mask those fields too.
    pairs = parse_qsl(query, keep_blank_values=True)
    return "?" + urlencode(
        [(k, MASK if k.lower() in SECRET_FIELDS else v) for k, v in pairs], safe="*"
    )


def _authority(parts: SplitResult) -> str:
    """host[:port] without userinfo: ``user:password@`` never reaches the log."""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{host}:{port}" if port is not None else host


def loggable_url(url: str) -> str:
    """``url`` as logs and error messages may show it: no userinfo, secret query fields masked."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{_authority(parts)}{parts.path}{_masked_query(parts.query)}"


def log_request(
    method: str, url: str, headers: Iterable[tuple[str, str]], body: bytes | str | None
) -> None:
    if not http_logger.isEnabledFor(logging.DEBUG):
        return
    headers = list(headers)
    parts = urlsplit(url)
    target = (parts.path or "/") + _masked_query(parts.query)
    lines = ["---- Sending ----", f"{method} {target} HTTP/1.1"]
    if not any(k.lower() == "host" for k, _ in headers):
        lines.append(f"Host: {_authority(parts)}")
    lines += [f"{k}: {v}" for k, v in mask_headers(headers)]
    lines += ["", mask_body(body, _content_type(headers))]
    http_logger.debug("%s", "\n".join(lines))


def log_response(
    status: int,
    reason: str,
    headers: Iterable[tuple[str, str]],
    body: bytes | None,
    *,
    url: str = "",
) -> None:
    if not http_logger.isEnabledFor(logging.DEBUG):
        return
    headers = list(headers)
    source = f" from {loggable_url(url)}" if url else ""
    lines = [f"---- Received{source} ----", f"HTTP/1.1 {status} {reason}"]
    lines += [f"{k}: {v}" for k, v in mask_headers(headers)]
    lines += ["", mask_body(body, _content_type(headers)) if body is not None else "[streamed]"]
    http_logger.debug("%s", "\n".join(lines))
