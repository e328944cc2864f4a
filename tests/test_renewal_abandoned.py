"""A renewal whose caller leaves in the middle of a step: a cancelled asyncio task.

The async adapters advance a renewal in a worker thread whenever a step may block (a shared
cache's fleet lock, a signer that blocks). A cancelled task stops waiting for that thread, but
the thread is still inside the step: the renewal slot must be freed at once, and what the flow
holds (the fleet lock, on a real redis-server here) released by the step when it returns.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dpop_hsm.shared_cache import entry_id
from dpop_hsm.signers.software import SoftwareSigner
from dpop_hsm.testing import ClientRegistration, LocalDPoPServers
from dpop_hsm.token import Renewal, TokenClient
from tests.support.redis import RedisServer, _require_redis

SECRET = "renewal-abandoned-secret-20c4"  # a fixture value the local AS registers


@pytest.fixture
def servers() -> Iterator[LocalDPoPServers]:
    _require_redis()
    with LocalDPoPServers(clients=[ClientRegistration("c", client_secret=SECRET)]) as srv:
        yield srv


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[Any]:
    client = redis_server.client()
    yield client
    client.close()


def test_a_cancelled_async_renewal_frees_the_client_and_the_fleet_lock(
    redis_server: RedisServer, redis_prefix: str, raw: Any, servers: LocalDPoPServers
) -> None:
    """aiohttp runs a shared cache's renewal steps in a worker thread. A task cancelled while
    its step waited for the fleet lock closed the running generator from the loop: the task
    ended with ValueError ("generator already executing") instead of CancelledError, and the
    client's renewal slot stayed taken for good (every later request timed out)."""
    aiohttp = pytest.importorskip("aiohttp")
    from dpop_hsm.aiohttp import DPoPMiddleware
    from dpop_hsm.redis import RedisTokenCache

    cache = RedisTokenCache.from_url(redis_server.url, prefix=redis_prefix, lease=2.0)
    client = TokenClient(
        SoftwareSigner.generate("ES256"),
        token_endpoint=servers.token_endpoint,
        client_id="c",
        client_secret=SECRET,
        scope="api",
        cache=cache,
        timeout=(2.0, 2.0),
    )
    name = entry_id(client.cache_key)
    lock, channel = cache._lock_name(name), cache._channel_name(name)
    raw.set(lock, b"4242:another-process", px=1000)  # the step waits for this one's token

    async def main() -> BaseException | None:
        async with aiohttp.ClientSession(middlewares=(DPoPMiddleware(client),)) as session:
            task = asyncio.create_task(session.get(servers.api_url))
            deadline = time.monotonic() + 10
            while raw.pubsub_numsub(channel)[0][1] < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # the step is inside the pub/sub wait
            task.cancel()
            try:
                await task
            except BaseException as e:  # the test looks at it
                return e
        return None

    ended = asyncio.run(main())
    assert isinstance(ended, asyncio.CancelledError), repr(ended)
    slot = client.try_acquire()
    assert isinstance(slot, Renewal)  # the slot is free: the next caller renews
    with slot:
        pass
    # The abandoned step went on (the foreign lock ran out, it took the lock) and released
    # the lock itself when it returned, before sending any token request.
    deadline = time.monotonic() + 10
    while raw.exists(lock) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert raw.exists(lock) == 0 and servers.counters.token_requests == 0
    assert client.get_token().is_valid() and servers.counters.tokens_issued == 1
    cache.close()
