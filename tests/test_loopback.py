"""The RFC 8252 loopback redirect: the sans-IO decision and the one-shot listener over sockets."""

from __future__ import annotations

import http.client
import socket
from collections.abc import Iterator
from urllib.parse import urlencode

import pytest

from dpop_hsm.errors import (
    AuthorizationRejectedError,
    AuthorizationResponseError,
    LoginError,
    LoginTimeoutError,
    LoopbackListenerError,
    ResponseIssuerError,
    StateMismatchError,
)
from dpop_hsm.loopback import LoopbackListener, parse_authorization_response

ISSUER = "https://as.example.com"
STATE = "s-9f8e7d6c5b4a39281706f5e4d3c2b1a0"
CODE = "code-0123456789abcdef"


def query(**params: str) -> str:
    return urlencode(params)


def parse(q: str, *, iss_required: bool = False) -> object:
    return parse_authorization_response(q, state=STATE, issuer=ISSUER, iss_required=iss_required)


# --- the decision ------------------------------------------------------------------------------


def test_valid_response() -> None:
    response = parse_authorization_response(
        query(code=CODE, state=STATE, iss=ISSUER), state=STATE, issuer=ISSUER, iss_required=True
    )
    assert response.code == CODE and response.iss == ISSUER
    assert CODE not in repr(response) and STATE not in repr(response)


def test_iss_optional_when_not_promised() -> None:
    assert parse(query(code=CODE, state=STATE)) is not None


@pytest.mark.parametrize(
    "q",
    [
        query(code=CODE),
        query(code=CODE, state=""),
        query(code=CODE, state=STATE + "x"),
        query(code=CODE, state=STATE.upper()),
        query(code=CODE, state=STATE[:-1]),
        # a forged error response without our state must not pass as the AS's answer
        query(error="access_denied"),
    ],
)
def test_state_mismatch(q: str) -> None:
    with pytest.raises(StateMismatchError) as info:
        parse(q)
    assert STATE not in str(info.value) and CODE not in str(info.value)


@pytest.mark.parametrize("iss", ["https://evil.example", ISSUER + "/", "", ISSUER.upper()])
def test_wrong_iss_is_refused_even_when_not_promised(iss: str) -> None:
    # RFC 9207 §2.4: an iss that is present is always compared.
    for required in (False, True):
        with pytest.raises(ResponseIssuerError):
            parse(query(code=CODE, state=STATE, iss=iss), iss_required=required)


def test_missing_iss_when_promised() -> None:
    with pytest.raises(ResponseIssuerError) as info:
        parse(query(code=CODE, state=STATE), iss_required=True)
    assert "RFC 9207" in str(info.value)


def test_error_response_is_sanitised() -> None:
    hostile = "<script>alert(1)</script>\x1b[2J\r\nInjected: yes" + "x" * 5000
    with pytest.raises(AuthorizationRejectedError) as info:
        parse(query(error="access_denied", error_description=hostile, state=STATE))
    error = info.value
    assert error.error == "access_denied" and error.code == "authorization_rejected"
    text = str(error)
    assert "\x1b" not in text and "\r" not in text and "\n" not in text and len(text) < 1000
    assert isinstance(error, LoginError)


def test_error_response_with_wrong_iss_is_a_mix_up_first() -> None:
    with pytest.raises(ResponseIssuerError):
        parse(query(error="access_denied", state=STATE, iss="https://evil.example"))


@pytest.mark.parametrize(
    "q",
    [
        f"code={CODE}&code=other&state={STATE}",  # RFC 6749 §3.1: no repeats
        f"code={CODE}&state={STATE}&state={STATE}",
        f"state={STATE}",
        f"state={STATE}&code=",
        f"state={STATE}&code=%FF%FE",  # not UTF-8
        f"state={STATE}&code=a%0Ab",  # control character in the code
        f"state={STATE}&code=" + "a" * 5000,
        f"state={STATE}&code={CODE}&" + "&".join(f"p{i}=1" for i in range(40)),
    ],
)
def test_malformed_responses(q: str) -> None:
    with pytest.raises(AuthorizationResponseError):
        parse(q)


# --- the listener --------------------------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[LoopbackListener]:
    with LoopbackListener(state=STATE, issuer=ISSUER, iss_required=False) as it:
        yield it


def get(
    port: int, target: str, *, method: str = "GET", host: str | None = None
) -> tuple[int, bytes, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        if host is None:
            conn.request(method, target)
        else:
            conn.putrequest(method, target, skip_host=True)
            conn.putheader("Host", host)
            conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read(), response
    finally:
        conn.close()


def test_redirect_uri_is_the_loopback_ip_literal(listener: LoopbackListener) -> None:
    assert listener.redirect_uri == f"http://127.0.0.1:{listener.port}/callback"
    assert listener.port > 0


def test_one_valid_callback_then_refusal(listener: LoopbackListener) -> None:
    status, body, response = get(listener.port, "/callback?" + query(code=CODE, state=STATE))
    assert status == 200 and b"Login complete" in body
    assert CODE.encode() not in body and STATE.encode() not in body
    assert response.getheader("Cache-Control") == "no-store"
    assert "default-src 'none'" in (response.getheader("Content-Security-Policy") or "")
    assert listener.wait(5).code == CODE
    # A second callback (even a valid-looking one) changes nothing.
    status, body, _ = get(listener.port, "/callback?" + query(code="other", state=STATE))
    assert status == 409 and b"already finished" in body
    assert listener.wait(0).code == CODE


@pytest.mark.parametrize(
    ("q", "error"),
    [
        (query(code=CODE, state="forged"), StateMismatchError),
        (query(code=CODE, state=STATE, iss="https://evil.example"), ResponseIssuerError),
        (query(error="access_denied", state=STATE), AuthorizationRejectedError),
    ],
)
def test_bad_callback_ends_the_attempt_at_once(
    listener: LoopbackListener, q: str, error: type[Exception]
) -> None:
    status, body, _ = get(listener.port, "/callback?" + q)
    assert status == 400 and b"Login failed" in body
    with pytest.raises(error):
        listener.wait(5)
    # The genuine response arriving afterwards is refused: the user starts again.
    status, _, _ = get(listener.port, "/callback?" + query(code=CODE, state=STATE))
    assert status == 409
    with pytest.raises(error):
        listener.wait(0)


def test_page_never_reflects_the_request(listener: LoopbackListener) -> None:
    marker = "<b>reflected-marker</b>"
    status, body, _ = get(
        listener.port, "/callback?" + query(error=marker, error_description=marker, state=STATE)
    )
    assert status == 400 and b"reflected-marker" not in body
    for target in ("/%3Cb%3Ereflected-marker", "/callback/../reflected-marker"):
        status, body, _ = get(listener.port, target)
        assert status == 404 and b"reflected-marker" not in body
    status, body, _ = get(listener.port, "/x", method="REFLECTED-MARKER")
    assert status in (400, 501) and b"REFLECTED-MARKER" not in body.upper()


def test_only_get_callback_counts(listener: LoopbackListener) -> None:
    good = "/callback?" + query(code=CODE, state=STATE)
    assert get(listener.port, "/favicon.ico")[0] == 404
    assert get(listener.port, "/callbackx?" + query(code=CODE, state=STATE))[0] == 404
    assert get(listener.port, "/?" + query(code=CODE, state=STATE))[0] == 404
    assert get(listener.port, good, method="POST")[0] == 405
    assert get(listener.port, good, method="HEAD")[0] == 405
    assert (
        get(listener.port, "/callback?" + query(code=CODE, state="x"), host="evil.example")[0]
        == 400
    )  # DNS rebinding: another Host does not count
    with pytest.raises(LoginTimeoutError):
        listener.wait(0)  # nothing counted so far...
    # ... and a timed-out attempt refuses later callbacks too.
    assert get(listener.port, good)[0] == 409


def test_uncounted_requests_leave_the_attempt_open() -> None:
    with LoopbackListener(state=STATE, issuer=ISSUER, iss_required=True) as it:
        assert get(it.port, "/nope")[0] == 404
        assert get(it.port, "/callback", method="POST")[0] == 405
        good = "/callback?" + query(code=CODE, state=STATE, iss=ISSUER)
        assert get(it.port, good, host=f"localhost:{it.port}")[0] == 200
        assert it.wait(5).iss == ISSUER


def test_timeout() -> None:
    with LoopbackListener(state=STATE, issuer=ISSUER, iss_required=False) as it:
        with pytest.raises(LoginTimeoutError) as info:
            it.wait(0.05)
        assert it.redirect_uri in str(info.value)


def test_given_port_and_port_in_use() -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    try:
        port = blocker.getsockname()[1]
        with pytest.raises(LoopbackListenerError):
            LoopbackListener(state=STATE, issuer=ISSUER, iss_required=False, port=port)
    finally:
        blocker.close()
    with LoopbackListener(state=STATE, issuer=ISSUER, iss_required=False, port=port) as it:
        assert it.redirect_uri == f"http://127.0.0.1:{port}/callback"


@pytest.mark.parametrize("port", [-1, 65536, True, "8080", 1.5])
def test_invalid_ports(port: object) -> None:
    with pytest.raises(LoopbackListenerError):
        LoopbackListener(state=STATE, issuer=ISSUER, iss_required=False, port=port)  # type: ignore[arg-type]


def test_needs_a_state() -> None:
    with pytest.raises(LoopbackListenerError):
        LoopbackListener(state="", issuer=ISSUER, iss_required=False)


def test_closed_listener_refuses_connections() -> None:
    it = LoopbackListener(state=STATE, issuer=ISSUER, iss_required=False)
    port = it.port
    it.close()
    it.close()  # idempotent
    with pytest.raises(OSError):
        get(port, "/callback?" + query(code=CODE, state=STATE))


def test_listens_on_loopback_only(listener: LoopbackListener) -> None:
    assert listener._server.server_address[0] == "127.0.0.1"


def test_idle_connection_does_not_block_the_callback(listener: LoopbackListener) -> None:
    # A browser's speculative pre-connection that never sends a request.
    idle = socket.create_connection(("127.0.0.1", listener.port))
    try:
        assert get(listener.port, "/callback?" + query(code=CODE, state=STATE))[0] == 200
        assert listener.wait(5).code == CODE
    finally:
        idle.close()


def test_the_listener_log_never_shows_a_query(caplog: pytest.LogCaptureFixture) -> None:
    # http.server hands the request line to log_message (log_request, log_error): a callback's
    # request line carries the authorization code.
    from dpop_hsm.loopback import _Handler

    handler = object.__new__(_Handler)
    caplog.set_level("DEBUG", logger="dpop_hsm")
    handler.log_message('"%s" %s %s', "GET /callback?code=c0de-s3cret&state=x HTTP/1.1", "400", "-")
    assert "c0de-s3cret" not in caplog.text
    assert "/callback" in caplog.text
