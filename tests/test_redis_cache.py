"""RedisTokenCache against a real redis-server: sharing, the fleet lock, waiting, hostile
entries, secrets, degraded mode (down, frozen with SIGSTOP, restarted), nonces, async.

Several caches in one test process stand for several processes: each has its own in-process
layer and its own connection pool, so everything between them goes through Redis. The tests
that take ``caches`` run twice: over caches from ``from_url`` and over caches given an
application's ``redis.asyncio`` client (the synchronous twin, ``dpop_hsm._redis_twin``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dpop_hsm.errors import ConfigurationError
from dpop_hsm.jose import b64url_encode
from dpop_hsm.requests import DPoPSession
from dpop_hsm.shared_cache import decode_entry, entry_id
from dpop_hsm.signers.software import SoftwareSigner
from dpop_hsm.testing import LocalDPoPServers
from dpop_hsm.token import Token, TokenClient
from tests.support.caches import CACHE_CLIENT_SECRET, cache_client, cache_servers
from tests.support.redis import RedisServer, _require_redis


@pytest.fixture(autouse=True)
def _needs_redis() -> None:
    """redis-server and redis-py, or a skip (a failure in CI) that says which is missing."""
    _require_redis()


SECRET = CACHE_CLIENT_SECRET


@pytest.fixture
def servers() -> Iterator[LocalDPoPServers]:
    with cache_servers(as_nonce=True, rs_nonce=True) as srv:
        yield srv


@pytest.fixture(scope="module")
def signer() -> SoftwareSigner:
    return SoftwareSigner.generate("ES256")


class Caches:
    """Caches made by a test (standing for processes), closed after it; ``via`` is how: from a
    URL, or from a ``redis.asyncio`` client as an async application holds one."""

    def __init__(self, url: str, prefix: str, via: str) -> None:
        self.url, self.prefix, self.via = url, prefix, via
        self.made: list[Any] = []

    def __call__(self, **options: Any) -> Any:
        from dpop_hsm.redis import DEFAULT_OP_TIMEOUT, RedisTokenCache

        options.setdefault("prefix", self.prefix)
        url = options.pop("url", self.url)
        if self.via == "url":
            cache = RedisTokenCache.from_url(url, **options)
        else:
            import redis.asyncio

            timeout = DEFAULT_OP_TIMEOUT
            app = redis.asyncio.Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout
            )
            cache = RedisTokenCache(app, **options)
        self.made.append(cache)
        return cache


@pytest.fixture(params=["url", "asyncio client"])
def caches(
    redis_server: RedisServer, redis_prefix: str, request: pytest.FixtureRequest
) -> Iterator[Caches]:
    made = Caches(redis_server.url, redis_prefix, request.param)
    yield made
    for cache in made.made:
        cache.close()


_client = cache_client


def _entry_name(cache: Any, client: TokenClient) -> str:
    name: str = cache._entry_name(entry_id(client.cache_key))
    return name


def test_the_module_uses_redis_py_not_itself() -> None:
    import redis as redis_py

    import dpop_hsm.redis

    loaded = getattr(dpop_hsm.redis, "redis")  # noqa: B009 - the module the cache imported
    assert loaded is redis_py
    assert loaded.Redis is redis_py.Redis


def test_processes_share_one_token(
    caches: Caches, servers: LocalDPoPServers, signer: SoftwareSigner
) -> None:
    first = _client(servers, signer, caches()).get_token()
    second = _client(servers, signer, caches()).get_token()
    assert second.access_token == first.access_token
    assert servers.counters.tokens_issued == 1
    assert abs(second.expires_at - first.expires_at) < 1.0


def test_64_threads_of_one_process_make_one_redis_round_trip(
    caches: Caches, servers: LocalDPoPServers, signer: SoftwareSigner
) -> None:
    _client(servers, signer, caches()).get_token()  # another process fetched and shared it
    cache = caches()
    client = _client(servers, signer, cache)
    barrier = threading.Barrier(64)
    got: list[Token] = []

    def call() -> None:
        barrier.wait()
        got.append(client.get_token())

    threads = [threading.Thread(target=call) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({t.access_token for t in got}) == 1 and len(got) == 64
    assert cache.outage.stats["ops"] == 1  # the local single flight stands in front
    assert servers.counters.tokens_issued == 1 and client.token_requests == 0


def test_the_lock_is_released_only_by_its_owner(
    caches: Caches, servers: LocalDPoPServers, signer: SoftwareSigner, redis_server: RedisServer
) -> None:
    a, b = caches(), caches()
    key = _client(servers, signer, a).cache_key
    first = a.lock(key, 0.2)
    assert first.held
    busy = b.lock(key, 5.0)
    assert not busy.held and busy.available and 0 < busy.lease_left <= 0.2
    assert busy.holder == first.owner
    time.sleep(0.3)  # the lease ran out: the lock is free for the next process
    second = b.lock(key, 5.0)
    assert second.held
    first.release()  # its former owner must not delete the new owner's lock
    client = redis_server.client()
    try:
        assert client.get(a._lock_name(entry_id(key))) == second.owner.encode()
        second.release()
        assert client.get(a._lock_name(entry_id(key))) is None
    finally:
        client.close()


def test_a_dead_holder_costs_at_most_its_lease(
    caches: Caches, servers: LocalDPoPServers, signer: SoftwareSigner, redis_server: RedisServer
) -> None:
    cache = caches()
    client = _client(servers, signer, cache)
    raw = redis_server.client()
    try:
        # A process took the lock and died: nobody will release or publish.
        raw.set(cache._lock_name(entry_id(client.cache_key)), b"4242:dead", px=600)
        token = client.get_token()  # waits for the lease to run out, then renews
        assert raw.get(cache._lock_name(entry_id(client.cache_key))) is None
    finally:
        raw.close()
    assert token.is_valid() and servers.counters.tokens_issued == 1


def test_waiters_adopt_the_holders_token_by_polling_where_pub_sub_is_refused(
    redis_server: RedisServer,
    redis_prefix: str,
    servers: LocalDPoPServers,
    signer: SoftwareSigner,
) -> None:
    from dpop_hsm.redis import RedisTokenCache

    admin = redis_server.client()
    user = f"nopubsub{abs(hash(redis_prefix)) % 10**6}"
    admin.execute_command("ACL", "SETUSER", user, "on", "nopass", "~*", "resetchannels", "+@all")
    url = f"redis://{user}@127.0.0.1:{redis_server.port}/0"
    holder_cache = RedisTokenCache.from_url(url, prefix=redis_prefix)
    waiter_cache = RedisTokenCache.from_url(url, prefix=redis_prefix, lease=10.0)
    try:
        holder = _client(servers, signer, holder_cache)
        lock = holder_cache.lock(holder.cache_key, 10.0)
        assert lock.held
        got: list[Token] = []
        waiter = threading.Thread(
            target=lambda: got.append(_client(servers, signer, waiter_cache).get_token())
        )
        waiter.start()
        time.sleep(0.3)
        assert not got
        from dpop_hsm.token import drive_flow

        lock.publish(drive_flow(holder.token_flow(), holder._default_sender()))
        waiter.join(timeout=10)
        assert got and servers.counters.tokens_issued == 1
        assert waiter_cache._pubsub_refused_at is not None  # it really polled
        assert waiter_cache.outage.stats["outages"] == 0  # a refusal is not an outage
    finally:
        holder_cache.close()
        waiter_cache.close()
        admin.execute_command("ACL", "DELUSER", user)
        admin.close()


@pytest.mark.parametrize("kind", ["garbage", "no ttl", "other key", "bearer"])
def test_corrupt_or_foreign_entries_are_ignored_and_overwritten(
    caches: Caches,
    servers: LocalDPoPServers,
    signer: SoftwareSigner,
    redis_server: RedisServer,
    kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first_cache = caches()
    first = _client(servers, signer, first_cache)
    first.get_token()
    name = _entry_name(first_cache, first)
    raw = redis_server.client()
    try:
        good = raw.get(name)
        entry = json.loads(good)
        if kind == "garbage":
            raw.set(name, b"\xff\xfe not json", px=60_000)
        elif kind == "no ttl":
            raw.set(name, good)  # someone else's write: we always set a TTL
        elif kind == "other key":
            entry["key"][-1] = SoftwareSigner.generate("ES256").thumbprint
            raw.set(name, json.dumps(entry), px=60_000)
        else:
            entry["token_type"] = "Bearer"
            raw.set(name, json.dumps(entry), px=60_000)
        other_cache = caches()
        other = _client(servers, signer, other_cache)
        token = other.get_token()
        assert servers.counters.tokens_issued == 2  # not adopted
        stored = raw.get(name)
        assert raw.pttl(name) > 0
        decoded = decode_entry(other.cache_key, stored, remaining=raw.pttl(name) / 1000)
        assert decoded is not None and decoded.token.access_token == token.access_token
    finally:
        raw.close()
    assert any("corrupt or foreign" in r.getMessage() for r in caplog.records)


def test_no_entry_holds_the_private_key_client_secret_or_refresh_token(
    caches: Caches,
    servers: LocalDPoPServers,
    redis_server: RedisServer,
    redis_prefix: str,
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    signer = SoftwareSigner.generate("ES256")
    servers.issue_refresh_tokens = True
    cache = caches(share_nonces=True)
    client = _client(servers, signer, cache)
    with DPoPSession(client) as session:
        assert session.get(servers.api_url).status_code == 200
    client.invalidate()  # and a second token, through the lock path
    client.get_token()
    entries = {k: v for k, v in redis_server.dump().items() if k.startswith(redis_prefix.encode())}
    assert any(b":token:" in k for k in entries) and any(b":nonce:" in k for k in entries)
    blob = b"\n".join(entries.values())
    private = signer._key
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    numbers = private.private_numbers()
    d = numbers.private_value.to_bytes(32, "big")
    pem = signer._key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    der = signer._key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert len(servers.refresh_tokens_issued) == 2
    for secret in (
        b64url_encode(d).encode(),
        d,
        d.hex().encode(),
        pem,
        der,
        SECRET.encode(),
        *(t.encode() for t in servers.refresh_tokens_issued),
    ):
        assert secret not in blob
    for key, value in entries.items():
        if b":token:" in key:
            assert set(json.loads(value)) == {
                "v",
                "kind",
                "key",
                "access_token",
                "token_type",
                "scope",
                "lifetime",
                "issued_at",
                "expires_at",
                "renew_before",
                "extra",
            }


def test_an_invalidated_token_is_replaced_once_for_the_fleet(
    caches: Caches, servers: LocalDPoPServers, signer: SoftwareSigner
) -> None:
    a = _client(servers, signer, caches())
    b = _client(servers, signer, caches())
    with DPoPSession(a) as sa, DPoPSession(b) as sb:
        assert sa.get(servers.api_url).status_code == 200
        assert sb.get(servers.api_url).status_code == 200
        assert servers.counters.tokens_issued == 1
        servers.revoke_all()  # the RS now answers invalid_token for the shared token
        assert sa.get(servers.api_url).status_code == 200  # renewed, published
        assert sb.get(servers.api_url).status_code == 200  # adopted A's new token
    assert servers.counters.tokens_issued == 2


def test_shared_nonces_spare_a_new_process_both_challenges(
    caches: Caches, servers: LocalDPoPServers, signer: SoftwareSigner
) -> None:
    with DPoPSession(_client(servers, signer, caches(share_nonces=True))) as s:
        assert s.get(servers.api_url).status_code == 200
    assert servers.counters.as_nonce_challenges == 1
    assert servers.counters.rs_nonce_challenges == 1
    newcomer = _client(servers, signer, caches(share_nonces=True))
    newcomer.invalidate()  # the newcomer must fetch its own token: with the shared AS nonce
    with DPoPSession(newcomer) as s:
        assert s.get(servers.api_url).status_code == 200
    assert servers.counters.tokens_issued == 2
    assert servers.counters.as_nonce_challenges == 1
    assert servers.counters.rs_nonce_challenges == 1


def test_redis_down_from_the_start_warns_once_and_serves_locally(
    servers: LocalDPoPServers, signer: SoftwareSigner, caplog: pytest.LogCaptureFixture
) -> None:
    from dpop_hsm.redis import RedisTokenCache
    from tests.support.redis import _free_port

    port = _free_port()  # nothing listens there
    cache = RedisTokenCache.from_url(f"redis://:hunter2-pw@127.0.0.1:{port}/0", backoff=60)
    try:
        client = _client(servers, signer, cache)
        with DPoPSession(client) as session:
            for _ in range(5):
                assert session.get(servers.api_url).status_code == 200
        client.invalidate()
        client.get_token()
    finally:
        cache.close()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "unavailable" in warnings[0].getMessage()
    assert cache.outage.stats["failures"] == 1
    assert "hunter2" not in repr(cache) and "hunter2" not in caplog.text
    assert servers.counters.tokens_issued == 2


def test_a_frozen_redis_costs_one_timeout_per_backoff_and_sharing_resumes(
    own_redis: RedisServer,
    redis_prefix: str,
    servers: LocalDPoPServers,
    signer: SoftwareSigner,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from dpop_hsm.redis import RedisTokenCache

    servers.token_lifetime = 2.0

    def make() -> RedisTokenCache:
        return RedisTokenCache.from_url(
            own_redis.url, prefix=redis_prefix, op_timeout=0.2, backoff=1.0
        )

    made = [make(), make()]
    try:
        clients = [_client(servers, signer, c) for c in made]
        statuses: list[int] = []
        stop = threading.Event()

        def work(client: TokenClient) -> None:
            with DPoPSession(client) as session:
                while not stop.is_set():
                    statuses.append(session.get(servers.api_url, timeout=10).status_code)
                    time.sleep(0.05)

        threads = [threading.Thread(target=work, args=(c,)) for c in clients for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        own_redis.freeze()  # SIGSTOP: connections open, nothing answers
        time.sleep(3.5)
        own_redis.resume()
        time.sleep(3.0)
        stop.set()
        for t in threads:
            t.join()
        assert statuses and set(statuses) == {200}
        for cache in made:
            stats = cache.outage.stats
            assert stats["outages"] == 1
            # One operation timeout per back-off period at most (3.5 s frozen, 1 s back-off),
            # never one per request: every other call skipped Redis.
            assert stats["failures"] <= 5
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == len(made)
        # Sharing resumed: a new process adopts the fleet's current token.
        issued = servers.counters.tokens_issued
        late = make()
        made.append(late)
        token = _client(servers, signer, late).get_token()
        assert servers.counters.tokens_issued == issued
        held = [c.cached_token() for c in clients]
        assert token.access_token in {h.access_token for h in held if h is not None}
    finally:
        for cache in made:
            cache.close()


def test_async_httpx_never_calls_redis_on_the_event_loop(
    caches: Caches, servers: LocalDPoPServers, signer: SoftwareSigner
) -> None:
    httpx = pytest.importorskip("httpx")
    from dpop_hsm.httpx import DPoPAuth

    cache = caches()
    client = _client(servers, signer, cache)
    calls: list[int] = []
    original = cache._guard

    def recording(fn: Any, *args: Any) -> Any:
        calls.append(threading.get_ident())
        return original(fn, *args)

    cache._guard = recording

    async def main() -> int:
        loop_thread = threading.get_ident()
        auth = DPoPAuth(client)
        async with httpx.AsyncClient() as http:
            auth.attach(http)
            answers = await asyncio.gather(*(http.get(servers.api_url) for _ in range(20)))
            assert {a.status_code for a in answers} == {200}
            client.invalidate()  # the next renewal goes through the lock path again
            assert (await http.get(servers.api_url)).status_code == 200
        return loop_thread

    loop_thread = asyncio.run(main())
    assert calls and loop_thread not in calls
    assert servers.counters.tokens_issued == 2


def test_configuration_errors(redis_server: RedisServer) -> None:
    import redis as redis_py

    from dpop_hsm.redis import RedisTokenCache

    # An asyncio client is accepted: the cache mirrors it (tests/test_redis_async_client.py).
    mirrored = RedisTokenCache(redis_py.asyncio.Redis(port=redis_server.port))
    assert type(mirrored.client) is redis_py.Redis
    mirrored.close()
    with pytest.raises(ConfigurationError, match="RedisCluster"):
        RedisTokenCache(redis_py.asyncio.RedisCluster(host="127.0.0.1", port=redis_server.port))
    with pytest.raises(ConfigurationError, match=r"redis\.Redis"):
        RedisTokenCache(object())
    with pytest.raises(ConfigurationError, match="URL"):
        RedisTokenCache.from_url("http://:pw-in-url@example.invalid/")
    with pytest.raises(ConfigurationError, match="op_timeout"):
        RedisTokenCache.from_url(redis_server.url, op_timeout=0)
    with pytest.raises(ConfigurationError, match="lease"):
        RedisTokenCache.from_url(redis_server.url, lease=0)
    with pytest.raises(ConfigurationError, match="backoff"):
        RedisTokenCache.from_url(redis_server.url, backoff=-1)


def test_a_refusing_redis_is_an_outage_too(
    redis_server: RedisServer,
    redis_prefix: str,
    servers: LocalDPoPServers,
    signer: SoftwareSigner,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every command answered with an error (here an ACL that allows none): work locally."""
    from dpop_hsm.redis import RedisTokenCache

    admin = redis_server.client()
    user = f"refused{abs(hash(redis_prefix)) % 10**6}"
    admin.execute_command("ACL", "SETUSER", user, "on", "nopass", "~*", "-@all")
    cache = RedisTokenCache.from_url(
        f"redis://{user}@127.0.0.1:{redis_server.port}/0", prefix=redis_prefix
    )
    try:
        client = _client(servers, signer, cache)
        with DPoPSession(client) as session:
            for _ in range(3):
                assert session.get(servers.api_url).status_code == 200
    finally:
        cache.close()
        admin.execute_command("ACL", "DELUSER", user)
        admin.close()
    assert cache.outage.stats["outages"] == 1
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "NoPermissionError" in warnings[0].getMessage()


def test_a_client_with_slow_socket_timeouts_is_warned_about_once(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    import redis as redis_py

    from dpop_hsm.redis import RedisTokenCache

    caplog.set_level(logging.WARNING, logger="dpop_hsm")
    RedisTokenCache.from_url(redis_server.url).close()
    timed = redis_py.Redis(port=redis_server.port, socket_timeout=1, socket_connect_timeout=1)
    RedisTokenCache(timed).close()
    assert not caplog.records  # from_url's defaults, or the caller's own bounds
    RedisTokenCache(redis_py.Redis(port=redis_server.port)).close()  # redis-py's 5 s default
    RedisTokenCache(redis_py.Redis(port=redis_server.port, socket_timeout=None)).close()
    warnings = [r for r in caplog.records if "socket_timeout" in r.getMessage()]
    assert len(warnings) == 2 and f":{redis_server.port}" in warnings[0].getMessage()
