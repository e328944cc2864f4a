"""The authorization request of the code grant, with PKCE, DPoP binding and PAR (sans-IO).

:func:`new_authorization_request` makes one login attempt's values (state, PKCE, the key's
thumbprint); :func:`authorization_params` the parameters (RFC 6749 §4.1.1, RFC 7636 §4.3,
RFC 9449 §10, RFC 8707 §2); :func:`authorization_url` puts them on the authorization endpoint,
or, after a pushed authorization request (RFC 9126), only ``client_id`` and ``request_uri``;
:func:`parse_par_response` reads the PAR endpoint's answer.

Why the parameters are what they are:

* ``state`` (RFC 6749 §10.12): 256 random bits, single use, compared exactly on the redirect.
* PKCE S256 (RFC 7636; mandatory for native apps, RFC 8252 §8.1).
* ``dpop_jkt`` (RFC 9449 §10): binds the code to the key, so a code stolen from the redirect
  cannot be redeemed without the key. Sent on every authorization request we build — with PAR
  too, where the DPoP proof on the PAR request already binds (§10.1): both name the same key,
  and an AS that ignores the PAR proof still binds through ``dpop_jkt``.
* ``resource`` (RFC 8707 §2) on the authorization request as well as on the token request.
* The authorization endpoint may carry a query of its own, which must be kept (RFC 6749
  §3.1); a parameter of ours that it already has is refused rather than sent twice.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .errors import ConfigurationError, OAuthError, PushedAuthorizationError
from .pkce import Pkce, new_pkce
from .sansio import HttpResponse
from .strict_json import StrictJsonError, loads_strict
from .token_endpoint import redact

__all__ = [
    "AuthorizationRequest",
    "PushedRequest",
    "authorization_params",
    "authorization_url",
    "new_authorization_request",
    "new_state",
    "parse_par_response",
    "pushed_authorization_url",
]

_MAX_PAR_RESPONSE = 64 * 1024
MAX_PAR_LIFETIME = 600.0


def new_state() -> str:
    """256 bits from the OS CSPRNG, base64url: unguessable and safe in any URL."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class AuthorizationRequest:
    """One login attempt. ``repr`` hides the state and the PKCE verifier."""

    client_id: str
    redirect_uri: str
    jkt: str
    state: str = field(repr=False)
    pkce: Pkce = field(repr=False)
    scope: str | None = None
    resource: tuple[str, ...] = ()
    extra: tuple[tuple[str, str], ...] = ()


_OURS = frozenset(
    {
        "response_type",
        "client_id",
        "redirect_uri",
        "scope",
        "state",
        "code_challenge",
        "code_challenge_method",
        "dpop_jkt",
        "resource",
        "request_uri",
        "request",
    }
)


def new_authorization_request(
    *,
    client_id: str,
    redirect_uri: str,
    jkt: str,
    scope: str | Sequence[str] | None = None,
    resource: str | Sequence[str] | None = None,
    extra: Sequence[tuple[str, str]] = (),
    state: str | None = None,
) -> AuthorizationRequest:
    """Fresh state and PKCE for one attempt; raises :class:`ConfigurationError` on bad input.

    ``extra`` adds parameters such as ``prompt`` or ``login_hint``; it may not set ours.
    ``state`` may be made beforehand with :func:`new_state` (the redirect listener needs it
    before the request exists); it must be at least 128 bits of base64url (RFC 6749 §10.10).
    """
    if state is not None and (len(state) < 22 or not state.isascii() or not state.isprintable()):
        raise ConfigurationError("state must be an unguessable string (use new_state())")
    if not client_id or not isinstance(client_id, str):
        raise ConfigurationError("client_id must be a non-empty string")
    if scope is not None and not isinstance(scope, str):
        scope = " ".join(scope)
    if isinstance(resource, str):
        resource = (resource,)
    for uri in resource or ():
        parts = urlsplit(uri)
        # RFC 8707 §2: an absolute URI without a fragment.
        if not parts.scheme or not parts.netloc or parts.fragment or "#" in uri:
            raise ConfigurationError(
                f"resource {uri[:100]!r} must be an absolute URI without a fragment (RFC 8707 §2)"
            )
    clash = _OURS.intersection(name for name, _ in extra)
    if clash:
        raise ConfigurationError(f"extra authorization parameters may not set {sorted(clash)}")
    return AuthorizationRequest(
        client_id=client_id,
        redirect_uri=redirect_uri,
        jkt=jkt,
        state=state if state is not None else new_state(),
        pkce=new_pkce(),
        scope=scope or None,
        resource=tuple(resource or ()),
        extra=tuple(extra),
    )


def authorization_params(request: AuthorizationRequest) -> list[tuple[str, str]]:
    """The authorization request's parameters, in the order they are sent."""
    params = [
        ("response_type", "code"),
        ("client_id", request.client_id),
        ("redirect_uri", request.redirect_uri),
    ]
    if request.scope:
        params.append(("scope", request.scope))
    params += [
        ("state", request.state),
        ("code_challenge", request.pkce.challenge),  # RFC 7636 §4.3
        ("code_challenge_method", "S256"),
        ("dpop_jkt", request.jkt),  # RFC 9449 §10
    ]
    params += [("resource", uri) for uri in request.resource]  # RFC 8707 §2
    params += list(request.extra)
    return params


def _with_query(endpoint: str, params: Sequence[tuple[str, str]]) -> str:
    parts = urlsplit(endpoint)
    existing = parse_qsl(parts.query, keep_blank_values=True)
    clash = {name for name, _ in existing}.intersection(name for name, _ in params)
    if clash:
        raise ConfigurationError(
            f"the authorization endpoint's own query already sets {sorted(clash)}"
        )
    query = urlencode(params)
    if parts.query:
        query = parts.query + "&" + query  # RFC 6749 §3.1: keep the endpoint's query
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def authorization_url(endpoint: str, request: AuthorizationRequest) -> str:
    """The URL the browser opens when the request is not pushed."""
    return _with_query(endpoint, authorization_params(request))


@dataclass(frozen=True)
class PushedRequest:
    """The PAR endpoint's answer (RFC 9126 §2.2): the handle and how long it lives."""

    request_uri: str
    expires_in: float


def pushed_authorization_url(endpoint: str, *, client_id: str, pushed: PushedRequest) -> str:
    """RFC 9126 §4: after PAR, the authorization URL carries only client_id and request_uri."""
    return _with_query(endpoint, [("client_id", client_id), ("request_uri", pushed.request_uri)])


def parse_par_response(response: HttpResponse, *, secrets: Sequence[str] = ()) -> PushedRequest:
    """The pushed request's handle, or a typed error (RFC 9126 §2.2, §2.3).

    201 with ``request_uri`` and ``expires_in`` (200 is tolerated: some servers send it).
    Raises :class:`OAuthError` for an OAuth error response (the nonce challenge is handled by
    the flow before this; server text is redacted of ``secrets``), and
    :class:`PushedAuthorizationError` for anything unusable.
    """
    if len(response.body) > _MAX_PAR_RESPONSE:
        raise PushedAuthorizationError("the pushed authorization response is too large")
    try:
        parsed = loads_strict(response.body) if response.body else None
    except StrictJsonError:
        parsed = None
    if response.status not in (200, 201):
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
            description = parsed.get("error_description")
            raise OAuthError(
                "pushed authorization request rejected",
                error=redact(parsed["error"], secrets),
                error_description=redact(description, secrets)
                if isinstance(description, str)
                else None,
                status=response.status,
            )
        raise PushedAuthorizationError(
            f"the pushed authorization request endpoint answered HTTP {response.status}"
        )
    if not isinstance(parsed, dict):
        raise PushedAuthorizationError("the pushed authorization response is not a JSON object")
    request_uri = parsed.get("request_uri")
    if (
        not isinstance(request_uri, str)
        or not 0 < len(request_uri) <= 4096
        or not request_uri.isascii()
        or not request_uri.isprintable()
        or " " in request_uri
    ):
        raise PushedAuthorizationError("the pushed authorization response has no request_uri")
    expires_in = parsed.get("expires_in")
    if isinstance(expires_in, int) and not isinstance(expires_in, bool):
        # JSON integers are unbounded; math.isfinite(10**400) raises OverflowError.
        expires_in = min(expires_in, MAX_PAR_LIFETIME)
    if (
        isinstance(expires_in, bool)
        or not isinstance(expires_in, int | float)
        or not math.isfinite(expires_in)
        or expires_in <= 0
    ):
        raise PushedAuthorizationError(
            "the pushed authorization response's expires_in is not a positive number"
        )
    return PushedRequest(
        request_uri=request_uri, expires_in=min(float(expires_in), MAX_PAR_LIFETIME)
    )
