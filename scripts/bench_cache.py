"""Shared token caches: what a cache hit costs over the in-memory cache, what a Redis read
costs, what a frozen Redis adds to one request, and the fleet's token requests per renewal
window with and without sharing. All on a local redis-server started for the run.

Plugged into scripts/bench.py as ``bench_cache(seconds)``; speed is measured here only.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dpop_hsm.testing import LocalDPoPServers
    from dpop_hsm.token import TokenCache, TokenClient
    from tests.support.redis import RedisServer

    MakeClient = Callable[[TokenCache], TokenClient]

Row = tuple[str, float]
SECRET = "bench-cache-secret"  # a fixture value the local AS registers


def _per_call_us(fn: Callable[[], object], seconds: float) -> float:
    calls, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(200):
            fn()
        calls += 200
        now = time.perf_counter()
        if now >= deadline:
            return (now - start) / calls * 1e6


def _interleaved_us(
    a: Callable[[], object], b: Callable[[], object], seconds: float, rounds: int = 7
) -> tuple[float, float]:
    per = seconds / (2 * rounds)
    xs, ys = [], []
    for i in range(rounds):
        if i % 2:
            ys.append(_per_call_us(b, per))
            xs.append(_per_call_us(a, per))
        else:
            xs.append(_per_call_us(a, per))
            ys.append(_per_call_us(b, per))
    return statistics.median(xs), statistics.median(ys)


def bench_cache(seconds: float) -> list[Row]:
    from dpop_hsm.redis import RedisTokenCache
    from dpop_hsm.signers.software import SoftwareSigner
    from dpop_hsm.testing import ClientRegistration, LocalDPoPServers
    from dpop_hsm.token import TokenCache, TokenClient
    from tests.support.redis import RedisServer

    rows: list[Row] = []
    signer = SoftwareSigner.generate("ES256")
    with tempfile.TemporaryDirectory() as base:
        server = RedisServer(Path(base)).start()
        try:
            with LocalDPoPServers(clients=[ClientRegistration("c", client_secret=SECRET)]) as srv:

                def client(cache: TokenCache) -> TokenClient:
                    return TokenClient(
                        signer,
                        token_endpoint=srv.token_endpoint,
                        client_id="c",
                        client_secret=SECRET,
                        scope="api",
                        cache=cache,
                    )

                local = client(TokenCache())
                shared_cache = RedisTokenCache.from_url(server.url, prefix="bench:")
                shared = client(shared_cache)
                local.get_token()
                shared.get_token()
                m, r = _interleaved_us(local.get_token, shared.get_token, seconds * 0.4)
                rows.append(("get_token() hit, in-memory TokenCache (us)", m))
                rows.append(("get_token() hit, RedisTokenCache (us)", r))
                rows.append(("  a hit's extra cost over the in-memory cache (us)", r - m))
                key = shared.cache_key
                rows.append(
                    (
                        "Redis read of the shared entry (renewal path) (us)",
                        _per_call_us(lambda: shared_cache.load(key), seconds * 0.2),
                    )
                )
                rows.extend(_frozen(server, client))
                rows.extend(_fleet(srv, server, client, seconds))
                shared_cache.close()
        finally:
            server.stop()
    return rows


def _frozen(server: RedisServer, client: MakeClient) -> list[Row]:
    """Worst time one renewal takes while Redis is frozen (SIGSTOP), with the defaults."""
    from dpop_hsm.redis import RedisTokenCache

    quiet = logging.getLogger("dpop_hsm.shared_cache")  # its one WARNING is expected here
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    cache = RedisTokenCache.from_url(server.url, prefix="bench-frozen:")
    tc = client(cache)
    tc.get_token()
    server.freeze()
    try:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            tc.invalidate()  # as after an RS invalid_token: drop it here and in Redis
            tc.get_token()
            times.append(time.perf_counter() - start)
    finally:
        server.resume()
        cache.close()
        quiet.setLevel(level)
    return [
        ("invalidate + renewal, Redis frozen, first (one op timeout) (ms)", times[0] * 1000),
        ("invalidate + renewal, Redis frozen, next (Redis skipped) (ms)", max(times[1:]) * 1000),
    ]


def _fleet(
    srv: LocalDPoPServers, server: RedisServer, client: MakeClient, seconds: float
) -> list[Row]:
    """8 clients with caches of their own (standing for processes), 2 threads each, a 2 s
    token lifetime: token requests per renewal window, shared through Redis vs unshared."""
    from dpop_hsm.redis import RedisTokenCache
    from dpop_hsm.token import TokenCache

    lifetime, duration = 2.0, max(4.0, seconds * 1.5)
    srv.token_lifetime = lifetime
    rows: list[Row] = []

    def shared() -> TokenCache:
        return RedisTokenCache.from_url(server.url, prefix="bench-fleet:")

    makers: list[tuple[str, Callable[[], TokenCache]]] = [
        ("shared through Redis", shared),
        ("unshared (in-memory each)", TokenCache),
    ]
    for label, make in makers:
        caches = [make() for _ in range(8)]
        clients = [client(c) for c in caches]
        before = srv.counters.tokens_issued
        stop = time.monotonic() + duration

        def work(tc: TokenClient, stop: float = stop) -> None:
            while time.monotonic() < stop:
                tc.get_token()
                time.sleep(0.02)

        threads = [threading.Thread(target=work, args=(c,)) for c in clients for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        issued = srv.counters.tokens_issued - before
        per_window = issued / (duration / lifetime)
        rows.append((f"fleet of 8, token requests per window, {label}", per_window))
        for c in caches:
            if hasattr(c, "close"):
                c.close()
    return rows
