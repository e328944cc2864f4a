"""The few HTML pages of the local authorization server: login + consent, device approval.

Every value shown is escaped (client ids, scopes and codes are attacker-influenced), and the
pages refuse to be framed (RFC 6749 §10.13 clickjacking). Forms name their fields plainly so a
test can fill them in with any HTTP client: ``form_token`` + ``user`` for a login,
``user_code`` + ``user`` for a device.
"""

from __future__ import annotations

from html import escape

__all__ = ["PAGE_HEADERS", "device_page", "login_page", "message_page"]

PAGE_HEADERS = (
    ("Content-Type", "text/html; charset=utf-8"),
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"),
    ("Referrer-Policy", "no-referrer"),
)


def _page(title: str, body: str) -> bytes:
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title></head>\n<body>\n<h1>{escape(title)}</h1>\n{body}\n"
        "</body></html>\n"
    ).encode()


def login_page(*, client_id: str, scope: str, form_token: str) -> bytes:
    """Sign in and consent: POST ``/authorize/approve`` (or ``/authorize/deny``)."""
    return _page(
        "Sign in to the dpop_hsm test server",
        f"<p>Client <code>{escape(client_id)}</code> asks for: <code>{escape(scope)}</code></p>\n"
        '<form method="post" action="/authorize/approve">\n'
        f'<input type="hidden" name="form_token" value="{escape(form_token)}">\n'
        '<label>User name <input name="user" value="" autocomplete="username"></label>\n'
        '<button type="submit">Approve</button>\n'
        '<button type="submit" formaction="/authorize/deny">Deny</button>\n'
        "</form>",
    )


def device_page(*, user_code: str) -> bytes:
    """Enter a device's user code: POST ``/device/approve`` (or ``/device/deny``)."""
    return _page(
        "Connect a device",
        '<form method="post" action="/device/approve">\n'
        f'<label>Code <input name="user_code" value="{escape(user_code)}"></label>\n'
        '<label>User name <input name="user" value="" autocomplete="username"></label>\n'
        '<button type="submit">Approve</button>\n'
        '<button type="submit" formaction="/device/deny">Deny</button>\n'
        "</form>",
    )


def message_page(title: str, text: str) -> bytes:
    """A page that only says something (errors, "device approved")."""
    return _page(title, f"<p>{escape(text)}</p>")
