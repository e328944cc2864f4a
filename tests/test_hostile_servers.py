"""Hostile servers: the token client and the transport adapters against servers that misbehave.

Each server here is a few lines on a raw socket on 127.0.0.1 (threads, no framework), so it can
do what no well-behaved framework would: close mid-response, never answer, stream an endless
body, send two ``DPoP-Nonce`` fields, loop redirects. Every case must end, in bounded time, in a
typed error or the documented recovery, and credentials (client secret, access token, proof)
must never reach a server other than the one they were configured for.

``requests`` adapter note: errors raised by ``requests`` itself on the *resource* request (a
dropped connection, too many redirects) stay ``requests`` exceptions — that is the contract of
an ``AuthBase``; the token client, which owns its requests, turns them into ``TransportError``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dpop_hsm.errors import (
    DPoPError,
    NonceError,
    RedirectError,
    TokenResponseError,
    TransportError,
)
from dpop_hsm.signers.software import SoftwareSigner
from tests.support.raw_http import Handler, RawServer, Seen, response

token_mod = pytest.importorskip("dpop_hsm.token", reason="token client not landed")
TokenClient = token_mod.TokenClient

CLIENT_SECRET = "client-secret-5f9e-HOSTILE"  # a fixture, checked for leaks
ACCESS_TOKEN = "at-hostile-0123456789"
TOKEN_JSON = json.dumps(
    {"access_token": ACCESS_TOKEN, "token_type": "DPoP", "expires_in": 300}
).encode()
SHORT = (0.5, 0.5)  # (connect, read) seconds for the hang cases
BOUND = 10.0  # no case may take longer than this (seconds)


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], RawServer]]:
    servers: list[RawServer] = []

    def start(handler: Handler) -> RawServer:
        server = RawServer(handler)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def signer() -> SoftwareSigner:
    return SoftwareSigner.generate("ES256")


def token_client(signer: SoftwareSigner, server: RawServer, **options: Any) -> Any:
    options.setdefault("timeout", SHORT)
    return TokenClient(
        signer,
        token_endpoint=server.url + "/token",
        client_id="client-1",
        client_secret=CLIENT_SECRET,
        **options,
    )


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    try:
        result: Any = call()
    except DPoPError as e:
        result = e
    return result, time.monotonic() - started


# --- the token client --------------------------------------------------------------------


def test_token_client_has_a_finite_default_timeout(signer: SoftwareSigner) -> None:
    client = TokenClient(
        signer, token_endpoint="https://as.example.com/token", client_id="c", client_secret="s"
    )
    connect, read = client.timeout
    assert 0 < connect <= 60 and 0 < read <= 60


# Regression (found by this suite): a connection dropped mid-body raised urllib3's ProtocolError
# (IncompleteRead) out of send_http_request untyped.


@pytest.mark.parametrize(
    "partial",
    [
        b"",  # accept, read the request, close without a byte
        b"HTTP/1.1 200 OK\r\nContent-Ty",  # close inside the headers
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
            b'{"access_token":"x',  # close inside the body
        ),
        pytest.param(
            b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{"access_token"',
        ),
    ],
    ids=["no-bytes", "mid-headers", "mid-body", "mid-chunk"],
)
def test_token_endpoint_closing_mid_response(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer], partial: bytes
) -> None:
    def handler(seen: Seen, conn: socket.socket, index: int) -> None:
        conn.sendall(partial)
        conn.shutdown(socket.SHUT_RDWR)
        conn.close()

    server = serve(handler)
    result, elapsed = timed(token_client(signer, server).get_token)
    assert isinstance(result, TransportError | TokenResponseError), repr(result)
    assert elapsed < BOUND


def test_token_endpoint_never_answering_times_out(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    def handler(seen: Seen, conn: socket.socket, index: int) -> None:
        server.stop.wait(30)  # hold the connection open, say nothing

    server = serve(handler)
    result, elapsed = timed(token_client(signer, server).get_token)
    assert isinstance(result, TransportError), repr(result)
    assert elapsed < 4 * sum(SHORT) + 2  # the configured timeout, not the server, decides


# Regression (found by this suite, fixed in 39482b0): the timeout was per socket read only.
def test_token_endpoint_dripping_bytes_is_bounded_by_a_total_deadline(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    body = b'{"error":"slow"}'

    def handler(seen: Seen, conn: socket.socket, index: int) -> None:
        conn.sendall(b"HTTP/1.1 400 X\r\nContent-Length: %d\r\n\r\n" % len(body))
        for byte in body:
            if server.stop.wait(0.3):
                return
            conn.sendall(bytes([byte]))

    server = serve(handler)
    result, elapsed = timed(token_client(signer, server).get_token)
    assert isinstance(result, TransportError), repr(result)
    assert elapsed < 3.0


def test_token_endpoint_never_accepting_times_out(signer: SoftwareSigner) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # the kernel completes the handshake; nobody ever accepts or reads
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/token"
        client = TokenClient(
            signer, token_endpoint=url, client_id="c", client_secret=CLIENT_SECRET, timeout=SHORT
        )
        result, elapsed = timed(client.get_token)
    finally:
        listener.close()
    assert isinstance(result, TransportError), repr(result)
    assert elapsed < 4 * sum(SHORT) + 2


@pytest.mark.parametrize("framing", ["content-length", "close-delimited", "chunked"])
def test_token_endpoint_huge_body_is_read_bounded(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer], framing: str
) -> None:
    chunk = b"A" * 65536
    limit = 256 * 1024 * 1024  # what the server is willing to send

    def handler(seen: Seen, conn: socket.socket, index: int) -> None:
        head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        if framing == "content-length":
            head += f"Content-Length: {limit}\r\n"
        elif framing == "chunked":
            head += "Transfer-Encoding: chunked\r\n"
        else:
            head += "Connection: close\r\n"
        prefix = b'{"access_token":"'
        if framing == "chunked":
            prefix = b"%x\r\n%s\r\n" % (len(prefix), prefix)
        server.send(conn, (head + "\r\n").encode() + prefix)
        piece = b"%x\r\n%s\r\n" % (len(chunk), chunk) if framing == "chunked" else chunk
        try:
            while server.bytes_sent < limit and not server.stop.is_set():
                server.send(conn, piece)
        except OSError:
            return  # the client hung up: exactly what a bounded reader does

    server = serve(handler)
    result, elapsed = timed(token_client(signer, server).get_token)
    assert isinstance(result, TokenResponseError), repr(result)
    assert elapsed < BOUND
    # The client stopped reading long before the server ran out: socket buffers plus the
    # 1 MiB bound, not 256 MiB.
    assert server.bytes_sent < 32 * 1024 * 1024


@pytest.mark.parametrize(
    ("status", "content_type", "body"),
    [
        (200, "text/plain", b"everything is fine"),
        (200, "text/html", b"<html><body>Welcome to our captive portal</body></html>"),
        (200, "application/json", b'["access_token", "DPoP"]'),
        (200, "application/json", b'{"access_token": 12, "token_type": "DPoP"}'),
        (200, "application/json", b"\xff\xfe{not utf-8}"),
        (200, "application/json", b"[" * 100_000),
        (500, "text/html", b"<html><h1>500 Internal Server Error</h1></html>"),
        (502, "text/html", b"<html>Bad Gateway</html>"),
        (400, "text/html", b"<html><h1>400 Bad Request</h1></html>"),
        (401, "text/html", b"<html>Unauthorized</html>"),
        (403, "application/json", b'{"error": 7}'),
        (200, "application/json", b""),
    ],
)
def test_token_endpoint_wrong_content_and_html_error_pages(
    signer: SoftwareSigner,
    serve: Callable[[Handler], RawServer],
    status: int,
    content_type: str,
    body: bytes,
) -> None:
    server = serve(
        lambda seen, conn, i: conn.sendall(response(status, body, content_type=content_type))
    )
    result, elapsed = timed(token_client(signer, server).get_token)
    assert isinstance(result, TokenResponseError), repr(result)
    assert CLIENT_SECRET not in str(result)
    assert elapsed < BOUND


def test_token_json_with_a_wrong_content_type_is_parsed_or_refused_cleanly(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    server = serve(
        lambda seen, conn, i: conn.sendall(response(200, TOKEN_JSON, content_type="text/html"))
    )
    result, _ = timed(token_client(signer, server).get_token)
    if isinstance(result, DPoPError):
        assert isinstance(result, TokenResponseError)
    else:
        assert result.access_token == ACCESS_TOKEN and result.is_dpop


def test_token_endpoint_redirect_loop_is_not_followed(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    server = serve(
        lambda seen, conn, i: conn.sendall(response(302, headers=[("Location", "/token")]))
    )
    result, _ = timed(token_client(signer, server).get_token)
    assert isinstance(result, TokenResponseError), repr(result)
    assert len(server.seen) == 1


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_token_endpoint_redirect_to_another_origin_sends_nothing_there(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer], status: int
) -> None:
    elsewhere = serve(lambda seen, conn, i: conn.sendall(response(200, TOKEN_JSON)))
    server = serve(
        lambda seen, conn, i: conn.sendall(
            response(status, headers=[("Location", elsewhere.url + "/token")])
        )
    )
    result, _ = timed(token_client(signer, server).get_token)
    assert isinstance(result, TokenResponseError), repr(result)
    assert elsewhere.seen == []  # not the secret, not the proof: not even a connection


def test_token_endpoint_demanding_a_new_nonce_every_time_stops_after_one_retry(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    def handler(seen: Seen, conn: socket.socket, index: int) -> None:
        body = b'{"error":"use_dpop_nonce","error_description":"again"}'
        conn.sendall(response(400, body, [("DPoP-Nonce", f"nonce-{index}")]))

    server = serve(handler)
    result, _ = timed(token_client(signer, server).get_token)
    assert isinstance(result, NonceError), repr(result)
    assert len(server.seen) == 2
    assert "nonce" not in server.seen[0].proof_claims()
    assert server.seen[1].proof_claims()["nonce"] == "nonce-0"
    assert server.seen[0].proof_claims()["jti"] != server.seen[1].proof_claims()["jti"]


def test_token_endpoint_nonce_on_every_success_is_used_next_time(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    server = serve(
        lambda seen, conn, i: conn.sendall(response(200, TOKEN_JSON, [("dpop-nonce", f"ok-{i}")]))
    )
    client = token_client(signer, server)
    for _ in range(3):
        client.get_token()
        client.invalidate()
    nonces = [seen.proof_claims().get("nonce") for seen in server.seen]
    assert nonces == [None, "ok-0", "ok-1"]


def test_token_endpoint_two_nonce_headers_last_one_wins(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    def handler(seen: Seen, conn: socket.socket, index: int) -> None:
        if index == 0:
            body = b'{"error":"use_dpop_nonce"}'
            nonces = [("DPoP-Nonce", "first-nonce"), ("DPoP-Nonce", "second-nonce")]
            conn.sendall(response(400, body, nonces))
        else:
            conn.sendall(response(200, TOKEN_JSON))

    server = serve(handler)
    token = token_client(signer, server).get_token()
    assert token.access_token == ACCESS_TOKEN
    assert server.seen[1].proof_claims()["nonce"] == "second-nonce"  # documented in nonces.py


# --- the requests adapter ----------------------------------------------------------------

requests_mod = pytest.importorskip("dpop_hsm.requests", reason="requests adapter not landed")
import requests  # noqa: E402


def rs_handler(api: Callable[[Seen, int], bytes]) -> Handler:
    """Token requests get a token; everything else goes to ``api`` (index among API calls)."""
    api_calls: list[Seen] = []

    def handler(seen: Seen, conn: socket.socket, index: int) -> None:
        if seen.path == "/token":
            conn.sendall(response(200, TOKEN_JSON))
            return
        api_calls.append(seen)
        conn.sendall(api(seen, len(api_calls) - 1))

    return handler


def api_calls(server: RawServer) -> list[Seen]:
    return [s for s in server.seen if s.path != "/token"]


def test_rs_401_without_a_challenge_is_returned_not_retried(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    server = serve(rs_handler(lambda seen, i: response(401, b"nope", content_type="text/plain")))
    with requests_mod.DPoPSession(token_client(signer, server)) as session:
        answer = session.get(server.url + "/api", timeout=SHORT)
    assert answer.status_code == 401
    assert len(api_calls(server)) == 1


def test_rs_nonce_changing_every_time_stops_after_one_retry(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    challenge = ("WWW-Authenticate", 'DPoP error="use_dpop_nonce", algs="ES256"')
    server = serve(
        rs_handler(lambda seen, i: response(401, b"", [challenge, ("DPoP-Nonce", f"rs-{i}")]))
    )
    with requests_mod.DPoPSession(token_client(signer, server)) as session:
        started = time.monotonic()
        with pytest.raises(NonceError):
            session.get(server.url + "/api", timeout=SHORT)
    assert time.monotonic() - started < BOUND
    calls = api_calls(server)
    assert len(calls) == 2
    assert calls[1].proof_claims()["nonce"] == "rs-0"


def test_rs_two_nonce_headers_last_one_wins(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    challenge = ("WWW-Authenticate", 'Bearer realm="x", DPoP error="use_dpop_nonce"')

    def api(seen: Seen, index: int) -> bytes:
        if index == 0:
            return response(401, b"", [challenge, ("DPoP-Nonce", "a-1"), ("dpop-nonce", "b-2")])
        return response(200, b'{"ok":true}')

    server = serve(rs_handler(api))
    with requests_mod.DPoPSession(token_client(signer, server)) as session:
        answer = session.get(server.url + "/api", timeout=SHORT)
    assert answer.status_code == 200
    assert api_calls(server)[1].proof_claims()["nonce"] == "b-2"


def test_rs_redirect_loop_is_bounded_and_every_hop_is_signed_anew(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    server = serve(rs_handler(lambda seen, i: response(302, headers=[("Location", "/api")])))
    with requests_mod.DPoPSession(token_client(signer, server)) as session:
        session.max_redirects = 5
        with pytest.raises(requests.TooManyRedirects):
            session.get(server.url + "/api", timeout=SHORT)
    calls = api_calls(server)
    assert len(calls) == 6
    jtis = [c.proof_claims()["jti"] for c in calls]
    assert len(set(jtis)) == len(jtis)  # never a replayed proof


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("how", ["DPoPSession", "plain-session-with-DPoPAuth"])
def test_rs_redirect_to_another_origin_carries_no_credentials(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer], status: int, how: str
) -> None:
    elsewhere = serve(lambda seen, conn, i: conn.sendall(response(200, b'{"elsewhere":1}')))
    server = serve(
        rs_handler(lambda seen, i: response(status, headers=[("Location", elsewhere.url + "/x")]))
    )
    client = token_client(signer, server)
    if how == "DPoPSession":
        session: requests.Session = requests_mod.DPoPSession(client)
    else:
        session = requests.Session()
        session.auth = requests_mod.DPoPAuth(client, session=session)
    with session:
        answer = session.post(server.url + "/api", data=b"x=1", timeout=SHORT)
    assert answer.status_code == 200
    (hop,) = elsewhere.seen
    assert hop.header("Authorization") is None
    assert hop.header("DPoP") is None
    everything = repr(hop.headers).encode() + hop.body
    for secret in (CLIENT_SECRET, ACCESS_TOKEN):
        assert secret.encode() not in everything


def test_rs_cross_origin_redirect_refused_when_configured(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    elsewhere = serve(lambda seen, conn, i: conn.sendall(response(200, b"{}")))
    server = serve(
        rs_handler(lambda seen, i: response(302, headers=[("Location", elsewhere.url + "/x")]))
    )
    session = requests_mod.DPoPSession(
        token_client(signer, server), cross_origin_redirects="refuse"
    )
    with session, pytest.raises(RedirectError):
        session.get(server.url + "/api", timeout=SHORT)
    assert elsewhere.seen == []


def test_rs_closing_mid_response_is_a_requests_error_in_bounded_time(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    def api(seen: Seen, index: int) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"

    def handler(seen: Seen, conn: socket.socket, index: int) -> None:
        rs_handler(api)(seen, conn, index)
        if seen.path != "/token":
            conn.close()

    server = serve(handler)
    started = time.monotonic()
    with (
        requests_mod.DPoPSession(token_client(signer, server)) as session,
        pytest.raises(requests.RequestException),
    ):
        session.get(server.url + "/api", timeout=SHORT)
    assert time.monotonic() - started < BOUND


def test_token_fetch_through_the_adapter_uses_the_client_timeout(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    def handler(seen: Seen, conn: socket.socket, index: int) -> None:
        server.stop.wait(30)

    server = serve(handler)
    with requests_mod.DPoPSession(token_client(signer, server)) as session:
        started = time.monotonic()
        with pytest.raises(TransportError):
            session.get(server.url + "/api", timeout=SHORT)
    assert time.monotonic() - started < 4 * sum(SHORT) + 2


# --- the httpx adapter -------------------------------------------------------------------
# httpx raises its own exceptions for transport failures of any request it sends, token
# requests included (the Auth API offers no hook to translate them; documented in httpx.py).

httpx = pytest.importorskip("httpx", reason="httpx extra not installed")
httpx_mod = pytest.importorskip("dpop_hsm.httpx", reason="httpx adapter not landed")


def httpx_client(client: Any, **options: Any) -> Any:
    http = httpx.Client(timeout=SHORT[1], **options)
    httpx_mod.DPoPAuth(client).attach(http)
    return http


# Regression (found by this suite, fixed in 39482b0): httpx token requests had no timeout.
def test_httpx_token_endpoint_never_answering_times_out(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    def handler(seen: Seen, conn: socket.socket, index: int) -> None:
        server.stop.wait(3)
        conn.close()

    server = serve(handler)
    started = time.monotonic()
    with httpx_client(token_client(signer, server)) as http, pytest.raises(httpx.TimeoutException):
        http.get(server.url + "/api")
    assert time.monotonic() - started < 4 * sum(SHORT) + 2


def test_httpx_token_endpoint_closing_mid_body(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    def handler(seen: Seen, conn: socket.socket, index: int) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{")
        conn.close()

    server = serve(handler)
    started = time.monotonic()
    with httpx_client(token_client(signer, server)) as http, pytest.raises(httpx.HTTPError):
        http.get(server.url + "/api")
    assert time.monotonic() - started < BOUND


# Regression (found by this suite, fixed in 39482b0): httpx read token bodies unbounded.
def test_httpx_token_endpoint_huge_body_is_read_bounded(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    limit = 64 * 1024 * 1024

    def handler(seen: Seen, conn: socket.socket, index: int) -> None:
        head = (
            f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {limit}\r\n\r\n"
        )
        server.send(conn, head.encode())
        chunk = b"A" * 65536
        try:
            while server.bytes_sent < limit and not server.stop.is_set():
                server.send(conn, chunk)
        except OSError:
            return

    server = serve(handler)
    with httpx_client(token_client(signer, server)) as http, pytest.raises(DPoPError):
        http.get(server.url + "/api")
    assert server.bytes_sent < 32 * 1024 * 1024


def test_httpx_rs_nonce_changing_every_time_stops_after_one_retry(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    challenge = ("WWW-Authenticate", 'DPoP error="use_dpop_nonce"')
    server = serve(
        rs_handler(lambda seen, i: response(401, b"", [challenge, ("DPoP-Nonce", f"rs-{i}")]))
    )
    with httpx_client(token_client(signer, server)) as http, pytest.raises(NonceError):
        http.get(server.url + "/api")
    calls = api_calls(server)
    assert len(calls) == 2
    assert calls[1].proof_claims()["nonce"] == "rs-0"


def test_httpx_rs_two_nonce_headers_last_one_wins(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    challenge = ("WWW-Authenticate", 'DPoP error="use_dpop_nonce"')

    def api(seen: Seen, index: int) -> bytes:
        if index == 0:
            return response(401, b"", [challenge, ("DPoP-Nonce", "a-1"), ("DPoP-Nonce", "b-2")])
        return response(200, b"{}")

    server = serve(rs_handler(api))
    with httpx_client(token_client(signer, server)) as http:
        assert http.get(server.url + "/api").status_code == 200
    assert api_calls(server)[1].proof_claims()["nonce"] == "b-2"


def test_httpx_rs_401_without_challenge_is_returned(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    server = serve(
        rs_handler(lambda seen, i: response(401, b"<html>no</html>", content_type="text/html"))
    )
    with httpx_client(token_client(signer, server)) as http:
        assert http.get(server.url + "/api").status_code == 401
    assert len(api_calls(server)) == 1


# Regression (found by this suite, fixed in 39482b0): same-URL hops re-sent the old proof.
def test_httpx_rs_redirect_loop_is_bounded_and_every_hop_is_signed_anew(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    server = serve(rs_handler(lambda seen, i: response(302, headers=[("Location", "/api")])))
    with (
        httpx_client(token_client(signer, server), follow_redirects=True, max_redirects=5) as http,
        pytest.raises(httpx.TooManyRedirects),
    ):
        http.get(server.url + "/api")
    jtis = [c.proof_claims()["jti"] for c in api_calls(server)]
    assert 2 <= len(jtis) <= 6
    assert len(set(jtis)) == len(jtis)  # never a replayed proof


@pytest.mark.parametrize("status", [302, 307, 308])
def test_httpx_rs_redirect_to_another_origin_carries_no_credentials(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer], status: int
) -> None:
    elsewhere = serve(lambda seen, conn, i: conn.sendall(response(200, b"{}")))
    server = serve(
        rs_handler(lambda seen, i: response(status, headers=[("Location", elsewhere.url + "/x")]))
    )
    with httpx_client(token_client(signer, server), follow_redirects=True) as http:
        assert http.post(server.url + "/api", content=b"x=1").status_code == 200
    (hop,) = elsewhere.seen
    assert hop.header("Authorization") is None and hop.header("DPoP") is None
    assert ACCESS_TOKEN.encode() not in repr(hop.headers).encode() + hop.body


# Regression (found by this suite, fixed in 39482b0): with follow_redirects=True a 307/308 from
# the token endpoint re-sent the client_secret_post body to another origin.
@pytest.mark.parametrize(
    ("status", "auth_method"),
    [
        (302, "client_secret_basic"),
        (307, "client_secret_basic"),
        (308, "client_secret_basic"),
        (302, "client_secret_post"),
        (307, "client_secret_post"),
        (308, "client_secret_post"),
    ],
)
def test_httpx_token_endpoint_redirect_to_another_origin_gets_no_client_secret(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer], status: int, auth_method: str
) -> None:
    """With follow_redirects on the user's client, a token request must still not carry the
    client secret (Basic header or form field) or its proof to another origin."""
    elsewhere = serve(lambda seen, conn, i: conn.sendall(response(200, TOKEN_JSON)))
    server = serve(
        lambda seen, conn, i: conn.sendall(
            response(status, headers=[("Location", elsewhere.url + "/token")])
        )
    )
    client = token_client(signer, server, auth_method=auth_method)
    with (
        httpx_client(client, follow_redirects=True) as http,
        contextlib.suppress(DPoPError, httpx.HTTPError),
    ):
        http.get(server.url + "/api")
    for hop in elsewhere.seen:
        sent = repr(hop.headers).encode() + hop.body
        assert CLIENT_SECRET.encode() not in sent
        assert b"client-secret" not in sent.lower()
        assert hop.header("Authorization") is None
        assert hop.header("DPoP") is None


# --- the httpx adapter, async --------------------------------------------------------------


def test_httpx_async_token_endpoint_never_answering_times_out(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    import asyncio

    def handler(seen: Seen, conn: socket.socket, index: int) -> None:
        server.stop.wait(3)
        conn.close()

    server = serve(handler)

    async def main() -> None:
        async with httpx.AsyncClient(timeout=SHORT[1]) as http:
            httpx_mod.DPoPAuth(token_client(signer, server)).attach(http)
            with pytest.raises((httpx.TimeoutException, TransportError)):
                await http.get(server.url + "/api")

    started = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - started < 4 * sum(SHORT) + 2


def test_httpx_async_nonce_changing_every_time_stops_after_one_retry(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    import asyncio

    challenge = ("WWW-Authenticate", 'DPoP error="use_dpop_nonce"')
    server = serve(
        rs_handler(lambda seen, i: response(401, b"", [challenge, ("DPoP-Nonce", f"rs-{i}")]))
    )

    async def main() -> None:
        async with httpx.AsyncClient(timeout=2) as http:
            httpx_mod.DPoPAuth(token_client(signer, server)).attach(http)
            with pytest.raises(NonceError):
                await http.get(server.url + "/api")

    asyncio.run(main())
    calls = api_calls(server)
    assert len(calls) == 2
    assert calls[1].proof_claims()["nonce"] == "rs-0"


# --- security review regressions (client side) ---------------------------------------------


def test_token_endpoint_dripping_header_lines_is_bounded_by_the_total_deadline(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    """Each header line arrives within the read timeout, so only a deadline for the whole
    exchange, headers included, ends it (the renewal and its waiters are not held hostage)."""

    def handler(seen: Seen, conn: socket.socket, index: int) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        for i in range(200):
            if server.stop.wait(0.2):
                return
            conn.sendall(b"X-Drip-%d: y\r\n" % i)

    server = serve(handler)
    result, elapsed = timed(token_client(signer, server).get_token)
    assert isinstance(result, TransportError), repr(result)
    assert elapsed < sum(SHORT) + SHORT[1] + 1.5  # connect + 2 x read, plus scheduling slack


def test_a_session_response_hook_reading_the_body_does_not_break_token_parsing(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    server = serve(rs_handler(lambda seen, i: response(200, b'{"ok":true}')))
    read: list[int] = []
    with requests.Session() as session:
        session.hooks["response"].append(lambda r, **kw: read.append(len(r.content)))
        client = token_client(signer, server)
        auth = requests_mod.DPoPAuth(client, session=session)
        assert session.get(server.url + "/api", auth=auth).status_code == 200
    assert len(TOKEN_JSON) in read  # the hook saw the token body, and parsing still worked


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"\xef\xbb\xbf" + TOKEN_JSON, "byte-order mark"),
        (TOKEN_JSON.decode().encode("utf-16"), "UTF-16"),
        (
            b'{"access_token":"%s","token_type":"Bearer","token_type":"DPoP","expires_in":60}'
            % ACCESS_TOKEN.encode(),
            "duplicate members",
        ),
        (
            b'{"access_token":"%s","token_type":"DPoP","expires_in":NaN}' % ACCESS_TOKEN.encode(),
            "NaN",
        ),
    ],
)
def test_token_responses_must_be_strict_json(
    signer: SoftwareSigner,
    serve: Callable[[Handler], RawServer],
    caplog: pytest.LogCaptureFixture,
    body: bytes,
    why: str,
) -> None:
    """RFC 8259 §8.1 and §4: UTF-8 only, unique member names; the log never shows the token."""
    server = serve(
        lambda seen, conn, i: conn.sendall(response(200, body, content_type="text/plain"))
    )
    caplog.set_level("DEBUG", logger="dpop_hsm")
    result, _ = timed(token_client(signer, server).get_token)
    assert isinstance(result, TokenResponseError), f"{why}: {result!r}"
    assert ACCESS_TOKEN not in caplog.text
    assert ACCESS_TOKEN not in str(result)


def test_server_text_echoing_our_secrets_is_redacted_from_errors(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    """An AS that echoes the request into error_description must not put the client secret
    (or the Basic credentials, or a form field) into str(OAuthError)."""
    from urllib.parse import quote

    from dpop_hsm.errors import OAuthError

    def handler(seen: Seen, conn: socket.socket, index: int) -> None:
        echo = f"bad request: {seen.header('Authorization')} body={seen.body.decode()}"
        conn.sendall(
            response(
                400, json.dumps({"error": "invalid_client", "error_description": echo}).encode()
            )
        )

    server = serve(handler)
    for method in ("client_secret_basic", "client_secret_post"):
        result, _ = timed(token_client(signer, server, auth_method=method).get_token)
        assert isinstance(result, OAuthError), repr(result)
        text = str(result) + repr(result) + (result.error_description or "")
        assert CLIENT_SECRET not in text
        assert quote(CLIENT_SECRET, safe="") not in text
        import base64

        basic = base64.b64encode(f"client-1:{CLIENT_SECRET}".encode()).decode()
        assert basic not in text
        assert "****" in text


def test_secret_source_is_resolved_once_per_renewal_even_with_a_nonce_retry(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    def handler(seen: Seen, conn: socket.socket, index: int) -> None:
        if index == 0:
            conn.sendall(
                response(400, b'{"error":"use_dpop_nonce"}', [("DPoP-Nonce", "as-nonce-1")])
            )
        else:
            conn.sendall(response(200, TOKEN_JSON))

    server = serve(handler)
    prompts: list[int] = []

    def prompt() -> str:
        prompts.append(1)
        return CLIENT_SECRET

    client = TokenClient(
        signer,
        token_endpoint=server.url + "/token",
        client_id="client-1",
        client_secret=prompt,
        timeout=SHORT,
    )
    assert client.get_token().access_token == ACCESS_TOKEN
    assert len(server.seen) == 2  # the nonce retry happened
    assert prompts == [1]


def test_httpx_unattached_client_never_sends_credentials_across_origins(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    """follow_redirects=True without attach(): the hop to another origin must carry neither
    the proof nor the token — the misuse cannot leak — and the flow says to call attach()."""
    elsewhere = serve(lambda seen, conn, i: conn.sendall(response(200, b"{}")))
    server = serve(
        rs_handler(lambda seen, i: response(302, headers=[("Location", elsewhere.url + "/x")]))
    )
    client = token_client(signer, server)
    auth = httpx_mod.DPoPAuth(client)
    with (
        httpx.Client(timeout=2, follow_redirects=True, auth=auth) as http,
        pytest.raises(RedirectError, match="attach"),
    ):
        http.get(server.url + "/api")
    (hop,) = elsewhere.seen
    assert hop.header("DPoP") is None and hop.header("Authorization") is None


def test_httpx_unattached_async_client_never_sends_credentials_across_origins(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    import asyncio

    elsewhere = serve(lambda seen, conn, i: conn.sendall(response(200, b"{}")))
    server = serve(
        rs_handler(lambda seen, i: response(307, headers=[("Location", elsewhere.url + "/x")]))
    )
    client = token_client(signer, server)

    async def main() -> None:
        async with httpx.AsyncClient(
            timeout=2, follow_redirects=True, auth=httpx_mod.DPoPAuth(client)
        ) as http:
            with pytest.raises(RedirectError):
                await http.get(server.url + "/api")

    asyncio.run(main())
    (hop,) = elsewhere.seen
    assert hop.header("DPoP") is None and hop.header("Authorization") is None


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_httpx_response_history_holds_no_token_traffic(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer], kind: str
) -> None:
    """httpx lists auth-flow responses in history; the token response (it holds the access
    token) must not reach the application that way."""
    import asyncio

    challenge = ("WWW-Authenticate", 'DPoP error="use_dpop_nonce"')

    def api(seen: Seen, i: int) -> bytes:
        if i == 0:
            return response(401, b"", [challenge, ("DPoP-Nonce", "rs-1")])
        return response(200, b'{"ok":true}')

    server = serve(rs_handler(api))
    client = token_client(signer, server)
    if kind == "sync":
        with httpx.Client(timeout=2) as http:
            httpx_mod.DPoPAuth(client).attach(http)
            result = http.get(server.url + "/api")
    else:

        async def main() -> Any:
            async with httpx.AsyncClient(timeout=2) as http:
                httpx_mod.DPoPAuth(client).attach(http)
                return await http.get(server.url + "/api")

        result = asyncio.run(main())
    assert result.status_code == 200
    assert [r.status_code for r in result.history] == [401]  # the nonce challenge, nothing else
    for earlier in result.history:
        assert ACCESS_TOKEN.encode() not in earlier.content
        assert str(earlier.request.url).endswith("/api")


def test_token_transport_failures_are_requests_errors_too(signer: SoftwareSigner) -> None:
    """Inside session.get() a failing token fetch is catchable as requests users catch errors."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once the socket closes
    client = TokenClient(
        signer,
        token_endpoint=f"http://127.0.0.1:{port}/token",
        client_id="client-1",
        client_secret=CLIENT_SECRET,
        timeout=SHORT,
    )
    with requests.Session() as session, pytest.raises(requests.RequestException) as info:
        session.get(f"http://127.0.0.1:{port}/api", auth=requests_mod.DPoPAuth(client))
    assert isinstance(info.value, TransportError)


# --- independent review regressions ----------------------------------------------------------


def test_requests_plain_session_redirect_after_a_nonce_resend_carries_no_stale_proof(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    """requests follows the resent request's redirect from the ORIGINAL request: its spent
    proof (and token) must not ride along to another origin."""
    elsewhere = serve(lambda seen, conn, i: conn.sendall(response(200, b"{}")))
    challenge = ("WWW-Authenticate", 'DPoP error="use_dpop_nonce"')

    def api(seen: Seen, i: int) -> bytes:
        if i == 0:
            return response(401, b"", [challenge, ("DPoP-Nonce", "rs-1")])
        return response(302, headers=[("Location", elsewhere.url + "/x")])

    server = serve(rs_handler(api))
    with requests.Session() as session:
        reply = session.get(
            server.url + "/api", auth=requests_mod.DPoPAuth(token_client(signer, server))
        )
    assert reply.status_code == 200
    (hop,) = elsewhere.seen
    assert hop.header("DPoP") is None and hop.header("Authorization") is None


@pytest.mark.parametrize("status", [307, 308])
def test_httpx_unattached_token_redirect_sends_nothing_to_the_target(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer], status: int
) -> None:
    """follow_redirects=True, never attach()-ed: the token endpoint's 307 must not re-post
    the client secret (or the proof) to its target — refused before the hop is written."""
    collector = serve(lambda seen, conn, i: conn.sendall(response(200, TOKEN_JSON)))
    server = serve(
        lambda seen, conn, i: conn.sendall(
            response(status, headers=[("Location", collector.url + "/collect")])
        )
    )
    client = token_client(signer, server, auth_method="client_secret_post")
    with (
        httpx.Client(timeout=2, follow_redirects=True, auth=httpx_mod.DPoPAuth(client)) as http,
        pytest.raises(RedirectError),
    ):
        http.get(server.url + "/api")
    assert collector.seen == []


def test_aiohttp_redirect_with_a_fragment_carries_no_credentials_across_origins(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    """aiohttp drops a Location's fragment from the hop's URL: the hop is still recognized
    (by origin), so the other origin gets neither the token nor a proof."""
    import asyncio

    aiohttp = pytest.importorskip("aiohttp")
    from dpop_hsm.aiohttp import DPoPMiddleware

    elsewhere = serve(lambda seen, conn, i: conn.sendall(response(200, b"{}")))
    server = serve(
        rs_handler(lambda seen, i: response(302, headers=[("Location", elsewhere.url + "/x#f")]))
    )
    client = token_client(signer, server)

    async def main() -> int:
        async with (
            aiohttp.ClientSession(middlewares=(DPoPMiddleware(client),)) as session,
            session.get(server.url + "/api") as reply,
        ):
            await reply.read()
            status: int = reply.status
            return status

    assert asyncio.run(main()) == 200
    (hop,) = elsewhere.seen
    assert hop.header("DPoP") is None and hop.header("Authorization") is None


def test_redaction_covers_form_and_lowercase_percent_encodings() -> None:
    from dpop_hsm.token_endpoint import redact

    assert redact("client_secret=my+secret+value", ["my secret value"]) == "client_secret=****"
    assert "Ab%2fCd" not in (redact("echo Ab%2fCd", ["Ab/Cd"]) or "")
    assert redact("nothing here", ["my secret value"]) == "nothing here"


def test_hung_token_requests_are_bounded_per_origin(
    signer: SoftwareSigner, serve: Callable[[Handler], RawServer]
) -> None:
    """A server that drips header bytes forever holds each abandoned worker (and socket) open;
    past a few of them, the next request to that origin fails at once instead of adding one."""
    import threading

    from dpop_hsm._requests_sender import MAX_HUNG_PER_ORIGIN

    def handler(seen: Seen, conn: socket.socket, index: int) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        for i in range(10_000):
            if server.stop.wait(0.1):
                return
            conn.sendall(b"X-Drip-%d: y\r\n" % i)

    server = serve(handler)
    client = token_client(signer, server)
    for _ in range(MAX_HUNG_PER_ORIGIN):
        result, _ = timed(client.get_token)
        assert isinstance(result, TransportError), repr(result)
    result, elapsed = timed(client.get_token)
    assert isinstance(result, TransportError) and "still hang" in str(result)
    assert elapsed < 0.5  # no new worker, no wait for the deadline
    server.close()  # the server lets go: the abandoned workers end
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not [t for t in threading.enumerate() if t.name == "dpop_hsm-token-request"]:
            break
        time.sleep(0.1)
    assert not [t for t in threading.enumerate() if t.name == "dpop_hsm-token-request"]
