"""The token-endpoint protocol as values: grants, client authentication, proofs, parsing.

Sans-IO (RFC 6749 §3.2, §5; RFC 9449 §5, §8). A :class:`Grant` says what is asked for
(client credentials here; authorization code, refresh token, device code and token exchange
are more :class:`Grant` classes, added without touching these); a :class:`ClientAuth` says
who asks (secret basic/post, private_key_jwt, none). :class:`TokenEndpoint` joins them with a
proof factory and a nonce store: :meth:`TokenEndpoint.post_form` is the one "POST a form with
client authentication and a DPoP proof, retry once on ``use_dpop_nonce``" generator — token,
PAR, device-authorization and revocation endpoints all speak it — and
:meth:`TokenEndpoint.token_flow` adds the token-response rules on top.

Generators yield :class:`~dpop_hsm.sansio.HttpRequest` values and receive
:class:`~dpop_hsm.sansio.HttpResponse` values; whoever drives them owns the I/O.
"""

from __future__ import annotations

import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar
from urllib.parse import quote, quote_plus, urlencode

from .client_auth import (
    ASSERTION_TYPE,
    AUTH_METHODS,
    AuthMethod,
    ClientAuth,
    Form,
    NoClientAuth,
    PrivateKeyJwt,
    SecretBasic,
    SecretPost,
    client_auth_for,
)
from .errors import (
    ConfigurationError,
    NonceError,
    OAuthError,
    TokenResponseError,
    TokenTypeError,
)
from .logs import SECRET_FIELDS
from .nonces import NonceStore, is_nonce_challenge
from .proof import ProofFactory
from .sansio import HttpRequest, HttpResponse
from .strict_json import StrictJsonError, loads_strict

__all__ = [
    "ASSERTION_TYPE",
    "AUTH_METHODS",
    "DEFAULT_LIFETIME",
    "MAX_TOKEN_RESPONSE",
    "AuthMethod",
    "ClientAuth",
    "ClientCredentialsGrant",
    "Exchange",
    "Form",
    "Grant",
    "NoClientAuth",
    "PrivateKeyJwt",
    "SecretBasic",
    "SecretPost",
    "Token",
    "TokenEndpoint",
    "TokenResponse",
    "client_auth_for",
    "redact",
]

MAX_TOKEN_RESPONSE = 1024 * 1024
DEFAULT_LIFETIME = 300.0
# Members a grant's caller may not set through ``extra`` parameters: they belong to the
# grant or the client authentication, and a clash would send two conflicting values.
RESERVED_PARAMS = frozenset(
    {
        "grant_type",
        "client_id",
        "client_secret",
        "client_assertion",
        "client_assertion_type",
        "scope",
        "resource",
    }
)
_PCT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_SECRET_RESPONSE_FIELDS = frozenset({"access_token", "refresh_token", "id_token"})


# --- values --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    """An access token and what we know about it. ``repr`` never shows the token.

    ``expires_at``/``renew_at`` are ``time.monotonic()`` deadlines; ``issued_at`` is wall-clock
    time for display. ``extra`` holds the response's other, non-secret members.
    """

    access_token: str = field(repr=False)
    token_type: str
    expires_at: float
    renew_at: float
    issued_at: float
    lifetime: float
    jkt: str
    scope: str | None = None
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def expires_in(self, now: float | None = None) -> float:
        return self.expires_at - (time.monotonic() if now is None else now)

    def is_valid(self, now: float | None = None) -> bool:
        return self.expires_in(now) > 0

    def needs_renewal(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self.renew_at

    @property
    def is_dpop(self) -> bool:
        return self.token_type.lower() == "dpop"

    def __repr__(self) -> str:
        return (
            f"Token(token_type={self.token_type!r}, access_token='****', "
            f"expires_in={self.expires_in():.1f}s, scope={self.scope!r}, jkt={self.jkt!r})"
        )

    __str__ = __repr__


@dataclass(frozen=True)
class TokenResponse:
    """A successful token response: the :class:`Token` plus what a grant may need to keep.

    ``refresh_token`` is here (not in ``Token.extra``) so a refresh grant can store a rotated
    one; it never shows in ``repr``.
    """

    token: Token
    refresh_token: str | None = field(default=None, repr=False)
    members: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), repr=False)


@dataclass(frozen=True)
class Exchange:
    """What :meth:`TokenEndpoint.post_form` returns: the final response and when it was sent."""

    response: HttpResponse
    sent_monotonic: float
    sent_wall: float
    secrets: tuple[str, ...] = field(default=(), repr=False)


def redact(text: str | None, secrets: Iterable[str]) -> str | None:
    """``text`` with every known secret (and its form/Basic encodings) replaced by ``****``.

    An authorization server that echoes the request into ``error_description`` would
    otherwise put our client secret or assertion into ``str(OAuthError)``.
    """
    if text is None:
        return None
    # Percent-escapes compare case-insensitively (RFC 3986 §6.2.2.1): "%2f" and "%2F" alike.
    text = _PCT_ESCAPE.sub(lambda m: m.group(0).upper(), text)
    for secret in secrets:
        if len(secret) < 4:  # too short to find without masking ordinary words
            continue
        # As sent, percent-encoded, and form-encoded (spaces as "+", as urlencode writes them).
        for spelling in {secret, quote(secret, safe=""), quote_plus(secret, safe="")}:
            if spelling in text:
                text = text.replace(spelling, "****")
    return text


# --- grants --------------------------------------------------------------------------------


class Grant(ABC):
    """What the token request asks for (RFC 6749 §4): its ``grant_type`` and parameters.

    A subclass adds its own parameters; :meth:`accept` sees each successful response (a refresh
    grant stores the rotated refresh token there, before the access token is used).
    """

    grant_type: ClassVar[str]

    @abstractmethod
    def parameters(self) -> list[tuple[str, str]]:
        """Form parameters besides ``grant_type`` and client authentication."""

    @property
    def scope(self) -> str | None:
        """The scope this grant asks for, when it asks for one (cache key, token default)."""
        return None

    def accept(self, response: TokenResponse) -> None:  # noqa: B027 - optional hook
        """Called with every successful token response of this grant, before it is used."""

    def secrets(self) -> list[str]:
        """Values this grant sends that a server might echo (codes, refresh tokens)."""
        return []


def _scope_text(scope: str | Sequence[str] | None) -> str | None:
    if scope is not None and not isinstance(scope, str):
        scope = " ".join(scope)
    return scope or None


def _resources(resource: str | Sequence[str] | None) -> tuple[str, ...]:
    if isinstance(resource, str):
        return (resource,)
    return tuple(resource or ())


def check_extra_params(extra: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    """Caller-supplied extra parameters, refusing any that a grant or client auth owns."""
    items = dict(extra or {})
    clash = RESERVED_PARAMS.intersection(items)
    if clash:
        raise ConfigurationError(f"extra_params may not set {sorted(clash)}")
    return tuple(items.items())


class ClientCredentialsGrant(Grant):
    """RFC 6749 §4.4: the client asks for a token for itself (with RFC 8707 ``resource``)."""

    grant_type = "client_credentials"

    def __init__(
        self,
        *,
        scope: str | Sequence[str] | None = None,
        resource: str | Sequence[str] | None = None,
        extra_params: Mapping[str, str] | None = None,
    ) -> None:
        self._scope = _scope_text(scope)
        self.resource = _resources(resource)
        self.extra_params = check_extra_params(extra_params)

    @property
    def scope(self) -> str | None:
        return self._scope

    def parameters(self) -> list[tuple[str, str]]:
        pairs: list[tuple[str, str]] = []
        if self._scope:
            pairs.append(("scope", self._scope))
        pairs += [("resource", r) for r in self.resource]  # RFC 8707 §2
        pairs += list(self.extra_params)
        return pairs

    def __repr__(self) -> str:
        return f"ClientCredentialsGrant(scope={self._scope!r}, resource={self.resource!r})"


# --- the endpoint ----------------------------------------------------------------------------


class TokenEndpoint:
    """One client at one authorization server: client auth, proofs, nonces, response rules.

    Not a network client: every method that talks to the server is a generator driven by an
    adapter (or by ``TokenClient.get_token``'s default sender).
    """

    def __init__(
        self,
        url: str,
        *,
        client_id: str,
        client_auth: ClientAuth,
        proofs: ProofFactory,
        nonces: NonceStore,
        allow_bearer: bool = False,
        default_lifetime: float = DEFAULT_LIFETIME,
        renew_before: float | None = None,
    ) -> None:
        if renew_before is not None and renew_before < 0:
            raise ConfigurationError("renew_before must be >= 0")
        if not default_lifetime > 0:
            raise ConfigurationError("default_lifetime must be positive")
        self.url = url
        self.client_id = client_id
        self.client_auth = client_auth
        self.proofs = proofs
        self.nonces = nonces
        self.allow_bearer = allow_bearer
        self.default_lifetime = default_lifetime
        self.renew_before = renew_before
        self.attempts = 0  # requests sent, for diagnostics and tests

    def __repr__(self) -> str:
        return f"TokenEndpoint({self.url!r}, client_id={self.client_id!r}, {self.client_auth!r})"

    def form_request(
        self,
        url: str,
        pairs: Sequence[tuple[str, str]],
        stamp: Callable[[Form], None],
        *,
        nonce: str | None,
        dpop: bool = True,
        secrets: Sequence[str] = (),
    ) -> tuple[HttpRequest, Form]:
        """One attempt: form parameters, client authentication, then the proof (made last)."""
        form = Form(
            pairs=list(pairs),
            headers=[
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Accept", "application/json"),
            ],
            secrets=list(secrets),
        )
        stamp(form)
        form.secrets += [v for k, v in form.pairs if k in SECRET_FIELDS]
        if dpop:  # RFC 9449 §5, §10.1: right before sending, never ahead
            form.headers.append(("DPoP", self.proofs.create("POST", url, nonce=nonce)))
        body = urlencode(form.pairs).encode("ascii")
        return HttpRequest("POST", url, tuple(form.headers), body), form

    def post_form(
        self,
        url: str,
        pairs: Sequence[tuple[str, str]],
        *,
        dpop: bool = True,
        secrets: Sequence[str] = (),
        what: str = "the token endpoint",
    ) -> Generator[HttpRequest, HttpResponse, Exchange]:
        """POST a form with client auth and a proof; at most one retry, for a nonce (RFC 9449 §8).

        Returns the final response whatever its status: the caller applies its endpoint's rules.
        Raises :class:`NonceError` when the server asks for a nonce twice, without one, or
        hands back the nonce it just rejected.
        """
        stamp = self.client_auth.prepare(self.client_id)  # secrets resolved once per call
        nonce = self.nonces.get(url) if dpop else None
        for attempt in (1, 2):
            request, form = self.form_request(
                url, pairs, stamp, nonce=nonce, dpop=dpop, secrets=secrets
            )
            sent_mono, sent_wall = time.monotonic(), time.time()
            self.attempts += 1
            response = yield request
            fresh = self.nonces.observe(url, response.headers)
            if dpop and is_nonce_challenge(response.status, response.headers, response.body):
                if attempt == 2:
                    raise NonceError(f"{what} rejected our nonce twice (RFC 9449 §8)")
                if fresh is None:
                    raise NonceError(f"{what}: use_dpop_nonce without a DPoP-Nonce header")
                if fresh == nonce:
                    raise NonceError(f"{what} handed back the nonce it just rejected")
                nonce = fresh
                continue
            return Exchange(response, sent_mono, sent_wall, tuple(form.secrets))
        raise AssertionError("unreachable")  # pragma: no cover

    def token_flow(self, grant: Grant) -> Generator[HttpRequest, HttpResponse, TokenResponse]:
        """One token request for ``grant`` (nonce retry included) and its parsed response."""
        pairs = [("grant_type", grant.grant_type), *grant.parameters()]
        exchange = yield from self.post_form(self.url, pairs, secrets=grant.secrets())
        parsed = self.parse_response(
            exchange.response,
            sent_monotonic=exchange.sent_monotonic,
            sent_wall=exchange.sent_wall,
            scope=grant.scope,
            secrets=exchange.secrets,
        )
        grant.accept(parsed)
        return parsed

    # --- response rules ------------------------------------------------------------------

    def parse_response(
        self,
        response: HttpResponse,
        *,
        sent_monotonic: float,
        sent_wall: float,
        scope: str | None = None,
        secrets: Sequence[str] = (),
    ) -> TokenResponse:
        """A :class:`TokenResponse` from a token endpoint response, or the typed error it is.

        Raises :class:`OAuthError` (error response, server text redacted of our secrets),
        :class:`TokenTypeError` (not DPoP and no ``allow_bearer``), :class:`TokenResponseError`
        (5xx, redirects, bodies that are not strict JSON objects, unusable members).
        """
        status = response.status
        parsed = error_body(response)
        if status >= 500:
            raise TokenResponseError(f"token endpoint failed with HTTP {status}")
        if 300 <= status < 400:
            raise TokenResponseError(f"token endpoint answered with a redirect (HTTP {status})")
        if status != 200:
            raise_oauth_error(parsed, status, secrets, what="token request rejected")
        if not isinstance(parsed, dict):
            raise TokenResponseError(
                "token response is not a strict JSON object (RFC 6749 §5.1, RFC 8259)"
            )
        return self.token_from_members(
            parsed, sent_monotonic=sent_monotonic, sent_wall=sent_wall, scope=scope
        )

    def token_from_members(
        self,
        members: Mapping[str, Any],
        *,
        sent_monotonic: float,
        sent_wall: float,
        scope: str | None = None,
    ) -> TokenResponse:
        """RFC 6749 §5.1 members → :class:`TokenResponse` (RFC 9449 §5: DPoP required)."""
        access_token = members.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise TokenResponseError("token response has no access_token string")
        if not _header_safe(access_token):
            raise TokenResponseError("access_token has characters a header cannot carry")
        token_type = members.get("token_type")
        if not isinstance(token_type, str) or not token_type:
            raise TokenResponseError("token response has no token_type")
        # RFC 6749 §5.1 / RFC 9449 §5: case-insensitive; anything but DPoP is a downgrade.
        if token_type.lower() != "dpop" and not (
            self.allow_bearer and token_type.lower() == "bearer"
        ):
            raise TokenTypeError(
                f"token_type is {token_type[:20]!r}, not DPoP; refusing a silent downgrade"
            )
        refresh_token = members.get("refresh_token")
        if refresh_token is not None and (
            not isinstance(refresh_token, str)
            or not refresh_token
            or not _header_safe(refresh_token)
        ):
            raise TokenResponseError("refresh_token is not a usable string")
        lifetime = self._lifetime(members.get("expires_in"))
        renew_before = (
            self.renew_before if self.renew_before is not None else min(60.0, lifetime / 10)
        )
        renew_before = min(renew_before, lifetime)
        granted = members.get("scope")
        extra = {
            k: v
            for k, v in members.items()
            if k not in _SECRET_RESPONSE_FIELDS and isinstance(k, str)
        }
        token = Token(
            access_token=access_token,
            token_type=token_type,
            expires_at=sent_monotonic + lifetime,
            renew_at=sent_monotonic + lifetime - renew_before,
            issued_at=sent_wall,
            lifetime=lifetime,
            jkt=self.proofs.thumbprint,
            scope=granted if isinstance(granted, str) else scope,
            extra=MappingProxyType(extra),
        )
        return TokenResponse(token, refresh_token, MappingProxyType(dict(members)))

    def _lifetime(self, value: Any) -> float:
        if value is None:
            return self.default_lifetime
        if isinstance(value, str):  # seen in the wild: "3600"; ASCII digits only, bounded
            text = value.strip()
            if not (0 < len(text) <= 12 and text.isascii() and text.isdigit()):
                raise TokenResponseError("expires_in is not a number")
            value = int(text)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TokenResponseError("expires_in is not a number")
        try:
            seconds = float(value)
        except OverflowError as e:  # JSON integers beyond the float range
            raise TokenResponseError("expires_in is absurdly large") from e
        if not math.isfinite(seconds) or seconds <= 0:
            raise TokenResponseError("expires_in must be a positive number of seconds")
        return seconds


def _header_safe(value: str) -> bool:
    return value.isascii() and value.isprintable() and " " not in value


def error_body(response: HttpResponse) -> Any:
    """The strict-JSON body of an endpoint response, or None when it is not strict JSON.

    Bounded: a body over :data:`MAX_TOKEN_RESPONSE` is an error whatever it holds.
    """
    if len(response.body) > MAX_TOKEN_RESPONSE:
        raise TokenResponseError(f"response larger than {MAX_TOKEN_RESPONSE} bytes")
    if not response.body:
        return None
    try:
        return loads_strict(response.body)
    except StrictJsonError:
        return None


def raise_oauth_error(parsed: Any, status: int, secrets: Sequence[str], *, what: str) -> None:
    """Raise the :class:`OAuthError` an RFC 6749 §5.2 error body describes (redacted).

    Without a usable ``error`` member the answer is a :class:`TokenResponseError`.
    """
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        description = parsed.get("error_description")
        raise OAuthError(
            what,
            error=redact(parsed["error"], secrets),
            error_description=redact(description, secrets)
            if isinstance(description, str)
            else None,
            status=status,
        )
    raise TokenResponseError(f"endpoint answered HTTP {status} without an OAuth error")
