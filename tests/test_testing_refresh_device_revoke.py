"""The local AS's refresh tokens (RFC 6749 §6, RFC 9449 §5, rotation per RFC 9700 §4.14.2),
device authorization grant (RFC 8628) and revocation (RFC 7009), over real sockets. Time moves
through the servers' ``clock_offset``, never by sleeping."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from dpop_hsm.errors import ProtocolError
from dpop_hsm.signers.software import SoftwareSigner
from dpop_hsm.testing import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_PUBLIC_CLIENT_ID,
    DEVICE_CODE_GRANT,
    ClientRegistration,
    LocalDPoPServers,
)
from tests.support.oauth import M2M_SECRET, Flow, api, claims_of, error_of


@pytest.fixture(scope="module")
def key() -> SoftwareSigner:
    return SoftwareSigner.generate("ES256")


@pytest.fixture(scope="module")
def other_key() -> SoftwareSigner:
    return SoftwareSigner.generate("ES256")


@pytest.fixture
def srv() -> Iterator[LocalDPoPServers]:
    # Polls never wait in real time: the interval is long and time moves by clock_offset.
    with LocalDPoPServers(device_interval=3600, device_code_lifetime=86400) as servers:
        yield servers


@pytest.fixture
def public(srv: LocalDPoPServers, key: SoftwareSigner) -> Flow:
    return Flow(srv, key, DEFAULT_PUBLIC_CLIENT_ID)


@pytest.fixture
def confidential(srv: LocalDPoPServers, key: SoftwareSigner) -> Flow:
    return Flow(srv, key, DEFAULT_CLIENT_ID, secret=DEFAULT_CLIENT_SECRET)


def _grant_error(response: requests.Response, error: str = "invalid_grant") -> None:
    assert response.status_code == 400, response.text
    assert error_of(response) == error


# --- refresh tokens --------------------------------------------------------------------------


def test_refresh_rotates_and_the_old_token_dies(
    srv: LocalDPoPServers, public: Flow, key: SoftwareSigner
) -> None:
    first = public.tokens()
    second = public.refresh(first["refresh_token"])
    assert second.status_code == 200, second.text
    body = second.json()
    assert body["refresh_token"] != first["refresh_token"]
    assert body["access_token"] != first["access_token"] and body["token_type"] == "DPoP"
    assert claims_of(api(srv, key, body["access_token"]))["sub"] == "alice"
    assert srv.counters.refreshes == 1 and srv.counters.tokens_refresh_token == 1
    third = public.refresh(body["refresh_token"])
    assert third.status_code == 200
    assert srv.counters.refreshes == 2


def test_reusing_a_rotated_refresh_token_revokes_the_grant(
    srv: LocalDPoPServers, public: Flow, key: SoftwareSigner
) -> None:
    first = public.tokens()
    second = public.refresh(first["refresh_token"]).json()
    _grant_error(public.refresh(first["refresh_token"]))
    assert srv.counters.refresh_reuse == 1
    # RFC 9700 §4.14.2: someone holds a copy, so the whole grant goes.
    _grant_error(public.refresh(second["refresh_token"]))
    assert api(srv, key, second["access_token"]).status_code == 401


def test_a_public_clients_refresh_token_needs_its_key(
    srv: LocalDPoPServers, public: Flow, other_key: SoftwareSigner
) -> None:
    body = public.tokens()
    _grant_error(public.refresh(body["refresh_token"], signer=other_key))
    assert srv.counters.rejections["refresh_dpop_key"] == 1
    # The theft attempt did not spend the token: its owner still refreshes.
    assert public.refresh(body["refresh_token"]).status_code == 200


def test_a_confidential_clients_refresh_token_is_bound_to_the_client(
    srv: LocalDPoPServers, confidential: Flow, public: Flow, other_key: SoftwareSigner
) -> None:
    body = confidential.tokens()
    _grant_error(public.refresh(body["refresh_token"]))  # another client
    confidential.secret = "wrong"
    refused = confidential.refresh(body["refresh_token"])
    assert refused.status_code == 401 and error_of(refused) == "invalid_client"
    confidential.secret = DEFAULT_CLIENT_SECRET
    # RFC 9449 §5: not bound to a key; the new access token is bound to the new proof's key.
    moved = confidential.refresh(body["refresh_token"], signer=other_key)
    assert moved.status_code == 200
    assert api(srv, other_key, moved.json()["access_token"]).status_code == 200


def test_refresh_scope_may_narrow_but_not_widen(public: Flow) -> None:
    body = public.tokens(scope="api offline_access")
    narrowed = public.refresh(body["refresh_token"], form={"scope": "api"})
    assert narrowed.status_code == 200 and narrowed.json()["scope"] == "api"
    _grant_error(
        public.refresh(narrowed.json()["refresh_token"], form={"scope": "api admin"}),
        "invalid_scope",
    )


def test_refresh_tokens_expire(srv: LocalDPoPServers, public: Flow) -> None:
    body = public.tokens()
    srv.clock_offset = srv.refresh_token_lifetime + 1
    _grant_error(public.refresh(body["refresh_token"]))
    assert srv.counters.rejections["refresh_expired"] == 1


def test_refresh_requires_a_nonce_and_a_proof(srv: LocalDPoPServers, public: Flow) -> None:
    body = public.tokens()
    public.nonce = None
    challenged = public.refresh(body["refresh_token"], retry=False)
    _grant_error(challenged, "use_dpop_nonce")
    no_proof = public.refresh(body["refresh_token"], proof=False)
    _grant_error(no_proof, "invalid_dpop_proof")
    assert public.refresh(body["refresh_token"]).status_code == 200  # nothing was spent


def test_a_short_access_token_is_renewed_by_refresh(key: SoftwareSigner) -> None:
    with LocalDPoPServers(token_lifetime=1) as srv:
        flow = Flow(srv, key, DEFAULT_PUBLIC_CLIENT_ID)
        body = flow.tokens()
        assert body["expires_in"] == 1
        srv.clock_offset = 5
        expired = api(srv, key, body["access_token"])
        assert expired.status_code == 401 and srv.counters.rejections["token_expired"] == 1
        renewed = flow.refresh(body["refresh_token"]).json()
        assert api(srv, key, renewed["access_token"]).status_code == 200


@pytest.mark.parametrize(
    ("policy", "scope", "issued"),
    [
        ("always", "api", True),
        ("offline_access", "api", False),
        ("offline_access", "api offline_access", True),
        ("never", "api offline_access", False),
    ],
)
def test_refresh_token_policy(key: SoftwareSigner, policy: str, scope: str, issued: bool) -> None:
    with LocalDPoPServers(refresh_tokens=policy) as srv:  # type: ignore[arg-type]
        body = Flow(srv, key, DEFAULT_PUBLIC_CLIENT_ID).tokens(scope=scope)
        assert ("refresh_token" in body) is issued


def test_unknown_and_missing_refresh_tokens(public: Flow) -> None:
    _grant_error(public.refresh("no-such-token"))
    _grant_error(public.token({"grant_type": "refresh_token"}), "invalid_request")


def test_grant_type_errors(public: Flow, confidential: Flow) -> None:
    _grant_error(public.token({}), "invalid_request")
    _grant_error(public.token({"grant_type": "password"}), "unsupported_grant_type")
    # RFC 6749 §4.4: the public default client may not use client_credentials.
    _grant_error(public.token({"grant_type": "client_credentials"}), "unauthorized_client")
    assert confidential.token({"grant_type": "client_credentials"}).status_code == 200
    assert public.servers.counters.tokens_client_credentials == 1


# --- device authorization grant --------------------------------------------------------------


def _device(flow: Flow, **form: str) -> dict[str, Any]:
    response = flow.post(flow.servers.device_authorization_endpoint, form, proof=False)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _poll(flow: Flow, device_code: str, *, retry: bool = True) -> requests.Response:
    form = {"grant_type": DEVICE_CODE_GRANT, "device_code": device_code}
    return flow.token(form, retry=retry)


def test_device_flow(srv: LocalDPoPServers, public: Flow, key: SoftwareSigner) -> None:
    device = _device(public, scope="api offline_access")
    assert re.fullmatch(r"[BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4}", device["user_code"])
    assert device["verification_uri"] == srv.as_url + "/device"
    assert (
        device["verification_uri_complete"]
        == f"{srv.as_url}/device?user_code={device['user_code']}"
    )
    assert device["expires_in"] == 86400 and device["interval"] == 3600
    page = requests.get(device["verification_uri_complete"], timeout=5)
    assert page.status_code == 200 and device["user_code"] in page.text
    _grant_error(_poll(public, device["device_code"]), "authorization_pending")
    srv.approve_device(device["user_code"].lower().replace("-", " "))  # RFC 8628 §6.1
    srv.clock_offset += 3600
    tokens = _poll(public, device["device_code"])
    assert tokens.status_code == 200, tokens.text
    body = tokens.json()
    assert body["refresh_token"] and body["scope"] == "api offline_access"
    assert claims_of(api(srv, key, body["access_token"]))["sub"] == "alice"
    assert srv.counters.tokens_device_code == 1 and srv.counters.device_approvals == 1
    srv.clock_offset += 3600
    _grant_error(_poll(public, device["device_code"]))  # collected once
    assert public.refresh(body["refresh_token"]).status_code == 200


def test_polling_too_fast_slows_down_for_good(srv: LocalDPoPServers, public: Flow) -> None:
    device = _device(public)
    _grant_error(_poll(public, device["device_code"]), "authorization_pending")
    _grant_error(_poll(public, device["device_code"]), "slow_down")
    assert srv.counters.device_slow_downs == 1
    srv.clock_offset += 3604  # the interval is now 3605 s: still too soon
    _grant_error(_poll(public, device["device_code"]), "slow_down")
    srv.clock_offset += 3611  # beyond the new interval (3610 s)
    _grant_error(_poll(public, device["device_code"]), "authorization_pending")


def test_a_nonce_challenge_is_not_a_poll(srv: LocalDPoPServers, public: Flow) -> None:
    device = _device(public)
    public.nonce = None
    _grant_error(_poll(public, device["device_code"], retry=False), "use_dpop_nonce")
    _grant_error(_poll(public, device["device_code"]), "authorization_pending")
    assert srv.counters.device_slow_downs == 0 and srv.counters.device_polls == 1


def test_a_denied_device_gets_access_denied(srv: LocalDPoPServers, public: Flow) -> None:
    device = _device(public)
    srv.approve_device(device["user_code"], approve=False)
    _grant_error(_poll(public, device["device_code"]), "access_denied")
    with pytest.raises(ProtocolError):  # decided already
        srv.approve_device(device["user_code"])


def test_an_expired_device_code(srv: LocalDPoPServers, public: Flow) -> None:
    device = _device(public)
    srv.clock_offset = srv.device_code_lifetime + 1
    _grant_error(_poll(public, device["device_code"]), "expired_token")
    with pytest.raises(ProtocolError):
        srv.approve_device(device["user_code"])


def test_device_codes_belong_to_their_client(
    srv: LocalDPoPServers, public: Flow, confidential: Flow
) -> None:
    device = _device(public)
    srv.approve_device(device["user_code"])
    _grant_error(_poll(confidential, device["device_code"]))
    _grant_error(_poll(public, "no-such-code"))
    with pytest.raises(ProtocolError):
        srv.approve_device("BCDF-GHJK")


def test_device_authorization_checks_client_and_scope(
    srv: LocalDPoPServers, key: SoftwareSigner, public: Flow
) -> None:
    only_m2m = frozenset({"client_credentials"})
    srv.register_client(ClientRegistration("m2m", client_secret=M2M_SECRET, grant_types=only_m2m))
    m2m = Flow(srv, key, "m2m", M2M_SECRET).post(
        srv.device_authorization_endpoint, {"scope": "api"}, proof=False
    )
    assert m2m.status_code == 400 and error_of(m2m) == "unauthorized_client"
    wide = public.post(srv.device_authorization_endpoint, {"scope": "admin"}, proof=False)
    assert wide.status_code == 400 and error_of(wide) == "invalid_scope"
    anonymous = Flow(srv, key, DEFAULT_CLIENT_ID)
    refused = anonymous.post(srv.device_authorization_endpoint, {}, proof=False)
    assert refused.status_code == 401 and error_of(refused) == "invalid_client"


def test_a_device_user_name_is_required(srv: LocalDPoPServers, public: Flow) -> None:
    device = _device(public)
    response = requests.post(
        srv.as_url + "/device/approve",
        data={"user_code": device["user_code"], "user": ""},
        timeout=5,
    )
    assert response.status_code == 400


# --- revocation ------------------------------------------------------------------------------


def _revoke(flow: Flow, token: str, **form: str) -> requests.Response:
    return flow.post(flow.servers.revocation_endpoint, {"token": token, **form}, proof=False)


def test_revoking_a_refresh_token_ends_the_grant(
    srv: LocalDPoPServers, public: Flow, key: SoftwareSigner
) -> None:
    body = public.tokens()
    response = _revoke(public, body["refresh_token"], token_type_hint="refresh_token")
    assert response.status_code == 200 and response.content == b""
    _grant_error(public.refresh(body["refresh_token"]))
    # RFC 7009 §2.1: the access tokens of the same grant go too.
    assert api(srv, key, body["access_token"]).status_code == 401
    assert srv.counters.revocations == 1 and srv.counters.revocation_requests == 1
    assert _revoke(public, body["refresh_token"]).status_code == 200  # again: still 200


def test_revoking_an_access_token(
    srv: LocalDPoPServers, confidential: Flow, key: SoftwareSigner
) -> None:
    body = confidential.tokens()
    # The hint is wrong on purpose: RFC 7009 §2.1 makes it a hint only.
    assert _revoke(confidential, body["access_token"], token_type_hint="refresh_token").ok
    assert api(srv, key, body["access_token"]).status_code == 401
    assert confidential.refresh(body["refresh_token"]).status_code == 200


def test_unknown_tokens_revoke_with_200(public: Flow) -> None:
    assert _revoke(public, "not-a-token").status_code == 200
    assert public.servers.counters.revocations == 0


def test_an_as_that_does_not_revoke_access_tokens_says_so(key: SoftwareSigner) -> None:
    with LocalDPoPServers(revoke_access_tokens=False) as srv:
        flow = Flow(srv, key, DEFAULT_PUBLIC_CLIENT_ID)
        body = flow.tokens()
        refused = _revoke(flow, body["access_token"])
        assert refused.status_code == 400 and error_of(refused) == "unsupported_token_type"
        assert api(srv, key, body["access_token"]).status_code == 200
        assert _revoke(flow, body["refresh_token"]).status_code == 200


def test_revocation_authenticates_and_checks_the_owner(
    srv: LocalDPoPServers, key: SoftwareSigner, public: Flow, confidential: Flow
) -> None:
    body = confidential.tokens()
    anonymous = Flow(srv, key, DEFAULT_CLIENT_ID)
    refused = _revoke(anonymous, body["refresh_token"])
    assert refused.status_code == 401 and error_of(refused) == "invalid_client"
    foreign = _revoke(public, body["refresh_token"])
    assert foreign.status_code == 400 and error_of(foreign) == "invalid_request"
    assert confidential.refresh(body["refresh_token"]).status_code == 200
    missing = public.post(srv.revocation_endpoint, {}, proof=False)
    assert missing.status_code == 400 and error_of(missing) == "invalid_request"


def test_concurrent_refreshes_with_one_token_let_one_win(
    srv: LocalDPoPServers, public: Flow, key: SoftwareSigner
) -> None:
    body = public.tokens()
    results: list[int] = []
    barrier = threading.Barrier(6)

    def refresh() -> None:
        flow = Flow(srv, key, public.client_id, nonce=srv.as_nonces.current())
        barrier.wait()
        results.append(flow.refresh(body["refresh_token"]).status_code)

    threads = [threading.Thread(target=refresh) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # One rotation wins; the others present a token that is no longer live, which is reuse.
    assert results.count(200) <= 1 and results.count(400) >= 5
    assert srv.counters.refreshes == results.count(200)
