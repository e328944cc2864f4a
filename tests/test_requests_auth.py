"""requests transport over real sockets against dpop_hsm.testing: nonces at both servers, every
auth method, renewal, single flight, typed failures, redirects, and a secret-free DEBUG log."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from dpop_hsm.errors import NonceError, RedirectError, UnauthorizedError
from dpop_hsm.requests import DPoPAuth, DPoPSession
from dpop_hsm.signers.base import Signer
from dpop_hsm.testing import LocalDPoPServers
from tests.support.servers import AUTH_METHODS, CLIENT_SECRET, token_client


def _claims(response: requests.Response) -> dict[str, str]:
    return {item["type"]: item["value"] for item in response.json()}


@pytest.mark.parametrize("method", AUTH_METHODS)
def test_each_auth_method_with_nonces_at_both_servers(
    servers: LocalDPoPServers, dpop_signer: Signer, method: str
) -> None:
    tc = token_client(servers, dpop_signer, method)
    with DPoPSession(tc) as session:
        first = session.get(servers.api_url)
        assert first.status_code == 200
        assert [r.status_code for r in first.history] == [401]  # one RS nonce challenge
        claims = _claims(first)
        assert claims["authorization_scheme"] == "DPoP"
        assert dpop_signer.thumbprint in claims["cnf"]
        assert "proof_token" not in claims
        for _ in range(3):
            again = session.post(servers.api_url, data=b"payload")
            assert again.status_code == 200 and not again.history
    c = servers.counters
    assert c.tokens_issued == 1 and c.as_nonce_challenges == 1 and c.rs_nonce_challenges == 1


def test_plain_session_with_auth_and_token_via_that_session(
    servers: LocalDPoPServers, dpop_signer: Signer
) -> None:
    seen: list[str] = []
    with requests.Session() as session:
        session.hooks["response"].append(lambda r, **kw: seen.append(r.url))
        auth = DPoPAuth(token_client(servers, dpop_signer), session=session)
        assert session.get(servers.api_url, auth=auth).status_code == 200
    assert servers.token_endpoint in seen  # the token request went through our session


def test_short_token_lifetime_renews_across_requests(
    servers: LocalDPoPServers, dpop_signer: Signer
) -> None:
    servers.token_lifetime = 2
    tc = token_client(servers, dpop_signer, "client_secret_post")
    tokens = set()
    with DPoPSession(tc) as session:
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            assert session.get(servers.api_url).status_code == 200
            tokens.add(_claims(session.get(servers.api_url))["jti"])
            time.sleep(0.1)
    assert servers.counters.tokens_issued >= 2
    assert len(tokens) == servers.counters.tokens_issued
    assert servers.counters.rejections["token_expired"] == 0  # renewed ahead, never late


def test_single_flight_32_threads(servers: LocalDPoPServers, dpop_signer: Signer) -> None:
    tc = token_client(servers, dpop_signer, "private_key_jwt")
    barrier = threading.Barrier(32)
    statuses: list[int] = []
    with DPoPSession(tc) as session:

        def worker() -> None:
            barrier.wait()
            statuses.append(session.get(servers.api_url).status_code)

        threads = [threading.Thread(target=worker) for _ in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert statuses == [200] * 32
    assert servers.counters.tokens_issued == 1
    assert servers.counters.token_requests == 2  # the fetch and its single nonce retry


def test_invalid_token_renews_once_and_resends(
    servers: LocalDPoPServers, dpop_signer: Signer
) -> None:
    tc = token_client(servers, dpop_signer)
    with DPoPSession(tc) as session:
        assert session.get(servers.api_url).status_code == 200
        servers.revoke_all()
        response = session.get(servers.api_url)
        assert response.status_code == 200
        assert [r.status_code for r in response.history] == [401]
    assert servers.counters.tokens_issued == 2
    assert servers.counters.rejections["token_revoked"] == 1


def test_rs_rejection_is_a_typed_error(servers: LocalDPoPServers, dpop_signer: Signer) -> None:
    servers.required_scope = "admin"
    with DPoPSession(token_client(servers, dpop_signer), raise_on_rejection=True) as session:
        with pytest.raises(UnauthorizedError) as info:
            session.get(servers.api_url)
        assert info.value.error == "insufficient_scope" and info.value.status == 403
        servers.rs_behavior = "reject"
        with pytest.raises(UnauthorizedError) as info:
            session.get(servers.api_url)
        assert info.value.error == "invalid_token"
    # The default: the final 401 comes back like any response (raise_for_status() works).
    with DPoPSession(token_client(servers, dpop_signer)) as lenient:
        response = lenient.get(servers.api_url)
        assert response.status_code == 401
        with pytest.raises(requests.HTTPError):
            response.raise_for_status()


def test_endless_rs_nonce_challenges_stop(servers: LocalDPoPServers, dpop_signer: Signer) -> None:
    servers.rs_behavior = "always_nonce"
    with DPoPSession(token_client(servers, dpop_signer)) as session, pytest.raises(NonceError):
        session.get(servers.api_url)
    assert servers.counters.rs_nonce_challenges == 2


def test_streamed_body_is_never_resent(servers: LocalDPoPServers, dpop_signer: Signer) -> None:
    def body() -> Iterator[bytes]:
        yield b"chunk-1"
        yield b"chunk-2"

    with DPoPSession(token_client(servers, dpop_signer), raise_on_rejection=True) as session:
        with pytest.raises(UnauthorizedError) as info:
            session.post(servers.api_url, data=body())  # first RS contact: nonce challenge
        assert "not replayable" in str(info.value)
        assert servers.counters.api_requests == 1
        ok = session.post(servers.api_url, data=body())  # now the nonce is known
        assert ok.status_code == 200 and _claims(ok)["body_length"] == "14"


def test_same_origin_redirect_is_resigned(servers: LocalDPoPServers, dpop_signer: Signer) -> None:
    with DPoPSession(token_client(servers, dpop_signer)) as session:
        session.get(servers.api_url)  # learn the RS nonce
        response = session.post(servers.rs_url + "/redirect?to=/api/dpop/test", data=b"x")
    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [307]
    assert not any(k.startswith("proof_") for k in servers.counters.rejections)


def test_cross_origin_redirect_strips_credentials(
    servers: LocalDPoPServers, dpop_signer: Signer
) -> None:
    target = servers.as_url + "/echo"
    with DPoPSession(token_client(servers, dpop_signer)) as session:
        response = session.get(servers.rs_url + "/redirect", params={"to": target})
    assert response.status_code == 200
    assert response.json() == {"authorization": False, "dpop": False}


def test_cross_origin_redirect_can_be_refused(
    servers: LocalDPoPServers, dpop_signer: Signer
) -> None:
    target = servers.as_url + "/echo"
    tc = token_client(servers, dpop_signer)
    with DPoPSession(tc, cross_origin_redirects="refuse") as session, pytest.raises(RedirectError):
        session.get(servers.rs_url + "/redirect", params={"to": target})


def test_plain_session_never_forwards_the_old_proof(
    servers: LocalDPoPServers, dpop_signer: Signer
) -> None:
    auth = DPoPAuth(token_client(servers, dpop_signer))
    with requests.Session() as session:
        session.get(servers.api_url, auth=auth)
        response = session.get(servers.rs_url + "/redirect?to=/api/dpop/test", auth=auth)
    assert response.status_code == 401  # followed without credentials: not with a stale proof
    assert servers.counters.rejections["missing_token"] == 1
    assert not any(k.startswith("proof_") for k in servers.counters.rejections)


def test_debug_log_holds_no_secret(
    servers: LocalDPoPServers, dpop_signer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    proofs: list[str] = []
    assertions: list[str] = []
    tokens: list[str] = []
    for method in AUTH_METHODS:
        tc = token_client(servers, dpop_signer, method)
        with DPoPSession(tc) as session:
            session.hooks["response"].append(
                lambda r, **kw: proofs.extend(
                    h.request.headers.get("DPoP", "") for h in [*r.history, r]
                )
            )
            assert session.post(servers.api_url, data=b"x").status_code == 200
            token = tc.cached_token()
            assert token is not None
            tokens.append(token.access_token)
            assertions.append(tc._client_assertion())
    secrets = [CLIENT_SECRET, *tokens, *[p for p in proofs if p]]
    assert len(secrets) > 4
    records = caplog.records
    text = "\n".join(r.getMessage() for r in records)
    assert "Authorization: ****" in text and "DPoP: ****" in text
    assert "client_secret=****" in text and "client_assertion=****" in text
    assert '"access_token":"****"' in text
    for secret in secrets:
        assert secret not in text
        assert all(secret not in repr(r.__dict__) for r in records)
    # Signature segments of assertions and proofs never appear either.
    for jws in [*assertions, *proofs]:
        if jws:
            assert jws.rsplit(".", 1)[1] not in text


def test_plain_http_to_a_remote_host_is_refused_before_any_token(
    servers: LocalDPoPServers, dpop_signer: Signer
) -> None:
    from dpop_hsm.errors import InsecureEndpointError

    with (
        DPoPSession(token_client(servers, dpop_signer)) as session,
        pytest.raises(InsecureEndpointError),
    ):
        session.get("http://rs.example.com/api")
    assert servers.counters.token_requests == 0
