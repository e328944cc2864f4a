"""RedisTokenCache against what someone else may leave under its names, on a real redis-server.

Another writer (another tenant on the same prefix, an operator at ``redis-cli``, an older or
buggy client) can put anything under the cache's keys: a value of another type, a multi-MB
value, bytes that are not text, a lock without an expiry, forged pub/sub messages. None of it
may fail a request, switch sharing off (an outage), stall the fleet for more than one lease or
be trusted. And fork() after the cache was used.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dpop_hsm.htu import origin_of
from dpop_hsm.shared_cache import decode_entry, entry_id
from dpop_hsm.signers.software import SoftwareSigner
from dpop_hsm.testing import ClientRegistration, LocalDPoPServers
from dpop_hsm.token import Token, TokenClient
from tests.support.caches import CACHE_CLIENT_SECRET, cache_client, cache_servers
from tests.support.redis import RedisServer, _require_redis


@pytest.fixture(autouse=True)
def _needs_redis() -> None:
    _require_redis()


SECRET = CACHE_CLIENT_SECRET


@pytest.fixture
def servers() -> Iterator[LocalDPoPServers]:
    with cache_servers() as srv:
        yield srv


@pytest.fixture(scope="module")
def signer() -> SoftwareSigner:
    return SoftwareSigner.generate("ES256")


@pytest.fixture
def make(redis_server: RedisServer, redis_prefix: str) -> Iterator[Any]:
    """``make(**options)``: a cache (standing for one process) on the shared server; with
    ``decode_responses=True``, over a client that decodes replies as text."""
    from dpop_hsm.redis import RedisTokenCache

    made: list[Any] = []

    def cache(*, decode_responses: bool = False, **options: Any) -> Any:
        options.setdefault("prefix", redis_prefix)
        if decode_responses:
            import redis

            client = redis.Redis(port=redis_server.port, decode_responses=True, socket_timeout=0.5)
            made.append(RedisTokenCache(client, **options))
        else:
            made.append(RedisTokenCache.from_url(redis_server.url, **options))
        return made[-1]

    yield cache
    for c in made:
        c.close()


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[Any]:
    """A plain client: the other writer."""
    client = redis_server.client()
    yield client
    client.close()


_client = cache_client


def _names(cache: Any, client: TokenClient) -> tuple[str, str, str]:
    name = entry_id(client.cache_key)
    return cache._entry_name(name), cache._lock_name(name), cache._channel_name(name)


def _assert_shared(
    raw: Any, entry: str, client: TokenClient, token: Token, newcomer: TokenClient
) -> None:
    """The entry now holds ``token`` with a TTL, and a new process adopts it."""
    assert raw.type(entry) == b"string" and raw.pttl(entry) > 0
    decoded = decode_entry(client.cache_key, raw.get(entry), remaining=raw.pttl(entry) / 1000)
    assert decoded is not None and decoded.token.access_token == token.access_token
    assert newcomer.get_token().access_token == token.access_token
    assert newcomer.token_requests == 0


@pytest.mark.parametrize("where", ["entry", "lock"])
def test_a_key_of_another_type_is_replaced_not_an_outage(
    make: Any,
    raw: Any,
    servers: LocalDPoPServers,
    signer: SoftwareSigner,
    where: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hash under our name made every command on it fail (WRONGTYPE): one outage WARNING,
    then no sharing for the fleet, for as long as the foreign key stayed."""
    cache = make(lease=0.5)
    client = _client(servers, signer, cache)
    entry, lock, _ = _names(cache, client)
    raw.hset(entry if where == "entry" else lock, "field", "value")  # no TTL either
    token = client.get_token()
    assert cache.outage.stats["outages"] == 0 and cache.outage.stats["failures"] == 0
    assert not any("unavailable" in r.getMessage() for r in caplog.records)
    if where == "entry":
        assert any("not a string value" in r.getMessage() for r in caplog.records)
    assert raw.exists(lock) == 0  # the foreign lock ran out after one lease
    _assert_shared(raw, entry, client, token, _client(servers, signer, make()))
    assert servers.counters.tokens_issued == 1


@pytest.mark.parametrize("ttl_ms", [None, 86_400_000], ids=["no expiry", "a day"])
def test_a_foreign_lock_that_would_never_end_gets_one_lease(
    make: Any, raw: Any, servers: LocalDPoPServers, signer: SoftwareSigner, ttl_ms: int | None
) -> None:
    """``SET lock x`` without PX (or with a day): every renewal of every process waited a whole
    lease, polling Redis in a tight loop, then renewed alone, for as long as the key lived."""
    cache = make(lease=0.5)
    client = _client(servers, signer, cache)
    _, lock, _ = _names(cache, client)
    raw.set(lock, b"someone-else", px=ttl_ms)
    attempt = cache.lock(client.cache_key, 0.5)
    assert not attempt.held and attempt.available and attempt.holder == "foreign"
    assert 0 < raw.pttl(lock) <= 500 and 0 < attempt.lease_left <= 0.5  # ours now: one lease
    assert raw.get(lock) == b"someone-else"  # not stolen: it just ends
    client.get_token()
    assert servers.counters.tokens_issued == 1
    assert raw.exists(lock) == 0 and cache.outage.stats["outages"] == 0


def test_a_multi_megabyte_value_is_refused_without_being_transferred(
    own_redis: RedisServer,
    redis_prefix: str,
    servers: LocalDPoPServers,
    signer: SoftwareSigner,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every read fetched the whole value before its size was checked: 8 MB per read, and per
    waiter per wake-up, time and memory no request should spend on a cache."""
    from dpop_hsm.redis import RedisTokenCache

    cache = RedisTokenCache.from_url(own_redis.url, prefix=redis_prefix)
    other = own_redis.client()
    try:
        client = _client(servers, signer, cache)
        entry, _, _ = _names(cache, client)
        other.set(entry, b"x" * (8 << 20), px=600_000)
        sent_before = int(other.info("stats")["total_net_output_bytes"])
        token = client.get_token()
        sent = int(other.info("stats")["total_net_output_bytes"]) - sent_before
        assert sent < 256 * 1024, sent  # a few small replies, never the value
        assert any("too large" in r.getMessage() for r in caplog.records)
        assert cache.outage.stats["outages"] == 0
        decoded = decode_entry(client.cache_key, other.get(entry), remaining=1.0)
        assert decoded is not None and decoded.token.access_token == token.access_token
    finally:
        cache.close()
        other.close()


@pytest.mark.parametrize("where", ["entry", "lock", "nonce"])
def test_bytes_that_are_not_text_never_reach_a_client_that_decodes_replies(
    make: Any, raw: Any, servers: LocalDPoPServers, signer: SoftwareSigner, where: str
) -> None:
    """With ``decode_responses=True``, a value that is not UTF-8 raised UnicodeDecodeError out
    of get_token: every request of every process failed while the value stayed."""
    cache = make(decode_responses=True, lease=0.5, share_nonces=True)
    client = _client(servers, signer, cache)
    entry, lock, _ = _names(cache, client)
    if where == "nonce":
        raw.set(cache._nonce_name(origin_of(servers.token_endpoint)), b"\xff\xfe", px=60_000)
    else:
        raw.set(entry if where == "entry" else lock, b"\xff\xfe\x00", px=500)
    token = client.get_token()
    assert token.is_valid() and cache.outage.stats["outages"] == 0
    _assert_shared(raw, entry, client, token, _client(servers, signer, make()))


def test_forged_pub_sub_messages_only_wake_a_waiter(
    make: Any, raw: Any, servers: LocalDPoPServers, signer: SoftwareSigner
) -> None:
    """Anyone allowed to PUBLISH can wake the waiters: they re-read the entry and trust only
    it. A message that is not text raised UnicodeDecodeError out of a waiter's get_token (a
    client with ``decode_responses=True``); now the waiter goes on waiting by polling."""
    holder_cache = make(lease=10.0)
    holder = _client(servers, signer, holder_cache)
    _, _, channel = _names(holder_cache, holder)
    lock = holder_cache.lock(holder.cache_key, 10.0)
    assert lock.held
    waiter_cache = make(decode_responses=True, lease=10.0)
    got: list[Token] = []
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            got.append(_client(servers, signer, waiter_cache).get_token())
        except BaseException as e:  # reported below
            errors.append(e)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    deadline = time.monotonic() + 10
    while raw.pubsub_numsub(channel)[0][1] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert raw.pubsub_numsub(channel)[0][1] == 1, "the waiter never subscribed"
    raw.publish(channel, b"stored")  # a lie: nothing was stored
    raw.publish(channel, b"\xff\xfe")
    from dpop_hsm.token import drive_flow

    fetched = drive_flow(holder.token_flow(), holder._default_sender())
    lock.publish(fetched)
    waiter.join(timeout=10)
    assert not errors, errors
    assert got and got[0].access_token == fetched.access_token  # adopted, not fetched again
    assert servers.counters.tokens_issued == 1


def test_a_token_lifetime_beyond_what_redis_accepts_is_shared_capped(
    make: Any, raw: Any, signer: SoftwareSigner
) -> None:
    """expires_in 1e300 made ``SET … PX`` fail (an outage, the lock left for its lease);
    the entry now lives at most MAX_LIFETIME, which both sides agree on."""
    from dpop_hsm.shared_entry import MAX_LIFETIME

    with LocalDPoPServers(
        clients=[ClientRegistration("c", client_secret=SECRET)], token_lifetime=1e300
    ) as srv:
        cache = make()
        client = _client(srv, signer, cache)
        entry, lock, _ = _names(cache, client)
        token = client.get_token()
        assert cache.outage.stats["outages"] == 0 and raw.exists(lock) == 0
        assert 0 < raw.pttl(entry) <= MAX_LIFETIME * 1000
        newcomer = _client(srv, signer, make())
        adopted = newcomer.get_token()
        assert adopted.access_token == token.access_token and newcomer.token_requests == 0
        assert adopted.expires_in() <= MAX_LIFETIME


def _read_line(fd: int, timeout: float = 10.0) -> bytes:
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, "the child did not answer"
    return os.read(fd, 200)


def test_fork_after_use_gives_the_child_connections_of_its_own(
    make: Any, servers: LocalDPoPServers, signer: SoftwareSigner
) -> None:
    """The child of a process whose cache holds pooled connections shares a token through
    connections of its own, and the parent's keep working (redis-py's pool notices the pid)."""
    cache = make()
    client = _client(servers, signer, cache)
    first = client.get_token()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, never return into pytest
        code = 1
        try:
            os.close(read_end)
            client.invalidate(first)
            token = client.get_token()
            fine = cache.outage.stats["outages"] == 0 and token.access_token != first.access_token
            os.write(write_end, b"ok" if fine else b"bad")
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        assert _read_line(read_end) == b"ok"
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    shared = cache.load(client.cache_key)  # the child's token, over the parent's connections
    assert shared is not None and shared.access_token != first.access_token
    assert cache.outage.stats["outages"] == 0 and servers.counters.tokens_issued == 2


def test_a_frozen_redis_during_release_costs_one_timeout_and_the_lease_ends_the_lock(
    own_redis: RedisServer, redis_prefix: str, servers: LocalDPoPServers, signer: SoftwareSigner
) -> None:
    from dpop_hsm.redis import RedisTokenCache

    cache = RedisTokenCache.from_url(own_redis.url, prefix=redis_prefix, op_timeout=0.2)
    other = own_redis.client()
    try:
        client = _client(servers, signer, cache)
        _, lock_name, _ = _names(cache, client)
        lock = cache.lock(client.cache_key, 5.0)
        assert lock.held
        own_redis.freeze()  # SIGSTOP: the release's compare-and-delete gets no answer
        try:
            done = threading.Event()

            def release() -> None:
                lock.release()
                done.set()

            threading.Thread(target=release, daemon=True).start()
            assert done.wait(10), "release hung on a frozen Redis"
            assert cache.outage.stats["failures"] == 1 and cache.outage.stats["outages"] == 1
        finally:
            own_redis.resume()
        assert 0 < other.pttl(lock_name) <= 5000  # left behind, but with its lease: it ends
    finally:
        cache.close()
        other.close()


def test_an_error_while_holding_the_lock_releases_it(
    make: Any, raw: Any, servers: LocalDPoPServers, signer: SoftwareSigner
) -> None:
    from dpop_hsm.errors import OAuthError

    cache = make()
    client = TokenClient(
        signer,
        token_endpoint=servers.token_endpoint,
        client_id="c",
        client_secret="not-the-secret",
        scope="api",
        cache=cache,
    )
    _, lock, _ = _names(cache, client)
    with pytest.raises(OAuthError):
        client.get_token()
    assert raw.exists(lock) == 0 and cache.outage.stats["outages"] == 0
