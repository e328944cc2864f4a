"""The local AS/RS read requests exactly as the RFCs say, and answer hostile ones with an error.

Users test their clients against these servers, so leniency here hides client bugs: a form
must be one ``application/x-www-form-urlencoded`` body (RFC 6749 §3.2) whose parameters appear
once (§3.1; ``resource`` may repeat, RFC 8707 §2) and count as omitted when empty (§3.1); a
request uses one client authentication method (§2.3, §5.2); client_credentials is for
confidential clients (§4.4). Inputs that used to reach a crash (a non-ASCII nonce, an
unparsable request target or redirect URI, a malformed device-page query) get a 4xx answer.
Everything goes over real sockets; :func:`send_raw` sends what no HTTP library would.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from urllib.parse import urlencode

import pytest
import requests

from dpop_hsm.client_auth import PrivateKeyJwt
from dpop_hsm.errors import ConfigurationError
from dpop_hsm.proof import ProofFactory
from dpop_hsm.signers.software import SoftwareSigner
from dpop_hsm.testing import DEFAULT_PUBLIC_CLIENT_ID, ClientRegistration, LocalDPoPServers
from tests.support.login import claims
from tests.support.oauth import M2M_SECRET, Flow, callback_params, error_of
from tests.support.raw_http import send_raw

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FORM = "application/x-www-form-urlencoded"


@pytest.fixture(scope="module")
def key() -> SoftwareSigner:
    return SoftwareSigner.generate("ES256")


@pytest.fixture
def srv(key: SoftwareSigner) -> Iterator[LocalDPoPServers]:
    servers = LocalDPoPServers(
        clients=[
            ClientRegistration("basic", client_secret=M2M_SECRET),
            ClientRegistration("post", "client_secret_post", M2M_SECRET),
            ClientRegistration("jwt", "private_key_jwt", jwk=dict(key.public_jwk)),
            ClientRegistration(DEFAULT_PUBLIC_CLIENT_ID, "none"),
        ],
        as_nonce=False,
        rs_nonce=False,
    )
    with servers:
        yield servers


def _basic(client_id: str, secret: str = M2M_SECRET) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def _token_request(
    srv: LocalDPoPServers, key: SoftwareSigner, body: str, headers: list[tuple[str, str]]
) -> tuple[int, bytes, dict[str, str]]:
    """POST ``body`` to the token endpoint with exactly these header fields, plus a proof."""
    proof = ProofFactory(key).create("POST", srv.token_endpoint)
    fields = [("Host", "x"), ("DPoP", proof), *headers, ("Content-Length", str(len(body)))]
    head = "".join(f"{k}: {v}\r\n" for k, v in fields)
    raw = f"POST /connect/token HTTP/1.1\r\n{head}Connection: close\r\n\r\n{body}".encode()
    response, content = send_raw(srv.as_url, raw)
    return response.status, content, {k.lower(): v for k, v in response.getheaders()}


M2M = "grant_type=client_credentials"


# --- the form: one media type, each parameter once, empty means omitted ----------------------


@pytest.mark.parametrize(
    ("content_types", "status"),
    [
        ([FORM], 200),
        ([FORM + "; charset=UTF-8"], 200),
        (["Application/X-WWW-Form-URLEncoded"], 200),  # RFC 9110 §8.3.1: case-insensitive
        (["text/plain; x=" + FORM], 400),  # the media type is compared, not searched for
        (["application/x-www-form-urlencoded-not"], 400),
        ([FORM, FORM], 400),  # two Content-Type fields: which one is the body?
        ([], 400),
    ],
)
def test_the_form_media_type_is_compared_exactly(
    srv: LocalDPoPServers, key: SoftwareSigner, content_types: list[str], status: int
) -> None:
    headers = [("Authorization", _basic("basic"))] + [("Content-Type", t) for t in content_types]
    got, body, _ = _token_request(srv, key, M2M, headers)
    assert got == status, body
    if status == 400:
        assert srv.counters.rejections["content_type"] == 1 and srv.counters.tokens_issued == 0


def test_an_empty_parameter_is_treated_as_omitted(
    srv: LocalDPoPServers, key: SoftwareSigner
) -> None:
    # RFC 6749 §3.1: "scope=" asks for the default scope, not for a token with no scope.
    headers = [("Authorization", _basic("basic")), ("Content-Type", FORM)]
    status, body, _ = _token_request(srv, key, M2M + "&scope=", headers)
    assert status == 200, body
    assert claims(json.loads(body)["access_token"])["scope"] == "api"
    # ... and "state=" is no state: the redirect carries none back.
    flow = Flow(srv, key, DEFAULT_PUBLIC_CLIENT_ID)
    location = srv.complete_login(flow.authorization_url(state=""))
    params = callback_params(location)
    assert "state" not in params and params["code"] and params["iss"] == srv.issuer


def test_percent_escapes_must_decode_to_utf8(srv: LocalDPoPServers, key: SoftwareSigner) -> None:
    headers = [("Authorization", _basic("basic")), ("Content-Type", FORM)]
    status, body, _ = _token_request(srv, key, M2M + "&scope=%FF", headers)
    assert status == 400 and b"invalid_request" in body and b"malformed" in body


def test_resource_may_repeat_where_rfc8707_says_and_nothing_else(
    srv: LocalDPoPServers, key: SoftwareSigner
) -> None:
    two = [("resource", "https://a.example/"), ("resource", "https://b.example/")]
    flow = Flow(srv, key, DEFAULT_PUBLIC_CLIENT_ID)
    par_form = [*flow.authorization_params().items(), *two]
    par = requests.post(srv.par_endpoint, data=par_form, timeout=5)
    assert par.status_code == 201, par.text
    device_form = [("client_id", DEFAULT_PUBLIC_CLIENT_ID), *two]
    device = requests.post(srv.device_authorization_endpoint, data=device_form, timeout=5)
    assert device.status_code == 200, device.text
    headers = [("Authorization", _basic("basic")), ("Content-Type", FORM)]
    status, body, _ = _token_request(srv, key, M2M + "&" + urlencode(two), headers)
    assert status == 200, body
    status, body, _ = _token_request(srv, key, M2M + "&scope=api&scope=api", headers)
    assert status == 400 and b"repeated parameter scope" in body


# --- client authentication: one method, one client ---------------------------------------------


def _assertion(srv: LocalDPoPServers, key: SoftwareSigner) -> str:
    return PrivateKeyJwt(key, audience=srv.token_endpoint).assertion("jwt")


@pytest.mark.parametrize(
    "case",
    ["basic+post", "basic+assertion", "post+assertion", "basic+other_client_id", "two_basic"],
)
def test_one_client_authentication_method_per_request(
    srv: LocalDPoPServers, key: SoftwareSigner, case: str
) -> None:
    # RFC 6749 §2.3: "MUST NOT use more than one authentication method in each request";
    # §5.2 invalid_request: "includes multiple credentials, utilizes more than one mechanism".
    assertion = {"client_assertion_type": ASSERTION_TYPE, "client_assertion": _assertion(srv, key)}
    form: dict[str, str] = {"grant_type": "client_credentials"}
    headers = [("Content-Type", FORM)]
    if case.startswith("basic") or case == "two_basic":
        headers.append(("Authorization", _basic("basic")))
    if case == "two_basic":
        headers.append(("Authorization", _basic("post")))
    if "post" in case:
        form |= {"client_id": "post", "client_secret": M2M_SECRET}
    if "assertion" in case:
        form |= assertion
    if case == "basic+other_client_id":
        form["client_id"] = "post"
    status, body, _ = _token_request(srv, key, urlencode(form), headers)
    assert status == 400 and b"invalid_request" in body, body
    assert srv.counters.rejections["client_auth_methods"] == 1
    assert srv.counters.tokens_issued == 0


def test_basic_with_its_own_client_id_in_the_form_is_fine(
    srv: LocalDPoPServers, key: SoftwareSigner
) -> None:
    headers = [("Authorization", _basic("basic")), ("Content-Type", FORM)]
    status, body, _ = _token_request(srv, key, M2M + "&client_id=basic", headers)
    assert status == 200, body


def test_basic_credentials_are_form_decoded_first(key: SoftwareSigner) -> None:
    # RFC 6749 §2.3.1: client_id and secret are application/x-www-form-urlencoded (Appendix B)
    # before Basic, so "+" is a space and "%2B" a plus; our own client sends "%20" and "%2B".
    from urllib.parse import quote, quote_plus

    secret = "a b+c"
    with LocalDPoPServers(
        clients=[ClientRegistration("spaced id", client_secret=secret)],
        as_nonce=False,
        rs_nonce=False,
    ) as servers:
        for encode in (quote_plus, lambda v: quote(v, safe="")):
            pair = f"{encode('spaced id')}:{encode(secret)}"
            basic = "Basic " + base64.b64encode(pair.encode()).decode()
            headers = [("Authorization", basic), ("Content-Type", FORM)]
            status, body, _ = _token_request(servers, key, M2M, headers)
            assert status == 200, body
        raw = "Basic " + base64.b64encode(b"spaced id:a b+c").decode()  # "+" not encoded
        headers = [("Authorization", raw), ("Content-Type", FORM)]
        assert _token_request(servers, key, M2M, headers)[0] == 401


@pytest.mark.parametrize("scheme", ["Bearer", "DPoP"])
def test_an_unsupported_authorization_scheme_is_invalid_client(
    srv: LocalDPoPServers, key: SoftwareSigner, scheme: str
) -> None:
    # An access token sent to the token endpoint is a client bug this server should show,
    # not ignore (RFC 6749 §5.2 invalid_client: "unsupported authentication method").
    token = srv.issue_token(client_id="post", jkt=key.thumbprint, scope="api")
    form = urlencode({"grant_type": "client_credentials", "client_id": "post"})
    headers = [("Authorization", f"{scheme} {token}"), ("Content-Type", FORM)]
    status, body, response_headers = _token_request(srv, key, form + "&client_secret=x", headers)
    assert status == 401 and b"invalid_client" in body
    assert response_headers["www-authenticate"].startswith("Basic")


@pytest.mark.parametrize("endpoint", ["par", "device_authorization", "revoke"])
def test_the_other_back_channel_endpoints_refuse_two_methods(
    srv: LocalDPoPServers, key: SoftwareSigner, endpoint: str
) -> None:
    # Each request is good but for the second method: Basic plus client_secret in the form.
    url, form, ok = {
        "par": (srv.par_endpoint, Flow(srv, key, "basic").authorization_params(), 201),
        "device_authorization": (srv.device_authorization_endpoint, {"scope": "api"}, 200),
        "revoke": (srv.revocation_endpoint, {"token": "unknown-token"}, 200),
    }[endpoint]
    good = requests.post(url, data=form, auth=("basic", M2M_SECRET), timeout=5)
    assert good.status_code == ok, good.text
    two = form | {"client_secret": M2M_SECRET}
    answer = requests.post(url, data=two, auth=("basic", M2M_SECRET), timeout=5)
    assert answer.status_code == 400 and error_of(answer) == "invalid_request"
    assert srv.counters.rejections["client_auth_methods"] == 1


# --- client_credentials: confidential clients only (RFC 6749 §4.4) ---------------------------


def test_a_public_client_cannot_use_client_credentials(
    srv: LocalDPoPServers, key: SoftwareSigner
) -> None:
    srv.register_client(ClientRegistration("native", "none"))  # every grant it may have
    flow = Flow(srv, key, "native")
    answer = flow.token({"grant_type": "client_credentials"})
    assert answer.status_code == 400 and error_of(answer) == "unauthorized_client"
    assert srv.counters.tokens_issued == 0
    with pytest.raises(ConfigurationError, match="public client"):
        srv.register_client(
            ClientRegistration("m2m", "none", grant_types=frozenset({"client_credentials"}))
        )


# --- hostile inputs that used to crash the servers (HTTP 500) ---------------------------------


def test_a_non_ascii_nonce_is_use_dpop_nonce_at_the_as(
    srv: LocalDPoPServers, key: SoftwareSigner
) -> None:
    srv.as_nonce = True
    proof = ProofFactory(key).create("POST", srv.token_endpoint, nonce="é")
    answer = requests.post(
        srv.token_endpoint,
        data={"grant_type": "client_credentials"},
        headers={"DPoP": proof},
        auth=("basic", M2M_SECRET),
        timeout=5,
    )
    assert answer.status_code == 400 and error_of(answer) == "use_dpop_nonce"
    assert answer.headers["DPoP-Nonce"] == srv.as_nonces.current()


def test_a_non_ascii_nonce_is_use_dpop_nonce_at_the_rs(
    srv: LocalDPoPServers, key: SoftwareSigner
) -> None:
    srv.rs_nonce = True
    token = srv.issue_token(client_id="basic", jkt=key.thumbprint, scope="api")
    proof = ProofFactory(key).create("GET", srv.api_url, access_token=token, nonce="é")
    answer = requests.get(
        srv.api_url, headers={"Authorization": f"DPoP {token}", "DPoP": proof}, timeout=5
    )
    assert answer.status_code == 401
    assert 'error="use_dpop_nonce"' in answer.headers["WWW-Authenticate"]


@pytest.mark.parametrize("server", ["as", "rs"])
def test_an_unparsable_request_target_is_a_400(srv: LocalDPoPServers, server: str) -> None:
    url = srv.as_url if server == "as" else srv.rs_url
    raw = b"GET http://[bad/connect/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    response, body = send_raw(url, raw)
    assert response.status == 400 and b"malformed request target" in body


@pytest.mark.parametrize("query", ["x", "user_code=A&user_code=B", "user_code=%FF"])
def test_a_malformed_device_page_query_is_a_400_page(srv: LocalDPoPServers, query: str) -> None:
    answer = requests.get(f"{srv.as_url}/device?{query}", timeout=5)
    assert answer.status_code == 400 and answer.headers["Content-Type"].startswith("text/html")


def test_an_unparsable_redirect_uri_is_shown_a_page(
    srv: LocalDPoPServers, key: SoftwareSigner
) -> None:
    flow = Flow(srv, key, DEFAULT_PUBLIC_CLIENT_ID)
    url = flow.authorization_url(redirect_uri="http://[::1/callback")
    answer = requests.get(url, allow_redirects=False, timeout=5)
    assert answer.status_code == 400 and "redirect_uri is not registered" in answer.text
    assert "Location" not in answer.headers  # never redirected to (RFC 6749 §4.1.2.1)


def test_a_body_that_never_arrives_is_a_408_not_a_held_thread(
    srv: LocalDPoPServers, key: SoftwareSigner
) -> None:
    # The client promises 64 bytes, sends 10 and waits (no half-close): before, the server
    # waited with it until one of them gave up.
    assert srv.authorization_server.server is not None
    srv.authorization_server.server.body_timeout = 0.2
    proof = ProofFactory(key).create("POST", srv.token_endpoint)
    raw = (
        f"POST /connect/token HTTP/1.1\r\nHost: x\r\nDPoP: {proof}\r\n"
        f"Content-Type: {FORM}\r\nContent-Length: 64\r\n\r\ngrant_type"
    ).encode()
    response, body = send_raw(srv.as_url, raw)
    assert response.status == 408 and b"not received in time" in body
    assert srv.counters.token_requests == 0
