"""``dpop_hsm.login`` against the local AS/RS over real sockets, nonces required everywhere.

The user is played by :mod:`tests.support.login`: it signs in and consents on the AS's page
over HTTP and follows the redirect to the login's loopback listener, or approves the device
code. Every key kind of the ``dpop_signer`` matrix (software ES256/Ed25519, SoftHSM2) runs the
main flows; swtpm runs them in ``test_login_cli.py`` through the CLI.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from dpop_hsm import SoftwareSigner
from dpop_hsm.authorization import authorization_url, new_authorization_request
from dpop_hsm.client_auth import NoClientAuth
from dpop_hsm.discovery import ServerMetadata
from dpop_hsm.errors import (
    AuthorizationRejectedError,
    ConfigurationError,
    DeviceAccessDeniedError,
    DeviceCodeExpiredError,
    LoginRequiredError,
    LoginTimeoutError,
    OAuthError,
    ResponseIssuerError,
    StateMismatchError,
    UnsupportedAlgorithmError,
)
from dpop_hsm.grants import AuthorizationCodeGrant
from dpop_hsm.login import LoginSession, load_profile, login, logout
from dpop_hsm.login_session import run_flow
from dpop_hsm.pkce import new_pkce
from dpop_hsm.profiles import ProfileStore
from dpop_hsm.requests import DPoPSession
from dpop_hsm.signers.base import Signer
from dpop_hsm.testing import (
    DEFAULT_PUBLIC_CLIENT,
    DEFAULT_PUBLIC_CLIENT_ID,
    DEVICE_CODE_GRANT,
    ClientRegistration,
    LocalDPoPServers,
)
from tests.support.login import REFUSED, BrowserUser, DeviceUser, claims, replace_param
from tests.support.servers import CLIENT_SECRET

PUBLIC = DEFAULT_PUBLIC_CLIENT_ID


def make_servers(jwk: dict[str, str]) -> LocalDPoPServers:
    """AS + RS requiring nonces; a public client and one confidential client per method."""
    grants = frozenset({"authorization_code", "refresh_token", DEVICE_CODE_GRANT})
    return LocalDPoPServers(
        clients=[
            DEFAULT_PUBLIC_CLIENT,
            ClientRegistration(
                "conf-basic", "client_secret_basic", CLIENT_SECRET, grant_types=grants
            ),
            ClientRegistration(
                "conf-post", "client_secret_post", CLIENT_SECRET, grant_types=grants
            ),
            ClientRegistration("conf-jwt", "private_key_jwt", jwk=jwk, grant_types=grants),
        ],
        as_nonce=True,
        rs_nonce=True,
        device_interval=1,
    )


@pytest.fixture
def as_servers(dpop_signer: Signer) -> Iterator[LocalDPoPServers]:
    """The servers for a test that runs with every key kind of the ``dpop_signer`` matrix."""
    with make_servers(dict(dpop_signer.public_jwk)) as srv:
        yield srv


@pytest.fixture
def servers(software_es256_signer: Signer) -> Iterator[LocalDPoPServers]:
    """The servers for a test that runs once, with a software key."""
    with make_servers(dict(software_es256_signer.public_jwk)) as srv:
        yield srv


@pytest.fixture
def store(tmp_path: Path) -> ProfileStore:
    return ProfileStore(tmp_path / "state")


def api_status(servers: LocalDPoPServers, client: LoginSession) -> int:
    with DPoPSession(client) as http:
        return int(http.get(servers.api_url, timeout=10).status_code)


def do_login(
    servers: LocalDPoPServers, signer: Signer, user: BrowserUser | DeviceUser, **options: Any
) -> LoginSession:
    options.setdefault("client_id", PUBLIC)
    options.setdefault("scope", "api")
    try:
        return login(signer, issuer=servers.issuer, prompt=user, login_timeout=30, **options)
    finally:
        if isinstance(user, BrowserUser):
            user.join()


# --- the flows, every key kind -------------------------------------------------------------------


def test_public_client_with_par(as_servers: LocalDPoPServers, dpop_signer: Signer) -> None:
    user = BrowserUser(as_servers)
    session = do_login(as_servers, dpop_signer, user)
    # RFC 9126 §4: the browser URL carries only client_id and request_uri.
    assert [k for k, _ in parse_qsl(urlsplit(user.urls[0]).query)] == ["client_id", "request_uri"]
    assert as_servers.counters.par_requests == 1 and user.statuses == [200]
    token = session.get_token()
    assert claims(token.access_token)["cnf"]["jkt"] == dpop_signer.thumbprint
    assert "offline_access" in (session.scope or "").split()  # listed in scopes_supported
    assert session.refresh_token is not None
    assert api_status(as_servers, session) == 200
    assert as_servers.counters.as_nonce_challenges >= 1  # nonces were demanded and honoured


def test_public_client_without_par(as_servers: LocalDPoPServers, dpop_signer: Signer) -> None:
    user = BrowserUser(as_servers)
    session = do_login(as_servers, dpop_signer, user, par=False)
    query = dict(parse_qsl(urlsplit(user.urls[0]).query))
    assert query["dpop_jkt"] == dpop_signer.thumbprint  # RFC 9449 §10
    assert query["code_challenge_method"] == "S256" and "code_verifier" not in query
    assert as_servers.counters.par_requests == 0
    assert claims(session.get_token().access_token)["cnf"]["jkt"] == dpop_signer.thumbprint
    assert api_status(as_servers, session) == 200


def test_refresh_with_a_proof_and_rotation(
    as_servers: LocalDPoPServers, dpop_signer: Signer, store: ProfileStore
) -> None:
    session = do_login(
        as_servers,
        dpop_signer,
        BrowserUser(as_servers),
        profile="dev",
        store=store,
        key_reference="/not/used/here.pem",
    )
    first = store.load("dev")
    session.invalidate()  # as after the RS's invalid_token: the next request must refresh
    assert api_status(as_servers, session) == 200
    assert as_servers.counters.tokens_refresh_token == 1
    rotated = store.load("dev")
    assert rotated.refresh_token is not None and rotated.refresh_token != first.refresh_token
    assert rotated.access_token != first.access_token
    assert claims(rotated.access_token or "")["cnf"]["jkt"] == dpop_signer.thumbprint


def test_device_flow(as_servers: LocalDPoPServers, dpop_signer: Signer) -> None:
    user = DeviceUser(as_servers)
    session = do_login(as_servers, dpop_signer, user, device=True)
    assert as_servers.counters.device_approvals == 1
    assert claims(session.get_token().access_token)["cnf"]["jkt"] == dpop_signer.thumbprint
    assert api_status(as_servers, session) == 200


# --- confidential clients ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_id", "options"),
    [
        ("conf-basic", {"client_secret": CLIENT_SECRET}),
        ("conf-post", {"client_secret": CLIENT_SECRET, "auth_method": "client_secret_post"}),
        ("conf-jwt", {"auth_method": "private_key_jwt"}),  # the assertion signed by the same key
    ],
)
@pytest.mark.parametrize("par", [None, False])
def test_confidential_clients(
    servers: LocalDPoPServers,
    software_es256_signer: Signer,
    client_id: str,
    options: dict[str, object],
    par: bool | None,
) -> None:
    signer = software_es256_signer
    servers.register_client(
        ClientRegistration(
            "conf-jwt",
            "private_key_jwt",
            jwk=dict(signer.public_jwk),
            grant_types=frozenset({"authorization_code", "refresh_token"}),
        )
    )
    session = do_login(
        servers, signer, BrowserUser(servers), client_id=client_id, par=par, **options
    )
    assert session.auth_method == (options.get("auth_method") or "client_secret_basic")
    session.invalidate()
    assert api_status(servers, session) == 200  # refreshed with client auth and a proof
    assert servers.counters.tokens_refresh_token == 1


# --- the error paths -------------------------------------------------------------------------


def test_wrong_state_ends_the_attempt(servers: LocalDPoPServers) -> None:
    signer = SoftwareSigner.generate()
    user = BrowserUser(servers, tamper=lambda loc: replace_param(loc, "state", "forged"))
    with pytest.raises(StateMismatchError):
        do_login(servers, signer, user)
    assert user.statuses == [400]
    assert servers.counters.tokens_authorization_code == 0  # nothing was redeemed


def test_wrong_iss_ends_the_attempt(servers: LocalDPoPServers) -> None:
    user = BrowserUser(servers, tamper=lambda loc: replace_param(loc, "iss", "http://127.0.0.1:1"))
    with pytest.raises(ResponseIssuerError):
        do_login(servers, SoftwareSigner.generate(), user)
    assert servers.counters.tokens_authorization_code == 0


def test_missing_iss_is_refused_when_promised(servers: LocalDPoPServers) -> None:
    # RFC 9207: the AS's metadata says it sends iss, so a response without it is a mix-up.
    user = BrowserUser(servers, tamper=lambda loc: replace_param(loc, "iss", None))
    with pytest.raises(ResponseIssuerError):
        do_login(servers, SoftwareSigner.generate(), user)


def test_access_denied_on_the_redirect(servers: LocalDPoPServers) -> None:
    user = BrowserUser(servers, approve=False)
    with pytest.raises(AuthorizationRejectedError) as info:
        do_login(servers, SoftwareSigner.generate(), user)
    assert info.value.error == "access_denied"
    assert servers.counters.tokens_authorization_code == 0


def test_second_callback_is_refused(servers: LocalDPoPServers) -> None:
    user = BrowserUser(servers, callbacks=2)
    session = do_login(servers, SoftwareSigner.generate(), user)
    # Refused by the listener (409) or, once the login moved on, by the closed socket.
    assert user.statuses[0] == 200 and user.statuses[1] in (409, REFUSED)
    assert servers.counters.tokens_authorization_code == 1
    assert api_status(servers, session) == 200


def test_listener_timeout(servers: LocalDPoPServers) -> None:
    user = BrowserUser(servers, act=False)
    with pytest.raises(LoginTimeoutError):
        login(
            SoftwareSigner.generate(),
            issuer=servers.issuer,
            client_id=PUBLIC,
            prompt=user,
            login_timeout=0.5,
        )
    assert len(user.urls) == 1


def test_code_replay_is_refused(servers: LocalDPoPServers) -> None:
    signer = SoftwareSigner.generate()
    user = BrowserUser(servers)
    session = do_login(servers, signer, user, par=False)
    code = dict(parse_qsl(urlsplit(user.redirects[0]).query))["code"]
    redirect_uri = dict(parse_qsl(urlsplit(user.urls[0]).query))["redirect_uri"]
    replay = AuthorizationCodeGrant(
        code=code, redirect_uri=redirect_uri, code_verifier=new_pkce().verifier
    )
    with pytest.raises(OAuthError) as info:
        run_flow(session.endpoint.token_flow(replay), session._default_sender())
    assert info.value.error == "invalid_grant" and code not in str(info.value)


def test_pkce_mismatch_is_refused(servers: LocalDPoPServers) -> None:
    signer = SoftwareSigner.generate()
    session = LoginSession(
        signer,
        metadata=ServerMetadata.from_endpoints(
            servers.issuer, token_endpoint=servers.token_endpoint
        ),
        client_id=PUBLIC,
        client_auth=NoClientAuth(),
        refresh_token=None,
    )
    request = new_authorization_request(
        client_id=PUBLIC,
        redirect_uri="http://127.0.0.1:5555/callback",
        jkt=signer.thumbprint,
        scope="api",
    )
    location = servers.complete_login(authorization_url(servers.authorization_endpoint, request))
    code = dict(parse_qsl(urlsplit(location).query))["code"]
    wrong = AuthorizationCodeGrant(
        code=code, redirect_uri=request.redirect_uri, code_verifier=new_pkce().verifier
    )
    with pytest.raises(OAuthError) as info:
        run_flow(session.endpoint.token_flow(wrong), session._default_sender())
    assert info.value.error == "invalid_grant"
    assert request.pkce.verifier not in str(info.value)


def test_invalid_grant_on_refresh(servers: LocalDPoPServers, store: ProfileStore) -> None:
    signer = SoftwareSigner.generate()
    servers.refresh_token_lifetime = 10
    do_login(
        servers,
        signer,
        BrowserUser(servers),
        profile="dev",
        store=store,
        key_reference="/k.pem",
    )
    # The refresh token expires; our proofs, 11 s old on the AS's clock, are still accepted.
    servers.clock_offset = 11
    client = load_profile("dev", signer, store=store)
    client.invalidate()
    with pytest.raises(LoginRequiredError) as info:
        client.get_token()
    assert "login" in info.value.diagnostics()
    assert store.load("dev").refresh_token is None


def test_device_expired_token(servers: LocalDPoPServers) -> None:
    servers.device_code_lifetime = 10

    def expire(_: object) -> None:
        servers.clock_offset = 11  # past the device code's life; not past the proofs' window

    user = DeviceUser(servers, act=False, on_show=expire)
    with pytest.raises(DeviceCodeExpiredError):
        do_login(servers, SoftwareSigner.generate(), user, device=True)
    assert servers.counters.tokens_device_code == 0


def test_device_access_denied(servers: LocalDPoPServers) -> None:
    user = DeviceUser(servers, approve=False)
    with pytest.raises(DeviceAccessDeniedError):
        do_login(servers, SoftwareSigner.generate(), user, device=True)


def test_alg_not_supported_by_the_as(servers: LocalDPoPServers) -> None:
    servers.dpop_signing_algs = frozenset({"EdDSA"})
    user = BrowserUser(servers)
    with pytest.raises(UnsupportedAlgorithmError) as info:
        do_login(servers, SoftwareSigner.generate("ES256"), user)
    assert "ES256" in str(info.value) and user.urls == []  # refused before the browser opens


def test_par_required_cannot_be_turned_off(servers: LocalDPoPServers) -> None:
    servers.require_par = True
    with pytest.raises(ConfigurationError):
        do_login(servers, SoftwareSigner.generate(), BrowserUser(servers), par=False)


# --- profiles: another key, logout -----------------------------------------------------------


def test_profile_copied_to_another_key_cannot_refresh(
    servers: LocalDPoPServers, store: ProfileStore
) -> None:
    signer, thief = SoftwareSigner.generate(), SoftwareSigner.generate()
    do_login(
        servers,
        signer,
        BrowserUser(servers),
        profile="dev",
        store=store,
        key_reference="/k.pem",
    )
    stolen = replace(
        store.load("dev"), name="stolen", jkt=thief.thumbprint, access_token=None, expires_at=None
    )
    store.save(stolen)
    client = load_profile("stolen", thief, store=store)
    with pytest.raises((LoginRequiredError, OAuthError)):  # RFC 9449 §5: bound to the key
        client.get_token()
    assert servers.counters.tokens_refresh_token == 0
    # The owner's refresh token still works.
    owner = load_profile("dev", signer, store=store)
    owner.invalidate()
    assert api_status(servers, owner) == 200


@pytest.mark.parametrize("revoke_access_tokens", [True, False])
def test_logout_revokes(
    servers: LocalDPoPServers, store: ProfileStore, revoke_access_tokens: bool
) -> None:
    servers.revoke_access_tokens = revoke_access_tokens  # False: unsupported_token_type
    signer = SoftwareSigner.generate()
    do_login(
        servers,
        signer,
        BrowserUser(servers),
        profile="dev",
        store=store,
        key_reference="/k.pem",
    )
    refresh = store.load("dev").refresh_token
    assert refresh is not None
    result = logout("dev", signer, store=store)
    assert result.refresh_token_revoked and result.access_token_revoked is revoke_access_tokens
    assert store.names() == [] and servers.counters.revocation_requests == 2
    # The revoked refresh token is dead at the AS.
    ghost = LoginSession(
        signer,
        metadata=ServerMetadata.from_endpoints(
            servers.issuer, token_endpoint=servers.token_endpoint
        ),
        client_id=PUBLIC,
        client_auth=NoClientAuth(),
        refresh_token=refresh,
    )
    with pytest.raises(LoginRequiredError):
        ghost.get_token()


def test_httpx_adapters_refresh_a_logged_in_session(
    servers: LocalDPoPServers, store: ProfileStore
) -> None:
    import asyncio

    import httpx

    from dpop_hsm.httpx import DPoPAuth

    signer = SoftwareSigner.generate()
    do_login(
        servers, signer, BrowserUser(servers), profile="dev", store=store, key_reference="/k.pem"
    )
    client = load_profile("dev", signer, store=store)
    client.invalidate()
    with httpx.Client(auth=DPoPAuth(client)) as http:
        assert http.get(servers.api_url).status_code == 200
    assert servers.counters.tokens_refresh_token == 1

    async def run() -> int:
        client.invalidate()
        async with httpx.AsyncClient(auth=DPoPAuth(client)) as http:
            return (await http.get(servers.api_url)).status_code

    assert asyncio.run(run()) == 200
    assert servers.counters.tokens_refresh_token == 2
    assert store.load("dev").refresh_token == client.refresh_token
