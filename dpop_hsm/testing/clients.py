"""Registered clients, their redirect URIs, and client authentication at the local AS.

RFC 6749 §2.3.1 (``client_secret_basic``, ``client_secret_post``), RFC 7523 §3 + RFC 7521 §4.2
(``private_key_jwt``, assertion ``jti`` replay-checked) and public clients (``none``, RFC 6749
§2.1). Redirect URIs match exactly, except the port of a loopback IP literal (RFC 8252 §7.3).
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TypeGuard
from urllib.parse import unquote_plus, urlsplit

from ..errors import ConfigurationError, DPoPError, InvalidProofError, VerificationError
from ..verify import DEFAULT_ALGORITHMS, ReplayCache, public_key_from_jwk, verify_jws_signature
from .plumbing import Reject, decode_jws

__all__ = [
    "ASSERTION_TYPE",
    "DEFAULT_CLIENT",
    "DEFAULT_CLIENT_ID",
    "DEFAULT_CLIENT_SECRET",
    "DEFAULT_PUBLIC_CLIENT",
    "DEFAULT_PUBLIC_CLIENT_ID",
    "DEFAULT_REDIRECT_URIS",
    "DEVICE_CODE_GRANT",
    "GRANT_TYPES",
    "ClientAuthenticator",
    "ClientRegistration",
    "allowed_scopes",
    "redirect_uri_matches",
    "validate_registration",
]

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
AUTH_METHODS = ("client_secret_basic", "client_secret_post", "private_key_jwt", "none")
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"  # RFC 8628 §3.4
GRANT_TYPES = ("authorization_code", "refresh_token", "client_credentials", DEVICE_CODE_GRANT)
# RFC 8252 §7.3: native apps listen on a loopback IP at a port chosen at run time.
DEFAULT_REDIRECT_URIS = ("http://127.0.0.1/callback", "http://[::1]/callback")
_URI_FORBIDDEN = re.compile(r"[\x00-\x20\x7f\\#]")  # controls, space, backslash, fragment
LEEWAY = 5.0
MAX_ASSERTION_LIFETIME = 3600.0


def _numeric_date(value: object) -> TypeGuard[int | float]:
    """RFC 7519 §2 NumericDate: a finite JSON number (``true`` is not one)."""
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


@dataclass(frozen=True)
class ClientRegistration:
    """A client the AS knows: its auth method and secret or public JWK, and allowed scopes.

    ``redirect_uris`` are compared exactly, except that any port matches a loopback IP
    literal registered without one (RFC 8252 §7.3); the default allows a native app's
    ``http://127.0.0.1:{port}/callback`` and ``http://[::1]:{port}/callback``.
    ``grant_types`` limits the grants the client may use (``None``: every grant the server
    has). ``auth_method="none"`` makes a public client (RFC 6749 §2.1): its refresh tokens are
    bound to its DPoP key (RFC 9449 §5).
    """

    client_id: str
    auth_method: str = "client_secret_basic"
    client_secret: str | None = field(default=None, repr=False)
    jwk: Mapping[str, str] | None = None
    scope: str = "api"
    redirect_uris: tuple[str, ...] = DEFAULT_REDIRECT_URIS
    grant_types: frozenset[str] | None = None

    @property
    def public(self) -> bool:
        """True for a public client (no client authentication)."""
        return self.auth_method == "none"

    def allows(self, grant_type: str) -> bool:
        """Whether this client may use ``grant_type``; never ``client_credentials`` for a
        public client (RFC 6749 §4.4: "MUST only be used by confidential clients")."""
        if grant_type == "client_credentials" and self.public:
            return False
        return self.grant_types is None or grant_type in self.grant_types


# Fixture values for local test servers, not credentials of anything real.
DEFAULT_CLIENT_ID = "dpop-hsm-test"
DEFAULT_CLIENT_SECRET = "dpop-hsm-test-secret"  # noqa: S105
DEFAULT_CLIENT = ClientRegistration(
    DEFAULT_CLIENT_ID, "client_secret_basic", DEFAULT_CLIENT_SECRET, scope="api"
)
DEFAULT_PUBLIC_CLIENT_ID = "dpop-hsm-public"
# RFC 6749 §4.4: client_credentials is for confidential clients only.
DEFAULT_PUBLIC_CLIENT = ClientRegistration(
    DEFAULT_PUBLIC_CLIENT_ID,
    "none",
    scope="api",
    grant_types=frozenset({"authorization_code", "refresh_token", DEVICE_CODE_GRANT}),
)


def allowed_scopes(client: ClientRegistration) -> set[str]:
    """The client's scopes, plus ``offline_access`` when it may hold refresh tokens (OpenID
    Connect Core §11: the scope that asks for a refresh token)."""
    scopes = set(client.scope.split())
    if client.allows("refresh_token"):
        scopes.add("offline_access")
    return scopes


def _loopback_literal(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def redirect_uri_matches(registered: str, requested: str) -> bool:
    """RFC 6749 §3.1.2.3 exact string match, but any port for a loopback IP (RFC 8252 §7.3).

    The requested URI is judged as a browser would follow it: one with userinfo, a fragment,
    whitespace, control characters or a backslash never matches, and the loopback exception
    needs ``http``, the very same IP literal, path and query, and a port in 1..65535.
    """
    if _URI_FORBIDDEN.search(requested):
        return False
    if requested == registered:
        return True
    try:
        reg, req = urlsplit(registered), urlsplit(requested)
    except ValueError:  # e.g. "http://[::1/cb": an authority no browser could follow
        return False
    if reg.scheme != "http" or req.scheme != "http" or reg.port is not None:
        return False
    host = reg.hostname or ""
    if not _loopback_literal(host):
        return False
    literal = f"[{host}]" if ":" in host else host
    match = re.fullmatch(re.escape(literal) + r":([0-9]{1,5})", req.netloc)
    return (
        match is not None
        and 0 < int(match.group(1)) < 65536
        and (req.path, req.query) == (reg.path, reg.query)
    )


def validate_registration(client: ClientRegistration) -> None:
    """Refuse a registration that no request could ever authenticate as or redirect to.

    Raises :class:`~dpop_hsm.errors.ConfigurationError`.
    """
    if client.auth_method in ("client_secret_basic", "client_secret_post"):
        if not client.client_secret:
            raise ConfigurationError(f"{client.auth_method} client needs a secret")
    elif client.auth_method == "private_key_jwt":
        if not client.jwk:
            raise ConfigurationError("private_key_jwt client needs a public JWK")
    elif client.auth_method != "none":
        raise ConfigurationError(f"unknown auth method {client.auth_method!r}")
    if isinstance(client.redirect_uris, str):
        raise ConfigurationError("redirect_uris must be a tuple of URIs, not one string")
    for uri in client.redirect_uris:
        # RFC 6749 §3.1.2: absolute, no fragment.
        if _URI_FORBIDDEN.search(uri) or not urlsplit(uri).scheme:
            raise ConfigurationError(f"redirect URI {uri[:100]!r} is not an absolute URI")
    unknown = set(client.grant_types or ()) - set(GRANT_TYPES)
    if unknown:
        raise ConfigurationError(f"unknown grant types {sorted(unknown)}")
    if client.public and "client_credentials" in (client.grant_types or ()):
        raise ConfigurationError(
            "a public client (auth_method 'none') cannot use client_credentials (RFC 6749 §4.4)"
        )


def _invalid_client(reason: str, description: str) -> Reject:
    return Reject(401, reason, "invalid_client", description)


class ClientAuthenticator:
    """Authenticates the client of one request against the registered clients.

    ``now`` is the server's clock; ``audiences`` (called per request) lists the values a client
    assertion's ``aud`` may take; ``max_assertion_lifetime`` bounds ``exp - iat`` (seconds).
    """

    def __init__(
        self,
        clients: Mapping[str, ClientRegistration],
        *,
        now: Callable[[], float],
        audiences: Callable[[], Collection[str]],
        max_assertion_lifetime: float = MAX_ASSERTION_LIFETIME,
    ) -> None:
        self._clients = clients
        self.max_assertion_lifetime = max_assertion_lifetime
        self._now = now
        self._audiences = audiences
        self._assertion_replays = ReplayCache()

    def authenticate(
        self, authorization: str, form: Mapping[str, str], *, endpoint: str | None = None
    ) -> ClientRegistration:
        """The client that the ``Authorization`` header or the form authenticates.

        ``endpoint`` is the URL the request went to: a client assertion may name it as its
        audience besides the issuer and token endpoint (RFC 9126 §2). Raises :class:`Reject`:
        401 ``invalid_client`` for a failed or unsupported authentication (an ``Authorization``
        scheme other than Basic included, RFC 6749 §5.2), 400 ``invalid_request`` for a
        request using more than one method or naming two clients (§2.3: "MUST NOT use more
        than one authentication method in each request"; §5.2).
        """
        basic = authorization[:6].lower() == "basic "
        if authorization and not basic:
            raise _invalid_client("client_auth_scheme", "only Basic client authentication")
        methods = [basic, "client_secret" in form, "client_assertion" in form]
        if sum(methods) > 1:
            raise Reject(
                400, "client_auth_methods", "invalid_request", "more than one client auth method"
            )
        if basic:
            try:
                decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8")
                raw_id, _, raw_secret = decoded.partition(":")
                # RFC 6749 §2.3.1: both are form-urlencoded (Appendix B) first, so "+" is a space.
                client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
            except (ValueError, UnicodeDecodeError) as e:
                raise _invalid_client("client_auth", "bad Basic header") from e
            if form.get("client_id", client_id) != client_id:
                raise Reject(
                    400, "client_auth_methods", "invalid_request", "client_id is not the Basic one"
                )
            return self._check_secret(client_id, secret, "client_secret_basic")
        client_id = form.get("client_id", "")
        if "client_assertion" in form:
            return self._check_assertion(client_id, form, endpoint)
        if "client_secret" in form:
            return self._check_secret(client_id, form["client_secret"], "client_secret_post")
        client = self._clients.get(client_id)
        if client is None or client.auth_method != "none":
            raise _invalid_client("client_auth", "client authentication failed")
        return client

    def _check_secret(self, client_id: str, secret: str, method: str) -> ClientRegistration:
        client = self._clients.get(client_id)
        if (
            client is None
            or client.auth_method != method
            or client.client_secret is None
            or not hmac.compare_digest(secret.encode(), client.client_secret.encode())
        ):
            raise _invalid_client("client_auth", "client authentication failed")
        return client

    def _check_assertion(
        self, client_id: str, form: Mapping[str, str], endpoint: str | None
    ) -> ClientRegistration:
        """RFC 7523 §3; the ``jti`` replay check catches a client reusing its assertion on the
        nonce retry (RFC 7523 §3 item 7)."""
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise _invalid_client("client_auth", "wrong client_assertion_type")
        try:
            header, claims, signature, signing_input = decode_jws(form["client_assertion"])
        except (ValueError, DPoPError) as e:
            raise _invalid_client("client_auth", "malformed client assertion") from e
        iss = claims.get("iss")
        client = self._clients.get(iss) if isinstance(iss, str) else None
        if client is None or client.auth_method != "private_key_jwt" or client.jwk is None:
            raise _invalid_client("client_auth", "unknown client")
        if client_id and client_id != client.client_id:
            raise _invalid_client("client_auth", "client_id does not match iss")
        alg = header.get("alg")
        try:
            if not isinstance(alg, str) or alg not in DEFAULT_ALGORITHMS:
                raise InvalidProofError("alg", "unsupported")
            verify_jws_signature(public_key_from_jwk(client.jwk), alg, signature, signing_input)
        except VerificationError as e:
            raise _invalid_client("assertion_signature", "bad assertion signature") from e
        now = self._now()
        exp, iat, jti = claims.get("exp"), claims.get("iat"), claims.get("jti")
        if claims.get("sub") != client.client_id:
            raise _invalid_client("assertion_claims", "sub must be the client_id")
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        audiences = {*self._audiences(), *((endpoint,) if endpoint else ())}
        if not any(isinstance(a, str) and a in audiences for a in auds):
            raise _invalid_client("assertion_claims", "wrong aud")
        # RFC 7523 §3 items 4-6: exp required, iat bounds the lifetime; both finite NumericDates
        # (the strict parser already refused NaN/Infinity; bool is not a number here).
        if not _numeric_date(exp) or not _numeric_date(iat):
            raise _invalid_client("assertion_claims", "exp and iat must be numbers")
        if exp < now - LEEWAY:
            raise _invalid_client("assertion_expired", "assertion expired")
        if iat > now + LEEWAY:
            raise _invalid_client("assertion_claims", "iat in the future")
        if not 0 < exp - iat <= self.max_assertion_lifetime:
            # The replay cache must remember a jti until exp: an absurd lifetime would let one
            # assertion pin an entry for years (or, negative, never be valid).
            raise _invalid_client(
                "assertion_lifetime",
                f"exp - iat must be within (0, {self.max_assertion_lifetime:g}] seconds",
            )
        nbf = claims.get("nbf")
        if nbf is not None and (not _numeric_date(nbf) or nbf > now + LEEWAY):
            raise _invalid_client("assertion_claims", "assertion not yet valid (nbf)")
        if not isinstance(jti, str) or not jti or len(jti) > 256:
            raise _invalid_client("assertion_claims", "jti missing or too long")
        if not self._assertion_replays.check_and_store(
            client.client_id + ":" + jti, float(exp) + 10, now
        ):
            raise _invalid_client("assertion_replay", "client assertion replayed")
        return client
