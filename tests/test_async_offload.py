"""Async adapters keep the event loop free: only signatures that may block leave it.

httpx.AsyncClient and aiohttp, against the local servers over real sockets: a software key
signs on the loop thread (a thread hop costs more than its 25 µs signature), a signer that
sleeps 40 ms per signature never stalls the loop for 50 ms, 200 tasks with no token cause
exactly one token, and a blocking signer's signatures queue in its own bounded pool.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from typing import Any

import pytest

from dpop_hsm.signers.software import SoftwareSigner
from dpop_hsm.testing import ClientRegistration, LocalDPoPServers
from dpop_hsm.token import TokenClient

httpx = pytest.importorskip("httpx")
aiohttp = pytest.importorskip("aiohttp")

from dpop_hsm.aiohttp import DPoPMiddleware  # noqa: E402
from dpop_hsm.httpx import DPoPAuth  # noqa: E402

SECRET = "offload-secret-21c4"  # a fixture value the local AS registers


class SlowSigner:
    """A signer that blocks like a busy YubiKey: 40 ms per signature, at most 2 at a time."""

    blocking = True
    concurrency = 2

    def __init__(self, inner: SoftwareSigner, delay: float = 0.04) -> None:
        self._inner = inner
        self._delay = delay
        self.threads: set[int] = set()
        self.active = 0
        self.most_active = 0
        self._lock = threading.Lock()

    @property
    def alg(self) -> str:
        return self._inner.alg

    @property
    def public_jwk(self) -> Mapping[str, str]:
        return self._inner.public_jwk

    @property
    def thumbprint(self) -> str:
        return self._inner.thumbprint

    def sign(self, signing_input: bytes) -> bytes:
        with self._lock:
            self.threads.add(threading.get_ident())
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        time.sleep(self._delay)
        with self._lock:
            self.active -= 1
        return self._inner.sign(signing_input)


class RecordingSoftwareSigner(SlowSigner):
    """A non-blocking signer (like SoftwareSigner) that records the threads it signed on."""

    blocking = False

    def __init__(self, inner: SoftwareSigner) -> None:
        super().__init__(inner, delay=0.0)


@pytest.fixture(scope="module")
def key() -> SoftwareSigner:
    return SoftwareSigner.generate("ES256")


@pytest.fixture
def local() -> Iterator[LocalDPoPServers]:
    client = ClientRegistration("c", auth_method="client_secret_basic", client_secret=SECRET)
    with LocalDPoPServers(clients=[client], as_nonce=True, rs_nonce=True) as servers:
        yield servers


def client_for(local: LocalDPoPServers, signer: Any) -> TokenClient:
    return TokenClient(
        signer, token_endpoint=local.token_endpoint, client_id="c", client_secret=SECRET
    )


Fetch = Callable[[TokenClient, str, int], Coroutine[Any, Any, list[int]]]


async def via_httpx(tc: TokenClient, url: str, count: int) -> list[int]:
    async with httpx.AsyncClient(timeout=60) as http:
        DPoPAuth(tc).attach(http)
        responses = await asyncio.gather(*[http.get(url) for _ in range(count)])
    return [r.status_code for r in responses]


async def via_aiohttp(tc: TokenClient, url: str, count: int) -> list[int]:
    async with aiohttp.ClientSession(middlewares=(DPoPMiddleware(tc),)) as session:

        async def one() -> int:
            async with session.get(url) as response:
                await response.read()
                status: int = response.status
                return status

        return list(await asyncio.gather(*[one() for _ in range(count)]))


ADAPTERS: dict[str, Fetch] = {"httpx": via_httpx, "aiohttp": via_aiohttp}


async def with_stall_monitor(work: Awaitable[list[int]]) -> tuple[list[int], float]:
    """Run ``work`` while a ticker measures the loop's worst delay between 5 ms ticks."""
    worst = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst
        while not done.is_set():
            before = time.monotonic()
            await asyncio.sleep(0.005)
            worst = max(worst, time.monotonic() - before - 0.005)

    monitor = asyncio.create_task(ticker())
    try:
        result = await work
    finally:
        done.set()
        await monitor
    return result, worst


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_software_keys_sign_on_the_event_loop(
    name: str, local: LocalDPoPServers, key: SoftwareSigner
) -> None:
    signer = RecordingSoftwareSigner(key)

    async def main() -> tuple[list[int], int]:
        return await ADAPTERS[name](client_for(local, signer), local.api_url, 8), (
            threading.get_ident()
        )

    statuses, loop_thread = asyncio.run(main())
    assert statuses == [200] * 8
    assert signer.threads == {loop_thread}


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_a_slow_signer_never_stalls_the_loop_and_queues_in_its_own_pool(
    name: str, local: LocalDPoPServers, key: SoftwareSigner
) -> None:
    signer = SlowSigner(key)

    async def main() -> tuple[tuple[list[int], float], int]:
        fetch = ADAPTERS[name](client_for(local, signer), local.api_url, 16)
        return await with_stall_monitor(fetch), threading.get_ident()

    (statuses, worst), loop_thread = asyncio.run(main())
    assert statuses == [200] * 16
    assert loop_thread not in signer.threads
    assert signer.most_active <= SlowSigner.concurrency  # the signer's own bound, not 16
    assert worst < 0.05, f"event loop stalled for {worst * 1000:.0f} ms"


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_200_tasks_without_a_token_cause_exactly_one_token(
    name: str, local: LocalDPoPServers, key: SoftwareSigner
) -> None:
    statuses = asyncio.run(ADAPTERS[name](client_for(local, key), local.api_url, 200))
    assert statuses == [200] * 200
    assert local.counters.tokens_issued == 1
    assert local.counters.token_requests == 2  # the fetch and its one AS nonce retry


def test_aiohttp_token_requests_go_through_the_session_and_the_log_is_masked(
    local: LocalDPoPServers, key: SoftwareSigner, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []

    async def on_headers_sent(session: Any, context: Any, params: Any) -> None:
        seen.append(str(params.url))

    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(on_headers_sent)
    tc = client_for(local, key)
    caplog.set_level("DEBUG", logger="dpop_hsm.http")

    async def main() -> str:
        async with (
            aiohttp.ClientSession(
                middlewares=(DPoPMiddleware(tc),), trace_configs=[trace]
            ) as session,
            session.get(local.api_url) as response,
        ):
            assert response.status == 200
            text: str = await response.text()
            return text

    asyncio.run(main())
    assert seen.count(local.token_endpoint) == 2  # through our session: fetch + nonce retry
    token = tc.cached_token()
    assert token is not None
    assert token.access_token not in caplog.text
    assert SECRET not in caplog.text
    assert "****" in caplog.text


def test_aiohttp_token_transport_failures_are_aiohttp_errors_too(key: SoftwareSigner) -> None:
    import socket

    from dpop_hsm.errors import TransportError

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tc = TokenClient(
        key,
        token_endpoint=f"http://127.0.0.1:{port}/token",
        client_id="c",
        client_secret=SECRET,
        timeout=(0.5, 0.5),
    )

    async def main() -> None:
        async with aiohttp.ClientSession(middlewares=(DPoPMiddleware(tc),)) as session:
            with pytest.raises(aiohttp.ClientError) as info:
                await session.get(f"http://127.0.0.1:{port}/api")
            assert isinstance(info.value, TransportError)

    asyncio.run(main())


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_a_shared_cache_renewal_never_runs_on_the_event_loop(
    name: str, local: LocalDPoPServers, key: SoftwareSigner, tmp_path: Any
) -> None:
    """A shared cache's renewal takes a fleet lock (file or network I/O, possibly waiting for
    another process): even with a software key, its steps run in a worker thread."""
    from dpop_hsm.file_cache import FileTokenCache

    threads: list[int] = []

    class Recording(FileTokenCache):
        def renewal_flow(self, client: Any, previous: Any) -> Any:
            inner = super().renewal_flow(client, previous)

            def watched() -> Any:
                threads.append(threading.get_ident())
                response = None
                try:
                    request = next(inner)
                    while True:
                        response = yield request
                        threads.append(threading.get_ident())
                        request = inner.send(response)
                except StopIteration as stop:
                    return stop.value

            return watched()

    tc = TokenClient(
        key,
        token_endpoint=local.token_endpoint,
        client_id="c",
        client_secret=SECRET,
        cache=Recording(tmp_path / "cache"),
    )

    async def main() -> tuple[list[int], int]:
        return await ADAPTERS[name](tc, local.api_url, 4), threading.get_ident()

    statuses, loop_thread = asyncio.run(main())
    assert statuses == [200] * 4
    assert threads and loop_thread not in threads
