"""The contract every HTTP adapter keeps, one test set run over each driver in
``tests.support.adapters.DRIVERS`` (requests' DPoPAuth and DPoPSession, httpx Client and
AsyncClient), against ``dpop_hsm.testing.LocalDPoPServers`` over real sockets.

Public API only: what a user can set up is what is tested. What each server saw comes from its
counters; what each adapter sent comes from its client's transport, and every proof on the wire is
checked by the independent verifier (``tests.support.verifier``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("httpx")

from dpop_hsm import (
    NonceError,
    RedirectError,
    SoftwareSigner,
    TokenClient,
    TokenTypeError,
    UnauthorizedError,
)
from dpop_hsm.testing import ClientRegistration, LocalDPoPServers
from tests.support.adapters import DRIVERS, Driver, Sent, Streamed
from tests.support.raw_http import RawServer, Seen, response
from tests.support.verifier import verify_proof_signature

CLIENT_ID = "contract"
CLIENT_SECRET = "contract-secret-8d1e"  # a fixture value the local AS registers
Connect = Callable[..., Driver]


@pytest.fixture(scope="module")
def signer() -> SoftwareSigner:
    return SoftwareSigner.generate("ES256")


@pytest.fixture
def local() -> Iterator[LocalDPoPServers]:
    """A fresh AS + RS, both requiring nonces (RFC 9449 §8, §9)."""
    client = ClientRegistration(CLIENT_ID, client_secret=CLIENT_SECRET)
    with LocalDPoPServers(clients=[client], as_nonce=True, rs_nonce=True) as servers:
        yield servers


@pytest.fixture(params=list(DRIVERS))
def connect(
    request: pytest.FixtureRequest, local: LocalDPoPServers, signer: SoftwareSigner
) -> Iterator[Connect]:
    """``connect(**options)``: a driver for the adapter under test, on a new TokenClient."""
    made: list[Driver] = []

    def make(**options: Any) -> Driver:
        tc = TokenClient(
            signer,
            token_endpoint=local.token_endpoint,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            scope="api",
        )
        driver = DRIVERS[request.param](tc, **options)
        made.append(driver)
        return driver

    yield make
    for driver in made:
        driver.close()


@pytest.fixture
def adapter(connect: Connect) -> Driver:
    return connect()


def to_api(adapter: Driver, local: LocalDPoPServers) -> list[Sent]:
    return [s for s in adapter.sent if s.url.startswith(local.rs_url)]


def ath(token: str) -> str:
    # RFC 9449 §4.2: base64url(SHA-256(ASCII(access token))), no padding.
    digest = hashlib.sha256(token.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def claims_of(reply_body: bytes) -> dict[str, str]:
    return {item["type"]: item["value"] for item in json.loads(reply_body)}


# --- stamping ---------------------------------------------------------------------------------


def test_authorization_dpop_and_a_proof_bound_to_the_token(
    adapter: Driver, local: LocalDPoPServers, signer: SoftwareSigner
) -> None:
    reply = adapter.send("POST", local.api_url + "?q=1", b"payload")
    assert reply.status == 200
    assert claims_of(reply.body)["body_length"] == "7"
    sent = to_api(adapter, local)[-1]
    scheme, _, token = (sent.header("Authorization") or "").partition(" ")
    assert scheme == "DPoP" and token
    proof = verify_proof_signature(sent.header("DPoP") or "", signer.public_jwk)
    assert proof.header == {"typ": "dpop+jwt", "alg": "ES256", "jwk": dict(signer.public_jwk)}
    assert set(proof.claims) == {"jti", "htm", "htu", "iat", "ath", "nonce"}
    assert proof.claims["htm"] == "POST"
    assert proof.claims["htu"] == local.api_url  # RFC 9449 §4.2: no query, no fragment
    assert proof.claims["ath"] == ath(token)
    assert proof.claims["nonce"] == reply.headers["dpop-nonce"]


def test_a_path_with_characters_no_uri_holds_raw_verifies_on_every_adapter(
    adapter: Driver, local: LocalDPoPServers
) -> None:
    # { } and non-ASCII: every transport percent-encodes them; | ^ [ ]: httpx sends them raw,
    # requests and yarl encode them. The RS compares htu as RFC 3986 §6.2.2 says: 200 on each.
    reply = adapter.send("GET", local.api_url + "/items/{id}|a^[b]/caf\u00e9")
    assert reply.status == 200, reply.body[:200]
    assert "/items/%7Bid%7D" in to_api(adapter, local)[-1].url


def test_every_request_gets_a_fresh_proof(adapter: Driver, local: LocalDPoPServers) -> None:
    for _ in range(5):
        assert adapter.send("GET", local.api_url).status == 200
    proofs = [s.header("DPoP") or "" for s in to_api(adapter, local)]
    jtis = [verify_proof_signature(p).claims["jti"] for p in proofs]
    assert len(proofs) == 6  # five requests, one RS nonce retry
    assert len(set(jtis)) == len(jtis)
    assert len(set(proofs)) == len(proofs)


# --- nonces ----------------------------------------------------------------------------------


def test_as_and_rs_nonce_are_each_retried_once_then_reused(
    adapter: Driver, local: LocalDPoPServers
) -> None:
    assert adapter.send("GET", local.api_url).status == 200
    c = local.counters
    assert (c.token_requests, c.as_nonce_challenges, c.tokens_issued) == (2, 1, 1)
    assert (c.api_requests, c.rs_nonce_challenges, c.api_ok) == (2, 1, 1)
    first, retry = to_api(adapter, local)
    assert "nonce" not in verify_proof_signature(first.header("DPoP") or "").claims
    nonce = verify_proof_signature(retry.header("DPoP") or "").claims["nonce"]
    for _ in range(3):
        assert adapter.send("GET", local.api_url).status == 200
    assert (c.api_requests, c.rs_nonce_challenges) == (5, 1)  # RFC 9449 §8.2: nonce kept
    later = to_api(adapter, local)[2:]
    assert [verify_proof_signature(s.header("DPoP") or "").claims["nonce"] for s in later] == [
        nonce
    ] * 3
    local.revoke_all()  # the renewal's token request reuses the AS nonce too
    assert adapter.send("GET", local.api_url).status == 200
    assert (c.token_requests, c.as_nonce_challenges, c.tokens_issued) == (3, 1, 2)


def test_rs_nonce_demanded_again_after_the_retry_is_a_nonce_error(
    adapter: Driver, local: LocalDPoPServers
) -> None:
    local.rs_behavior = "always_nonce"
    with pytest.raises(NonceError):
        adapter.send("GET", local.api_url)
    assert local.counters.rs_nonce_challenges == 2  # one retry, then stop


def test_as_nonce_demanded_again_after_the_retry_is_a_nonce_error(
    adapter: Driver, local: LocalDPoPServers
) -> None:
    local.as_behavior = "always_nonce"
    with pytest.raises(NonceError):
        adapter.send("GET", local.api_url)
    assert local.counters.token_requests == 2
    assert local.counters.api_requests == 0  # nothing sent without a token


# --- tokens ----------------------------------------------------------------------------------


def test_invalid_token_renews_once_and_resends_once(
    adapter: Driver, local: LocalDPoPServers
) -> None:
    assert adapter.send("GET", local.api_url).status == 200
    local.revoke_all()
    assert adapter.send("GET", local.api_url).status == 200
    c = local.counters
    assert (c.tokens_issued, c.api_requests, c.rejections["token_revoked"]) == (2, 4, 1)
    old, new = (s.header("Authorization") for s in to_api(adapter, local)[-2:])
    assert old != new


def test_invalid_token_after_the_renewal_is_raised_not_retried_again(
    adapter: Driver, local: LocalDPoPServers
) -> None:
    assert adapter.send("GET", local.api_url).status == 200
    local.rs_behavior = "reject"
    with pytest.raises(UnauthorizedError) as info:
        adapter.send("GET", local.api_url)
    assert (info.value.error, info.value.status) == ("invalid_token", 401)
    assert (local.counters.tokens_issued, local.counters.api_requests) == (2, 4)


def test_rejection_with_an_error_is_typed_or_returned(
    connect: Connect, local: LocalDPoPServers
) -> None:
    local.required_scope = "admin"
    with pytest.raises(UnauthorizedError) as info:
        connect().send("GET", local.api_url)
    assert (info.value.error, info.value.status) == ("insufficient_scope", 403)
    assert "insufficient_scope" in str(info.value)
    lenient = connect(raise_on_rejection=False)
    assert lenient.send("GET", local.api_url).status == 403


def test_bearer_token_type_is_refused(adapter: Driver, local: LocalDPoPServers) -> None:
    local.as_behavior = "bearer"  # RFC 9449 §5: a Bearer answer to a DPoP request
    with pytest.raises(TokenTypeError):
        adapter.send("GET", local.api_url)
    assert local.counters.api_requests == 0


def test_concurrent_callers_without_a_token_cause_exactly_one(
    adapter: Driver, local: LocalDPoPServers
) -> None:
    replies = adapter.send_concurrently(200, "GET", local.api_url)
    assert [r.status for r in replies] == [200] * 200
    assert local.counters.tokens_issued == 1
    assert local.counters.token_requests == 2  # the fetch and its one AS nonce retry


# --- responses the adapter must pass through ----------------------------------------------


@pytest.fixture
def raw_401() -> Iterator[RawServer]:
    """A server answering 401 with a Bearer challenge only: nothing for DPoP to act on."""

    def handler(seen: Seen, conn: socket.socket, index: int) -> None:
        conn.sendall(
            response(401, b'{"error":"who"}', [("WWW-Authenticate", 'Bearer realm="raw"')])
        )

    server = RawServer(handler)
    yield server
    server.close()


def test_401_without_a_dpop_challenge_is_returned_as_is(
    adapter: Driver, local: LocalDPoPServers, raw_401: RawServer
) -> None:
    reply = adapter.send("GET", raw_401.url + "/api")
    assert (reply.status, reply.body) == (401, b'{"error":"who"}')
    assert reply.headers["www-authenticate"] == 'Bearer realm="raw"'
    assert len(raw_401.seen) == 1  # no retry
    assert local.counters.tokens_issued == 1  # and no renewal
    assert (raw_401.seen[0].header("Authorization") or "").startswith("DPoP ")


def test_a_body_that_cannot_be_replayed_is_never_resent(
    adapter: Driver, local: LocalDPoPServers
) -> None:
    # First RS contact: no nonce known yet, so the RS challenges (RFC 9449 §9); a stream
    # already sent cannot be sent again, so the challenge surfaces instead of a retry.
    with pytest.raises(UnauthorizedError, match="not replayable") as info:
        adapter.send("POST", local.api_url, Streamed((b"chunk-1", b"chunk-2")))
    assert info.value.error == "use_dpop_nonce"
    assert local.counters.api_requests == 1
    assert len(to_api(adapter, local)) == 1
    reply = adapter.send("POST", local.api_url, Streamed((b"chunk-1", b"chunk-2")))
    assert reply.status == 200 and claims_of(reply.body)["body_length"] == "14"


# --- redirects -------------------------------------------------------------------------------


def test_cross_origin_redirect_strips_credentials(adapter: Driver, local: LocalDPoPServers) -> None:
    adapter.send("GET", local.api_url)  # a token and the RS nonce first
    reply = adapter.send("GET", f"{local.rs_url}/redirect?to={local.as_url}/echo")
    assert reply.status == 200
    assert json.loads(reply.body) == {"authorization": False, "dpop": False}
    hop = adapter.sent[-1]
    assert hop.url == local.as_url + "/echo"
    assert hop.header("Authorization") is None and hop.header("DPoP") is None


def test_cross_origin_redirect_can_be_refused(
    connect: Connect, local: LocalDPoPServers, request: pytest.FixtureRequest
) -> None:
    adapter = connect(cross_origin_redirects="refuse")
    with pytest.raises(RedirectError):
        adapter.send("GET", f"{local.rs_url}/redirect?to={local.as_url}/echo")
    assert not [s for s in adapter.sent if s.url.startswith(local.as_url + "/echo")]


def test_same_origin_redirect_is_signed_anew(
    adapter: Driver, local: LocalDPoPServers, signer: SoftwareSigner
) -> None:
    adapter.send("GET", local.api_url)
    reply = adapter.send("POST", local.rs_url + "/redirect?to=/api/dpop/test", b"x")
    hop, redirected = adapter.sent[-1], adapter.sent[-2]
    assert hop.url == local.api_url and redirected.url.startswith(local.rs_url + "/redirect")
    if not adapter.resigns_redirects:
        # Documented: a plain requests.Session follows hops without our credentials.
        assert reply.status == 401
        assert hop.header("Authorization") is None and hop.header("DPoP") is None
        return
    assert reply.status == 200
    first = verify_proof_signature(redirected.header("DPoP") or "", signer.public_jwk)
    again = verify_proof_signature(hop.header("DPoP") or "", signer.public_jwk)
    assert again.claims["htu"] == local.api_url  # RFC 9449 §4.2: the hop's own URL
    assert again.claims["jti"] != first.claims["jti"]
    assert again.claims["htm"] == hop.method  # 307 keeps the method
    assert hop.header("Authorization") == redirected.header("Authorization")
    assert not any(k.startswith("proof_") for k in local.counters.rejections)
