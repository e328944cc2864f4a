"""The local AS's authorization code flow, each rule and each refusal over real sockets:
metadata (RFC 8414), the login + consent step, PKCE S256 (RFC 7636), redirect URI matching
(RFC 6749 §3.1.2.3, RFC 8252 §7.3), ``dpop_jkt`` (RFC 9449 §10), ``iss`` (RFC 9207), single-use
codes (RFC 6749 §4.1.2) and PAR (RFC 9126, RFC 9449 §10.1)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from urllib.parse import urlencode

import pytest
import requests

from dpop_hsm.errors import ConfigurationError, ProtocolError
from dpop_hsm.signers.software import SoftwareSigner
from dpop_hsm.testing import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_PUBLIC_CLIENT_ID,
    ClientRegistration,
    LocalDPoPServers,
)
from dpop_hsm.token import TokenClient
from tests.support.oauth import M2M_SECRET, Flow, api, callback_params, claims_of, error_of


@pytest.fixture(scope="module")
def key() -> SoftwareSigner:
    return SoftwareSigner.generate("ES256")


@pytest.fixture(scope="module")
def other_key() -> SoftwareSigner:
    return SoftwareSigner.generate("ES256")


@pytest.fixture
def srv() -> Iterator[LocalDPoPServers]:
    with LocalDPoPServers() as servers:  # nonces required at both servers
        yield servers


@pytest.fixture
def public(srv: LocalDPoPServers, key: SoftwareSigner) -> Flow:
    return Flow(srv, key, DEFAULT_PUBLIC_CLIENT_ID)


@pytest.fixture
def confidential(srv: LocalDPoPServers, key: SoftwareSigner) -> Flow:
    return Flow(srv, key, DEFAULT_CLIENT_ID, secret=DEFAULT_CLIENT_SECRET)


def _page_refusal(response: requests.Response) -> None:
    """An error the AS shows to the user and does NOT redirect (RFC 6749 §4.1.2.1)."""
    assert response.status_code == 400
    assert "Location" not in response.headers
    assert response.headers["Content-Type"].startswith("text/html")


def _redirected_error(flow: Flow, **overrides: str | None) -> dict[str, str]:
    response = requests.get(flow.authorization_url(**overrides), allow_redirects=False, timeout=5)
    assert response.status_code == 302, response.text
    params = callback_params(response.headers["Location"])
    assert params["iss"] == flow.servers.issuer and "code" not in params
    return params


# --- metadata --------------------------------------------------------------------------------


def test_metadata_is_served_at_both_well_known_paths(srv: LocalDPoPServers) -> None:
    documents = [
        requests.get(srv.as_url + path, timeout=5).json()
        for path in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration")
    ]
    assert documents[0] == documents[1] == srv.metadata()
    meta = documents[0]
    assert meta["issuer"] == srv.as_url  # RFC 8414 §3.3: exactly the issuer
    assert meta["authorization_endpoint"] == srv.authorization_endpoint
    assert meta["token_endpoint"] == srv.token_endpoint
    assert meta["pushed_authorization_request_endpoint"] == srv.par_endpoint
    assert meta["device_authorization_endpoint"] == srv.device_authorization_endpoint
    assert meta["revocation_endpoint"] == srv.revocation_endpoint
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert meta["authorization_response_iss_parameter_supported"] is True
    assert meta["require_pushed_authorization_requests"] is False
    assert "ES256" in meta["dpop_signing_alg_values_supported"]
    assert {"api", "offline_access"} <= set(meta["scopes_supported"])
    assert {
        "authorization_code",
        "refresh_token",
        "client_credentials",
        "urn:ietf:params:oauth:grant-type:device_code",
    } == set(meta["grant_types_supported"])
    assert requests.get(meta["jwks_uri"], timeout=5).json()["keys"][0]["kid"] == srv.kid


def test_metadata_follows_the_options() -> None:
    with LocalDPoPServers(
        require_par=True, dpop_signing_algs=["ES384"], metadata_overrides={"issuer": "x"}
    ) as srv:
        meta = srv.metadata()
        assert meta["require_pushed_authorization_requests"] is True
        assert meta["dpop_signing_alg_values_supported"] == ["ES384"]
        assert meta["issuer"] == "x"  # for client tests of the RFC 8414 §3.3 issuer check
        srv.metadata_overrides["issuer"] = None
        assert "issuer" not in srv.metadata()
        srv.authorization_server.metadata_paths.discard("/.well-known/oauth-authorization-server")
        missing = requests.get(srv.metadata_url, timeout=5)
        assert missing.status_code == 404


# --- the happy paths -------------------------------------------------------------------------


def test_public_client_login_gives_a_key_bound_token(
    srv: LocalDPoPServers, public: Flow, key: SoftwareSigner
) -> None:
    page = requests.get(public.authorization_url(), timeout=5)
    assert page.status_code == 200 and 'name="form_token"' in page.text
    assert page.headers["X-Frame-Options"] == "DENY"  # RFC 6749 §10.13
    state = "s t&a=te/é"
    callback = public.login(state=state)
    assert callback["state"] == state and callback["iss"] == srv.issuer  # RFC 9207
    response = public.exchange(callback["code"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "DPoP" and body["scope"] == "api"
    assert body["refresh_token"] and body["expires_in"] == 300
    assert response.headers["Cache-Control"] == "no-store"
    claims = claims_of(api(srv, key, body["access_token"]))
    assert json.loads(claims["cnf"]) == {"jkt": key.thumbprint}
    assert claims["sub"] == "alice" and claims["client_id"] == DEFAULT_PUBLIC_CLIENT_ID
    assert srv.counters.tokens_authorization_code == 1
    assert srv.counters.codes_issued == 1 and srv.counters.authorizations_approved == 1


def test_confidential_client_login_authenticates_at_the_token_endpoint(
    confidential: Flow,
) -> None:
    code = confidential.login()["code"]
    confidential.secret = "wrong"
    refused = confidential.exchange(code)
    assert refused.status_code == 401 and error_of(refused) == "invalid_client"
    confidential.secret = DEFAULT_CLIENT_SECRET
    assert confidential.exchange(code).status_code == 200  # a failed client auth burns nothing


def test_a_confidential_client_must_authenticate(
    srv: LocalDPoPServers, key: SoftwareSigner, confidential: Flow
) -> None:
    code = confidential.login()["code"]
    anonymous = Flow(srv, key, DEFAULT_CLIENT_ID)  # client_id only, no secret
    anonymous.verifier = confidential.verifier
    refused = anonymous.exchange(code)
    assert refused.status_code == 401 and error_of(refused) == "invalid_client"


def test_the_user_can_deny(srv: LocalDPoPServers, public: Flow) -> None:
    location = srv.complete_login(public.authorization_url(state="xyz"), approve=False)
    params = callback_params(location)
    assert params["error"] == "access_denied" and params["state"] == "xyz"
    assert params["iss"] == srv.issuer and "code" not in params
    assert srv.counters.authorizations_denied == 1


def test_the_login_form_token_is_single_use(srv: LocalDPoPServers, public: Flow) -> None:
    page = requests.get(public.authorization_url(), timeout=5)
    token = page.text.split('name="form_token" value="', 1)[1].split('"', 1)[0]
    form = {"form_token": token, "user": "alice"}
    first = requests.post(
        srv.as_url + "/authorize/approve", data=form, allow_redirects=False, timeout=5
    )
    assert first.status_code == 302
    again = requests.post(
        srv.as_url + "/authorize/approve", data=form, allow_redirects=False, timeout=5
    )
    _page_refusal(again)
    nameless = requests.post(
        srv.as_url + "/authorize/approve",
        data={"form_token": token, "user": ""},
        allow_redirects=False,
        timeout=5,
    )
    _page_refusal(nameless)


# --- PKCE ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"code_challenge_method": "plain"},
        {"code_challenge_method": None},  # RFC 7636 §4.3: defaults to plain
        {"code_challenge": None},
        {"code_challenge": "short"},
        {"code_challenge": "A" * 42 + "="},
    ],
    ids=["plain", "no-method", "no-challenge", "short", "padded"],
)
def test_pkce_s256_is_required(public: Flow, overrides: dict[str, str | None]) -> None:
    params = _redirected_error(public, state="st", **overrides)
    assert params["error"] == "invalid_request" and params["state"] == "st"


def test_a_wrong_verifier_is_invalid_grant(public: Flow) -> None:
    code = public.login()["code"]
    other = Flow(public.servers, public.signer, public.client_id)
    wrong = public.exchange(code, code_verifier=other.verifier)
    assert wrong.status_code == 400 and error_of(wrong) == "invalid_grant"
    assert public.servers.counters.rejections["pkce"] == 1


def test_a_missing_or_malformed_verifier_is_refused(public: Flow) -> None:
    for verifier in (None, "x" * 42, "é" * 43):
        response = public.exchange(public.login()["code"], code_verifier=verifier)
        assert response.status_code == 400
        assert error_of(response) == "invalid_request"


# --- redirect URIs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "redirect_uri",
    ["http://127.0.0.1/callback", "http://127.0.0.1:1/callback", "http://[::1]:50000/callback"],
)
def test_any_port_of_a_loopback_ip_matches(public: Flow, redirect_uri: str) -> None:
    public.redirect_uri = redirect_uri
    assert public.exchange(public.login()["code"]).status_code == 200


@pytest.mark.parametrize(
    "redirect_uri",
    [
        None,
        "http://127.0.0.1:8765/other",
        "http://127.0.0.1:8765/callback/",
        "http://127.0.0.1:8765/callback?x=1",
        "http://localhost:8765/callback",  # RFC 8252 §8.3: a name, not a loopback IP
        "https://127.0.0.1:8765/callback",
        "http://127.0.0.2:8765/callback",
        "http://user@127.0.0.1:8765/callback",
        "http://127.0.0.1:8765@evil.example/callback",
        "http://127.0.0.1:8765\\@evil.example/callback",
        "http://127.0.0.1:8765/callback#frag",
        "http://127.0.0.1:99999/callback",
    ],
)
def test_other_redirect_uris_are_shown_an_error_not_redirected_to(
    public: Flow, redirect_uri: str | None
) -> None:
    response = requests.get(
        public.authorization_url(redirect_uri=redirect_uri), allow_redirects=False, timeout=5
    )
    _page_refusal(response)


def test_exact_match_for_a_non_loopback_redirect_uri(
    srv: LocalDPoPServers, key: SoftwareSigner
) -> None:
    srv.register_client(
        ClientRegistration("web", "none", redirect_uris=("https://app.example/cb",), scope="api")
    )
    flow = Flow(srv, key, "web", redirect_uri="https://app.example/cb")
    ok = requests.get(flow.authorization_url(), allow_redirects=False, timeout=5)
    assert ok.status_code == 200
    for uri in ("https://app.example:444/cb", "https://APP.example/cb", "https://app.example/cb2"):
        _page_refusal(
            requests.get(flow.authorization_url(redirect_uri=uri), allow_redirects=False, timeout=5)
        )


def test_the_token_request_must_repeat_the_redirect_uri(public: Flow) -> None:
    public.redirect_uri = "http://127.0.0.1:4000/callback"
    for sent in (None, "http://127.0.0.1:4001/callback"):
        response = public.exchange(public.login()["code"], redirect_uri=sent)
        assert response.status_code == 400 and error_of(response) == "invalid_grant"


def test_unknown_client_gets_a_page(public: Flow) -> None:
    response = requests.get(
        public.authorization_url(client_id="nobody"), allow_redirects=False, timeout=5
    )
    _page_refusal(response)


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"response_type": None}, "invalid_request"),
        ({"scope": "api admin"}, "invalid_scope"),
        ({"response_mode": "fragment"}, "invalid_request"),
        ({"dpop_jkt": "not-a-thumbprint"}, "invalid_request"),
    ],
)
def test_bad_requests_are_redirected_with_an_error(
    public: Flow, overrides: dict[str, str | None], error: str
) -> None:
    assert _redirected_error(public, **overrides)["error"] == error


def test_repeated_parameters_are_refused(public: Flow) -> None:
    url = public.authorization_url() + "&scope=api"
    _page_refusal(requests.get(url, allow_redirects=False, timeout=5))


def test_a_client_without_the_grant_is_unauthorized(
    srv: LocalDPoPServers, key: SoftwareSigner
) -> None:
    only_m2m = frozenset({"client_credentials"})
    srv.register_client(ClientRegistration("m2m", client_secret=M2M_SECRET, grant_types=only_m2m))
    assert _redirected_error(Flow(srv, key, "m2m"))["error"] == "unauthorized_client"


def test_offline_access_is_granted_to_clients_that_may_refresh(public: Flow) -> None:
    body = public.tokens(scope="api offline_access")
    assert body["scope"] == "api offline_access" and body["refresh_token"]


# --- dpop_jkt and single use -----------------------------------------------------------------


def test_the_code_is_bound_to_dpop_jkt(public: Flow, other_key: SoftwareSigner) -> None:
    code = public.login()["code"]
    response = public.exchange(code, signer=other_key)
    assert response.status_code == 400 and error_of(response) == "invalid_grant"
    assert public.servers.counters.rejections["code_dpop_jkt"] == 1


def test_without_dpop_jkt_the_token_binds_to_the_exchange_key(
    srv: LocalDPoPServers, public: Flow, other_key: SoftwareSigner
) -> None:
    code = public.login(dpop_jkt=None)["code"]
    body = public.exchange(code, signer=other_key).json()
    claims = claims_of(api(srv, other_key, body["access_token"]))
    assert json.loads(claims["cnf"]) == {"jkt": other_key.thumbprint}


def test_a_replayed_code_fails_and_revokes_its_tokens(
    srv: LocalDPoPServers, public: Flow, key: SoftwareSigner
) -> None:
    code = public.login()["code"]
    first = public.exchange(code).json()
    assert api(srv, key, first["access_token"]).status_code == 200
    replay = public.exchange(code)
    assert replay.status_code == 400 and error_of(replay) == "invalid_grant"
    assert srv.counters.code_replays == 1
    # RFC 6749 §4.1.2: the tokens issued from the code are revoked.
    revoked = api(srv, key, first["access_token"])
    assert (
        revoked.status_code == 401
        and 'error="invalid_token"' in revoked.headers["WWW-Authenticate"]
    )
    refresh = public.refresh(first["refresh_token"])
    assert refresh.status_code == 400 and error_of(refresh) == "invalid_grant"


def test_a_code_of_another_client_is_unknown_and_not_burnt(
    srv: LocalDPoPServers, public: Flow, confidential: Flow
) -> None:
    code = public.login()["code"]
    confidential.verifier = public.verifier
    stolen = confidential.exchange(code)
    assert stolen.status_code == 400 and error_of(stolen) == "invalid_grant"
    assert public.exchange(code).status_code == 200


def test_codes_expire(srv: LocalDPoPServers, public: Flow) -> None:
    code = public.login()["code"]
    srv.clock_offset = srv.code_lifetime + 1
    response = public.exchange(code)
    assert response.status_code == 400 and error_of(response) == "invalid_grant"
    assert srv.counters.rejections["code_expired"] == 1


def test_a_nonce_challenge_does_not_burn_the_code(srv: LocalDPoPServers, public: Flow) -> None:
    code = public.login()["code"]
    public.nonce = None
    challenged = public.token(
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": public.redirect_uri,
            "code_verifier": public.verifier,
        },
        retry=False,
    )
    assert challenged.status_code == 400 and error_of(challenged) == "use_dpop_nonce"
    assert challenged.headers["DPoP-Nonce"]
    assert public.exchange(code).status_code == 200  # with the nonce now


def test_an_unsupported_proof_alg_is_refused(key: SoftwareSigner) -> None:
    with LocalDPoPServers(dpop_signing_algs=["ES384"]) as srv:
        flow = Flow(srv, key, DEFAULT_PUBLIC_CLIENT_ID)
        response = flow.exchange(flow.login()["code"])
        assert response.status_code == 400 and error_of(response) == "invalid_dpop_proof"
        assert srv.counters.rejections["proof_alg"] == 1


# --- PAR -------------------------------------------------------------------------------------


def _push(
    flow: Flow,
    *,
    proof: bool = False,
    overrides: dict[str, str | None] | None = None,
    **more: str | None,
) -> requests.Response:
    params = flow.authorization_params(**(overrides or {}), **more)
    params.pop("client_id")
    return flow.post(flow.servers.par_endpoint, params, proof=proof)


def _authorize_pushed(flow: Flow, request_uri: str, client_id: str | None = None) -> str:
    query = {"client_id": client_id or flow.client_id, "request_uri": request_uri}
    return flow.servers.authorization_endpoint + "?" + urlencode(query)


def test_par_then_login(public: Flow) -> None:
    pushed = _push(public)
    assert pushed.status_code == 201, pushed.text
    body = pushed.json()
    assert body["request_uri"].startswith("urn:ietf:params:oauth:request_uri:")
    assert body["expires_in"] == 60
    location = public.servers.complete_login(_authorize_pushed(public, body["request_uri"]))
    code = callback_params(location)["code"]
    assert public.exchange(code).status_code == 200
    assert public.servers.counters.par_requests == 1


def test_a_request_uri_is_single_use_expiring_and_the_clients_own(
    srv: LocalDPoPServers, public: Flow
) -> None:
    request_uri = _push(public).json()["request_uri"]
    stolen = requests.get(
        _authorize_pushed(public, request_uri, client_id=DEFAULT_CLIENT_ID), timeout=5
    )
    _page_refusal(stolen)
    assert requests.get(_authorize_pushed(public, request_uri), timeout=5).status_code == 200
    _page_refusal(requests.get(_authorize_pushed(public, request_uri), timeout=5))
    late = _push(public).json()["request_uri"]
    srv.clock_offset = srv.par_lifetime + 1
    _page_refusal(requests.get(_authorize_pushed(public, late), timeout=5))
    with pytest.raises(ProtocolError):
        srv.complete_login(_authorize_pushed(public, late))


def test_a_proof_at_par_binds_the_code(public: Flow, other_key: SoftwareSigner) -> None:
    pushed = _push(public, proof=True, dpop_jkt=None)
    assert pushed.status_code == 201, pushed.text
    location = public.servers.complete_login(
        _authorize_pushed(public, pushed.json()["request_uri"])
    )
    code = callback_params(location)["code"]
    wrong = public.exchange(code, signer=other_key)
    assert wrong.status_code == 400 and error_of(wrong) == "invalid_grant"


def test_par_refuses_a_proof_that_contradicts_dpop_jkt(
    public: Flow, other_key: SoftwareSigner
) -> None:
    response = _push(public, proof=True, dpop_jkt=other_key.thumbprint)
    assert response.status_code == 400 and error_of(response) == "invalid_request"


def test_par_nonces_apply_to_proofs(public: Flow) -> None:
    public.nonce = None
    params = public.authorization_params()
    challenged = public.post(public.servers.par_endpoint, params, proof=True, retry=False)
    assert challenged.status_code == 400 and error_of(challenged) == "use_dpop_nonce"
    assert challenged.headers["DPoP-Nonce"] == public.servers.as_nonces.current()
    assert public.servers.counters.as_nonce_challenges == 1
    assert public.post(public.servers.par_endpoint, params, proof=True).status_code == 201


def test_par_authenticates_confidential_clients(
    srv: LocalDPoPServers, key: SoftwareSigner, confidential: Flow
) -> None:
    assert _push(confidential).status_code == 201
    anonymous = Flow(srv, key, DEFAULT_CLIENT_ID)
    refused = _push(anonymous)
    assert refused.status_code == 401 and error_of(refused) == "invalid_client"


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"request_uri": "urn:x"}, "invalid_request"),  # RFC 9126 §2.1
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"redirect_uri": "http://evil.example/cb"}, "invalid_request"),
        ({"scope": "admin"}, "invalid_scope"),
    ],
)
def test_par_errors_are_json(public: Flow, overrides: dict[str, str | None], error: str) -> None:
    response = _push(public, overrides=overrides)
    assert response.status_code == 400 and error_of(response) == error


def test_required_par(key: SoftwareSigner) -> None:
    with LocalDPoPServers(require_par=True) as srv:
        flow = Flow(srv, key, DEFAULT_PUBLIC_CLIENT_ID)
        assert _redirected_error(flow)["error"] == "invalid_request"
        request_uri = _push(flow).json()["request_uri"]
        location = srv.complete_login(_authorize_pushed(flow, request_uri))
        assert flow.exchange(callback_params(location)["code"]).status_code == 200


def test_the_flow_works_without_nonces(key: SoftwareSigner) -> None:
    with LocalDPoPServers(as_nonce=False, rs_nonce=False) as srv:
        flow = Flow(srv, key, DEFAULT_PUBLIC_CLIENT_ID)
        body = flow.tokens()
        assert api(srv, key, body["access_token"]).status_code == 200
        assert srv.counters.as_nonce_challenges == 0


def test_par_accepts_an_assertion_for_the_par_endpoint(
    srv: LocalDPoPServers, key: SoftwareSigner
) -> None:
    # RFC 9126 §2: the AS accepts its issuer, token endpoint or PAR endpoint as aud.
    srv.register_client(ClientRegistration("jwt", "private_key_jwt", jwk=dict(key.public_jwk)))
    flow = Flow(srv, key, "jwt")
    for audience in (srv.par_endpoint, srv.issuer, srv.token_endpoint):
        client = TokenClient(
            key, token_endpoint=srv.token_endpoint, client_id="jwt", audience=audience
        )
        params = flow.authorization_params()
        params["client_assertion_type"] = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        params["client_assertion"] = client._client_assertion()
        response = flow.post(srv.par_endpoint, params, proof=False, auth=False)
        assert response.status_code == 201, response.text
    wrong = TokenClient(
        key, token_endpoint=srv.token_endpoint, client_id="jwt", audience=srv.revocation_endpoint
    )
    params = flow.authorization_params()
    params["client_assertion_type"] = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    params["client_assertion"] = wrong._client_assertion()
    refused = flow.post(srv.par_endpoint, params, proof=False, auth=False)
    assert refused.status_code == 401 and error_of(refused) == "invalid_client"


def test_concurrent_redemptions_of_one_code_leave_no_live_token(
    srv: LocalDPoPServers, public: Flow, key: SoftwareSigner
) -> None:
    code = public.login()["code"]
    results: list[requests.Response] = []
    barrier = threading.Barrier(8)

    def redeem() -> None:
        flow = Flow(srv, key, public.client_id, nonce=srv.as_nonces.current())
        flow.verifier = public.verifier
        barrier.wait()
        results.append(flow.exchange(code))

    threads = [threading.Thread(target=redeem) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Seven are replays (RFC 6749 §4.1.2): refused, and whatever the code produced, even for
    # the one redemption that came first, is revoked.
    refused = [r for r in results if r.status_code != 200]
    assert len(refused) >= 7 and {error_of(r) for r in refused} == {"invalid_grant"}
    assert srv.counters.code_replays == 7
    for winner in (r for r in results if r.status_code == 200):
        assert api(srv, key, winner.json()["access_token"]).status_code == 401


def test_registration_checks_redirect_uris_and_grants() -> None:
    srv = LocalDPoPServers(clients=[])
    for bad in (("/relative",), ("http://127.0.0.1/cb#x",), ("http://a b/cb",)):
        with pytest.raises(ConfigurationError, match="redirect URI"):
            srv.register_client(ClientRegistration("x", "none", redirect_uris=bad))
    with pytest.raises(ConfigurationError, match="tuple"):
        srv.register_client(
            ClientRegistration("x", "none", redirect_uris="http://127.0.0.1/cb")  # type: ignore[arg-type]
        )
    with pytest.raises(ConfigurationError, match="grant types"):
        srv.register_client(ClientRegistration("x", "none", grant_types=frozenset({"password"})))
    with pytest.raises(ConfigurationError, match="dpop_signing_algs"):
        LocalDPoPServers(dpop_signing_algs=["HS256"])
