"""TokenClient: requests it builds, responses it accepts, errors it raises, cache, single flight.

Unit tests drive the sans-IO flow directly; end-to-end tests use the real local AS over sockets.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl

import pytest

from dpop_hsm.errors import (
    ConfigurationError,
    InsecureEndpointError,
    NonceError,
    OAuthError,
    TokenResponseError,
    TokenTypeError,
    TransportError,
)
from dpop_hsm.jose import b64url_decode
from dpop_hsm.signers.base import Signer
from dpop_hsm.signers.software import SoftwareSigner
from dpop_hsm.testing import LocalDPoPServers
from dpop_hsm.token import Token, TokenClient
from dpop_hsm.token_http import HttpResponse
from dpop_hsm.verify import verify_proof
from tests.support.servers import AUTH_METHODS, CLIENT_SECRET, token_client

ENDPOINT = "https://as.example.com/token"
SECRET = "s3cr:et/ü"


def _claims(jws: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(b64url_decode(jws.split(".")[1]))
    return result


def _form(body: bytes) -> dict[str, str]:
    return dict(parse_qsl(body.decode()))


def _ok(token_type: str = "DPoP", **extra: Any) -> HttpResponse:
    body = {"access_token": "at-" + "x" * 20, "token_type": token_type, **extra}
    return HttpResponse(200, (("Content-Type", "application/json"),), json.dumps(body).encode())


@pytest.fixture
def signer() -> Signer:
    return SoftwareSigner.generate("ES256")


def test_client_secret_basic_request(signer: Signer) -> None:
    tc = TokenClient(signer, token_endpoint=ENDPOINT, client_id="c 1", client_secret=SECRET)
    req = tc.token_request(nonce="n1")
    assert req.method == "POST" and req.url == ENDPOINT
    auth = req.header("Authorization")
    assert auth is not None and auth.startswith("Basic ")
    # RFC 6749 §2.3.1: form-urlencode both parts before Base64.
    assert base64.b64decode(auth[6:]).decode() == "c+1:s3cr%3Aet%2F%C3%BC".replace("+", "%20")
    form = _form(req.body)
    assert form == {"grant_type": "client_credentials"}
    proof = req.header("DPoP")
    assert proof is not None
    verified = verify_proof(proof, htm="POST", htu=ENDPOINT, nonce="n1")
    assert verified.jkt == signer.thumbprint
    assert "s3cr" not in repr(req) and proof not in repr(req)


def test_client_secret_post_scope_resource_extra(signer: Signer) -> None:
    tc = TokenClient(
        signer,
        token_endpoint=ENDPOINT,
        client_id="c1",
        client_secret=lambda: SECRET,
        auth_method="client_secret_post",
        scope=["api", "read"],
        resource=["https://rs1/", "https://rs2/"],
        extra_params={"audience": "x"},
    )
    req = tc.token_request()
    pairs = parse_qsl(req.body.decode())
    assert ("client_secret", SECRET) in pairs and ("client_id", "c1") in pairs
    assert ("scope", "api read") in pairs and ("audience", "x") in pairs
    assert [v for k, v in pairs if k == "resource"] == ["https://rs1/", "https://rs2/"]
    assert req.header("Authorization") is None


def test_private_key_jwt_assertion_is_fresh_per_attempt(signer: Signer) -> None:
    other = SoftwareSigner.generate("ES384")
    tc = TokenClient(
        signer, token_endpoint=ENDPOINT, client_id="c1", assertion_signer=other, audience="aud-x"
    )
    assert tc.auth_method == "private_key_jwt"
    a1 = _form(tc.token_request().body)
    a2 = _form(tc.token_request().body)
    assert a1["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    c1, c2 = _claims(a1["client_assertion"]), _claims(a2["client_assertion"])
    assert c1["iss"] == c1["sub"] == "c1" and c1["aud"] == "aud-x"
    assert c1["exp"] - c1["iat"] == 60
    # RFC 7523 §3: a new assertion per attempt, or the retry is rejected as a replay
    assert c1["jti"] != c2["jti"]
    header = json.loads(b64url_decode(a1["client_assertion"].split(".")[0]))
    assert header == {"alg": "ES384", "typ": "JWT", "kid": other.thumbprint}


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"token_endpoint": "http://as.example.com/token"}, InsecureEndpointError),
        ({"auth_method": "client_secret_post"}, ConfigurationError),
        ({"client_secret": "x", "auth_method": "private_key_jwt"}, ConfigurationError),
        ({"extra_params": {"grant_type": "password"}}, ConfigurationError),
        ({"auth_method": "magic"}, ConfigurationError),
    ],
)
def test_bad_configuration(signer: Signer, kwargs: dict[str, Any], error: type[Exception]) -> None:
    options: dict[str, Any] = {"token_endpoint": ENDPOINT, "client_id": "c1", **kwargs}
    with pytest.raises(error):
        TokenClient(signer, **options)


def test_loopback_http_is_allowed(signer: Signer) -> None:
    for url in ("http://127.0.0.1:8080/t", "http://localhost/t", "http://[::1]:9/t"):
        TokenClient(signer, token_endpoint=url, client_id="c", auth_method="none")


def _parse(tc: TokenClient, response: HttpResponse) -> Token:
    return tc.parse_response(response, sent_monotonic=time.monotonic(), sent_wall=time.time())


def test_token_type_is_case_insensitive_and_bearer_refused(signer: Signer) -> None:
    tc = TokenClient(signer, token_endpoint=ENDPOINT, client_id="c", auth_method="none")
    assert _parse(tc, _ok("dpop")).is_dpop
    with pytest.raises(TokenTypeError):
        _parse(tc, _ok("Bearer"))
    relaxed = TokenClient(
        signer, token_endpoint=ENDPOINT, client_id="c", auth_method="none", allow_bearer=True
    )
    assert _parse(relaxed, _ok("bearer")).token_type == "bearer"


def test_token_repr_and_fields_hold_no_secret(signer: Signer) -> None:
    tc = TokenClient(signer, token_endpoint=ENDPOINT, client_id="c", auth_method="none")
    token = _parse(tc, _ok(expires_in=120, refresh_token="rt-secret", scope="api", custom=1))
    assert "at-xxx" not in repr(token) and "at-xxx" not in str(token)
    assert "refresh_token" not in token.extra and token.extra["custom"] == 1
    assert token.scope == "api" and token.jkt == signer.thumbprint
    assert 119 < token.expires_in() <= 120
    assert token.renew_at == pytest.approx(token.expires_at - 12)  # 10 % of the lifetime


@pytest.mark.parametrize(
    ("lifetime", "renew_before", "ahead"),
    [(3600, None, 60.0), (2, None, 0.2), (100, 30.0, 30.0), (10, 60.0, 10.0)],
)
def test_renewal_margin(signer: Signer, lifetime: int, renew_before: Any, ahead: float) -> None:
    tc = TokenClient(
        signer,
        token_endpoint=ENDPOINT,
        client_id="c",
        auth_method="none",
        renew_before=renew_before,
    )
    token = _parse(tc, _ok(expires_in=lifetime))
    assert token.expires_at - token.renew_at == pytest.approx(ahead)


def test_missing_expires_in_uses_default_lifetime(signer: Signer) -> None:
    tc = TokenClient(
        signer, token_endpoint=ENDPOINT, client_id="c", auth_method="none", default_lifetime=42
    )
    assert _parse(tc, _ok()).lifetime == 42


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (503, b"busy", TokenResponseError),
        (500, b'{"error":"server_error"}', TokenResponseError),
        (200, b"<html/>", TokenResponseError),
        (200, b"[]", TokenResponseError),
        (200, b'{"token_type":"DPoP"}', TokenResponseError),
        (200, b'{"access_token":"a b","token_type":"DPoP"}', TokenResponseError),
        (200, b'{"access_token":"ab","token_type":"DPoP","expires_in":"1h"}', TokenResponseError),
        (200, b'{"access_token":"ab","token_type":"DPoP","expires_in":-1}', TokenResponseError),
        (302, b"", TokenResponseError),
        (401, b'{"error":"invalid_client","error_description":"nope"}', OAuthError),
        (400, b"plain", TokenResponseError),
    ],
)
def test_response_errors_are_typed(
    signer: Signer, status: int, body: bytes, error: type[Exception]
) -> None:
    tc = TokenClient(signer, token_endpoint=ENDPOINT, client_id="c", auth_method="none")
    with pytest.raises(error) as info:
        _parse(tc, HttpResponse(status, (), body))
    if isinstance(info.value, OAuthError):
        assert info.value.error == "invalid_client" and info.value.status == status
        assert info.value.error_description == "nope"


def _nonce_challenge(nonce: str | None) -> HttpResponse:
    headers = (("DPoP-Nonce", nonce),) if nonce else ()
    return HttpResponse(400, headers, b'{"error":"use_dpop_nonce"}')


def test_flow_retries_once_with_the_new_nonce(signer: Signer) -> None:
    tc = TokenClient(signer, token_endpoint=ENDPOINT, client_id="c", auth_method="none")
    flow = tc.token_flow()
    first = next(flow)
    assert "nonce" not in _claims(first.header("DPoP") or "")
    second = flow.send(_nonce_challenge("N1"))
    assert _claims(second.header("DPoP") or "")["nonce"] == "N1"
    with pytest.raises(StopIteration) as done:
        flow.send(_ok(expires_in=60))
    assert isinstance(done.value.value, Token)
    assert tc.nonces.get(ENDPOINT) == "N1"


@pytest.mark.parametrize("second", ["N2", "N1", None])
def test_flow_never_loops_on_nonce_challenges(signer: Signer, second: str | None) -> None:
    tc = TokenClient(signer, token_endpoint=ENDPOINT, client_id="c", auth_method="none")
    tc.nonces.put(ENDPOINT, "N0")
    flow = tc.token_flow()
    next(flow)
    flow.send(_nonce_challenge("N1"))
    with pytest.raises(NonceError):
        flow.send(_nonce_challenge(second))


@pytest.mark.parametrize("nonce", [None, "N0"])
def test_flow_refuses_challenge_without_new_nonce(signer: Signer, nonce: str | None) -> None:
    tc = TokenClient(signer, token_endpoint=ENDPOINT, client_id="c", auth_method="none")
    tc.nonces.put(ENDPOINT, "N0")
    flow = tc.token_flow()
    next(flow)
    with pytest.raises(NonceError):
        flow.send(_nonce_challenge(nonce))


# --- end to end against the local AS ----------------------------------------------------


@pytest.mark.parametrize("method", AUTH_METHODS)
def test_get_token_each_auth_method(
    servers: LocalDPoPServers, dpop_signer: Signer, method: str
) -> None:
    tc = token_client(servers, dpop_signer, method)
    token = tc.get_token()
    assert token.is_dpop and token.scope == "api"
    claims = _claims(token.access_token)
    assert claims["cnf"] == {"jkt": dpop_signer.thumbprint}
    assert tc.get_token() is token  # cached
    assert servers.counters.tokens_issued == 1
    assert servers.counters.as_nonce_challenges == 1  # first attempt had no nonce


def test_invalidate_forces_a_new_token(servers: LocalDPoPServers, dpop_signer: Signer) -> None:
    tc = token_client(servers, dpop_signer)
    first = tc.get_token()
    tc.invalidate(first)
    second = tc.get_token()
    assert second.access_token != first.access_token
    tc.invalidate(first)  # stale handle: does not drop the newer token
    assert tc.cached_token() is second


def test_as_unreachable_is_a_transport_error(dpop_signer: Signer) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tc = TokenClient(
        dpop_signer,
        token_endpoint=f"http://127.0.0.1:{port}/token",
        client_id="c",
        auth_method="none",
        timeout=2,
    )
    with pytest.raises(TransportError):
        tc.get_token()


@pytest.mark.parametrize(
    ("behavior", "error"),
    [
        ("error_500", TokenResponseError),
        ("not_json", TokenResponseError),
        ("no_access_token", TokenResponseError),
        ("bearer", TokenTypeError),
        ("bad_expires", TokenResponseError),
        ("always_nonce", NonceError),
    ],
)
def test_as_failures_are_typed(
    servers: LocalDPoPServers, dpop_signer: Signer, behavior: Any, error: type[Exception]
) -> None:
    servers.as_behavior = behavior
    tc = token_client(servers, dpop_signer, "client_secret_post")
    with pytest.raises(error) as info:
        tc.get_token()
    assert CLIENT_SECRET not in str(info.value) and CLIENT_SECRET not in repr(info.value)
    assert tc.cached_token() is None
    if behavior == "always_nonce":
        assert servers.counters.token_requests == 2  # one retry, never a loop


def test_wrong_secret_is_an_oauth_error(servers: LocalDPoPServers, dpop_signer: Signer) -> None:
    tc = TokenClient(
        dpop_signer,
        token_endpoint=servers.token_endpoint,
        client_id="client-basic",
        client_secret="wrong-secret-value",
    )
    with pytest.raises(OAuthError) as info:
        tc.get_token()
    assert info.value.error == "invalid_client" and info.value.status == 401
    assert "wrong-secret-value" not in str(info.value)


def test_renewal_failure_keeps_the_valid_token(
    servers: LocalDPoPServers, dpop_signer: Signer
) -> None:
    tc = token_client(servers, dpop_signer, renew_before=299.5)  # due almost at once
    first = tc.get_token()
    time.sleep(0.6)
    servers.as_behavior = "error_500"
    assert tc.get_token() is first  # still valid: renewal failed quietly
    servers.as_behavior = "normal"
    assert tc.get_token() is first  # within the 1 s backoff: the AS is not asked again
    time.sleep(1.1)
    assert tc.get_token() is not first


@pytest.fixture
def many_threads() -> Iterator[int]:
    yield 32


def test_single_flight_across_threads(
    servers: LocalDPoPServers, dpop_signer: Signer, many_threads: int
) -> None:
    tc = token_client(servers, dpop_signer, "private_key_jwt")
    barrier = threading.Barrier(many_threads)
    tokens: list[Token] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            tokens.append(tc.get_token())
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(many_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({t.access_token for t in tokens}) == 1
    assert servers.counters.tokens_issued == 1
    assert servers.counters.token_requests == 2  # one fetch + its one nonce retry
