"""DPoP-bound access tokens for one client and one key: cache, renewal, single flight.

:class:`TokenClient` keeps the keyword API users know and builds the values of
:mod:`dpop_hsm.token_endpoint` from it: a :class:`~dpop_hsm.token_endpoint.Grant`
(client credentials unless one is given), a :class:`~dpop_hsm.token_endpoint.ClientAuth` and a
:class:`~dpop_hsm.token_endpoint.TokenEndpoint`. :meth:`TokenClient.acquire` hands out a cached
token or the one :class:`Renewal`, whose :meth:`~Renewal.flow` generator yields requests and
receives responses; the requests, httpx and aiohttp adapters drive it through their own session
or client, and :meth:`TokenClient.get_token` drives it with a private ``requests`` sender.

Renewal policy (documented defaults):

* ``renew_before``: a token is renewed once less than this many seconds of its lifetime remain.
  Default ``min(60 s, 10 % of the lifetime)``: 6 min tokens renew 36 s early, 1 h tokens 60 s
  early, 2 s tokens 0.2 s early. While one caller renews, others keep using the still-valid
  token instead of waiting.
* ``default_lifetime`` (300 s): used when the AS omits ``expires_in`` (RFC 6749 §5.1 makes it
  optional). Short on purpose: a resource server's ``invalid_token`` also forces a renewal.
* Lifetimes are measured from when the request was *sent*, on the monotonic clock, so wall
  clock jumps and network latency never make us use an expired token.
* A failed renewal while the token is still valid keeps that token (:meth:`Renewal.fallback`)
  and backs off (1 s, 2 s … 60 s) before contacting the failing AS again.

Single flight: one renewal at a time per client, however many threads ask (a renewal stampede
at the AS is what many clients get wrong); the async adapters add a per-event-loop lock so
asyncio tasks queue without blocking the loop.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from . import _fork
from .errors import ConfigurationError, DPoPError, RedirectError, TransportError
from .htu import require_https
from .nonces import NonceStore
from .proof import ProofFactory
from .sansio import HttpRequest, HttpResponse, Sender
from .secret_sources import SecretSource
from .signers.base import Signer
from .token_endpoint import (
    DEFAULT_LIFETIME,
    MAX_TOKEN_RESPONSE,
    AuthMethod,
    ClientAuth,
    ClientCredentialsGrant,
    Grant,
    PrivateKeyJwt,
    Token,
    TokenEndpoint,
    client_auth_for,
)

if TYPE_CHECKING:
    import requests as _requests

__all__ = [
    "DEFAULT_LIFETIME",
    "MAX_TOKEN_RESPONSE",
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

DEFAULT_TIMEOUT = (10.0, 10.0)


def timeout_pair(timeout: float | tuple[float, float]) -> tuple[float, float]:
    """A ``timeout`` option as the (connect, read) seconds requests takes: one number is both."""
    if isinstance(timeout, int | float):
        return (float(timeout), float(timeout))
    return (float(timeout[0]), float(timeout[1]))


@dataclass(frozen=True)
class CacheKey:
    """What a cached token is filed under: endpoint, client, scope, resource and key.

    The key's RFC 7638 thumbprint is part of the key (a token is useless with another key, RFC 9449
    §6), and nothing else about the key is: no key material ever reaches a cache.
    """

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
        _fork.register(self)  # re-armed in a forked child (a parent thread's lock or renewal)

    def _after_fork(self) -> None:
        """In a forked child: fresh locks (a parent thread may have held one at fork time)."""
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

    renewal_blocks = False
    """True when :meth:`renewal_flow` itself does blocking I/O (a shared cache's fleet lock),
    so async adapters advance it in a worker thread even for a signer that never blocks."""

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
        # An async adapter advances the flow in a worker thread; a cancelled task leaves the
        # block while that thread is still inside a step. ``_stepping`` says so (the flow
        # cannot be closed from outside then), ``_closed`` tells the step to close it itself,
        # ``_inner_closed`` that one thread has closed it (see _close_inner).
        self._state = threading.Lock()
        self._stepping = False
        self._closed = False
        self._inner_closed = False

    def flow(self) -> Generator[HttpRequest, HttpResponse, Token]:
        """Yield token requests, receive responses; return the new (cached) token.

        May return without yielding (a shared cache already holds a fresh token)."""
        client = self._client
        inner = self._inner = client.cache.renewal_flow(client, self.previous)
        try:
            request = self._step(inner, None)
            while True:
                request = self._step(inner, (yield request))
        except StopIteration as stop:
            token: Token = stop.value
        finally:
            self._close_inner()  # no-op once finished; else a shared cache's fleet lock goes now
        self._finish(token)
        return token

    def _step(
        self, inner: Generator[HttpRequest, HttpResponse, Token], response: HttpResponse | None
    ) -> HttpRequest:
        with self._state:
            if self._closed:
                raise TransportError("the token renewal was abandoned by its caller")
            self._stepping = True
        try:
            request = inner.send(response)  # type: ignore[arg-type] # None starts it
        finally:
            with self._state:
                self._stepping = False
                closed = self._closed
        if closed:  # the caller left during this step: release what the flow holds, here
            self._close_inner()
            raise TransportError("the token renewal was abandoned by its caller")
        return request

    def _close_inner(self) -> None:
        """Close the inner flow exactly once, and never while another thread executes it.

        Two threads may want to close it at the same moment (the worker's ``finally`` and the
        loop's ``__exit__``); a generator closed while it runs raises ``ValueError`` in one of
        them. The flag makes one thread the closer; while a step runs nobody closes it here,
        the stepping thread does when its step returns (it sees ``_closed``).
        """
        with self._state:
            inner = self._inner
            if inner is None or self._inner_closed or self._stepping:
                return
            self._inner_closed = True
        inner.close()

    def _finish(self, token: Token | None, *, failed: bool = True) -> None:
        with self._state:
            first, self._done = not self._done, True
        if first:
            self._client._finish_renewal(token, failed=failed)
        elif token is not None:  # fetched by a step its caller stopped waiting for
            self._client._adopt_late_token(token)

    def fallback(self, error: DPoPError) -> Token:
        """The one rule for a failed renewal: keep the still-valid previous token, else raise.

        A redirected token endpoint is never papered over: it is an attack or a
        misconfiguration (RFC 6749 §3.2 gives the token endpoint no redirects).
        """
        if isinstance(error, RedirectError):
            raise error
        previous = self.previous
        if previous is not None and previous.is_valid():
            log.warning("token renewal failed (%s); the current token stays in use", error.code)
            return previous
        raise error

    def __enter__(self) -> Renewal:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._state:
            self._closed = True  # from here on no step starts
        try:
            # A shared cache's fleet lock is released now, not at GC. While a worker thread
            # is inside a step (a cancelled asyncio task stopped waiting for it), the
            # generator cannot be closed from here: that step closes it when it returns.
            self._close_inner()
        finally:
            # The slot is free for the next caller either way. A caller that was cancelled
            # (asyncio, or httpx closing its auth flow) did not see the AS fail: no back-off.
            self._finish(None, failed=not _is_cancellation(exc_type))


def _is_cancellation(exc_type: type[BaseException] | None) -> bool:
    if exc_type is None:
        return False
    asyncio = sys.modules.get("asyncio")  # not loaded: no task exists that could be cancelled
    if asyncio is not None and issubclass(exc_type, asyncio.CancelledError):
        return True
    return issubclass(exc_type, GeneratorExit)


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


class TokenClient:
    """Fetches, caches and renews a DPoP-bound access token for one client and one key.

    Raises (from :meth:`get_token` and the adapters): :class:`OAuthError` for an OAuth error
    response, :class:`TokenResponseError` for 5xx / unusable bodies, :class:`TokenTypeError`
    when the AS did not issue a DPoP token, :class:`NonceError` when the AS keeps asking for a
    nonce, :class:`TransportError` when the AS cannot be reached, and
    :class:`InsecureEndpointError` / :class:`ConfigurationError` at construction for a
    non-loopback ``http://`` endpoint or a URL the transports would parse differently.

    ``grant`` and ``client_auth`` take the token-endpoint values directly (a login's
    authorization-code or refresh grant, say); without them the keyword arguments build a
    client-credentials grant and the client authentication ``auth_method`` names.
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
        grant: Grant | None = None,
        client_auth: ClientAuth | None = None,
    ) -> None:
        if not client_id or not isinstance(client_id, str):
            raise ConfigurationError("client_id must be a non-empty string")
        self.token_endpoint = require_https(token_endpoint, "token_endpoint")
        self.client_id = client_id
        self.proofs = proof_factory or ProofFactory(signer, clock_offset=clock_offset)
        if proof_factory is not None and proof_factory.thumbprint != signer.thumbprint:
            raise ConfigurationError("proof_factory signs with a different key than signer")
        self.signer = signer
        self.audience = audience or token_endpoint
        if client_auth is not None:
            if client_secret is not None or auth_method is not None:
                raise ConfigurationError("give client_auth, or client_secret/auth_method, not both")
            self.client_auth = client_auth
        else:
            self.client_auth = client_auth_for(
                auth_method,
                client_secret=client_secret,
                assertion_signer=assertion_signer or signer,
                audience=self.audience,
                assertion_kid=assertion_kid,
                assertion_lifetime=assertion_lifetime,
                clock_offset=clock_offset,
            )
        if grant is not None:
            if scope is not None or resource is not None or extra_params is not None:
                raise ConfigurationError("give grant, or scope/resource/extra_params, not both")
            self.grant = grant
        else:
            self.grant = ClientCredentialsGrant(
                scope=scope, resource=resource, extra_params=extra_params
            )
        self.scope: str | None = self.grant.scope
        self.resource: tuple[str, ...] = tuple(getattr(self.grant, "resource", ()))
        self.allow_bearer = allow_bearer
        self.timeout = timeout_pair(timeout)
        self.clock_offset = clock_offset
        self.cache = cache if cache is not None else TokenCache()
        # A shared cache may share nonces too, so a new worker needs no nonce round trip.
        self.nonces = nonce_store if nonce_store is not None else self.cache.nonce_store()
        self.endpoint = TokenEndpoint(
            self.token_endpoint,
            client_id=client_id,
            client_auth=self.client_auth,
            proofs=self.proofs,
            nonces=self.nonces,
            allow_bearer=allow_bearer,
            default_lifetime=default_lifetime,
            renew_before=renew_before,
        )
        self.renew_before = renew_before
        self.default_lifetime = default_lifetime
        self.cache_key = CacheKey(
            self.token_endpoint, client_id, self.scope, self.resource, signer.thumbprint
        )
        self._session = session
        self._own_session = False  # made by _default_sender (a caller's session stays theirs)
        self._cond = threading.Condition(threading.Lock())
        self._renewing = False
        self._failures = 0  # renewals failed in a row
        self._retry_at = 0.0  # monotonic time before which a valid token is not renewed again
        _fork.register(self)  # re-armed in a forked child (a parent thread's lock or renewal)

    def _after_fork(self) -> None:
        """In a forked child: no renewal is running (its thread stayed in the parent), and the
        private session's pooled sockets are the parent's (dropped, never closed)."""
        self._cond = threading.Condition(threading.Lock())
        self._renewing = False
        if self._own_session:
            self._session, self._own_session = None, False

    @property
    def auth_method(self) -> AuthMethod:
        return self.client_auth.method

    @property
    def renewal_blocks(self) -> bool:
        """Whether a renewal does blocking I/O besides signing (a shared cache's fleet lock,
        a login profile's file lock): async adapters then run it in a worker thread."""
        return bool(getattr(self.cache, "renewal_blocks", False))

    @property
    def token_requests(self) -> int:
        """Token requests sent (nonce retries included), for diagnostics and tests."""
        return self.endpoint.attempts

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
                got = self._acquire_locked()
                if got is not None:
                    return got
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransportError("timed out waiting for another token renewal")
                self._cond.wait(remaining)

    def wait_for_renewal(self, *, timeout: float | None = None) -> None:
        """Block until :meth:`try_acquire` would not return None, taking nothing.

        For event loops, which wait for another thread's renewal in a worker thread: a worker
        that took the :class:`Renewal` slot itself would hold it for good if the task that
        awaits it were cancelled meanwhile (nobody would exit the slot). This one only waits;
        the loop then calls :meth:`try_acquire` again. Same time limit as :meth:`acquire`.
        """
        limit = timeout if timeout is not None else 4 * sum(self.timeout) + 5
        deadline = time.monotonic() + limit
        with self._cond:
            while self._renewing:
                token = self.cache.get(self.cache_key)
                if token is not None and token.is_valid():
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransportError("timed out waiting for another token renewal")
                self._cond.wait(remaining)

    def try_acquire(self) -> Token | Renewal | None:
        """:meth:`acquire` without waiting: None while another caller renews and no valid
        token exists (an event loop then waits for it in a worker thread, not on the loop)."""
        with self._cond:
            return self._acquire_locked()

    def _acquire_locked(self) -> Token | Renewal | None:
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
            return Renewal(self, token if token is not None and token.is_valid(now) else None)
        if token is not None and token.is_valid(now):
            return token
        return None

    def _adopt_late_token(self, token: Token) -> None:
        """Keep a token whose renewal's caller stopped waiting, unless a newer one is cached."""
        with self._cond:
            current = self.cache.get(self.cache_key)
            if current is not None and current.expires_at >= token.expires_at:
                return
            self.cache.put(self.cache_key, token)
            self._failures = 0
            self._retry_at = 0.0
            self._cond.notify_all()

    def _finish_renewal(self, token: Token | None, *, failed: bool = True) -> None:
        with self._cond:
            if token is not None:
                self.cache.put(self.cache_key, token)
                self._failures = 0
                self._retry_at = 0.0
            elif not failed:
                pass  # abandoned by its caller: the slot is freed below, the back-off unchanged
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

    def get_token(self, send: Sender | None = None) -> Token:
        """A valid token, fetched through ``send`` (default: a private ``requests`` sender)."""
        got = self.acquire()
        if isinstance(got, Token):
            return got
        sender = send or self._default_sender()
        with got:
            try:
                return drive_flow(got.flow(), sender)
            except DPoPError as e:
                return got.fallback(e)

    def _default_sender(self) -> Sender:
        import requests

        from ._requests_sender import send_http_request

        if self._session is None:
            self._session = requests.Session()
            self._own_session = True
        session = self._session
        timeout = self.timeout

        def send(request: HttpRequest) -> HttpResponse:
            return send_http_request(session, request, timeout=timeout)

        return send

    # --- the sans-IO flow -----------------------------------------------------------------

    def token_flow(self) -> Generator[HttpRequest, HttpResponse, Token]:
        """One token fetch: at most one retry, for a nonce challenge (RFC 9449 §8)."""
        response = yield from self.endpoint.token_flow(self.grant)
        return response.token

    def token_request(self, *, nonce: str | None = None) -> HttpRequest:
        """The next token request: a fresh proof (and assertion); signs, so it may block."""
        pairs = [("grant_type", self.grant.grant_type), *self.grant.parameters()]
        stamp = self.client_auth.prepare(self.client_id)
        request, _ = self.endpoint.form_request(
            self.token_endpoint, pairs, stamp, nonce=nonce, secrets=self.grant.secrets()
        )
        return request

    def parse_response(
        self, response: HttpResponse, *, sent_monotonic: float, sent_wall: float
    ) -> Token:
        """A :class:`Token` from a token endpoint response, or the typed error it amounts to."""
        return self.endpoint.parse_response(
            response, sent_monotonic=sent_monotonic, sent_wall=sent_wall, scope=self.scope
        ).token

    def _client_assertion(self) -> str:
        """A fresh RFC 7523 assertion (tests use it to replay one at the local AS)."""
        auth = self.client_auth
        if not isinstance(auth, PrivateKeyJwt):
            auth = PrivateKeyJwt(
                self.signer, audience=self.audience, clock_offset=self.clock_offset
            )
        return auth.assertion(self.client_id)
