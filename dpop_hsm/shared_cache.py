"""Token caches that many processes share: one token and one renewal per cache key per fleet.

A DPoP-bound token is useless without its private key (RFC 9449 §6), so processes that sign
with the same key (one HSM key, many workers) may share the token; the key itself is never
shared and no entry ever holds key material, a PIN or a client secret. A refresh token is
written only when the cache was created with ``share_refresh_tokens=True`` and the cached
token carries one; the tokens a :class:`~dpop_hsm.token.TokenClient` caches today come from
client_credentials, which issues no refresh token (RFC 6749 §4.4.3), so the option writes
nothing more yet. It is the opt-in for grants that will: off, a refresh token never reaches
the store whatever the grant.

:class:`SharedTokenCache` is the base of :class:`dpop_hsm.redis.RedisTokenCache` and
:class:`dpop_hsm.file_cache.FileTokenCache`. It is a :class:`~dpop_hsm.token.TokenCache`: every
process keeps the in-memory layer in front, so a cache hit never leaves the process, and the
client's in-process single flight stays in front of the fleet lock, so however many threads
wait, one thread per process and cache key renews through the shared store. It runs
:func:`renewal_flow`: read the shared entry; if it is stale, take the fleet lock, read again
(someone may have just renewed), then either adopt the shared token or fetch one and publish
it; while another process holds the lock, wait (bounded by its lease) for its token.

Degraded mode: the shared store is a cache, not a dependency. Any failure of it (down, frozen,
refusing) marks an outage: one WARNING on ``dpop_hsm.shared_cache``, then the store is skipped
for ``backoff`` seconds, so each request pays at most one operation timeout per back-off
period, and the client renews on its own (local cache, local single flight). The first
operation after the back-off probes the store again; an INFO says when sharing resumes.

Entries are JSON (:func:`encode_entry`) validated on every read (:func:`decode_entry`): a
corrupt or foreign entry — wrong cache key, a token bound to another key, a token type other
than DPoP, impossible times — is ignored and overwritten by the next renewal, never used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator
from dataclasses import replace
from types import TracebackType
from typing import Any, TypeVar

from .errors import ConfigurationError
from .htu import origin_of
from .nonces import NonceStore, is_valid_nonce
from .sansio import HttpRequest, HttpResponse
from .shared_entry import (
    MAX_ENTRY,
    MAX_LIFETIME,
    Decoded,
    decode_entry,
    digest,
    encode_entry,
    entry_id,
)
from .token import CacheKey, Token, TokenCache, TokenClient

__all__ = [
    "DEFAULT_BACKOFF",
    "LEASE_MARGIN",
    "MAX_ENTRY",
    "MAX_LEASE",
    "Decoded",
    "Outage",
    "SharedLock",
    "SharedNonceStore",
    "SharedTokenCache",
    "decode_entry",
    "encode_entry",
    "entry_id",
    "renewal_flow",
]

log = logging.getLogger("dpop_hsm.shared_cache")

DEFAULT_BACKOFF = 5.0  # seconds the store is skipped after a failure: sharing resumes <= ~10 s
LEASE_MARGIN = 2.0  # default lease: one token request's timeout (connect + read) plus this
MAX_LEASE = 600.0  # no lease is longer: a lock that is (or has no expiry) is not one of ours
_WAIT_SLACK = 0.05
T = TypeVar("T")


class Unavailable(Exception):  # noqa: N818 - internal signal, never leaves this package
    """The shared store is in an outage (failed just now, or being skipped)."""


# --- degraded mode ------------------------------------------------------------------------


class Outage:
    """Health of one shared store: skip it for ``backoff`` s after a failure; say so once.

    ``stats``: operations tried, failed and skipped, and outages begun — what tests and the
    bench read to show that a frozen store costs one timeout per back-off period, not one per
    request.
    """

    def __init__(self, what: str, *, backoff: float = DEFAULT_BACKOFF) -> None:
        if not 0 < backoff <= 300:
            raise ValueError("backoff must be within (0, 300] seconds")
        self.what = what
        self.backoff = backoff
        self._lock = threading.Lock()
        self._skip_until = 0.0
        self.down = False
        self.stats = {"ops": 0, "failures": 0, "skipped": 0, "outages": 0}

    def call(self, fn: Callable[..., T], *args: Any, errors: tuple[type[BaseException], ...]) -> T:
        """``fn(*args)``, or :class:`Unavailable` while skipping or when it raises ``errors``."""
        with self._lock:
            if time.monotonic() < self._skip_until:
                self.stats["skipped"] += 1
                raise Unavailable(self.what)
            self.stats["ops"] += 1
        try:
            result = fn(*args)
        except errors as e:
            self.failed(e)
            raise Unavailable(self.what) from e
        self.succeeded()
        return result

    def failed(self, error: BaseException) -> None:
        with self._lock:
            self.stats["failures"] += 1
            self._skip_until = time.monotonic() + self.backoff
            first = not self.down
            if first:
                self.down = True
                self.stats["outages"] += 1
        if first:
            # One WARNING per outage, not per request; the error class says why, never a URL
            # with a password in it.
            log.warning(
                "shared token cache %s unavailable (%s); using the local cache and renewing "
                "locally, retrying it every %g s",
                self.what,
                type(error).__name__,
                self.backoff,
            )
        else:
            log.debug("shared token cache %s still unavailable (%s)", self.what, type(error))

    def succeeded(self) -> None:
        if not self.down:
            return
        with self._lock:
            recovered, self.down = self.down, False
        if recovered:
            log.info("shared token cache %s reachable again; sharing resumed", self.what)


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def run_off_loop(fn: Callable[[], object]) -> None:
    """Run ``fn`` now, or in a short-lived thread when called on a running event loop.

    Releasing a lock can happen on the loop (a ``Renewal`` left by an error or cancellation
    in an async adapter); a blocking network call must never run there.
    """
    if not _on_event_loop():
        fn()
        return
    threading.Thread(target=fn, name="dpop_hsm-shared-cache", daemon=True).start()


# --- the lock -----------------------------------------------------------------------------


class SharedLock:
    """The fleet-wide renewal lock of one cache key, as one attempt to take it found it.

    ``held``: we own it (publish or release it); ``available``: False when the store is in an
    outage (renew locally); ``lease_left``: seconds until a busy lock's lease ends; ``holder``:
    who holds a busy lock, where the store knows; ``current``: the entry read in the same step
    (the re-read after taking the lock).
    Subclasses implement :meth:`_publish`, :meth:`_release` and :meth:`_extend`.
    """

    def __init__(
        self,
        cache: SharedTokenCache,
        key: CacheKey,
        *,
        held: bool,
        available: bool = True,
        lease_left: float = 0.0,
        holder: str | None = None,
        current: Token | None = None,
    ) -> None:
        self.cache, self.key = cache, key
        self.held, self.available = held, available
        self.lease_left, self.holder, self.current = lease_left, holder, current

    def publish(self, token: Token) -> None:
        """Store ``token`` for the fleet, wake the waiters and release the lock (best effort)."""
        raw = self.cache._encode(self.key, token)
        held, self.held = self.held, False
        try:
            if raw is None:
                if held:
                    self.cache._guard(self._release)
                return
            self.cache._guard(self._publish, raw, _ttl(token), held)
            self.cache._remember(self.key, token, raw)
        except Unavailable:
            pass

    def extend(self) -> None:
        """Renew the lease before another attempt (the nonce retry), if we still own it."""
        if self.held:
            with contextlib.suppress(Unavailable):
                self.cache._guard(self._extend)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False

        def release() -> None:
            with contextlib.suppress(Unavailable):  # if it fails, the lease ends it
                self.cache._guard(self._release)

        run_off_loop(release)

    def _publish(self, raw: bytes, ttl: float, release: bool) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def _extend(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> SharedLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


# --- the cache ----------------------------------------------------------------------------


class SharedTokenCache(TokenCache):
    """A :class:`TokenCache` whose entries other processes see; see the module docstring.

    Subclasses provide the store: :meth:`_read`, :meth:`_write`, :meth:`_delete`,
    :meth:`lock`, :meth:`wait_for_update`, :meth:`_read_nonce`, :meth:`_write_nonce`, and
    ``_errors`` (the exceptions that mean "store unavailable").
    """

    _errors: tuple[type[BaseException], ...] = (OSError,)

    def __init__(
        self,
        *,
        what: str,
        lease: float | None = None,
        backoff: float = DEFAULT_BACKOFF,
        share_refresh_tokens: bool = False,
        share_nonces: bool = False,
        max_entries: int = 1024,
        poll_interval: float = 0.02,
    ) -> None:
        """The options every shared cache has; bad values are a ConfigurationError."""
        super().__init__(max_entries=max_entries)
        if lease is not None and not 0.1 <= lease <= MAX_LEASE:
            raise ConfigurationError(f"lease must be within [0.1, {MAX_LEASE:g}] seconds")
        if not 0.001 <= poll_interval <= 5:
            raise ConfigurationError("poll_interval must be within [0.001, 5] seconds")
        self.lease = lease
        self.poll_interval = poll_interval
        self.share_refresh_tokens = share_refresh_tokens
        self.share_nonces = share_nonces
        try:
            self.outage = Outage(what, backoff=backoff)
        except ValueError as e:
            raise ConfigurationError(str(e)) from e
        self._meta = threading.Lock()
        self._known: OrderedDict[CacheKey, tuple[Token, bytes]] = OrderedDict()
        self._rejected: OrderedDict[CacheKey, str] = OrderedDict()
        self._complained: set[str] = set()

    def _after_fork(self) -> None:
        super()._after_fork()
        self._meta = threading.Lock()
        self.outage._lock = threading.Lock()

    # --- store primitives (subclasses) ----------------------------------------------------

    def _read(self, key: CacheKey) -> tuple[bytes, float | None] | str | None:
        """The raw entry and the lifetime the store says is left (None: use the wall clock);
        a string says why what the store holds there is not an entry (wrong type, no TTL…)."""
        raise NotImplementedError

    def _write(self, key: CacheKey, raw: bytes, ttl: float) -> None:
        raise NotImplementedError

    def _delete(self, key: CacheKey, expected: bytes | None) -> None:
        """Delete the entry (only if it still is ``expected``, when given)."""
        raise NotImplementedError

    def lock(self, key: CacheKey, lease: float) -> SharedLock:
        """Try once to take the fleet lock of ``key`` for ``lease`` seconds."""
        raise NotImplementedError

    def wait_for_update(self, key: CacheKey, timeout: float) -> Token | None:
        """Block up to ``timeout`` s until the entry holds a token not due for renewal or the
        lock is free; return the entry's token then (None: none, or unavailable)."""
        raise NotImplementedError

    def _read_nonce(self, origin: str) -> str | None:
        raise NotImplementedError

    def _write_nonce(self, origin: str, nonce: str) -> None:
        raise NotImplementedError

    # --- shared operations ----------------------------------------------------------------

    def _guard(self, fn: Callable[..., T], *args: Any) -> T:
        return self.outage.call(fn, *args, errors=self._errors)

    def _encode(self, key: CacheKey, token: Token) -> bytes | None:
        refresh = getattr(token, "refresh_token", None) if self.share_refresh_tokens else None
        try:
            return encode_entry(key, token, refresh_token=refresh)
        except ValueError as e:
            log.debug("token not shared: %s", e)
            return None

    def _accept(self, key: CacheKey, got: tuple[bytes, float | None] | str) -> Token | None:
        """Validate what :meth:`_read` got; a corrupt or foreign entry is reported once and
        ignored (the next renewal overwrites it)."""
        try:
            if isinstance(got, str):
                raise ValueError(got)
            raw, remaining = got
            decoded = decode_entry(
                key, raw, remaining=remaining, accept_refresh_token=self.share_refresh_tokens
            )
        except ValueError as e:
            name = entry_id(key)
            if name not in self._complained:
                self._complained.add(name)
                log.warning("ignoring a corrupt or foreign shared token entry: %s", e)
            return None
        if decoded is None:
            return None
        token = decoded.token
        if decoded.refresh_token is not None and "refresh_token" in Token.__dataclass_fields__:
            fields: dict[str, Any] = {"refresh_token": decoded.refresh_token}
            token = replace(token, **fields)
        with self._meta:
            if self._rejected.get(key) == digest(token.access_token):
                return None  # a resource server refused it here: never adopt it again
        self._remember(key, token, raw)
        return token

    def _remember(self, key: CacheKey, token: Token, raw: bytes) -> None:
        with self._meta:
            self._known[key] = (token, raw)
            self._known.move_to_end(key)
            while len(self._known) > self._max:
                self._known.popitem(last=False)

    def load(self, key: CacheKey) -> Token | None:
        """The fleet's token for ``key`` (validated), or None: absent, expired, corrupt, down."""
        try:
            got = self._guard(self._read, key)
        except Unavailable:
            return None
        return None if got is None else self._accept(key, got)

    def store(self, key: CacheKey, token: Token) -> None:
        """Publish ``token`` without the lock (best effort; never raises)."""
        raw = self._encode(key, token)
        if raw is None:
            return
        try:
            self._guard(self._write, key, raw, _ttl(token))
        except Unavailable:
            return
        self._remember(key, token, raw)

    # --- TokenCache interface -------------------------------------------------------------

    def put(self, key: CacheKey, token: Token) -> None:
        """Cache locally; publish too, unless the token came from (or went to) the store."""
        super().put(key, token)
        with self._meta:
            known = self._known.get(key)
        if known is None or known[0] is not token:
            self.store(key, token)

    def discard(self, key: CacheKey, token: Token | None = None) -> None:
        """Forget locally; delete the shared entry when it holds ``token`` (or any, without).

        A token discarded after a resource server's ``invalid_token`` is never adopted from
        the store again by this process, even if deleting it failed.
        """
        super().discard(key, token)
        with self._meta:
            known = self._known.get(key)
            if token is not None:
                self._rejected[key] = digest(token.access_token)
                while len(self._rejected) > self._max:
                    self._rejected.popitem(last=False)
        if token is None:
            expected = None
        elif known is not None and known[0].access_token == token.access_token:
            expected = known[1]
        else:
            return  # the store does not hold that token, as far as this process knows

        def delete() -> None:
            with contextlib.suppress(Unavailable):
                self._guard(self._delete, key, expected)

        run_off_loop(delete)

    renewal_blocks = True  # takes and waits for the fleet lock over the network

    def renewal_flow(
        self, client: TokenClient, previous: Token | None
    ) -> Generator[HttpRequest, HttpResponse, Token]:
        lease = self.lease if self.lease is not None else sum(client.timeout) + LEASE_MARGIN
        return renewal_flow(self, client, lease=lease)

    def nonce_store(self) -> NonceStore:
        return SharedNonceStore(self) if self.share_nonces else NonceStore()


# --- the renewal --------------------------------------------------------------------------


def _ttl(token: Token) -> float:
    """The store TTL of ``token``'s entry: its remaining life, within :data:`MAX_LIFETIME`."""
    return min(token.expires_in(), MAX_LIFETIME)


def _fresh(token: Token | None) -> Token | None:
    return token if token is not None and not token.needs_renewal() else None


def renewal_flow(
    shared: SharedTokenCache, client: TokenClient, *, lease: float
) -> Generator[HttpRequest, HttpResponse, Token]:
    """Get ``client`` a token renewed at most once per fleet (see the module docstring).

    Runs in the one thread of this process that holds the client's renewal slot. Waiting for
    another process is bounded by about one lease; after that, or while the store is down,
    the token is fetched here (and published if the store takes it). Raises what the token
    flow raises; store failures never raise.
    """
    key = client.cache_key
    token = _fresh(shared.load(key))
    if token is not None:
        return token
    deadline = time.monotonic() + lease + 1.0
    holder: str | None = None
    took_over = False
    while True:
        with shared.lock(key, lease) as lock:
            if lock.held:
                token = _fresh(lock.current)  # re-read after taking the lock
                if token is not None:
                    return token
                token = yield from _fetch(client, lock)
                lock.publish(token)
                return token
            if not lock.available:
                break
            wait = lock.lease_left
            if lock.holder != holder:
                if holder is not None and not took_over:
                    # The holder we waited for died (its lease ran out) and another process
                    # took over: wait for that one's token too, once, rather than fetch one
                    # more ourselves.
                    took_over = True
                    deadline = max(deadline, time.monotonic() + wait + 1.0)
                holder = lock.holder
        left = deadline - time.monotonic()
        if left <= 0:
            break
        token = _fresh(shared.wait_for_update(key, min(left, wait + _WAIT_SLACK)))
        if token is not None:
            return token
    token = yield from client.token_flow()
    shared.store(key, token)
    return token


def _fetch(client: TokenClient, lock: SharedLock) -> Generator[HttpRequest, HttpResponse, Token]:
    """The client's token flow, extending the lease before every attempt after the first."""
    flow = client.token_flow()
    try:
        request = next(flow)
        while True:
            response = yield request
            request = flow.send(response)
            lock.extend()
    except StopIteration as stop:
        token: Token = stop.value
        return token


# --- nonces -------------------------------------------------------------------------------


class SharedNonceStore(NonceStore):
    """A :class:`NonceStore` that also reads and writes the servers' nonces in a shared store,
    so a new process's first request already carries a current nonce (RFC 9449 §8, §9).

    Nonces are not secrets (servers send them in clear on every response). The store is read
    only on a local miss, at most once per origin every ``recheck`` seconds, and written only
    when a server hands out a nonce this process had not seen.
    """

    def __init__(
        self, cache: SharedTokenCache, *, max_origins: int = 1024, recheck: float = 30.0
    ) -> None:
        super().__init__(max_origins=max_origins)
        self._cache = cache
        self._recheck = recheck
        self._checked: OrderedDict[str, float] = OrderedDict()
        self._guard_lock = threading.Lock()

    def _after_fork(self) -> None:
        super()._after_fork()
        self._guard_lock = threading.Lock()

    def get(self, url: str) -> str | None:
        nonce = super().get(url)
        if nonce is not None:
            return nonce
        origin = origin_of(url)
        if not self._due(origin):
            return None
        if _on_event_loop():
            # Never a network read on an event loop: fetch in the background, so the next
            # request has the fleet's nonce; this one costs at most a nonce round trip.
            run_off_loop(lambda: self._read(url, origin))
            return None
        return self._read(url, origin)

    def _due(self, origin: str) -> bool:
        """Whether the store may be asked for ``origin``'s nonce now (once per ``recheck``)."""
        now = time.monotonic()
        with self._guard_lock:
            checked = self._checked.get(origin)
            if checked is not None and now - checked < self._recheck:
                return False
            self._checked[origin] = now
            self._checked.move_to_end(origin)
            while len(self._checked) > self._max:
                self._checked.popitem(last=False)
        return True

    def _read(self, url: str, origin: str) -> str | None:
        try:
            shared = self._cache._guard(self._cache._read_nonce, origin)
        except Unavailable:
            return None
        if shared is None or not is_valid_nonce(shared):
            return None
        super().put(url, shared)
        return shared

    def put(self, url: str, nonce: str) -> None:
        seen = super().get(url)
        super().put(url, nonce)
        if seen != nonce:
            origin = origin_of(url)

            def publish() -> None:
                with contextlib.suppress(Unavailable):
                    self._cache._guard(self._cache._write_nonce, origin, nonce)

            run_off_loop(publish)
