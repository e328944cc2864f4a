"""One small driver per HTTP adapter, so one contract suite runs over all of them.

A driver wraps an adapter exactly as a user would set it up (public API only) and offers:

* ``send(method, url, body=None) -> Reply``: one request; ``body`` is ``bytes``, ``None`` or a
  :class:`Streamed` (a one-shot iterator in the adapter's own kind, which cannot be replayed);
* ``send_concurrently(count, method, url) -> list[Reply]``: ``count`` requests at once (threads
  for a sync adapter, tasks on one event loop for an async one), started together;
* ``sent``: every request as it left through the client's transport (token requests included
  where the adapter sends them through its client), in order;
* ``close()``.

What the servers saw is asserted through ``LocalDPoPServers.counters``, not here.

A new adapter (aiohttp, …) subclasses :class:`Driver`, records what its transport sends, and
adds itself to :data:`DRIVERS`: the contract suite then runs over it with no other change.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

import requests
import requests.adapters

import dpop_hsm
from dpop_hsm.token import TokenClient

__all__ = ["DRIVERS", "Driver", "Reply", "Sent", "Streamed"]

RedirectPolicy = Literal["strip", "refuse"]
T = TypeVar("T")
# Generous: 200 concurrent requests on a busy 2-core machine queue for the connection pool.
TIMEOUT = 60.0


@dataclass(frozen=True)
class Reply:
    """The final response as the caller got it; header names lower-cased."""

    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Sent:
    """One request as it left through the adapter's transport."""

    method: str
    url: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        found = [v for k, v in self.headers if k.lower() == name.lower()]
        assert len(found) <= 1, f"{len(found)} {name} fields on one request"
        return found[0] if found else None


@dataclass(frozen=True)
class Streamed:
    """A request body the adapter gets as a one-shot stream of these chunks (not replayable)."""

    chunks: tuple[bytes, ...]


class Driver:
    """Base of the adapter drivers; see the module docstring for the interface."""

    name: ClassVar[str]
    # False for an adapter documented to follow same-origin redirects without credentials
    # (requests' plain Session: only DPoPSession re-signs hops).
    resigns_redirects: ClassVar[bool] = True

    def __init__(
        self,
        token_client: TokenClient,
        *,
        cross_origin_redirects: RedirectPolicy = "strip",
        raise_on_rejection: bool = True,
    ) -> None:
        self.sent: list[Sent] = []
        self._lock = threading.Lock()

    def _record(self, method: str, url: str, headers: Any) -> None:
        with self._lock:
            self.sent.append(Sent(method, url, tuple((str(k), str(v)) for k, v in headers)))

    def send(self, method: str, url: str, body: bytes | Streamed | None = None) -> Reply:
        raise NotImplementedError

    def send_concurrently(self, count: int, method: str, url: str) -> list[Reply]:
        """``count`` threads released together by a barrier; the first failure is re-raised."""
        barrier = threading.Barrier(count)
        replies: list[Reply] = []
        failures: list[BaseException] = []

        def worker() -> None:
            barrier.wait()
            try:
                reply = self.send(method, url)
            except BaseException as e:  # handed to the test thread below
                failures.append(e)
            else:
                with self._lock:
                    replies.append(reply)

        threads = [threading.Thread(target=worker) for _ in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]
        return replies

    def close(self) -> None:
        raise NotImplementedError


# --- requests --------------------------------------------------------------------------------


class _RecordingAdapter(requests.adapters.HTTPAdapter):
    def __init__(self, driver: Driver) -> None:
        super().__init__(pool_maxsize=64)
        self._driver = driver

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        self._driver._record(request.method or "", request.url or "", request.headers.items())
        return super().send(request, *args, **kwargs)


def _requests_body(body: bytes | Streamed | None) -> bytes | Iterator[bytes] | None:
    if isinstance(body, Streamed):
        return iter(body.chunks)
    return body


def _requests_reply(response: requests.Response) -> Reply:
    return Reply(
        response.status_code,
        {k.lower(): v for k, v in response.headers.items()},
        response.content,
    )


class RequestsSessionDriver(Driver):
    """``dpop_hsm.requests.DPoPSession``: token requests and redirects through the session."""

    name = "requests-DPoPSession"

    def __init__(
        self,
        token_client: TokenClient,
        *,
        cross_origin_redirects: RedirectPolicy = "strip",
        raise_on_rejection: bool = True,
    ) -> None:
        super().__init__(token_client)
        self.session: requests.Session = dpop_hsm.DPoPSession(
            token_client,
            cross_origin_redirects=cross_origin_redirects,
            raise_on_rejection=raise_on_rejection,
        )
        self.session.mount("http://", _RecordingAdapter(self))

    def send(self, method: str, url: str, body: bytes | Streamed | None = None) -> Reply:
        response = self.session.request(method, url, data=_requests_body(body), timeout=TIMEOUT)
        return _requests_reply(response)

    def close(self) -> None:
        self.session.close()


class RequestsAuthDriver(RequestsSessionDriver):
    """``dpop_hsm.DPoPAuth`` on a plain ``requests.Session``, as the README's quickstart."""

    name = "requests-DPoPAuth"
    resigns_redirects = False

    def __init__(
        self,
        token_client: TokenClient,
        *,
        cross_origin_redirects: RedirectPolicy = "strip",
        raise_on_rejection: bool = True,
    ) -> None:
        Driver.__init__(self, token_client)
        self.session = requests.Session()
        self.session.auth = dpop_hsm.DPoPAuth(
            token_client,
            cross_origin_redirects=cross_origin_redirects,
            raise_on_rejection=raise_on_rejection,
        )
        self.session.mount("http://", _RecordingAdapter(self))


# --- httpx -----------------------------------------------------------------------------------


def _httpx_reply(response: Any) -> Reply:
    return Reply(
        response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.content
    )


class HttpxDriver(Driver):
    """``dpop_hsm.httpx.DPoPAuth`` attached to an ``httpx.Client`` following redirects."""

    name = "httpx-Client"

    def __init__(
        self,
        token_client: TokenClient,
        *,
        cross_origin_redirects: RedirectPolicy = "strip",
        raise_on_rejection: bool = True,
    ) -> None:
        import httpx

        from dpop_hsm.httpx import DPoPAuth

        super().__init__(token_client)
        driver = self

        class Recording(httpx.HTTPTransport):
            def handle_request(self, request: httpx.Request) -> httpx.Response:
                driver._record(request.method, str(request.url), request.headers.multi_items())
                return super().handle_request(request)

        self.client = httpx.Client(transport=Recording(), follow_redirects=True, timeout=TIMEOUT)
        DPoPAuth(
            token_client,
            cross_origin_redirects=cross_origin_redirects,
            raise_on_rejection=raise_on_rejection,
        ).attach(self.client)

    def send(self, method: str, url: str, body: bytes | Streamed | None = None) -> Reply:
        content = iter(body.chunks) if isinstance(body, Streamed) else body
        return _httpx_reply(self.client.request(method, url, content=content))

    def close(self) -> None:
        self.client.close()


class HttpxAsyncDriver(Driver):
    """``dpop_hsm.httpx.DPoPAuth`` attached to an ``httpx.AsyncClient`` on one event loop."""

    name = "httpx-AsyncClient"

    def __init__(
        self,
        token_client: TokenClient,
        *,
        cross_origin_redirects: RedirectPolicy = "strip",
        raise_on_rejection: bool = True,
    ) -> None:
        import httpx

        from dpop_hsm.httpx import DPoPAuth

        super().__init__(token_client)
        driver = self

        class Recording(httpx.AsyncHTTPTransport):
            async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
                driver._record(request.method, str(request.url), request.headers.multi_items())
                return await super().handle_async_request(request)

        self.loop = asyncio.new_event_loop()

        async def make() -> httpx.AsyncClient:
            return httpx.AsyncClient(transport=Recording(), follow_redirects=True, timeout=TIMEOUT)

        self.client = self._run(make())
        DPoPAuth(
            token_client,
            cross_origin_redirects=cross_origin_redirects,
            raise_on_rejection=raise_on_rejection,
        ).attach(self.client)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    async def _send(self, method: str, url: str, body: bytes | Streamed | None) -> Reply:
        content: bytes | AsyncIterator[bytes] | None
        if isinstance(body, Streamed):

            async def stream(chunks: tuple[bytes, ...]) -> AsyncIterator[bytes]:
                for chunk in chunks:
                    yield chunk

            content = stream(body.chunks)
        else:
            content = body
        response = await self.client.request(method, url, content=content)
        return _httpx_reply(response)

    def send(self, method: str, url: str, body: bytes | Streamed | None = None) -> Reply:
        return self._run(self._send(method, url, body))

    def send_concurrently(self, count: int, method: str, url: str) -> list[Reply]:
        """``count`` tasks gathered on the driver's loop (all start before any finishes)."""

        async def many() -> list[Reply]:
            calls = [self._send(method, url, None) for _ in range(count)]
            return list(await asyncio.gather(*calls))

        return self._run(many())

    def close(self) -> None:
        try:
            self._run(self.client.aclose())
            self._run(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()


# --- aiohttp ---------------------------------------------------------------------------------


class AiohttpDriver(Driver):
    """``dpop_hsm.aiohttp.DPoPMiddleware`` on an ``aiohttp.ClientSession`` on one event loop.

    What left the client is recorded with an aiohttp trace (headers as written, every hop and
    token request included).
    """

    name = "aiohttp-ClientSession"

    def __init__(
        self,
        token_client: TokenClient,
        *,
        cross_origin_redirects: RedirectPolicy = "strip",
        raise_on_rejection: bool = True,
    ) -> None:
        import aiohttp

        from dpop_hsm.aiohttp import DPoPMiddleware

        super().__init__(token_client)
        driver = self

        async def on_headers_sent(
            session: Any, context: Any, params: aiohttp.TraceRequestHeadersSentParams
        ) -> None:
            driver._record(params.method, str(params.url), params.headers.items())

        trace = aiohttp.TraceConfig()
        trace.on_request_headers_sent.append(on_headers_sent)
        middleware = DPoPMiddleware(
            token_client,
            cross_origin_redirects=cross_origin_redirects,
            raise_on_rejection=raise_on_rejection,
        )
        self.loop = asyncio.new_event_loop()

        async def make() -> aiohttp.ClientSession:
            return aiohttp.ClientSession(
                middlewares=(middleware,),
                trace_configs=[trace],
                timeout=aiohttp.ClientTimeout(total=TIMEOUT),
                connector=aiohttp.TCPConnector(limit=64),
            )

        self.session = self.loop.run_until_complete(make())

    async def _send(self, method: str, url: str, body: bytes | Streamed | None) -> Reply:
        data: bytes | AsyncIterator[bytes] | None
        if isinstance(body, Streamed):

            async def stream(chunks: tuple[bytes, ...]) -> AsyncIterator[bytes]:
                for chunk in chunks:
                    yield chunk

            data = stream(body.chunks)
        else:
            data = body
        async with self.session.request(method, url, data=data) as response:
            content = await response.read()
            return Reply(
                response.status, {k.lower(): v for k, v in response.headers.items()}, content
            )

    def send(self, method: str, url: str, body: bytes | Streamed | None = None) -> Reply:
        return self.loop.run_until_complete(self._send(method, url, body))

    def send_concurrently(self, count: int, method: str, url: str) -> list[Reply]:
        async def many() -> list[Reply]:
            calls = [self._send(method, url, None) for _ in range(count)]
            return list(await asyncio.gather(*calls))

        return self.loop.run_until_complete(many())

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.session.close())
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()


DriverFactory = Callable[..., Driver]
# The adapters under contract, by test id. A new adapter adds one entry.
DRIVERS: dict[str, DriverFactory] = {
    RequestsAuthDriver.name: RequestsAuthDriver,
    RequestsSessionDriver.name: RequestsSessionDriver,
    HttpxDriver.name: HttpxDriver,
    HttpxAsyncDriver.name: HttpxAsyncDriver,
    AiohttpDriver.name: AiohttpDriver,
}
