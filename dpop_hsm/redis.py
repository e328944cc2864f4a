"""A Redis token cache for fleets: one token and one renewal per cache key across processes.

``RedisTokenCache.from_url("redis://…", prefix="dpop_hsm:")`` (or ``RedisTokenCache(client)``)
is passed as ``TokenClient(…, cache=…)``. What it stores, per cache key (token endpoint,
client, scope, resource, jkt): the access token, its type, scope, lifetime and the non-secret
members of the token response, with the key's TTL set to the token's remaining lifetime —
never key material, a PIN or a client secret; a refresh token only with
``share_refresh_tokens=True``. Readers take the remaining lifetime from Redis' own clock
(``PTTL``), so hosts whose clocks disagree still agree on when a token expires.

Single flight across processes (the documented single-instance Redis lock): ``SET lock owner
NX PX lease`` with a random owner; released only by its owner (compare-and-delete in a Lua
script); the new token is stored, the lock released and the waiters woken (``PUBLISH``) in one
script. Waiters block on a pub/sub subscription, or poll where pub/sub is refused, bounded by
the holder's lease: a holder that dies mid-renewal costs the fleet at most one lease. The
default lease is one token request's timeout (connect + read) plus 2 s, renewed before a
nonce retry; a lease shorter than the AS's response time only risks a second token request.

Whatever else is found under these names is untrusted and never an outage: every read is a
script that returns a value only if it is a string of at most ``MAX_ENTRY`` ASCII bytes with a
TTL (anything else is reported once and overwritten, without being transferred), and a lock
without an expiry, or longer than any lease, gets one lease (a foreign ``SET`` without ``PX``
would otherwise stall every renewal for good). Pub/sub messages only wake waiters to re-read.

Degraded mode (see :mod:`dpop_hsm.shared_cache`): with the defaults of :meth:`from_url` — a
0.5 s timeout per operation, no client-side retries, 5 s of skipping Redis after a failure —
a down, frozen or refusing Redis adds at most one operation timeout to a request per back-off
period, and sharing resumes within about 10 s of its recovery. A ``redis.Redis`` passed in
directly keeps its own timeouts and retries: give it ``socket_timeout``/``socket_connect_timeout``
and ``retry=Retry(NoBackoff(), 0)`` for the same bound. A ``redis.asyncio.Redis`` lends its
timeouts to the cache's twin of it (below), whose retries are already off: give the async client
the same timeouts.

Asyncio: the cache talks to Redis through redis-py's *synchronous* client on purpose. Nothing
on an event loop touches Redis: ``get()`` (the cache hit) reads only the in-process layer, and
the renewal flow, invalidation and nonce look-ups run where the async adapters already run
every step that may block (a worker thread, ``anyio.to_thread``); a lock release that happens
on the loop (an error or cancellation) is handed to a thread. An application that holds a
``redis.asyncio.Redis`` passes it as it is: ``RedisTokenCache(async_client)`` builds a
synchronous twin on a pool of its own with the same connection settings (server, TLS or unix
socket, db, credentials, timeouts) and never uses the async client or its pool, which belong to
the loop: count one more pool of connections. The twin's retries are off unless the async
client was given a retry policy of its own; settings that cannot be copied faithfully (cluster,
Sentinel, custom connection classes, an async-only credential provider) are refused with
:class:`ConfigurationError`. See :mod:`dpop_hsm._redis_twin` for the details.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from typing import TYPE_CHECKING, Any

from ._optional import requires_extra
from ._redis_twin import sync_twin
from .errors import ConfigurationError
from .shared_cache import (
    DEFAULT_BACKOFF,
    MAX_ENTRY,
    MAX_LEASE,
    SharedLock,
    SharedTokenCache,
    Unavailable,
    entry_id,
)
from .shared_entry import store_json
from .strict_json import loads_strict
from .token import CacheKey, Token

with requires_extra("redis"):
    import redis
    import redis.asyncio
    import redis.asyncio.cluster
    import redis.cluster
    from redis.backoff import NoBackoff
    from redis.retry import Retry

if TYPE_CHECKING:
    from redis.client import PubSub

__all__ = ["DEFAULT_OP_TIMEOUT", "RedisTokenCache"]

DEFAULT_OP_TIMEOUT = 0.5
_log = logging.getLogger("dpop_hsm.redis")
_SLOW_TIMEOUT = 2.0  # seconds: a socket timeout above it is warned about (see __init__)
DEFAULT_PREFIX = "dpop_hsm:"
NONCE_TTL_MS = 300_000
_PUBSUB_RETRY = 300.0  # seconds before trying pub/sub again after the server refused it

# Every script treats what it finds under our names as untrusted: a key of another type, a
# value too large or not ASCII, a lock without an expiry are someone else's writes, which are
# reported, replaced or run out, and never make a command fail (that would read as an outage
# and switch sharing off for good). Replies hold only ASCII, for clients that decode replies.
_LUA_HELPERS = """
local function string_value(k)
  if redis.call('TYPE', k)['ok'] == 'string' then return redis.call('GET', k) end
  return false
end
local function entry(k, max)
  local t = redis.call('TYPE', k)['ok']
  if t == 'none' then return {'none', false, -2} end
  local ttl = redis.call('PTTL', k)
  if t ~= 'string' then return {'type', false, ttl} end
  if redis.call('STRLEN', k) > max then return {'big', false, ttl} end
  local v = redis.call('GET', k)
  if string.find(v, '[\\128-\\255]') then return {'binary', false, ttl} end
  return {'ok', v, ttl}
end
"""
# KEYS[1] entry (or nonce), KEYS[2] lock (optional); ARGV[1] the largest value read.
# {status, value, pttl[, lock exists]}.
_READ = (
    _LUA_HELPERS
    + """
local r = entry(KEYS[1], tonumber(ARGV[1]))
if KEYS[2] then r[4] = redis.call('EXISTS', KEYS[2]) end
return r
"""
)
# KEYS[1] lock, KEYS[2] entry; ARGV[1] owner, ARGV[2] lease ms, ARGV[3] longest lease ms,
# ARGV[4] largest entry. SET NX PX, then who holds it for how long, and the entry (the re-read
# after taking it), in one step. A lock without expiry, or longer than any lease, is a foreign
# SET that would stall the fleet for good: it gets our lease, so it ends within one lease.
_ATTEMPT = (
    _LUA_HELPERS
    + """
local got = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -1 or ttl > tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  ttl = tonumber(ARGV[2])
end
local holder = string_value(KEYS[1])
if not holder or #holder > 80 or not string.match(holder, '^[%w:]+$') then holder = 'foreign' end
local r = entry(KEYS[2], tonumber(ARGV[4]))
return {got, holder, ttl, r[1], r[2], r[3]}
"""
)
# KEYS[1] lock; ARGV[1] owner, ARGV[2] channel. Compare-and-delete: a lock whose lease ended
# and that another process took since is never deleted by its former owner.
_RELEASE = (
    _LUA_HELPERS
    + """
if string_value(KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.pcall('PUBLISH', ARGV[2], 'released')
  return 1
end
return 0
"""
)
# KEYS[1] entry, KEYS[2] lock; ARGV[1] value, ARGV[2] ttl ms, ARGV[3] owner ('' = none),
# ARGV[4] channel. Store, release our lock, wake the waiters: one round trip.
_PUBLISH = (
    _LUA_HELPERS
    + """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if ARGV[3] ~= '' and string_value(KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
end
redis.pcall('PUBLISH', ARGV[4], 'stored')
return 1
"""
)
# KEYS[1] lock; ARGV[1] owner, ARGV[2] lease ms.
_EXTEND = (
    _LUA_HELPERS
    + """
if string_value(KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
)
# KEYS[1] entry; ARGV[1] the value that may be deleted.
_DELETE_IF = (
    _LUA_HELPERS
    + """
if string_value(KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
)
_FOREIGN = {
    "type": "entry is not a string value",
    "big": "entry too large",
    "binary": "entry is not ASCII",
}
_MAX_NONCE_VALUE = 8192


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class _RedisLock(SharedLock):
    cache: RedisTokenCache

    def __init__(self, cache: RedisTokenCache, key: CacheKey, owner: str, lease: float, **kw: Any):
        super().__init__(cache, key, **kw)
        self.owner, self.lease = owner, lease

    def _publish(self, raw: bytes, ttl: float, release: bool) -> None:
        c, name = self.cache, entry_id(self.key)
        owner = self.owner if release else ""
        c._publish_script(
            keys=[c._entry_name(name), c._lock_name(name)],
            args=[raw, _ms(ttl), owner, c._channel_name(name)],
        )

    def _release(self) -> None:
        c, name = self.cache, entry_id(self.key)
        c._release_script(keys=[c._lock_name(name)], args=[self.owner, c._channel_name(name)])

    def _extend(self) -> None:
        c = self.cache
        c._extend_script(
            keys=[c._lock_name(entry_id(self.key))], args=[self.owner, _ms(self.lease)]
        )


class RedisTokenCache(SharedTokenCache):
    """Tokens shared through Redis, renewed once per fleet; see the module docstring.

    ``prefix`` namespaces every key (one per deployment); ``lease`` (s) overrides the default
    lease; ``backoff`` (s) is how long Redis is skipped after a failure; ``poll_interval`` (s)
    paces waiters where pub/sub is refused.

    ``client`` is a ``redis.Redis``, used as it is (``close()`` closes it), or a
    ``redis.asyncio.Redis``, for which the cache builds and owns a synchronous twin with the
    same connection settings and connections of its own (``close()`` closes the twin; the async
    client stays the application's to close), because the cache calls Redis from worker
    threads, never on the event loop.

    Raises :class:`ConfigurationError` for bad options, a cluster client, or an asyncio client
    whose settings cannot be copied (the message names the setting, never its value), and
    :class:`MissingDependencyError` without the ``redis`` extra.
    """

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = DEFAULT_PREFIX,
        lease: float | None = None,
        backoff: float = DEFAULT_BACKOFF,
        share_refresh_tokens: bool = False,
        share_nonces: bool = False,
        poll_interval: float = 0.05,
        max_entries: int = 1024,
    ) -> None:
        if isinstance(client, (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster)):
            raise ConfigurationError(
                "RedisTokenCache needs one Redis server, not a RedisCluster client: pass a "
                "redis.Redis or redis.asyncio.Redis for the server that holds the cache"
            )
        if isinstance(client, redis.asyncio.Redis):
            client = sync_twin(client)  # the cache's own connections: see the module docstring
        if not isinstance(client, redis.Redis):
            raise ConfigurationError("client must be a redis.Redis or redis.asyncio.Redis instance")
        if not isinstance(prefix, str) or not prefix.isprintable() or len(prefix) > 200:
            raise ConfigurationError("prefix must be a printable string of at most 200 chars")
        kwargs = client.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
        bounds = [kwargs.get("socket_timeout"), kwargs.get("socket_connect_timeout")]
        if any(b is None or b > _SLOW_TIMEOUT for b in bounds):
            # A frozen Redis holds a renewing request for one socket timeout per operation
            # before the degraded mode starts: redis-py's 5 s default (none at all before 8.0)
            # breaks the promise that Redis adds under 2 s to any one request. Said once.
            _log.warning(
                "the Redis client for the token cache (redis at %s) allows socket timeouts over "
                "%.0f s (%s): a frozen Redis would stall token renewals that long; "
                "RedisTokenCache.from_url uses %.1f s",
                where,
                _SLOW_TIMEOUT,
                "socket_timeout, socket_connect_timeout = " + ", ".join(map(str, bounds)),
                DEFAULT_OP_TIMEOUT,
            )
        super().__init__(
            what=f"redis at {where}",
            lease=lease,
            backoff=backoff,
            share_refresh_tokens=share_refresh_tokens,
            share_nonces=share_nonces,
            max_entries=max_entries,
            poll_interval=poll_interval,
        )
        self._errors = (redis.RedisError, OSError)
        self.client = client
        self.prefix = prefix
        self._pubsub_refused_at: float | None = None
        self._read_script = client.register_script(_READ)
        self._attempt_script = client.register_script(_ATTEMPT)
        self._release_script = client.register_script(_RELEASE)
        self._publish_script = client.register_script(_PUBLISH)
        self._extend_script = client.register_script(_EXTEND)
        self._delete_script = client.register_script(_DELETE_IF)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        op_timeout: float = DEFAULT_OP_TIMEOUT,
        backoff: float = DEFAULT_BACKOFF,
        lease: float | None = None,
        share_refresh_tokens: bool = False,
        share_nonces: bool = False,
    ) -> RedisTokenCache:
        """A cache on a new client for ``url`` (``redis://``, ``rediss://``, ``unix://``).

        ``op_timeout`` bounds every connect and every command; redis-py's own retries are off
        so a frozen server costs one timeout, after which Redis is skipped for ``backoff`` s.
        """
        if not 0.01 <= op_timeout <= 10:
            raise ConfigurationError("op_timeout must be within [0.01, 10] seconds")
        try:
            client = redis.Redis.from_url(
                url,
                socket_timeout=op_timeout,
                socket_connect_timeout=op_timeout,
                retry=Retry(NoBackoff(), 0),
                health_check_interval=0,
            )
        except ValueError as e:  # the URL itself; its text may hold a password: not shown
            raise ConfigurationError("not a usable Redis URL (redis://, rediss://, unix://)") from e
        return cls(
            client,
            prefix=prefix,
            lease=lease,
            backoff=backoff,
            share_refresh_tokens=share_refresh_tokens,
            share_nonces=share_nonces,
        )

    def close(self) -> None:
        """Close the client's connections (a cache from :meth:`from_url` owns its client, and a
        cache given a ``redis.asyncio.Redis`` its synchronous twin; the async client is left
        open)."""
        self.client.close()

    def __repr__(self) -> str:
        return f"RedisTokenCache({self.outage.what}, prefix={self.prefix!r})"

    # --- names: one hash tag per cache key keeps entry and lock in one cluster slot --------

    def _entry_name(self, name: str) -> str:
        return f"{self.prefix}token:{{{name}}}"

    def _lock_name(self, name: str) -> str:
        return f"{self.prefix}lock:{{{name}}}"

    def _channel_name(self, name: str) -> str:
        return f"{self.prefix}updated:{{{name}}}"

    def _nonce_name(self, origin: str) -> str:
        return f"{self.prefix}nonce:{hashlib.sha256(origin.encode('utf-8')).hexdigest()}"

    # --- store primitives -----------------------------------------------------------------

    def _read(self, key: CacheKey) -> tuple[bytes, float | None] | str | None:
        status, raw, pttl = self._read_script(
            keys=[self._entry_name(entry_id(key))], args=[MAX_ENTRY]
        )
        return _entry(status, raw, pttl)

    def _write(self, key: CacheKey, raw: bytes, ttl: float) -> None:
        name = entry_id(key)
        self._publish_script(
            keys=[self._entry_name(name), self._lock_name(name)],
            args=[raw, _ms(ttl), "", self._channel_name(name)],
        )

    def _delete(self, key: CacheKey, expected: bytes | None) -> None:
        entry = self._entry_name(entry_id(key))
        if expected is None:
            self.client.delete(entry)
        else:
            self._delete_script(keys=[entry], args=[expected])

    def lock(self, key: CacheKey, lease: float) -> SharedLock:
        name = entry_id(key)
        owner = f"{os.getpid()}:{secrets.token_hex(16)}"
        try:
            got, holder, lock_ttl, *read = self._guard(
                self._attempt_script,
                [self._lock_name(name), self._entry_name(name)],
                [owner, _ms(lease), _ms(MAX_LEASE), MAX_ENTRY],
            )
        except Unavailable:
            return SharedLock(self, key, held=False, available=False)
        lock = _RedisLock(
            self,
            key,
            owner,
            lease,
            held=bool(got),
            lease_left=lock_ttl / 1000 if isinstance(lock_ttl, int) and lock_ttl > 0 else 0.0,
            holder=_text(holder),
        )
        try:  # the re-read; from here on the lock is released whatever happens
            found = _entry(*read)
            lock.current = None if found is None else self._accept(key, found)
        except BaseException:
            lock.release()
            raise
        return lock

    def wait_for_update(self, key: CacheKey, timeout: float) -> Token | None:
        end = time.monotonic() + timeout
        refused = self._pubsub_refused_at
        if refused is None or time.monotonic() - refused > _PUBSUB_RETRY:
            try:
                return self._wait_pubsub(key, end)
            except _PubSubRefused:
                self._pubsub_refused_at = time.monotonic()
        return self._wait_polling(key, end)

    def _wait_pubsub(self, key: CacheKey, end: float) -> Token | None:
        channel = self._channel_name(entry_id(key))
        pubsub: PubSub = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(channel)
            # Subscribed before re-reading: a token published in between is in the entry.
            token, lock_free = self._peek(key)
            while token is None and not lock_free:
                left = end - time.monotonic()
                if left <= 0:
                    break
                # Any message only wakes us to re-read: what it says is never trusted.
                if pubsub.get_message(timeout=min(left, 1.0)) is not None:
                    token, lock_free = self._peek(key)
        except redis.ResponseError as e:
            raise _PubSubRefused from e  # e.g. NOPERM (an ACL without channels): poll instead
        except UnicodeError:  # a forged non-text message, to a client that decodes replies
            token, lock_free = None, False
        except self._errors as e:
            self.outage.failed(e)
            return None
        finally:
            pubsub.close()
        if token is None and not lock_free:
            return self._wait_polling(key, end)
        return token if token is not None else self.load(key)

    def _wait_polling(self, key: CacheKey, end: float) -> Token | None:
        while True:
            token, lock_free = self._peek(key)
            left = end - time.monotonic()
            if token is not None or lock_free or left <= 0:
                return token if token is not None else self.load(key)
            time.sleep(min(left, self.poll_interval))

    def _peek(self, key: CacheKey) -> tuple[Token | None, bool]:
        """(a token not due for renewal, or None; whether the lock is free)."""
        name = entry_id(key)

        names = [self._entry_name(name), self._lock_name(name)]
        try:
            status, raw, pttl, locked = self._guard(self._read_script, names, [MAX_ENTRY])
        except Unavailable:
            return None, True  # stop waiting: the caller renews locally
        got = _entry(status, raw, pttl)
        token = None if got is None else self._accept(key, got)
        if token is not None and token.needs_renewal():
            token = None
        return token, not locked

    def _read_nonce(self, origin: str) -> str | None:
        got = _entry(*self._read_script(keys=[self._nonce_name(origin)], args=[_MAX_NONCE_VALUE]))
        if not isinstance(got, tuple):
            return None  # absent, or not one of ours: overwritten by the next nonce
        raw, _ = got
        try:
            value = loads_strict(raw)
        except ValueError:
            return None
        if not isinstance(value, dict) or value.get("origin") != origin:
            return None  # foreign or corrupt: ignored, overwritten by the next nonce
        nonce = value.get("nonce")
        return nonce if isinstance(nonce, str) else None

    def _write_nonce(self, origin: str, nonce: str) -> None:
        value = store_json({"origin": origin, "nonce": nonce})
        self.client.set(self._nonce_name(origin), value, px=NONCE_TTL_MS)


class _PubSubRefused(Exception):  # noqa: N818 - internal signal
    """The server refused pub/sub (ACL, proxy): waiters poll instead."""


def _text(value: Any) -> str | None:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def _entry(status: Any, raw: Any, pttl: Any) -> tuple[bytes, float | None] | str | None:
    """What a read script found: an entry and its remaining lifetime, None for none, or why
    the value there is not an entry. A value without a TTL is foreign (we always set one)."""
    kind = _text(status)
    if kind == "none":
        return None
    if kind != "ok" or not isinstance(raw, bytes | str):
        return _FOREIGN.get(str(kind), "entry is not a string value")
    if pttl == -1:
        return "entry has no TTL"
    if not isinstance(pttl, int) or pttl <= 0:
        return None  # expiring this very moment
    return (raw.encode("ascii") if isinstance(raw, str) else raw), pttl / 1000
