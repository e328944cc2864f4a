"""The synchronous twin of a ``redis.asyncio.Redis``: how :class:`~dpop_hsm.redis.RedisTokenCache`
accepts an async application's client without ever using it.

The cache's renewal flow is synchronous code that the async adapters run in worker threads
(where they already run every step that may block), and the sync adapters have no event loop at
all. An asyncio client cannot serve it: its connections belong to the loop that opened them,
and handing each call back to that loop would tie the cache to one loop and put its Redis
traffic, pub/sub waits and timeouts on the application's loop, which the cache promises never
to touch. So the cache builds a ``redis.Redis`` of its own, on a new connection pool, with the
connection settings read from the async client's pool: the same server (TCP host and port, TLS
with the same ``ssl_*`` options, or the same unix socket), db, username and password or
credential provider, socket timeouts and keepalive, encoding, client name and protocol. The
async client and its pool are never used: the twin opens its own connections (count one more
pool; it holds a connection per worker thread inside a Redis call or a pub/sub wait).

Retries: redis-py's constructor default (10 retries with exponential backoff) is replaced by
none, as in :meth:`RedisTokenCache.from_url`, so a frozen Redis costs one socket timeout per
back-off period and not eleven. A retry policy the application chose (a ``retry`` other than
that default, ``retry_on_error`` or ``retry_on_timeout``) is kept: same backoff, same count,
same errors.

What cannot be copied faithfully is refused with :class:`ConfigurationError` naming the setting
and what to pass instead (never its value: it may be a password): cluster clients,
sentinel-managed pools, connection or pool classes other than redis-py's own, a credential
provider with only ``get_credentials_async``, and connection settings that are async code
(``redis_connect_func``, a parser or encoder class, an event dispatcher).
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

from ._optional import requires_extra
from .errors import ConfigurationError

with requires_extra("redis"):
    import redis
    import redis.asyncio
    import redis.asyncio.connection as async_connection
    import redis.asyncio.retry
    import redis.asyncio.sentinel
    import redis.connection
    import redis.retry
    from redis.backoff import NoBackoff
    from redis.credentials import CredentialProvider

__all__ = ["CONNECTION_CLASSES", "COPIED_SETTINGS", "sync_twin"]

CONNECTION_CLASSES: dict[type[Any], type[Any]] = {
    async_connection.Connection: redis.connection.Connection,
    async_connection.SSLConnection: redis.connection.SSLConnection,
    async_connection.UnixDomainSocketConnection: redis.connection.UnixDomainSocketConnection,
}
_POOL_CLASSES: dict[type[Any], type[Any]] = {
    async_connection.ConnectionPool: redis.connection.ConnectionPool,
    async_connection.BlockingConnectionPool: redis.connection.BlockingConnectionPool,
}

# Settings with the same name, meaning and default on both sides (tests/test_redis_async_client
# checks the defaults against the installed redis-py): copied as they are.
COPIED_SETTINGS = frozenset(
    {
        "host",
        "port",
        "path",
        "db",
        "username",
        "password",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "socket_keepalive_options",
        "socket_type",
        "socket_read_size",
        "encoding",
        "encoding_errors",
        "decode_responses",
        "client_name",
        "driver_info",
        "lib_name",
        "lib_version",
        "health_check_interval",
        "protocol",
        "legacy_responses",
        "ssl_keyfile",
        "ssl_certfile",
        "ssl_cert_reqs",
        "ssl_include_verify_flags",
        "ssl_exclude_verify_flags",
        "ssl_ca_certs",
        "ssl_ca_data",
        "ssl_ca_path",
        "ssl_check_hostname",
        "ssl_min_version",
        "ssl_ciphers",
        "ssl_password",
    }
)
# The async pool's own moving parts, which the twin's pool builds afresh for itself.
_POOL_STATE = frozenset(
    {
        "himport_registry",
        "maint_notifications_pool_handler",
        "oss_cluster_maint_notifications_handler",
        "maintenance_state",
        "maintenance_notification_hash",
        "orig_host_address",
        "orig_socket_timeout",
        "orig_socket_connect_timeout",
    }
)
_HANDLED = frozenset(
    {
        "credential_provider",
        "maint_notifications_config",
        "retry",
        "retry_on_error",
        "retry_on_timeout",
    }
)

# The policy redis.asyncio.Redis() gives a client that was not told otherwise.
_retry_parameter = inspect.signature(redis.asyncio.Redis.__init__).parameters.get("retry")
_DEFAULT_RETRY = None if _retry_parameter is None else _retry_parameter.default
_INSTEAD = "pass a synchronous redis.Redis configured the same way instead"


def sync_twin(client: redis.asyncio.Redis) -> redis.Redis:
    """A ``redis.Redis`` on a new pool that connects exactly as ``client`` would."""
    pool = client.connection_pool
    if isinstance(pool, redis.asyncio.sentinel.SentinelConnectionPool):
        raise ConfigurationError(
            "a Sentinel-managed redis.asyncio client cannot be mirrored (the master moves): "
            "pass redis.sentinel.Sentinel(...).master_for(...), a synchronous client"
        )
    sync_pool_class = _POOL_CLASSES.get(type(pool))
    if sync_pool_class is None:
        raise ConfigurationError(
            f"the redis.asyncio client's pool class {type(pool).__qualname__} has no "
            f"synchronous twin here: {_INSTEAD}"
        )
    sync_connection_class = CONNECTION_CLASSES.get(pool.connection_class)
    if sync_connection_class is None:
        raise ConfigurationError(
            f"the redis.asyncio client's connection class {pool.connection_class.__qualname__} "
            f"has no synchronous twin here: {_INSTEAD}"
        )
    settings = pool.connection_kwargs
    kwargs = {k: v for k, v in settings.items() if k in COPIED_SETTINGS}
    for name, value in settings.items():
        if name in COPIED_SETTINGS or name in _POOL_STATE or name in _HANDLED:
            continue
        if value is not None:  # only the name: the value may hold a secret
            raise ConfigurationError(
                f"the redis.asyncio client's connection setting {name!r} cannot be copied to "
                f"a synchronous connection: {_INSTEAD}"
            )
    provider = settings.get("credential_provider")
    if provider is not None:
        kwargs["credential_provider"] = _sync_provider(provider)
    kwargs.update(_retry_settings(settings))
    if isinstance(pool, async_connection.BlockingConnectionPool):
        kwargs["timeout"] = pool.timeout
    config = settings.get("maint_notifications_config")
    try:
        twin_pool = sync_pool_class(
            connection_class=sync_connection_class,
            max_connections=pool.max_connections,
            maint_notifications_config=copy.deepcopy(config),
            **kwargs,
        )
    except (redis.RedisError, ValueError, TypeError) as e:
        raise ConfigurationError(
            f"the redis.asyncio client's settings do not make a synchronous pool "
            f"({type(e).__name__}): {_INSTEAD}"
        ) from None  # redis-py's text may quote a setting's value
    # credential_provider given to the client too: a streaming provider is wired to the pool
    # for re-authentication by the client's constructor.
    return redis.Redis(
        connection_pool=twin_pool, credential_provider=kwargs.get("credential_provider")
    )


def _sync_provider(provider: object) -> CredentialProvider:
    """The same provider, if a synchronous connection can ask it (``get_credentials``)."""
    if not isinstance(provider, CredentialProvider):
        raise ConfigurationError(
            f"the redis.asyncio client's credential_provider is a {type(provider).__qualname__}, "
            "not a redis.credentials.CredentialProvider: pass one, or a synchronous redis.Redis"
        )
    if type(provider).get_credentials is CredentialProvider.get_credentials:
        raise ConfigurationError(
            f"the redis.asyncio client's credential_provider ({type(provider).__qualname__}) "
            "implements only get_credentials_async, and the cache's connections are "
            "synchronous: implement get_credentials() too, pass username/password, or pass a "
            "synchronous redis.Redis with a provider it can call"
        )
    return provider


def _retry_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The twin's retry policy: none for redis-py's default, else the application's own."""
    retry = settings.get("retry")
    on_error = list(settings.get("retry_on_error") or ())
    on_timeout = bool(settings.get("retry_on_timeout"))
    if not on_error and not on_timeout and (retry is None or retry == _DEFAULT_RETRY):
        return {"retry": redis.retry.Retry(NoBackoff(), 0)}
    out: dict[str, Any] = {}
    if on_error:
        out["retry_on_error"] = on_error
    if on_timeout:
        out["retry_on_timeout"] = True
    if retry is not None:
        if type(retry) is not redis.asyncio.retry.Retry:
            raise ConfigurationError(
                f"the redis.asyncio client's retry policy is a {type(retry).__qualname__}, "
                f"which has no synchronous twin: {_INSTEAD}"
            )
        out["retry"] = redis.retry.Retry(
            copy.deepcopy(retry._backoff), retry.get_retries(), tuple(retry._supported_errors)
        )
    return out
