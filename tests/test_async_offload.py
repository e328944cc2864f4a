"""Async adapters keep the event loop free: only signatures that may block leave it.

httpx.AsyncClient and aiohttp, against the local servers over real sockets: a software key
signs on the loop thread (a thread hop costs more than its 25 µs signature), a signer that
blocks 40 ms per signature never runs on the loop and the loop serves other work while each of
its signatures is in progress, 200 tasks with no token cause exactly one token, and a blocking
signer's signatures queue in its own bounded pool.

The loop is proved free by a handshake, not by a stopwatch: every signature waits until the
loop has run a callback it scheduled, which it can only do if the signature is not blocking it.
How long the loop may stall (the "under 50 ms with a 40 ms signer" figure) is a measurement and
lives in ``scripts/bench`` (async section), where a loaded machine cannot fail the suite.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
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


LOOP_ANSWER_BOUND = 10.0  # seconds a signature waits for the loop's answer before it gives up


class SlowSigner:
    """A signer that blocks like a busy YubiKey: 40 ms per signature, at most 2 at a time.

    Given the test's event loop (``watch``), each signature also asks the loop to run a callback
    and waits for it: a signature that blocked the loop would never see it run.
    """

    blocking = True
    concurrency = 2

    def __init__(self, inner: SoftwareSigner, delay: float = 0.04) -> None:
        self._inner = inner
        self._delay = delay
        self.threads: set[int] = set()
        self.active = 0
        self.most_active = 0
        self.signatures = 0
        self.loop_served = 0  # signatures during which the loop ran a callback
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._lock = threading.Lock()

    def watch_running_loop(self) -> None:
        """Call on the loop: its signatures will check that this loop keeps running."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    def _loop_answers(self) -> bool:
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread:
            return False  # on the loop thread itself: waiting would only deadlock
        answered = threading.Event()
        loop.call_soon_threadsafe(answered.set)
        return answered.wait(LOOP_ANSWER_BOUND)

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
        served = self._loop_answers()
        with self._lock:
            self.active -= 1
            self.signatures += 1
            self.loop_served += served
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
def test_a_slow_signer_never_blocks_the_loop_and_queues_in_its_own_pool(
    name: str, local: LocalDPoPServers, key: SoftwareSigner
) -> None:
    signer = SlowSigner(key)

    async def main() -> tuple[list[int], int]:
        signer.watch_running_loop()
        return await ADAPTERS[name](client_for(local, signer), local.api_url, 16), (
            threading.get_ident()
        )

    statuses, loop_thread = asyncio.run(main())
    assert statuses == [200] * 16
    assert loop_thread not in signer.threads
    assert signer.most_active <= SlowSigner.concurrency  # the signer's own bound, not 16
    # 16 resource proofs plus the token request's (and its nonce retry's): all off the loop,
    # and the loop answered during every one of them.
    assert signer.signatures >= 16
    assert signer.loop_served == signer.signatures


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


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_a_task_cancelled_while_another_thread_renews_leaves_the_slot_free(
    name: str, local: LocalDPoPServers, key: SoftwareSigner
) -> None:
    from dpop_hsm.token import Renewal

    tc = client_for(local, key)
    holder = tc.acquire()  # this thread renews; no token is cached yet
    assert isinstance(holder, Renewal)

    async def main() -> None:
        task = asyncio.create_task(ADAPTERS[name](tc, local.api_url, 1))
        await asyncio.sleep(0.3)  # the task now waits for our renewal in a worker thread
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with holder:  # our renewal ends without a token: the slot is free again
            pass

    asyncio.run(main())
    again = tc.try_acquire()
    assert isinstance(again, Renewal), "the cancelled task's worker kept the renewal slot"
    with again:
        pass
    assert asyncio.run(ADAPTERS[name](tc, local.api_url, 2)) == [200, 200]
