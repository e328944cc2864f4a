"""The local AS/RS enforce RFC 9449 themselves: raw requests with hand-made proofs and tokens."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
import requests

from dpop_hsm.challenges import find_challenge
from dpop_hsm.errors import ConfigurationError
from dpop_hsm.proof import ProofFactory
from dpop_hsm.signers.base import Signer
from dpop_hsm.signers.software import SoftwareSigner
from dpop_hsm.testing import ClientRegistration, Counters, LocalDPoPServers
from dpop_hsm.token import TokenClient
from tests.support.oauth import M2M_SECRET
from tests.support.servers import CLIENT_SECRET, token_client


@pytest.fixture
def bound(servers: LocalDPoPServers, dpop_signer: Signer) -> tuple[str, ProofFactory]:
    """A token bound to dpop_signer, and a factory making proofs with that key."""
    token = token_client(servers, dpop_signer).get_token()
    return token.access_token, ProofFactory(dpop_signer)


def _api(
    servers: LocalDPoPServers,
    *,
    authorization: str | None,
    proof: str | None,
    method: str = "GET",
    url: str | None = None,
) -> requests.Response:
    headers = {}
    if authorization is not None:
        headers["Authorization"] = authorization
    if proof is not None:
        headers["DPoP"] = proof
    return requests.request(method, url or servers.api_url, headers=headers, timeout=5)


def _error(response: requests.Response) -> str | None:
    challenge = find_challenge(response.headers.get("WWW-Authenticate", ""), "DPoP")
    assert challenge is not None, response.headers
    assert "ES256" in challenge.params["algs"].split()  # RFC 9449 §7.1 algs parameter
    return challenge.params.get("error")


def _nonce(servers: LocalDPoPServers) -> str:
    return servers.rs_nonces.current()


def test_valid_request_returns_claims_not_the_proof(
    servers: LocalDPoPServers, bound: tuple[str, ProofFactory], dpop_signer: Signer
) -> None:
    token, proofs = bound
    proof = proofs.create("GET", servers.api_url, access_token=token, nonce=_nonce(servers))
    response = _api(servers, authorization=f"DPoP {token}", proof=proof)
    assert response.status_code == 200
    assert response.headers["DPoP-Nonce"]  # nonces on 200s too
    claims = {c["type"]: c["value"] for c in response.json()}
    assert json.loads(claims["cnf"]) == {"jkt": dpop_signer.thumbprint}
    assert claims["client_id"] == "client-basic" and claims["scope"] == "api"
    assert proof not in response.text and token not in response.text


def test_missing_nonce_gets_use_dpop_nonce(
    servers: LocalDPoPServers, bound: tuple[str, ProofFactory]
) -> None:
    token, proofs = bound
    response = _api(
        servers,
        authorization=f"DPoP {token}",
        proof=proofs.create("GET", servers.api_url, access_token=token),
    )
    assert response.status_code == 401 and _error(response) == "use_dpop_nonce"
    assert response.headers["DPoP-Nonce"] == _nonce(servers)
    assert servers.counters.rs_nonce_challenges == 1


def test_rotated_nonce_previous_still_accepted_older_not(
    servers: LocalDPoPServers, bound: tuple[str, ProofFactory]
) -> None:
    token, proofs = bound
    old = _nonce(servers)
    servers.rs_nonces.rotate()
    ok = _api(
        servers,
        authorization=f"DPoP {token}",
        proof=proofs.create("GET", servers.api_url, access_token=token, nonce=old),
    )
    assert ok.status_code == 200
    servers.rs_nonces.rotate()
    stale = _api(
        servers,
        authorization=f"DPoP {token}",
        proof=proofs.create("GET", servers.api_url, access_token=token, nonce=old),
    )
    assert _error(stale) == "use_dpop_nonce"


@pytest.mark.parametrize(
    ("case", "error", "reason"),
    [
        ("bearer", "invalid_token", "bearer_bound"),
        ("replay", "invalid_dpop_proof", "replay"),
        ("htu", "invalid_dpop_proof", "proof_htu"),
        ("htm", "invalid_dpop_proof", "proof_htm"),
        ("ath", "invalid_dpop_proof", "proof_ath"),
        ("other_key", "invalid_token", "proof_cnf"),
        ("no_proof", "invalid_dpop_proof", "proof_missing"),
        ("forged_token", "invalid_token", "token_invalid"),
    ],
)
def test_rejections(
    servers: LocalDPoPServers,
    bound: tuple[str, ProofFactory],
    case: str,
    error: str,
    reason: str,
) -> None:
    token, proofs = bound
    nonce = _nonce(servers)
    authorization = f"DPoP {token}"
    proof: str | None = proofs.create("GET", servers.api_url, access_token=token, nonce=nonce)
    if case == "bearer":
        authorization = f"Bearer {token}"
    elif case == "replay":
        assert proof is not None
        assert _api(servers, authorization=authorization, proof=proof).status_code == 200
    elif case == "htu":
        proof = proofs.create("GET", servers.rs_url + "/other", access_token=token, nonce=nonce)
    elif case == "htm":
        proof = proofs.create("POST", servers.api_url, access_token=token, nonce=nonce)
    elif case == "ath":
        proof = proofs.create("GET", servers.api_url, access_token=token + "x", nonce=nonce)
    elif case == "other_key":
        other = ProofFactory(SoftwareSigner.generate("ES256"))
        proof = other.create("GET", servers.api_url, access_token=token, nonce=nonce)
    elif case == "no_proof":
        proof = None
    elif case == "forged_token":
        head, body, _sig = token.split(".")
        authorization = f"DPoP {head}.{body}.{_sig[::-1]}"
    response = _api(servers, authorization=authorization, proof=proof)
    assert response.status_code == 401
    assert _error(response) == error
    assert servers.counters.rejections[reason] == 1


def test_multi_challenge_header_has_a_quoted_comma(
    servers: LocalDPoPServers, bound: tuple[str, ProofFactory]
) -> None:
    response = _api(servers, authorization=None, proof=None)
    header = response.headers["WWW-Authenticate"]
    assert header.startswith("Bearer ") and "DPoP " in header
    servers.multi_challenge = False
    token, proofs = bound
    response = _api(
        servers,
        authorization=f"DPoP {token}",
        proof=proofs.create("GET", servers.api_url, access_token=token),
    )
    assert response.headers["WWW-Authenticate"].startswith("DPoP ")
    assert "nonce, in DPoP proof" in response.headers["WWW-Authenticate"]


def _token_post(
    servers: LocalDPoPServers, proof: str | None, form: dict[str, str], auth: Any = None
) -> requests.Response:
    headers = {"DPoP": proof} if proof else {}
    return requests.post(servers.token_endpoint, data=form, headers=headers, auth=auth, timeout=5)


def test_as_requires_proof_and_nonce(servers: LocalDPoPServers, dpop_signer: Signer) -> None:
    proofs = ProofFactory(dpop_signer)
    form = {"grant_type": "client_credentials"}
    basic = ("client-basic", CLIENT_SECRET)
    no_proof = _token_post(servers, None, form, basic)
    assert no_proof.status_code == 400 and no_proof.json()["error"] == "invalid_dpop_proof"
    no_nonce = _token_post(servers, proofs.create("POST", servers.token_endpoint), form, basic)
    assert no_nonce.status_code == 400 and no_nonce.json()["error"] == "use_dpop_nonce"
    nonce = no_nonce.headers["DPoP-Nonce"]
    wrong_htu = proofs.create("POST", servers.as_url + "/token", nonce=nonce)
    assert _token_post(servers, wrong_htu, form, basic).json()["error"] == "invalid_dpop_proof"
    good = _token_post(
        servers, proofs.create("POST", servers.token_endpoint, nonce=nonce), form, basic
    )
    assert good.status_code == 200 and good.json()["token_type"] == "DPoP"
    assert good.headers["DPoP-Nonce"] and good.headers["Cache-Control"] == "no-store"
    bad_secret = _token_post(
        servers,
        proofs.create("POST", servers.token_endpoint, nonce=nonce),
        form,
        ("client-basic", "x"),
    )
    assert bad_secret.status_code == 401 and bad_secret.json()["error"] == "invalid_client"


def test_as_rejects_a_replayed_client_assertion(
    servers: LocalDPoPServers, dpop_signer: Signer
) -> None:
    tc = token_client(servers, dpop_signer, "private_key_jwt")
    assertion = tc._client_assertion()
    proofs = ProofFactory(dpop_signer)
    nonce = servers.as_nonces.current()
    form = {
        "grant_type": "client_credentials",
        "client_id": "client-jwt",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion,
    }
    first = _token_post(servers, proofs.create("POST", servers.token_endpoint, nonce=nonce), form)
    assert first.status_code == 200
    again = _token_post(servers, proofs.create("POST", servers.token_endpoint, nonce=nonce), form)
    assert again.status_code == 401 and servers.counters.rejections["assertion_replay"] == 1


def test_jwks_endpoints_and_standalone_lifecycle(dpop_signer: Signer) -> None:
    srv = LocalDPoPServers(
        clients=[ClientRegistration("c", "client_secret_post", M2M_SECRET)],
        as_nonce=False,
        rs_nonce=False,
    )
    srv.start()
    try:
        keys = requests.get(srv.jwks_url, timeout=5).json()["keys"]
        assert keys[0]["kid"] == srv.kid and "d" not in keys[0]
        text = srv.endpoints()
        assert srv.token_endpoint in text and srv.api_url in text and "client" in text
        tc = token_client_post(srv, dpop_signer)
        assert tc.get_token().is_dpop
        assert srv.counters.token_requests == 1  # no nonce required: one request
    finally:
        srv.stop()
    with pytest.raises(ConfigurationError):
        _ = srv.api_url


def token_client_post(srv: LocalDPoPServers, signer: Signer) -> Any:
    from dpop_hsm.token import TokenClient

    return TokenClient(
        signer,
        token_endpoint=srv.token_endpoint,
        client_id="c",
        client_secret=M2M_SECRET,
        auth_method="client_secret_post",
    )


def test_registration_is_validated() -> None:
    srv = LocalDPoPServers()
    with pytest.raises(ConfigurationError, match="needs a secret"):
        srv.register_client(ClientRegistration("x", auth_method="client_secret_post"))
    with pytest.raises(ConfigurationError, match="public JWK"):
        srv.register_client(ClientRegistration("x", auth_method="private_key_jwt"))
    with pytest.raises(ConfigurationError, match="unknown auth method"):
        srv.register_client(ClientRegistration("x", auth_method="tls_client_auth"))


def test_counters_are_thread_safe() -> None:
    counters = Counters()

    def work() -> None:
        for _ in range(1000):
            counters.add("token_requests")
            counters.reject("x")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counters.token_requests == 8000
    assert counters.snapshot()["rejections"] == {"x": 8000}


def test_a_full_replay_cache_answers_503_with_retry_after(dpop_signer: Signer) -> None:
    """The RS fails closed at capacity (never forgetting a live jti) and says when to retry,
    instead of calling a good proof invalid (RFC 9110 §15.6.4, §10.2.3)."""
    import requests

    from dpop_hsm.replay import ReplayCache
    from dpop_hsm.requests import DPoPSession

    with LocalDPoPServers() as srv:
        srv.resource_server._proof_replays = ReplayCache(max_entries=2, max_entries_per_key=2)
        tc = token_client_default(srv, dpop_signer)
        with DPoPSession(tc) as session:
            replies = [session.get(srv.api_url) for _ in range(4)]
    statuses = [r.status_code for r in replies]
    assert statuses[0] == 200 and 503 in statuses
    first_full = statuses.index(503)
    assert set(statuses[:first_full]) == {200} and set(statuses[first_full:]) == {503}
    third = replies[first_full]
    assert int(third.headers["Retry-After"]) >= 1
    assert "WWW-Authenticate" not in third.headers
    assert third.json()["error"] == "temporarily_unavailable"
    assert isinstance(third, requests.Response)


def token_client_default(srv: LocalDPoPServers, signer: Signer) -> TokenClient:
    from dpop_hsm.testing import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET

    return TokenClient(
        signer,
        token_endpoint=srv.token_endpoint,
        client_id=DEFAULT_CLIENT_ID,
        client_secret=DEFAULT_CLIENT_SECRET,
        scope="api",
    )
