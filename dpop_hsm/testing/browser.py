"""A test acting as the user's browser: sign in and consent, or approve a device, over HTTP.

The login page's form is filled in exactly as a person would (``form_token`` from the page, a
user name) and the redirect is returned, not followed: the caller decides where it goes (a
loopback listener, or its own checks). Plain ``requests``; nothing here is trusted by the AS.
"""

from __future__ import annotations

import re
from html import unescape

from ..errors import ProtocolError
from ..htu import origin_of

__all__ = ["approve_device", "complete_login"]

_FORM_TOKEN = re.compile(r'name="form_token" value="([^"]*)"')


def complete_login(
    authorization_url: str, *, user: str = "alice", approve: bool = True, timeout: float = 10.0
) -> str:
    """GET the authorization URL, submit the login + consent form; the redirect ``Location``.

    An authorization request the AS redirects at once (an error it may send to the client)
    returns that ``Location`` too. Raises :class:`~dpop_hsm.errors.ProtocolError` when the AS
    shows an error page instead (unknown client, unregistered redirect URI, used
    ``request_uri``) or refuses the form.
    """
    import requests

    page = requests.get(authorization_url, allow_redirects=False, timeout=timeout)
    if page.status_code == 302:
        return page.headers["Location"]
    match = _FORM_TOKEN.search(page.text) if page.status_code == 200 else None
    if match is None:
        raise ProtocolError(f"the authorization page answered HTTP {page.status_code}")
    action = "/authorize/approve" if approve else "/authorize/deny"
    answer = requests.post(
        origin_of(authorization_url) + action,
        data={"form_token": unescape(match.group(1)), "user": user},
        allow_redirects=False,
        timeout=timeout,
    )
    if answer.status_code != 302:
        raise ProtocolError(f"the login form answered HTTP {answer.status_code}")
    return answer.headers["Location"]


def approve_device(
    issuer: str,
    user_code: str,
    *,
    user: str = "alice",
    approve: bool = True,
    timeout: float = 10.0,
) -> None:
    """Type ``user_code`` into the AS's device page and approve (or deny) it (RFC 8628 §3.3).

    Raises :class:`~dpop_hsm.errors.ProtocolError` when the AS refuses the code (unknown,
    expired or already decided).
    """
    import requests

    action = "/device/approve" if approve else "/device/deny"
    answer = requests.post(
        issuer + action, data={"user_code": user_code, "user": user}, timeout=timeout
    )
    if answer.status_code != 200:
        raise ProtocolError(f"the device page answered HTTP {answer.status_code}")
