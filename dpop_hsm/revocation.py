"""Token revocation (RFC 7009) as a sans-IO flow, and the blocking driver for such flows.

:func:`revocation_flow` builds one revocation request and decides on its answer; the caller
sends it (:func:`run_flow` with a blocking sender, or any adapter). :class:`LogoutResult` is
what a logout achieved. :mod:`dpop_hsm.login_session` re-exports all three under their old
names.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlencode

from .client_auth import ClientAuth, Form
from .errors import DPoPError, RevocationError
from .sansio import HttpRequest, HttpResponse, Sender
from .token_endpoint import error_body, redact

__all__ = ["LogoutResult", "revocation_flow", "run_flow"]

T = TypeVar("T")


@dataclass(frozen=True)
class LogoutResult:
    """What logout achieved: whether the AS can revoke, and what it revoked."""

    revocation_endpoint: bool
    refresh_token_revoked: bool = False
    access_token_revoked: bool = False


def run_flow(flow: Generator[HttpRequest, HttpResponse, T], send: Sender) -> T:
    """Drive a sans-IO flow with a blocking ``send``; a flow may finish without a request."""
    try:
        request = next(flow)
    except StopIteration as stop:
        done: T = stop.value
        return done
    while True:
        response = send(request)
        try:
            request = flow.send(response)
        except StopIteration as stop:
            result: T = stop.value
            return result


def _shown(text: str, limit: int = 120) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def revocation_flow(
    url: str, *, client_id: str, client_auth: ClientAuth, token: str, hint: str
) -> Generator[HttpRequest, HttpResponse, bool]:
    """One RFC 7009 §2.1 revocation request; True when revoked, False for an access token the
    AS cannot revoke (``unsupported_token_type``, §2.2.1). Raises :class:`RevocationError`.

    No DPoP proof: RFC 7009 and RFC 9449 define none for this endpoint; the client
    authenticates as at the token endpoint.
    """
    form = Form(
        pairs=[("token", token), ("token_type_hint", hint)],
        headers=[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Accept", "application/json"),
        ],
        secrets=[token],
    )
    client_auth.prepare(client_id)(form)
    request = HttpRequest("POST", url, tuple(form.headers), urlencode(form.pairs).encode("ascii"))
    response = yield request
    if response.status == 200:  # §2.2: also for tokens the AS does not know
        return True
    try:
        parsed = error_body(response)
    except DPoPError:
        parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if response.status == 400 and error == "unsupported_token_type" and hint == "access_token":
        return False
    detail = (
        f", error={_shown(redact(error, form.secrets) or '')!r}" if isinstance(error, str) else ""
    )
    raise RevocationError(
        f"the revocation endpoint refused to revoke the {hint.replace('_', ' ')} "
        f"(HTTP {response.status}{detail}); the profile is kept"
    )
