"""Hostile inputs against the local servers, each built byte by byte and sent over a socket.

The RS judges ``htu`` against its own origin (RFC 9449 §4.3), never the Host header; client
assertions are strict JSON with bounded, finite lifetimes (RFC 7523 §3, RFC 8259); request
bodies are framed exactly and bounded (RFC 9112 §6, §7.1) whatever the sizes say.
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Callable, Iterator
from urllib.parse import urlencode

import pytest
import requests

from dpop_hsm.jose import b64url_encode, compact_json
from dpop_hsm.proof import ProofFactory
from dpop_hsm.signers.software import SoftwareSigner
from dpop_hsm.testing import MAX_BODY, ClientRegistration, LocalDPoPServers
from dpop_hsm.token import TokenClient
from tests.support.oauth import M2M_SECRET
from tests.support.raw_http import send_raw

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@pytest.fixture(scope="module")
def key() -> SoftwareSigner:
    return SoftwareSigner.generate("ES256")


@pytest.fixture
def srv(key: SoftwareSigner) -> Iterator[LocalDPoPServers]:
    servers = LocalDPoPServers(
        clients=[
            ClientRegistration("jwt", auth_method="private_key_jwt", jwk=dict(key.public_jwk)),
            ClientRegistration("m2m", auth_method="client_secret_post", client_secret=M2M_SECRET),
        ],
        as_nonce=False,
        rs_nonce=False,
    )
    with servers:
        yield servers


def exchange(url: str, raw: bytes, *, close_write: bool = False) -> http.client.HTTPResponse:
    """Send ``raw`` bytes to the server of ``url``; the parsed response (5 s to answer)."""
    return send_raw(url, raw, close_write=close_write)[0]


# --- the RS uses its own origin for htu ------------------------------------------------------


def _token(srv: LocalDPoPServers, key: SoftwareSigner) -> str:
    client = TokenClient(
        key,
        token_endpoint=srv.token_endpoint,
        client_id="m2m",
        client_secret=M2M_SECRET,
        auth_method="client_secret_post",
    )
    return client.get_token().access_token


def test_a_proof_for_another_origin_fails_even_with_a_spoofed_host(
    srv: LocalDPoPServers, key: SoftwareSigner
) -> None:
    token = _token(srv, key)
    proofs = ProofFactory(key)
    forged = proofs.create("GET", "http://attacker.example/api/dpop/test", access_token=token)
    response = requests.get(
        srv.api_url,
        headers={"Authorization": f"DPoP {token}", "DPoP": forged, "Host": "attacker.example"},
        timeout=5,
    )
    assert response.status_code == 401
    assert 'error="invalid_dpop_proof"' in response.headers["WWW-Authenticate"]
    assert srv.counters.rejections["proof_htu"] == 1
    # The Host header plays no part: a proof for the RS's real origin passes whatever it says.
    honest = proofs.create("GET", srv.api_url, access_token=token)
    response = requests.get(
        srv.api_url,
        headers={"Authorization": f"DPoP {token}", "DPoP": honest, "Host": "attacker.example"},
        timeout=5,
    )
    assert response.status_code == 200


def test_an_absolute_form_target_does_not_choose_the_origin(
    srv: LocalDPoPServers, key: SoftwareSigner
) -> None:
    token = _token(srv, key)
    target = "http://attacker.example/api/dpop/test"
    proof = ProofFactory(key).create("GET", target, access_token=token)
    raw = (
        f"GET {target} HTTP/1.1\r\nHost: attacker.example\r\nAuthorization: DPoP {token}\r\n"
        f"DPoP: {proof}\r\nConnection: close\r\n\r\n"
    ).encode()
    response = exchange(srv.rs_url, raw)
    assert response.status == 401
    assert srv.counters.rejections["proof_htu"] == 1


# --- client assertions: strict JSON, finite and bounded lifetimes -----------------------------


def _assertion(key: SoftwareSigner, payload: str) -> str:
    """A correctly signed assertion whose payload is exactly ``payload`` (not re-serialized)."""
    header = b64url_encode(compact_json({"alg": "ES256", "typ": "JWT", "kid": key.thumbprint}))
    signing_input = header + "." + b64url_encode(payload.encode())
    return signing_input + "." + b64url_encode(key.sign(signing_input.encode()))


def _assertion_post(
    srv: LocalDPoPServers, key: SoftwareSigner, assertion: str
) -> requests.Response:
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion,
    }
    proof = ProofFactory(key).create("POST", srv.token_endpoint)
    return requests.post(srv.token_endpoint, data=form, headers={"DPoP": proof}, timeout=5)


def _claims(srv: LocalDPoPServers, **overrides: str) -> str:
    now = int(srv.now())
    members = {
        "iss": '"jwt"',
        "sub": '"jwt"',
        "aud": json.dumps(srv.token_endpoint),
        "jti": json.dumps(b64url_encode(os.urandom(12))),
        "iat": str(now),
        "exp": str(now + 60),
    }
    members.update(overrides)
    return "{" + ",".join(f'"{k}":{v}' for k, v in members.items()) + "}"


Overrides = Callable[[int], dict[str, str]]


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (lambda now: {"exp": "NaN"}, "client_auth"),
        (lambda now: {"exp": "Infinity"}, "client_auth"),
        (lambda now: {"iat": "-Infinity"}, "client_auth"),
        (lambda now: {"exp": "1e400"}, "client_auth"),  # inf in a lenient reader
        (lambda now: {"exp": "true"}, "assertion_claims"),
        (lambda now: {"iat": "null"}, "assertion_claims"),
        (lambda now: {"iat": '"0"'}, "assertion_claims"),
        (lambda now: {"exp": str(now + 3601)}, "assertion_lifetime"),
        (lambda now: {"exp": str(now + 10 * 365 * 86400)}, "assertion_lifetime"),
        (lambda now: {"exp": str(now - 1)}, "assertion_lifetime"),
        (lambda now: {"nbf": str(now + 600)}, "assertion_claims"),
    ],
    ids=[
        "exp-NaN",
        "exp-Infinity",
        "iat-minus-Infinity",
        "exp-1e400",
        "exp-true",
        "iat-null",
        "iat-string",
        "lifetime-3601s",
        "lifetime-10y",
        "exp-before-iat",
        "nbf-future",
    ],
)
def test_hostile_assertion_claims_are_refused(
    srv: LocalDPoPServers, key: SoftwareSigner, overrides: Overrides, reason: str
) -> None:
    assertion = _assertion(key, _claims(srv, **overrides(int(srv.now()))))
    for _ in range(2):  # refused every time: nothing bypasses the expiry or replay checks
        response = _assertion_post(srv, key, assertion)
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_client"
    assert srv.counters.rejections[reason] == 2
    assert srv.counters.tokens_issued == 0


def test_duplicate_members_in_an_assertion_are_refused(
    srv: LocalDPoPServers, key: SoftwareSigner
) -> None:
    # A lenient parser keeps the last "exp"; another keeps the first: refuse the ambiguity.
    payload = _claims(srv)[:-1] + f',"exp":{int(srv.now()) - 3600}}}'
    response = _assertion_post(srv, key, _assertion(key, payload))
    assert response.status_code == 401 and response.json()["error"] == "invalid_client"
    assert srv.counters.rejections["client_auth"] == 1


def test_a_one_hour_assertion_is_accepted_once(srv: LocalDPoPServers, key: SoftwareSigner) -> None:
    now = int(srv.now())
    assertion = _assertion(key, _claims(srv, exp=str(now + 3600)))
    assert _assertion_post(srv, key, assertion).status_code == 200
    again = _assertion_post(srv, key, assertion)
    assert again.status_code == 401 and srv.counters.rejections["assertion_replay"] == 1


# --- request framing: no size can read past the limit -----------------------------------------


def _form_request(srv: LocalDPoPServers, key: SoftwareSigner, framing: str, body: bytes) -> bytes:
    proof = ProofFactory(key).create("POST", srv.token_endpoint)
    return (
        f"POST /connect/token HTTP/1.1\r\nHost: x\r\nDPoP: {proof}\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\n{framing}\r\n"
    ).encode() + body


GOOD_FORM = urlencode(
    {"grant_type": "client_credentials", "client_id": "m2m", "client_secret": M2M_SECRET}
).encode()


def test_a_well_framed_chunked_body_is_read(srv: LocalDPoPServers, key: SoftwareSigner) -> None:
    half = len(GOOD_FORM) // 2
    body = b"".join(
        f"{len(part):x};ext=1\r\n".encode() + part + b"\r\n"
        for part in (GOOD_FORM[:half], GOOD_FORM[half:])
    )
    raw = _form_request(srv, key, "Transfer-Encoding: chunked\r\n", body + b"0\r\nX-T: 1\r\n\r\n")
    response = exchange(srv.as_url, raw)
    assert response.status == 200 and srv.counters.tokens_issued == 1


@pytest.mark.parametrize(
    ("size", "status"),
    [
        ("-1", 400),  # int(..., 16) takes it; read(-1) would read to EOF, past any limit
        ("-0", 400),
        ("+10", 400),
        ("0x10", 400),
        ("1_0", 400),
        (" 10", 400),
        ("", 400),
        ("FFFFFFFFF", 400),  # nine hex digits
        ("FFFFFFFF", 413),  # four GiB: refused before a byte is read
        (f"{MAX_BODY + 1:x}", 413),
    ],
)
def test_hostile_chunk_sizes_are_refused_without_reading(
    srv: LocalDPoPServers, key: SoftwareSigner, size: str, status: int
) -> None:
    # The socket stays open for writing: a server that reads to EOF or waits for the announced
    # size would never answer within the timeout.
    body = f"{size}\r\n".encode() + b"A" * 4096
    response = exchange(srv.as_url, _form_request(srv, key, "Transfer-Encoding: chunked\r\n", body))
    assert response.status == status
    assert response.getheader("Connection") == "close"
    assert srv.counters.token_requests == 0


def test_chunks_adding_up_past_the_limit_are_refused(
    srv: LocalDPoPServers, key: SoftwareSigner
) -> None:
    chunk = b"A" * 4096
    body = (f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n") * (MAX_BODY // len(chunk))
    body += b"1\r\nA\r\n0\r\n\r\n"  # one byte over
    response = exchange(srv.as_url, _form_request(srv, key, "Transfer-Encoding: chunked\r\n", body))
    assert response.status == 413 and srv.counters.token_requests == 0


@pytest.mark.parametrize(
    ("framing", "status"),
    [
        ("Content-Length: -1\r\n", 400),
        ("Content-Length: +5\r\n", 400),
        ("Content-Length: 1_0\r\n", 400),
        ("Content-Length: 0x10\r\n", 400),
        ("Content-Length: 5, 5\r\n", 400),
        ("Content-Length: 5\r\nContent-Length: 5\r\n", 400),
        ("Content-Length: 99999999999\r\n", 400),
        (f"Content-Length: {MAX_BODY + 1}\r\n", 413),
        ("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", 400),  # smuggling shape
        ("Transfer-Encoding: gzip, chunked\r\n", 501),
        ("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", 501),
    ],
)
def test_hostile_content_lengths_are_refused(
    srv: LocalDPoPServers, key: SoftwareSigner, framing: str, status: int
) -> None:
    response = exchange(srv.as_url, _form_request(srv, key, framing, b"A" * 64))
    assert response.status == status
    assert srv.counters.token_requests == 0


def test_a_body_shorter_than_its_content_length_is_refused(
    srv: LocalDPoPServers, key: SoftwareSigner
) -> None:
    raw = _form_request(srv, key, f"Content-Length: {len(GOOD_FORM) + 10}\r\n", GOOD_FORM)
    response = exchange(srv.as_url, raw, close_write=True)
    assert response.status == 400 and srv.counters.token_requests == 0
