"""RedisTokenCache given an application's ``redis.asyncio`` client: the synchronous twin it
builds connects exactly as the async client would (TCP with a password, a unix socket, TLS
verified against the server's CA, the same db), one token for many tasks over the httpx and
aiohttp async adapters with nothing on the event loop, the retry policy it picks, and the
settings it refuses (never quoting a password).

The contract tests of tests/test_redis_cache.py also run over caches built this way.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from dpop_hsm.errors import ConfigurationError
from dpop_hsm.shared_cache import decode_entry, entry_id
from dpop_hsm.signers.software import SoftwareSigner
from dpop_hsm.testing import LocalDPoPServers
from dpop_hsm.token import CacheKey
from tests.support.caches import CACHE_CLIENT_SECRET, cache_client, cache_servers
from tests.support.redis import RedisServer, _require_redis

if TYPE_CHECKING:
    import redis

SECRET = CACHE_CLIENT_SECRET
PASSWORD = "redis-twin-password-5be1"  # the server's requirepass: must never be shown


@pytest.fixture(autouse=True)
def _needs_redis() -> None:
    _require_redis()


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A password-protected redis-server on TCP, a unix socket and a TLS port."""
    _require_redis()
    base = tmp_path_factory.mktemp("redis-locked")
    server = RedisServer(base, password=PASSWORD, unix_socket=True, tls=True).start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def servers() -> Iterator[LocalDPoPServers]:
    with cache_servers(as_nonce=True, rs_nonce=True) as srv:
        yield srv


@pytest.fixture(scope="module")
def signer() -> SoftwareSigner:
    return SoftwareSigner.generate("ES256")


_client = cache_client


def _app_client(transport: str, server: RedisServer) -> redis.asyncio.Redis:
    """How an async application may have made its client; db 1, to show the db is copied."""
    import redis.asyncio

    if transport == "tcp":
        return redis.asyncio.Redis(
            host="127.0.0.1", port=server.port, db=1, password=PASSWORD, socket_timeout=2
        )
    if transport == "unix socket":
        return redis.asyncio.Redis.from_url(f"unix://{server.socket_path}?db=1", password=PASSWORD)
    assert server.tls_port is not None and server.ca_file is not None
    return redis.asyncio.Redis(
        host="127.0.0.1",
        port=server.tls_port,
        db=1,
        password=PASSWORD,
        ssl=True,
        ssl_ca_certs=str(server.ca_file),  # verified: the server's cert is from our own CA
    )


CONNECTION = {
    "tcp": "Connection",
    "unix socket": "UnixDomainSocketConnection",
    "tls": "SSLConnection",
}


@pytest.mark.parametrize("transport", list(CONNECTION))
def test_an_async_app_shares_one_token_over_httpx_and_aiohttp_and_never_blocks_its_loop(
    locked_redis: RedisServer,
    redis_prefix: str,
    servers: LocalDPoPServers,
    signer: SoftwareSigner,
    transport: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    httpx = pytest.importorskip("httpx")
    aiohttp = pytest.importorskip("aiohttp")
    from dpop_hsm.aiohttp import DPoPMiddleware
    from dpop_hsm.httpx import DPoPAuth
    from dpop_hsm.redis import RedisTokenCache

    redis_threads: list[int] = []

    def recorded(cache: RedisTokenCache) -> RedisTokenCache:
        original = cache._guard

        def guard(fn: Any, *args: Any) -> Any:
            redis_threads.append(threading.get_ident())
            return original(fn, *args)

        cache._guard = guard  # type: ignore[method-assign]
        return cache

    async def main() -> tuple[int, list[int], CacheKey, bytes | None, int]:
        app = _app_client(transport, locked_redis)  # the application's own async client
        # Two caches on one async client stand for two processes of the fleet.
        caches = [recorded(RedisTokenCache(app, prefix=redis_prefix)) for _ in range(2)]
        by_httpx, by_aiohttp = (_client(servers, signer, c) for c in caches)
        for cache in caches:
            twin_pool = cache.client.connection_pool  # its own, of redis-py's sync classes
            assert twin_pool.connection_class.__module__ == "redis.connection"
            assert twin_pool.connection_class.__name__ == CONNECTION[transport]
        auth = DPoPAuth(by_httpx)
        async with (
            httpx.AsyncClient() as http,
            aiohttp.ClientSession(middlewares=(DPoPMiddleware(by_aiohttp),)) as session,
        ):
            auth.attach(http)

            async def via_httpx() -> int:
                response = await http.get(servers.api_url)
                return int(response.status_code)

            async def via_aiohttp() -> int:
                async with session.get(servers.api_url) as response:
                    return int(response.status)

            statuses = await asyncio.gather(
                *(via_httpx() for _ in range(20)), *(via_aiohttp() for _ in range(20))
            )
        for cache in caches:
            cache.close()
        # The cache left the application's client alone: it still works, and sees the entry.
        name = caches[0]._entry_name(entry_id(by_httpx.cache_key))
        raw, pttl = await app.get(name), await app.pttl(name)
        assert raw is None or isinstance(raw, bytes)
        await app.aclose()
        return threading.get_ident(), statuses, by_httpx.cache_key, raw, pttl

    loop_thread, statuses, key, raw, pttl = asyncio.run(main())
    assert statuses == [200] * 40
    assert servers.counters.tokens_issued == 1  # one token for both "processes", 40 tasks
    assert redis_threads and loop_thread not in redis_threads
    assert raw is not None and pttl > 0
    shared = decode_entry(key, raw, remaining=pttl / 1000)
    assert shared is not None and shared.token.is_valid()
    admin = locked_redis.client(db=0)
    try:
        assert not any(k.startswith(redis_prefix.encode()) for k in admin.scan_iter())  # db 1
    finally:
        admin.close()
    assert PASSWORD not in caplog.text


def test_a_synchronous_credential_provider_is_used_by_the_twin(
    locked_redis: RedisServer, redis_prefix: str, servers: LocalDPoPServers, signer: SoftwareSigner
) -> None:
    import redis.asyncio
    import redis.credentials

    from dpop_hsm.redis import RedisTokenCache

    provider = redis.credentials.UsernamePasswordCredentialProvider(password=PASSWORD)
    app = redis.asyncio.Redis(port=locked_redis.port, credential_provider=provider)
    cache = RedisTokenCache(app, prefix=redis_prefix)
    try:
        assert cache.client.connection_pool.connection_kwargs["credential_provider"] is provider
        first = _client(servers, signer, cache).get_token()
        other = RedisTokenCache(app, prefix=redis_prefix)
        try:
            assert _client(servers, signer, other).get_token().access_token == first.access_token
        finally:
            other.close()
        assert cache.outage.stats["failures"] == 0
        assert servers.counters.tokens_issued == 1
    finally:
        cache.close()


def test_the_twin_copies_every_connection_setting_and_shows_no_password() -> None:
    import redis.asyncio

    from dpop_hsm._redis_twin import COPIED_SETTINGS
    from dpop_hsm.redis import RedisTokenCache

    app = redis.asyncio.Redis(
        host="cache.internal",
        port=6380,
        db=1,
        username="svc",
        password=PASSWORD,
        socket_timeout=0.3,
        socket_connect_timeout=0.7,
        socket_keepalive=False,
        client_name="app",
        health_check_interval=3,
        protocol=3,
        ssl=True,
        ssl_cert_reqs="required",
        ssl_ca_certs="ca.pem",
        ssl_check_hostname=True,
        ssl_min_version=None,
        ssl_password=PASSWORD,
    )
    cache = RedisTokenCache(app)
    try:
        want = app.connection_pool.connection_kwargs
        got = cache.client.connection_pool.connection_kwargs
        assert {k: got.get(k) for k in COPIED_SETTINGS & set(want)} == {
            k: want[k] for k in COPIED_SETTINGS & set(want)
        }
        assert cache.client.connection_pool.connection_class is redis.SSLConnection
        assert cache.client.connection_pool.max_connections == app.connection_pool.max_connections
        shown = repr(cache) + repr(cache.client) + repr(cache.client.connection_pool)
        assert PASSWORD not in shown and "cache.internal:6380" in repr(cache)
    finally:
        cache.close()


def test_a_blocking_pool_stays_blocking_with_its_bound_and_timeout() -> None:
    import redis.asyncio

    from dpop_hsm.redis import RedisTokenCache

    pool = redis.asyncio.BlockingConnectionPool(max_connections=7, timeout=3, port=6390)
    cache = RedisTokenCache(redis.asyncio.Redis(connection_pool=pool))
    try:
        twin_pool = cache.client.connection_pool
        assert type(twin_pool) is redis.BlockingConnectionPool
        assert (twin_pool.max_connections, twin_pool.timeout) == (7, 3)
    finally:
        cache.close()


def _twin_retry(app: Any) -> Any:
    from dpop_hsm.redis import RedisTokenCache

    cache = RedisTokenCache(app)
    try:
        connection: Any = cache.client.connection_pool.make_connection()  # no socket opened
        return connection.retry
    finally:
        cache.close()


def test_retries_are_off_unless_the_application_chose_a_policy() -> None:
    import redis.asyncio
    import redis.asyncio.retry
    import redis.backoff
    import redis.exceptions
    import redis.retry

    none = redis.retry.Retry(redis.backoff.NoBackoff(), 0)
    # redis-py's constructor default (10 retries) and from_url's (none) both give none: a
    # frozen Redis costs one socket timeout per back-off period, as with from_url.
    assert _twin_retry(redis.asyncio.Redis(port=6390)) == none
    assert _twin_retry(redis.asyncio.Redis.from_url("redis://127.0.0.1:6390/0")) == none
    chosen = redis.asyncio.retry.Retry(redis.backoff.ExponentialBackoff(cap=2, base=0.1), 2)
    got = _twin_retry(redis.asyncio.Redis(port=6390, retry=chosen))
    assert got.get_retries() == 2
    assert got._backoff == redis.backoff.ExponentialBackoff(cap=2, base=0.1)
    assert set(got._supported_errors) == set(chosen._supported_errors)
    on_timeout = _twin_retry(redis.asyncio.Redis.from_url("redis://h:1/0?retry_on_timeout=1"))
    assert on_timeout.get_retries() == 1 and redis.exceptions.TimeoutError in set(
        on_timeout._supported_errors
    )


def test_copied_settings_mean_the_same_on_both_sides() -> None:
    """The twin passes only the settings the async pool holds; one it leaves out must default
    the same way in redis-py's sync classes as in its async ones, or the twin would differ."""
    from dpop_hsm._redis_twin import CONNECTION_CLASSES, COPIED_SETTINGS

    def defaults(cls: type[Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            if "__init__" in vars(klass):
                for name, p in inspect.signature(vars(klass)["__init__"]).parameters.items():
                    out[name] = p.default
        return out

    for async_class, sync_class in CONNECTION_CLASSES.items():
        theirs, ours = defaults(async_class), defaults(sync_class)
        for name in COPIED_SETTINGS & set(theirs):
            assert name in ours, (sync_class, name)
            assert ours[name] == theirs[name], (sync_class, name)


def _refused(case: str) -> tuple[Any, str]:
    """(an async client the cache must refuse, the name its message must give)."""
    import redis.asyncio
    import redis.asyncio.retry
    import redis.asyncio.sentinel
    import redis.backoff
    import redis.credentials

    class AsyncOnlyProvider(redis.credentials.CredentialProvider):
        async def get_credentials_async(self) -> tuple[str, str]:
            return "svc", PASSWORD

    class OwnConnection(redis.asyncio.Connection):
        pass

    class OwnPool(redis.asyncio.ConnectionPool):
        pass

    class OwnRetry(redis.asyncio.retry.Retry):
        pass

    if case == "async-only credential provider":
        provider = AsyncOnlyProvider()
        return redis.asyncio.Redis(port=6390, credential_provider=provider), "get_credentials_async"
    if case == "connect callback":
        return redis.asyncio.Redis(
            port=6390, password=PASSWORD, redis_connect_func=lambda conn: None
        ), "redis_connect_func"
    if case == "own connection class":
        pool = redis.asyncio.ConnectionPool(
            connection_class=OwnConnection, port=6390, password=PASSWORD
        )
        return redis.asyncio.Redis(connection_pool=pool), "OwnConnection"
    if case == "own pool class":
        return redis.asyncio.Redis(connection_pool=OwnPool(port=6390, password=PASSWORD)), "OwnPool"
    if case == "own retry class":
        retry = OwnRetry(redis.backoff.NoBackoff(), 1)
        return redis.asyncio.Redis(port=6390, password=PASSWORD, retry=retry), "OwnRetry"
    if case == "sentinel":
        sentinel = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            [("127.0.0.1", 26390)], password=PASSWORD
        )
        return sentinel.master_for("main", password=PASSWORD), "Sentinel"
    assert case == "cluster"
    cluster = redis.asyncio.RedisCluster(host="127.0.0.1", port=6390, password=PASSWORD)
    return cluster, "RedisCluster"


REFUSED = [
    "async-only credential provider",
    "connect callback",
    "own connection class",
    "own pool class",
    "own retry class",
    "sentinel",
    "cluster",
]


@pytest.mark.parametrize("case", REFUSED)
def test_what_cannot_be_copied_is_refused_by_name_never_by_value(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    from dpop_hsm.redis import RedisTokenCache

    app, named = _refused(case)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConfigurationError) as info:
        RedisTokenCache(app)
    error = info.value
    assert named in error.message and "pass" in error.message  # what, and what to do instead
    shown = [str(error), repr(error), error.diagnostics(), caplog.text]
    cause = error.__cause__ or error.__context__
    if cause is not None:
        shown += [str(cause), repr(cause)]
    assert not any(PASSWORD in text for text in shown)


def test_the_support_server_really_requires_the_password(locked_redis: RedisServer) -> None:
    """Without this the password tests above would prove nothing."""
    import redis

    anonymous = redis.Redis(port=locked_redis.port, socket_timeout=2)
    try:
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.ping()
    finally:
        anonymous.close()
    assert Path(str(locked_redis.socket_path)).is_socket()
