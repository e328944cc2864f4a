"""A redirecting token endpoint never yields a usable token through the httpx adapter, even on a
client that follows redirects and was not ``attach()``-ed (RFC 6749 §3.2: the token endpoint
gets no redirects)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from dpop_hsm.errors import RedirectError
from dpop_hsm.signers.software import SoftwareSigner
from dpop_hsm.token import TokenClient

httpx = pytest.importorskip("httpx")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hits: list[str]


def _serve(handler: type[BaseHTTPRequestHandler]) -> tuple[_Server, threading.Thread]:
    server = _Server(("127.0.0.1", 0), handler)
    server.hits = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture
def redirecting_as() -> Iterator[tuple[str, _Server]]:
    class Collector(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            self.server.hits.append(self.rfile.read(length).decode())  # type: ignore[attr-defined]
            body = json.dumps({"access_token": "forged", "token_type": "DPoP"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    collector, t1 = _serve(Collector)
    target = f"http://127.0.0.1:{collector.server_address[1]}/collect"

    class Redirector(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(307)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

    redirector, t2 = _serve(Redirector)
    try:
        yield f"http://127.0.0.1:{redirector.server_address[1]}/token", collector
    finally:
        for server, thread in ((redirector, t2), (collector, t1)):
            server.shutdown()
            server.server_close()
            thread.join(5)


def _client(endpoint: str) -> TokenClient:
    return TokenClient(
        SoftwareSigner.generate(),
        token_endpoint=endpoint,
        client_id="c",
        client_secret="s3cret-value",
        auth_method="client_secret_post",
    )


def test_unattached_following_client_refuses_the_redirected_token(
    redirecting_as: tuple[str, _Server],
) -> None:
    from dpop_hsm.httpx import DPoPAuth

    endpoint, _ = redirecting_as
    with (
        httpx.Client(auth=DPoPAuth(_client(endpoint)), follow_redirects=True) as http,
        pytest.raises(RedirectError, match="attach"),
    ):
        http.get("http://127.0.0.1:9/api")


def test_attached_client_never_follows_the_token_redirect(
    redirecting_as: tuple[str, _Server],
) -> None:
    from dpop_hsm.httpx import DPoPAuth

    endpoint, collector = redirecting_as
    with httpx.Client(follow_redirects=True) as http:
        DPoPAuth(_client(endpoint)).attach(http)
        with pytest.raises(RedirectError):
            http.get("http://127.0.0.1:9/api")
    assert collector.hits == []  # the client secret never reached the redirect target
