"""httpx transport (Client and AsyncClient, one generator flow) over real sockets."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import pytest

pytest.importorskip("httpx")

import httpx

from dpop_hsm.errors import (
    NonceError,
    RedirectError,
    TokenResponseError,
    TokenTypeError,
    UnauthorizedError,
)
from dpop_hsm.httpx import DPoPAuth
from dpop_hsm.signers.base import Signer
from dpop_hsm.testing import LocalDPoPServers
from tests.support.servers import AUTH_METHODS, CLIENT_SECRET, token_client


def _claims(response: httpx.Response) -> dict[str, str]:
    return {item["type"]: item["value"] for item in response.json()}


class ThreadRecordingSigner:
    """Wraps a Signer and records which threads signed (to prove the event loop never did)."""

    def __init__(self, inner: Signer) -> None:
        self._inner = inner
        self.threads: set[int] = set()
        self.lock = threading.Lock()

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
        with self.lock:
            self.threads.add(threading.get_ident())
        time.sleep(0.005)  # a slow device
        return self._inner.sign(signing_input)


@pytest.mark.parametrize("method", AUTH_METHODS)
def test_sync_each_auth_method(servers: LocalDPoPServers, dpop_signer: Signer, method: str) -> None:
    with httpx.Client(auth=DPoPAuth(token_client(servers, dpop_signer, method))) as client:
        first = client.get(servers.api_url)
        assert first.status_code == 200
        assert _claims(first)["authorization_scheme"] == "DPoP"
        assert dpop_signer.thumbprint in _claims(first)["cnf"]
        for _ in range(3):
            assert client.post(servers.api_url, content=b"body").status_code == 200
    c = servers.counters
    assert c.tokens_issued == 1 and c.as_nonce_challenges == 1 and c.rs_nonce_challenges == 1


@pytest.mark.parametrize("method", AUTH_METHODS)
def test_async_each_auth_method(
    servers: LocalDPoPServers, dpop_signer: Signer, method: str
) -> None:
    async def main() -> None:
        auth = DPoPAuth(token_client(servers, dpop_signer, method))
        async with httpx.AsyncClient(auth=auth) as client:
            for _ in range(3):
                response = await client.post(servers.api_url, json={"a": 1})
                assert response.status_code == 200

    asyncio.run(main())
    assert servers.counters.tokens_issued == 1 and servers.counters.rs_nonce_challenges == 1


def test_async_32_tasks_one_token_and_signing_off_the_loop(
    servers: LocalDPoPServers, dpop_signer: Signer
) -> None:
    signer = ThreadRecordingSigner(dpop_signer)
    tc = token_client(servers, signer, "private_key_jwt")  # type: ignore[arg-type]

    async def main() -> int:
        loop_thread = threading.get_ident()
        async with httpx.AsyncClient(auth=DPoPAuth(tc)) as client:
            responses = await asyncio.gather(*[client.get(servers.api_url) for _ in range(32)])
        assert [r.status_code for r in responses] == [200] * 32
        return loop_thread

    loop_thread = asyncio.run(main())
    assert servers.counters.tokens_issued == 1
    assert servers.counters.token_requests == 2  # the fetch and its single nonce retry
    assert signer.threads and loop_thread not in signer.threads


def test_sync_32_threads_one_token(servers: LocalDPoPServers, dpop_signer: Signer) -> None:
    barrier = threading.Barrier(32)
    statuses: list[int] = []
    with httpx.Client(auth=DPoPAuth(token_client(servers, dpop_signer))) as client:

        def worker() -> None:
            barrier.wait()
            statuses.append(client.get(servers.api_url).status_code)

        threads = [threading.Thread(target=worker) for _ in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert statuses == [200] * 32
    assert servers.counters.tokens_issued == 1


def test_threads_and_tasks_share_one_renewal(
    servers: LocalDPoPServers, dpop_signer: Signer
) -> None:
    tc = token_client(servers, dpop_signer)
    auth = DPoPAuth(tc)
    barrier = threading.Barrier(9)
    results: list[int] = []

    def thread_worker() -> None:
        with httpx.Client(auth=auth) as client:
            barrier.wait()
            results.append(client.get(servers.api_url).status_code)

    def loop_worker() -> None:
        async def main() -> None:
            async with httpx.AsyncClient(auth=auth) as client:
                barrier.wait()
                rs = await asyncio.gather(*[client.get(servers.api_url) for _ in range(8)])
                results.extend(r.status_code for r in rs)

        asyncio.run(main())

    threads = [threading.Thread(target=thread_worker) for _ in range(8)]
    threads.append(threading.Thread(target=loop_worker))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 16
    assert servers.counters.tokens_issued == 1


def test_async_short_lifetime_renews(servers: LocalDPoPServers, dpop_signer: Signer) -> None:
    servers.token_lifetime = 2
    tc = token_client(servers, dpop_signer, "client_secret_post")

    async def main() -> set[str]:
        seen: set[str] = set()
        async with httpx.AsyncClient(auth=DPoPAuth(tc)) as client:
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline:
                response = await client.get(servers.api_url)
                assert response.status_code == 200
                seen.add(_claims(response)["jti"])
                await asyncio.sleep(0.1)
        return seen

    seen = asyncio.run(main())
    assert len(seen) == servers.counters.tokens_issued >= 2
    assert servers.counters.rejections["token_expired"] == 0


def test_invalid_token_renews_once(servers: LocalDPoPServers, dpop_signer: Signer) -> None:
    with httpx.Client(auth=DPoPAuth(token_client(servers, dpop_signer))) as client:
        assert client.get(servers.api_url).status_code == 200
        servers.revoke_all()
        assert client.get(servers.api_url).status_code == 200
    assert servers.counters.tokens_issued == 2


@pytest.mark.parametrize(
    ("behavior", "error"),
    [
        ("error_500", TokenResponseError),
        ("not_json", TokenResponseError),
        ("no_access_token", TokenResponseError),
        ("bearer", TokenTypeError),
        ("always_nonce", NonceError),
    ],
)
def test_token_failures_are_typed_sync_and_async(
    servers: LocalDPoPServers, dpop_signer: Signer, behavior: object, error: type[Exception]
) -> None:
    servers.as_behavior = behavior  # type: ignore[assignment]
    with (
        httpx.Client(auth=DPoPAuth(token_client(servers, dpop_signer))) as client,
        pytest.raises(error),
    ):
        client.get(servers.api_url)

    async def main() -> None:
        async with httpx.AsyncClient(auth=DPoPAuth(token_client(servers, dpop_signer))) as client:
            await client.get(servers.api_url)

    with pytest.raises(error):
        asyncio.run(main())
    assert servers.counters.api_requests == 0  # never sent the API request without a token


def test_as_unreachable_raises_httpx_transport_error(dpop_signer: Signer) -> None:
    import socket

    from dpop_hsm.token import TokenClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tc = TokenClient(
        dpop_signer, token_endpoint=f"http://127.0.0.1:{port}/t", client_id="c", auth_method="none"
    )
    with httpx.Client(auth=DPoPAuth(tc)) as client, pytest.raises(httpx.TransportError):
        client.get(f"http://127.0.0.1:{port}/api")
    assert tc.acquire() is not None  # the renewal slot was released for the next caller


def test_rs_rejections_are_typed(servers: LocalDPoPServers, dpop_signer: Signer) -> None:
    servers.rs_behavior = "always_nonce"
    with httpx.Client(
        auth=DPoPAuth(token_client(servers, dpop_signer), raise_on_rejection=True)
    ) as client:
        with pytest.raises(NonceError):
            client.get(servers.api_url)
        servers.rs_behavior = "normal"
        servers.required_scope = "admin"
        with pytest.raises(UnauthorizedError) as info:
            client.get(servers.api_url)
        assert info.value.error == "insufficient_scope"


def test_streamed_body_is_never_resent(servers: LocalDPoPServers, dpop_signer: Signer) -> None:
    def body() -> Iterator[bytes]:
        yield b"abc"

    async def abody() -> AsyncIterator[bytes]:
        yield b"abc"

    with httpx.Client(
        auth=DPoPAuth(token_client(servers, dpop_signer), raise_on_rejection=True)
    ) as client:
        with pytest.raises(UnauthorizedError, match="not replayable"):
            client.post(servers.api_url, content=body())
        assert servers.counters.api_requests == 1
        assert client.post(servers.api_url, content=body()).status_code == 200

    async def main() -> None:
        auth = DPoPAuth(token_client(servers, dpop_signer), raise_on_rejection=True)
        async with httpx.AsyncClient(auth=auth) as client:
            servers.rs_nonces.rotate()
            servers.rs_nonces.rotate()  # the known nonce is now stale
            with pytest.raises(UnauthorizedError, match="not replayable"):
                await client.post(servers.api_url, content=abody())

    asyncio.run(main())


def test_redirects_with_attach(servers: LocalDPoPServers, dpop_signer: Signer) -> None:
    auth = DPoPAuth(token_client(servers, dpop_signer))
    with httpx.Client(follow_redirects=True) as client:
        auth.attach(client)
        client.get(servers.api_url)
        same = client.post(servers.rs_url + "/redirect?to=/api/dpop/test", content=b"x")
        assert same.status_code == 200 and same.history[-1].status_code == 307
        cross = client.get(servers.rs_url + "/redirect", params={"to": servers.as_url + "/echo"})
        assert cross.json() == {"authorization": False, "dpop": False}
    assert not any(k.startswith("proof_") for k in servers.counters.rejections)

    async def main() -> None:
        async with httpx.AsyncClient(follow_redirects=True) as client:
            auth.attach(client)
            response = await client.get(servers.rs_url + "/redirect?to=/api/dpop/test")
            assert response.status_code == 200

    asyncio.run(main())


def test_attaching_twice_is_attaching_once(servers: LocalDPoPServers, dpop_signer: Signer) -> None:
    # A second redirect hook took the first send for a redirect hop: token fetches failed
    # with a RedirectError although nothing redirected.
    auth = DPoPAuth(token_client(servers, dpop_signer))
    with httpx.Client(follow_redirects=True) as client:
        auth.attach(client)
        auth.attach(client)
        assert len(client.event_hooks["request"]) == 1
        assert client.get(servers.api_url).status_code == 200

    async def main() -> None:
        async with httpx.AsyncClient() as client:
            auth.attach(client)
            auth.attach(client)
            assert len(client.event_hooks["request"]) == 1
            assert (await client.get(servers.api_url)).status_code == 200

    asyncio.run(main())


def test_redirect_refused_or_detected(servers: LocalDPoPServers, dpop_signer: Signer) -> None:
    tc = token_client(servers, dpop_signer)
    with httpx.Client(follow_redirects=True) as client:
        DPoPAuth(tc, cross_origin_redirects="refuse").attach(client)
        with pytest.raises(RedirectError):
            client.get(servers.rs_url + "/redirect", params={"to": servers.as_url + "/echo"})
    with (
        httpx.Client(follow_redirects=True, auth=DPoPAuth(tc)) as client,
        pytest.raises(RedirectError),
    ):
        client.get(servers.rs_url + "/redirect?to=/api/dpop/test")  # no attach: loud, not silent
    with httpx.Client(auth=DPoPAuth(tc)) as client:  # not following: just the 307
        assert client.get(servers.rs_url + "/redirect?to=/x").status_code == 307


def test_the_trace_guard_stays_where_no_hook_sees_the_hops(
    servers: LocalDPoPServers, dpop_signer: Signer
) -> None:
    """attach() lets its client's request hook take the per-request trace guard off (that hook
    sees every hop); the same auth on a client it was not attached to keeps the guard, so the
    cross-origin hop goes out bare. The caller's own trace is called either way."""
    auth = DPoPAuth(token_client(servers, dpop_signer))
    written: list[tuple[str, list[bytes]]] = []

    def mine(event: str, info: dict[str, Any]) -> None:
        if event.endswith("send_request_headers.started"):
            request = info["request"]
            written.append((bytes(request.url).decode(), [k.lower() for k, _ in request.headers]))

    trace = {"trace": mine}
    with httpx.Client() as attached, httpx.Client(follow_redirects=True, auth=auth) as other:
        auth.attach(attached)
        assert attached.get(servers.api_url, extensions=trace).status_code == 200
        assert written and {b"dpop", b"authorization"} <= set(written[-1][1])
        with pytest.raises(RedirectError, match="attach"):
            other.get(
                servers.rs_url + "/redirect",
                params={"to": servers.as_url + "/echo"},
                extensions=trace,
            )
    hop_url, hop_fields = written[-1]
    assert hop_url.startswith(servers.as_url + "/echo")
    assert b"dpop" not in hop_fields and b"authorization" not in hop_fields


def test_debug_log_holds_no_secret(
    servers: LocalDPoPServers, dpop_signer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    proofs: list[str] = []

    def record(request: httpx.Request) -> None:
        if "DPoP" in request.headers:
            proofs.append(request.headers["DPoP"])

    tokens = []
    for method in AUTH_METHODS:
        tc = token_client(servers, dpop_signer, method)
        with httpx.Client(auth=DPoPAuth(tc), event_hooks={"request": [record]}) as client:
            assert client.post(servers.api_url, json={"password": "pw-123"}).status_code == 200
        token = tc.cached_token()
        assert token is not None
        tokens.append(token.access_token)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "authorization: ****" in text.lower() and "dpop: ****" in text.lower()
    assert '"password":"****"' in text and "client_secret=****" in text
    for secret in [CLIENT_SECRET, "pw-123", *tokens, *proofs]:
        assert secret not in text
        assert all(secret not in repr(r.__dict__) for r in caplog.records)


def test_plain_http_to_a_remote_host_is_refused_before_any_token(
    servers: LocalDPoPServers, dpop_signer: Signer
) -> None:
    from dpop_hsm.errors import InsecureEndpointError

    with (
        httpx.Client(auth=DPoPAuth(token_client(servers, dpop_signer))) as client,
        pytest.raises(InsecureEndpointError),
    ):
        client.get("http://rs.example.com/api")
    assert servers.counters.token_requests == 0
