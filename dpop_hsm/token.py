"""DPoP-bound access tokens via client_credentials (RFC 6749 §4.4, RFC 9449 §5, §6, §8).

A sans-IO core. :meth:`TokenClient.token_request` builds an
:class:`~dpop_hsm.token_http.HttpRequest` (a fresh DPoP proof, and for ``private_key_jwt`` a
fresh RFC 7523 client assertion, on every attempt — pitfall 6, §7.3);
:meth:`TokenClient.parse_response` turns the answer into a :class:`Token` or a typed error;
:meth:`TokenClient.acquire` hands out a cached token or the one :class:`Renewal`, whose
:meth:`~Renewal.flow` generator yields requests and receives responses. The requests and httpx
adapters drive that generator through their own session or client;
:meth:`TokenClient.get_token` drives it with a plain ``requests`` session.

Renewal policy (documented defaults):

* ``renew_before``: a token is renewed once less than this many seconds of its lifetime remain.
  Default ``min(60 s, 10 % of the lifetime)``: 6 min tokens renew 36 s early, 1 h tokens 60 s
  early, 2 s tokens 0.2 s early. While one caller renews, others keep using the still-valid
  token instead of waiting.
* ``default_lifetime`` (300 s): used when the AS omits ``expires_in`` (RFC 6749 §5.1 makes it
  optional). Short on purpose: a resource server's ``invalid_token`` also forces a renewal.
* Lifetimes are measured from when the request was *sent*, on the monotonic clock, so wall
  clock jumps and network latency never make us use an expired token.

Single flight (pitfall 8): one renewal at a time per client, however many threads ask; the
httpx adapter adds a per-event-loop lock so asyncio tasks queue without blocking the loop.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote, urlencode

from .errors import (
    ConfigurationError,
    DPoPError,
    InsecureEndpointError,
    NonceError,
    OAuthError,
    TokenResponseError,
    TokenTypeError,
    TransportError,
)
from .htu import is_loopback_host, normalize_htu
from .jose import b64url_encode, compact_json
from .nonces import NonceStore, is_nonce_challenge
from .proof import ProofFactory
from .secret_sources import SecretSource, resolve_secret
from .signers.base import Signer
from .token_http import HttpRequest, HttpResponse

if TYPE_CHECKING:
    import requests as _requests

__all__ = [
    "AuthMethod",
    "CacheKey",
    "Renewal",
    "Token",
    "TokenCache",
    "TokenClient",
    "drive_flow",
    "require_https",
]

log = logging.getLogger("dpop_hsm.token")

AuthMethod = Literal["client_secret_basic", "client_secret_post", "private_key_jwt", "none"]
_AUTH_METHODS = ("client_secret_basic", "client_secret_post", "private_key_jwt", "none")
_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"  # RFC 7523 §2.2
_RESERVED_PARAMS = frozenset(
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
_SECRET_RESPONSE_FIELDS = frozenset({"access_token", "refresh_token", "id_token"})
MAX_TOKEN_RESPONSE = 1024 * 1024
DEFAULT_LIFETIME = 300.0
DEFAULT_TIMEOUT = (10.0, 10.0)


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
class CacheKey:
    """RFC 9449 pitfall 12: the key's thumbprint is part of the cache key; no key material."""

    token_endpoint: str
    client_id: str
    scope: str | None
    resource: tuple[str, ...]
    jkt: str


class TokenCache:
    """Tokens by :class:`CacheKey`; share one between clients that may ask for the same token.

    Bounded: beyond ``max_entries`` keys the least recently stored token is dropped (its client
    just fetches a new one), so a cache shared by many clients, scopes or resources stays small.
    """

    def __init__(self, *, max_entries: int = 1024) -> None:
        if max_entries < 1:
            raise ConfigurationError("max_entries must be positive")
        self._max = max_entries
        self._tokens: OrderedDict[CacheKey, Token] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: CacheKey) -> Token | None:
        return self._tokens.get(key)

    def put(self, key: CacheKey, token: Token) -> None:
        with self._lock:
            self._tokens[key] = token
            self._tokens.move_to_end(key)
            while len(self._tokens) > self._max:
                self._tokens.popitem(last=False)

    def discard(self, key: CacheKey, token: Token | None = None) -> None:
        """Drop ``key``; with ``token``, only if that exact token is still the cached one."""
        with self._lock:
            current = self._tokens.get(key)
            if current is not None and (token is None or current is token):
                del self._tokens[key]

    def __len__(self) -> int:
        return len(self._tokens)

    # Hooks for shared caches (dpop_hsm.shared_cache): a cache that several processes see
    # overrides these to renew once for all of them and to share the servers' nonces.

    def renewal_flow(
        self, client: TokenClient, previous: Token | None
    ) -> Generator[HttpRequest, HttpResponse, Token]:
        """The flow that gets ``client`` a new token; here: one fetch from the AS."""
        return client.token_flow()

    def nonce_store(self) -> NonceStore:
        """The nonce store for a client that was given none."""
        return NonceStore()


class Renewal:
    """The right (and duty) to fetch a new token: only one exists per client at a time.

    Use as a context manager around driving :meth:`flow`; leaving the block without a token
    (error, cancellation) frees the slot for the next caller.
    """

    def __init__(self, client: TokenClient, previous: Token | None) -> None:
        self._client = client
        self.previous = previous
        self._done = False
        self._inner: Generator[HttpRequest, HttpResponse, Token] | None = None

    def flow(self) -> Generator[HttpRequest, HttpResponse, Token]:
        """Yield token requests, receive responses; return the new (cached) token.

        May return without yielding (a shared cache already holds a fresh token)."""
        client = self._client
        self._inner = client.cache.renewal_flow(client, self.previous)
        token = yield from self._inner
        client._finish_renewal(token)
        self._done = True
        return token

    def __enter__(self) -> Renewal:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._inner is not None:
            self._inner.close()  # a shared cache's fleet lock is released now, not at GC
        if not self._done:
            self._done = True
            self._client._finish_renewal(None)


def drive_flow(
    flow: Generator[HttpRequest, HttpResponse, Token],
    send: Callable[[HttpRequest], HttpResponse],
) -> Token:
    """Run a sans-IO token flow with a blocking ``send``."""
    try:
        request = next(flow)  # a flow may finish at once (a shared cache had a fresh token)
        while True:
            request = flow.send(send(request))
    except StopIteration as stop:
        token: Token = stop.value
        return token


def _basic_credentials(client_id: str, secret: str) -> str:
    # RFC 6749 §2.3.1: both parts are form-urlencoded before Base64.
    pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")


def require_https(url: str, what: str) -> str:
    """``url`` unless it is plain http to a non-loopback host (InsecureEndpointError).

    Tokens and proofs over plain http can be read and replayed by anyone on the path; loopback
    is allowed for local test servers.
    """
    normalize_htu(url)  # raises ConfigurationError on junk
    if url.lower().startswith("https://"):
        return url
    if is_loopback_host(url):
        return url
    raise InsecureEndpointError(f"{what} must use https (plain http only for loopback): {url!r}")


class TokenClient:
    """Fetches, caches and renews a DPoP-bound access token for one client and one key.

    Raises (from :meth:`get_token` and the adapters): :class:`OAuthError` for an OAuth error
    response, :class:`TokenResponseError` for 5xx / unusable bodies, :class:`TokenTypeError`
    when the AS did not issue a DPoP token, :class:`NonceError` when the AS keeps asking for a
    nonce, :class:`TransportError` when the AS cannot be reached, and
    :class:`InsecureEndpointError` at construction for a non-loopback ``http://`` endpoint.
    """

    def __init__(
        self,
        signer: Signer,
        *,
        token_endpoint: str,
        client_id: str,
        client_secret: SecretSource | None = None,
        auth_method: AuthMethod | None = None,
        assertion_signer: Signer | None = None,
        assertion_kid: str | None = None,
        audience: str | None = None,
        assertion_lifetime: float = 60.0,
        scope: str | Sequence[str] | None = None,
        resource: str | Sequence[str] | None = None,
        extra_params: Mapping[str, str] | None = None,
        renew_before: float | None = None,
        default_lifetime: float = DEFAULT_LIFETIME,
        allow_bearer: bool = False,
        timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
        clock_offset: float = 0.0,
        nonce_store: NonceStore | None = None,
        proof_factory: ProofFactory | None = None,
        cache: TokenCache | None = None,
        session: _requests.Session | None = None,
    ) -> None:
        if not client_id or not isinstance(client_id, str):
            raise ConfigurationError("client_id must be a non-empty string")
        self.token_endpoint = require_https(token_endpoint, "token_endpoint")
        self.client_id = client_id
        method = auth_method or (
            "client_secret_basic" if client_secret is not None else "private_key_jwt"
        )
        if method not in _AUTH_METHODS:
            raise ConfigurationError(f"auth_method must be one of {', '.join(_AUTH_METHODS)}")
        if method in ("client_secret_basic", "client_secret_post") and client_secret is None:
            raise ConfigurationError(f"auth_method {method} needs client_secret")
        if method in ("private_key_jwt", "none") and client_secret is not None:
            raise ConfigurationError(f"auth_method {method} takes no client_secret")
        self.auth_method: AuthMethod = method
        self._client_secret = client_secret
        self.proofs = proof_factory or ProofFactory(signer, clock_offset=clock_offset)
        if proof_factory is not None and proof_factory.thumbprint != signer.thumbprint:
            raise ConfigurationError("proof_factory signs with a different key than signer")
        self.signer = signer
        self._assertion_signer = assertion_signer or signer
        self._assertion_kid = assertion_kid or self._assertion_signer.thumbprint
        self.audience = audience or token_endpoint
        if not 1 <= assertion_lifetime <= 3600:
            raise ConfigurationError("assertion_lifetime must be within 1..3600 seconds")
        self._assertion_lifetime = assertion_lifetime
        self._assertion_header = b64url_encode(
            compact_json(
                {"alg": self._assertion_signer.alg, "typ": "JWT", "kid": self._assertion_kid}
            )
        )
        if scope is not None and not isinstance(scope, str):
            scope = " ".join(scope)
        self.scope: str | None = scope or None
        if isinstance(resource, str):
            resource = (resource,)
        self.resource: tuple[str, ...] = tuple(resource or ())
        extra = dict(extra_params or {})
        clash = _RESERVED_PARAMS.intersection(extra)
        if clash:
            raise ConfigurationError(f"extra_params may not set {sorted(clash)}")
        self._extra_params = extra
        if renew_before is not None and renew_before < 0:
            raise ConfigurationError("renew_before must be >= 0")
        self.renew_before = renew_before
        if not default_lifetime > 0:
            raise ConfigurationError("default_lifetime must be positive")
        self.default_lifetime = default_lifetime
        self.allow_bearer = allow_bearer
        self.timeout: tuple[float, float] = (
            (float(timeout), float(timeout))
            if isinstance(timeout, int | float)
            else (float(timeout[0]), float(timeout[1]))
        )
        self.clock_offset = clock_offset
        self.cache = cache if cache is not None else TokenCache()
        self.nonces = nonce_store if nonce_store is not None else self.cache.nonce_store()
        self.cache_key = CacheKey(
            self.token_endpoint, client_id, self.scope, self.resource, signer.thumbprint
        )
        self._session = session
        self._cond = threading.Condition(threading.Lock())
        self._renewing = False
        self._failures = 0  # renewals failed in a row
        self._retry_at = 0.0  # monotonic time before which a valid token is not renewed again
        self.token_requests = 0  # attempts sent, for diagnostics and tests

    def __repr__(self) -> str:
        return (
            f"TokenClient(token_endpoint={self.token_endpoint!r}, client_id={self.client_id!r}, "
            f"auth_method={self.auth_method!r}, jkt={self.signer.thumbprint!r})"
        )

    # --- cache and single flight -----------------------------------------------------------

    def cached_token(self) -> Token | None:
        """The cached token if it is valid and not yet due for renewal (no locking)."""
        token = self.cache.get(self.cache_key)
        if token is not None and not token.needs_renewal():
            return token
        return None

    def acquire(self, *, timeout: float | None = None) -> Token | Renewal:
        """A usable token, or the single :class:`Renewal` slot when a new one must be fetched.

        Blocks (threads) while another caller renews and no valid token exists. A token that is
        due for renewal but still valid is returned to everyone but the one renewer.
        """
        limit = timeout if timeout is not None else 4 * sum(self.timeout) + 5
        deadline = time.monotonic() + limit
        with self._cond:
            while True:
                token = self.cache.get(self.cache_key)
                now = time.monotonic()
                if token is not None and not token.needs_renewal(now):
                    return token
                if token is not None and now < self._retry_at and token.is_valid(now):
                    # A renewal failed moments ago: keep using the valid token instead of
                    # contacting a failing AS again on every request (backoff below).
                    return token
                if not self._renewing:
                    self._renewing = True
                    return Renewal(self, token if token is not None and token.is_valid() else None)
                if token is not None and token.is_valid(now):
                    return token
                remaining = deadline - now
                if remaining <= 0:
                    raise TransportError("timed out waiting for another token renewal")
                self._cond.wait(remaining)

    def _finish_renewal(self, token: Token | None) -> None:
        with self._cond:
            if token is not None:
                self.cache.put(self.cache_key, token)
                self._failures = 0
                self._retry_at = 0.0
            else:
                # Exponential backoff (1 s, 2 s, 4 s … 60 s) for renewals while a still-valid
                # token exists; with no valid token, acquire() renews at once as before.
                self._failures += 1
                delay = min(60.0, float(2 ** min(self._failures - 1, 6)))
                self._retry_at = time.monotonic() + delay
            self._renewing = False
            self._cond.notify_all()

    def invalidate(self, token: Token | None = None) -> None:
        """Forget the cached token (all, or only ``token``): e.g. after an RS ``invalid_token``."""
        self.cache.discard(self.cache_key, token)

    def get_token(self, send: Callable[[HttpRequest], HttpResponse] | None = None) -> Token:
        """A valid token, fetched through ``send`` (default: a ``requests`` session) if needed."""
        got = self.acquire()
        if isinstance(got, Token):
            return got
        sender = send or self._default_sender()
        with got:
            try:
                return drive_flow(got.flow(), sender)
            except DPoPError:
                if got.previous is not None and got.previous.is_valid():
                    log.warning("token renewal failed; the current token stays in use")
                    return got.previous
                raise

    def _default_sender(self) -> Callable[[HttpRequest], HttpResponse]:
        import requests

        from .requests import send_http_request

        if self._session is None:
            self._session = requests.Session()
        session = self._session
        timeout = self.timeout

        def send(request: HttpRequest) -> HttpResponse:
            return send_http_request(session, request, timeout=timeout)

        return send

    # --- the sans-IO flow -----------------------------------------------------------------

    def token_flow(self) -> Generator[HttpRequest, HttpResponse, Token]:
        """One token fetch: at most one retry, for a nonce challenge (RFC 9449 §8)."""
        nonce = self.nonces.get(self.token_endpoint)
        for attempt in (1, 2):
            request = self.token_request(nonce=nonce)
            sent_mono, sent_wall = time.monotonic(), time.time()
            self.token_requests += 1
            response = yield request
            fresh = self.nonces.observe(self.token_endpoint, response.headers)
            if is_nonce_challenge(response.status, response.headers, response.body):
                if attempt == 2:
                    raise NonceError("the token endpoint rejected our nonce twice (RFC 9449 §8)")
                if fresh is None:
                    raise NonceError("use_dpop_nonce without a DPoP-Nonce header (RFC 9449 §8)")
                if fresh == nonce:
                    raise NonceError("the token endpoint handed back the nonce it just rejected")
                nonce = fresh
                continue
            return self.parse_response(response, sent_monotonic=sent_mono, sent_wall=sent_wall)
        raise AssertionError("unreachable")  # pragma: no cover

    def _client_assertion(self) -> str:
        """RFC 7523 §3: a new jti and iat for every attempt (pitfall 6)."""
        now = int(time.time() + self.clock_offset)
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.audience,
            "jti": b64url_encode(os.urandom(16)),
            "iat": now,
            "exp": now + int(self._assertion_lifetime),
        }
        signing_input = self._assertion_header + "." + b64url_encode(compact_json(claims))
        signature = self._assertion_signer.sign(signing_input.encode("ascii"))
        return signing_input + "." + b64url_encode(signature)

    def token_request(self, *, nonce: str | None = None) -> HttpRequest:
        """The next token request: a fresh proof (and assertion); signs, so it may block."""
        pairs: list[tuple[str, str]] = [("grant_type", "client_credentials")]
        if self.scope:
            pairs.append(("scope", self.scope))
        pairs += [("resource", r) for r in self.resource]  # RFC 8707 §2
        pairs += list(self._extra_params.items())
        headers: list[tuple[str, str]] = [
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Accept", "application/json"),
        ]
        method = self.auth_method
        if method in ("client_secret_basic", "client_secret_post"):
            secret = resolve_secret(self._client_secret, what="client_secret")
            if not secret:
                raise ConfigurationError("client_secret resolved to an empty value")
            if method == "client_secret_basic":
                headers.append(("Authorization", _basic_credentials(self.client_id, secret)))
            else:
                pairs += [("client_id", self.client_id), ("client_secret", secret)]
        elif method == "private_key_jwt":
            pairs += [
                ("client_id", self.client_id),
                ("client_assertion_type", _ASSERTION_TYPE),
                ("client_assertion", self._client_assertion()),
            ]
        else:
            pairs.append(("client_id", self.client_id))
        # RFC 9449 §5: every token request carries a proof; made last, right before sending.
        headers.append(("DPoP", self.proofs.create("POST", self.token_endpoint, nonce=nonce)))
        body = urlencode(pairs).encode("ascii")
        return HttpRequest("POST", self.token_endpoint, tuple(headers), body)

    def parse_response(
        self, response: HttpResponse, *, sent_monotonic: float, sent_wall: float
    ) -> Token:
        """A :class:`Token` from a token endpoint response, or the typed error it amounts to."""
        status = response.status
        if len(response.body) > MAX_TOKEN_RESPONSE:
            raise TokenResponseError(f"token response larger than {MAX_TOKEN_RESPONSE} bytes")
        parsed: Any = None
        try:
            parsed = json.loads(response.body) if response.body else None
        except (ValueError, UnicodeDecodeError, RecursionError):
            parsed = None
        if status >= 500:
            raise TokenResponseError(f"token endpoint failed with HTTP {status}")
        if 300 <= status < 400:
            raise TokenResponseError(f"token endpoint answered with a redirect (HTTP {status})")
        if status != 200:
            if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
                description = parsed.get("error_description")
                raise OAuthError(
                    "token request rejected",
                    error=parsed["error"],
                    error_description=description if isinstance(description, str) else None,
                    status=status,
                )
            raise TokenResponseError(f"token endpoint answered HTTP {status} without an error")
        if not isinstance(parsed, dict):
            raise TokenResponseError("token response is not a JSON object (RFC 6749 §5.1)")
        access_token = parsed.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise TokenResponseError("token response has no access_token string")
        if not access_token.isascii() or not access_token.isprintable() or " " in access_token:
            raise TokenResponseError("access_token has characters a header cannot carry")
        token_type = parsed.get("token_type")
        if not isinstance(token_type, str) or not token_type:
            raise TokenResponseError("token response has no token_type")
        # RFC 6749 §5.1 / RFC 9449 §5: case-insensitive; anything but DPoP is a downgrade.
        if token_type.lower() != "dpop" and not (
            self.allow_bearer and token_type.lower() == "bearer"
        ):
            raise TokenTypeError(
                f"token_type is {token_type[:20]!r}, not DPoP; refusing a silent downgrade"
            )
        lifetime = self._lifetime(parsed.get("expires_in"))
        renew_before = (
            self.renew_before if self.renew_before is not None else min(60.0, lifetime / 10)
        )
        renew_before = min(renew_before, lifetime)
        scope = parsed.get("scope")
        extra = {
            k: v
            for k, v in parsed.items()
            if k not in _SECRET_RESPONSE_FIELDS and isinstance(k, str)
        }
        return Token(
            access_token=access_token,
            token_type=token_type,
            expires_at=sent_monotonic + lifetime,
            renew_at=sent_monotonic + lifetime - renew_before,
            issued_at=sent_wall,
            lifetime=lifetime,
            jkt=self.signer.thumbprint,
            scope=scope if isinstance(scope, str) else self.scope,
            extra=MappingProxyType(extra),
        )

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
