"""Login grants and the logged-in session, driven sans-IO: parameters, proofs, rotation,
profile locking and updates, invalid_grant, revocation.

End-to-end runs against the local servers over sockets live in ``test_login_e2e.py``; here
each token-endpoint answer is written out so every branch of the rules is reached exactly.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest

from dpop_hsm import SoftwareSigner, verify_proof
from dpop_hsm.client_auth import NoClientAuth, SecretBasic
from dpop_hsm.discovery import ServerMetadata
from dpop_hsm.errors import (
    ConfigurationError,
    LoginRequiredError,
    OAuthError,
    ProfileError,
    RevocationError,
    TokenResponseError,
)
from dpop_hsm.grants import (
    MAX_VALUE,
    AuthorizationCodeGrant,
    DeviceCodeGrant,
    RefreshTokenGrant,
)
from dpop_hsm.login_session import (
    LoginSession,
    load_profile,
    revocation_flow,
    token_from_profile,
)
from dpop_hsm.pkce import new_pkce
from dpop_hsm.profiles import Profile, ProfileStore
from dpop_hsm.sansio import HttpRequest, HttpResponse

ISSUER = "https://as.example.com"
TOKEN_URL = ISSUER + "/token"
REVOKE_URL = ISSUER + "/revoke"
METADATA = ServerMetadata.from_endpoints(
    ISSUER, token_endpoint=TOKEN_URL, revocation_endpoint=REVOKE_URL
)


def form(request: HttpRequest) -> dict[str, str]:
    pairs = parse_qsl(request.body.decode())
    assert len({k for k, _ in pairs}) == len(pairs)
    return dict(pairs)


def ok(**members: Any) -> HttpResponse:
    body = {"access_token": "at-1", "token_type": "DPoP", "expires_in": 600}
    body.update(members)
    return HttpResponse(200, (("Content-Type", "application/json"),), json.dumps(body).encode())


def error(code: str, status: int = 400, headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
    return HttpResponse(status, headers, json.dumps({"error": code}).encode())


class Server:
    """Answers in order and keeps what was sent."""

    def __init__(self, *answers: HttpResponse) -> None:
        self.answers = list(answers)
        self.sent: list[HttpRequest] = []

    def __call__(self, request: HttpRequest) -> HttpResponse:
        self.sent.append(request)
        return self.answers.pop(0)


@pytest.fixture
def signer() -> SoftwareSigner:
    return SoftwareSigner.generate()


@pytest.fixture
def store(tmp_path: Path) -> ProfileStore:
    return ProfileStore(tmp_path / "state")


# --- grants ----------------------------------------------------------------------------------


def test_authorization_code_grant() -> None:
    pkce = new_pkce()
    grant = AuthorizationCodeGrant(
        code="c-123",
        redirect_uri="http://127.0.0.1:5000/callback",
        code_verifier=pkce.verifier,
        resource=["https://api.example.com"],
    )
    assert grant.grant_type == "authorization_code"
    assert dict(grant.parameters()) == {
        "code": "c-123",
        "redirect_uri": "http://127.0.0.1:5000/callback",
        "code_verifier": pkce.verifier,
        "resource": "https://api.example.com",
    }
    assert set(grant.secrets()) == {"c-123", pkce.verifier}
    assert "c-123" not in repr(grant)


def test_authorization_code_is_single_use(signer: SoftwareSigner) -> None:
    grant = AuthorizationCodeGrant(
        code="c-1", redirect_uri="http://127.0.0.1:1/callback", code_verifier=new_pkce().verifier
    )
    client = LoginSession(
        signer, metadata=METADATA, client_id="cli", client_auth=NoClientAuth(), refresh_token=None
    )
    server = Server(ok())
    from dpop_hsm.login_session import run_flow

    run_flow(client.endpoint.token_flow(grant), server)
    with pytest.raises(ConfigurationError):
        grant.parameters()


@pytest.mark.parametrize("verifier", ["short", "a" * 129, "a" * 42 + "+"])
def test_authorization_code_grant_checks_the_verifier(verifier: str) -> None:
    with pytest.raises(ConfigurationError):
        AuthorizationCodeGrant(
            code="c", redirect_uri="http://127.0.0.1:1/callback", code_verifier=verifier
        )


def test_device_code_grant() -> None:
    grant = DeviceCodeGrant("dc-1", resource="https://api.example.com")
    assert grant.grant_type == "urn:ietf:params:oauth:grant-type:device_code"
    assert grant.parameters() == [
        ("device_code", "dc-1"),
        ("resource", "https://api.example.com"),
    ]
    assert grant.secrets() == ["dc-1"] and "dc-1" not in repr(grant)


def test_refresh_grant_rotation_and_scope() -> None:
    rotated: list[str] = []
    grant = RefreshTokenGrant(
        "rt-1", scope="openid", on_rotate=lambda new, response: rotated.append(new)
    )
    assert grant.parameters() == [("refresh_token", "rt-1")]  # RFC 6749 §6: scope optional
    assert RefreshTokenGrant("rt", scope="a", send_scope=True).parameters()[-1] == ("scope", "a")
    assert "rt-1" not in repr(grant) and grant.secrets() == ["rt-1"]
    for bad in ("", "a\nb", 5):
        with pytest.raises(ConfigurationError):
            RefreshTokenGrant(bad)  # type: ignore[arg-type]
    assert rotated == []


# --- a session without a profile ---------------------------------------------------------------


def session(signer: SoftwareSigner, **changes: Any) -> LoginSession:
    options: dict[str, Any] = {
        "metadata": METADATA,
        "client_id": "cli",
        "client_auth": NoClientAuth(),
        "refresh_token": "rt-1",
        "scope": "openid offline_access",
    }
    options.update(changes)
    return LoginSession(signer, **options)


def test_refresh_sends_a_proof_and_rotates(signer: SoftwareSigner) -> None:
    client = session(signer)
    server = Server(ok(access_token="at-2", refresh_token="rt-2"))
    token = client.get_token(server)
    assert token.access_token == "at-2" and client.refresh_token == "rt-2"
    request = server.sent[0]
    assert form(request) == {
        "grant_type": "refresh_token",
        "refresh_token": "rt-1",
        "client_id": "cli",
    }
    proof = request.header("DPoP")
    assert proof is not None
    verified = verify_proof(proof, htm="POST", htu=TOKEN_URL, expected_jkt=signer.thumbprint)
    assert verified.jkt == signer.thumbprint
    # Without rotation the old refresh token stays.
    client.invalidate()
    server = Server(ok(access_token="at-3"))
    client.get_token(server)
    assert client.refresh_token == "rt-2" and form(server.sent[0])["refresh_token"] == "rt-2"


def test_refresh_retries_once_for_a_nonce(signer: SoftwareSigner) -> None:
    client = session(signer)
    server = Server(error("use_dpop_nonce", headers=(("DPoP-Nonce", "n-1"),)), ok())
    client.get_token(server)
    assert len(server.sent) == 2
    second = server.sent[1].header("DPoP")
    assert second is not None
    verify_proof(second, htm="POST", htu=TOKEN_URL, nonce="n-1")


def test_invalid_grant_means_log_in_again(signer: SoftwareSigner) -> None:
    client = session(signer)
    with pytest.raises(LoginRequiredError) as info:
        client.get_token(Server(error("invalid_grant")))
    assert "rt-1" not in str(info.value) and "login" in info.value.diagnostics()
    with pytest.raises(OAuthError):  # other errors stay what they are
        session(signer).get_token(Server(error("invalid_client", 401)))


def test_session_without_refresh_token(signer: SoftwareSigner) -> None:
    client = session(signer, refresh_token=None)
    server = Server()
    with pytest.raises(LoginRequiredError):
        client.get_token(server)
    assert server.sent == []


def test_seeded_token_is_used_until_due(signer: SoftwareSigner) -> None:
    seed = token_from_profile(stored(signer, expires_at=time.time() + 600))
    assert seed is not None
    client = session(signer, token=seed)
    assert client.get_token(Server()) is seed
    with pytest.raises(ConfigurationError):  # a token bound to another key is refused
        session(SoftwareSigner.generate(), token=seed)


def test_bearer_only_with_opt_in(signer: SoftwareSigner, caplog: pytest.LogCaptureFixture) -> None:
    from dpop_hsm.errors import TokenTypeError

    with pytest.raises(TokenTypeError):
        session(signer).get_token(Server(ok(token_type="Bearer")))
    with caplog.at_level("WARNING", logger="dpop_hsm.login"):
        token = session(signer, allow_bearer=True).get_token(Server(ok(token_type="Bearer")))
    assert token.token_type == "Bearer"
    assert any("allow_bearer" in r.getMessage() for r in caplog.records)


# --- with a profile --------------------------------------------------------------------------


def stored(signer: SoftwareSigner, name: str = "dev", **changes: Any) -> Profile:
    now = time.time()
    base = Profile(
        name=name,
        issuer=ISSUER,
        metadata=METADATA.to_document(),
        client_id="cli",
        auth_method="none",
        key="/keys/dev.pem",
        jkt=signer.thumbprint,
        scope="openid offline_access",
        refresh_token="rt-1",
        access_token="at-0",
        token_type="DPoP",
        expires_at=now - 1,
        created_at=now - 100,
        updated_at=now - 100,
    )
    return replace(base, **changes)


def test_refresh_updates_the_profile_before_the_token_is_used(
    signer: SoftwareSigner, store: ProfileStore
) -> None:
    store.save(stored(signer))
    client = load_profile("dev", signer, store=store)
    seen: list[str | None] = []

    def send(request: HttpRequest) -> HttpResponse:
        # While the refresh is in flight this process holds the profile's lock.
        from dpop_hsm.errors import ProfileLockedError

        with pytest.raises(ProfileLockedError), store.locked("dev", timeout=0.05):
            pass
        return ok(access_token="at-2", refresh_token="rt-2", expires_in=1200)

    token = client.get_token(send)
    seen.append(store.load("dev").refresh_token)
    assert seen == ["rt-2"] and token.access_token == "at-2"
    on_disk = store.load("dev")
    assert on_disk.access_token == "at-2" and on_disk.expires_at is not None
    assert abs(on_disk.expires_at - (time.time() + 1200)) < 30


def test_a_rotated_refresh_token_too_long_to_store_is_refused(
    signer: SoftwareSigner, store: ProfileStore
) -> None:
    # A hostile AS rotating to a 64 KiB+ refresh token: the constructor and replace() refuse
    # such a token, so a profile holding it could never be loaded again.
    store.save(stored(signer))
    client = load_profile("dev", signer, store=store)
    huge = "r" * (MAX_VALUE + 1)
    with pytest.raises(TokenResponseError, match="longer than"):
        client.get_token(Server(ok(access_token="at-2", refresh_token=huge)))
    assert store.load("dev").refresh_token == "rt-1"


def test_another_process_refreshed_meanwhile(signer: SoftwareSigner, store: ProfileStore) -> None:
    store.save(stored(signer))
    client = load_profile("dev", signer, store=store)
    # Another process rotated the refresh token and stored a fresh access token.
    store.save(
        stored(
            signer,
            refresh_token="rt-9",
            access_token="at-9",
            expires_at=time.time() + 900,
            updated_at=time.time(),
        )
    )
    server = Server()
    token = client.get_token(server)
    assert server.sent == [] and token.access_token == "at-9" and client.refresh_token == "rt-9"


def test_another_process_refreshed_while_we_waited_for_the_lock(
    signer: SoftwareSigner, store: ProfileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    store.save(stored(signer))
    client = load_profile("dev", signer, store=store)
    waiting = threading.Event()
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        waiting.set()  # the client polls for the profile lock: it is past its first look
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", sleep)  # the module profiles.py polls the lock with
    server = Server()
    got: list[str] = []
    with store.locked("dev") as handle:
        thread = threading.Thread(target=lambda: got.append(client.get_token(server).access_token))
        thread.start()
        assert waiting.wait(10)
        # Meanwhile the other process refreshes: rotated refresh token, fresh access token.
        rotated = stored(signer, refresh_token="rt-9", access_token="at-9")
        handle.save(replace(rotated, expires_at=time.time() + 900, updated_at=time.time()))
    thread.join(10)
    assert got == ["at-9"] and server.sent == [] and client.refresh_token == "rt-9"


def test_another_process_rotated_but_token_expired(
    signer: SoftwareSigner, store: ProfileStore
) -> None:
    store.save(stored(signer))
    client = load_profile("dev", signer, store=store)
    store.save(stored(signer, refresh_token="rt-9"))
    server = Server(ok(access_token="at-10", refresh_token="rt-10"))
    client.get_token(server)
    assert form(server.sent[0])["refresh_token"] == "rt-9"
    assert store.load("dev").refresh_token == "rt-10"


def test_invalid_grant_clears_the_profile(signer: SoftwareSigner, store: ProfileStore) -> None:
    store.save(stored(signer))
    with pytest.raises(LoginRequiredError):
        load_profile("dev", signer, store=store).get_token(Server(error("invalid_grant")))
    dead = store.load("dev")
    assert dead.refresh_token is None and dead.access_token is None
    server = Server()
    with pytest.raises(LoginRequiredError):  # later runs know without asking the AS
        load_profile("dev", signer, store=store).get_token(server)
    assert server.sent == []


def test_logged_out_meanwhile(signer: SoftwareSigner, store: ProfileStore) -> None:
    store.save(stored(signer))
    client = load_profile("dev", signer, store=store)
    store.delete("dev")
    with pytest.raises(LoginRequiredError):
        client.get_token(Server())


def test_profile_of_another_key_is_refused(signer: SoftwareSigner, store: ProfileStore) -> None:
    store.save(stored(signer))
    with pytest.raises(ProfileError) as info:
        load_profile("dev", SoftwareSigner.generate(), store=store)
    assert signer.thumbprint in str(info.value)


def test_valid_stored_token_needs_no_request(signer: SoftwareSigner, store: ProfileStore) -> None:
    store.save(stored(signer, expires_at=time.time() + 600, updated_at=time.time()))
    token = load_profile("dev", signer, store=store).get_token(Server())
    assert token.access_token == "at-0" and token.jkt == signer.thumbprint


def test_confidential_profile_needs_its_secret(signer: SoftwareSigner, store: ProfileStore) -> None:
    store.save(stored(signer, auth_method="client_secret_basic"))
    with pytest.raises(ConfigurationError):
        load_profile("dev", signer, store=store)
    client = load_profile("dev", signer, store=store, client_secret="s3cret-value")
    assert isinstance(client.client_auth, SecretBasic)
    server = Server(ok())
    client.get_token(server)
    authorization = server.sent[0].header("Authorization")
    assert authorization is not None and authorization.startswith("Basic ")


def test_bearer_profile_token(signer: SoftwareSigner) -> None:
    bearer = stored(signer, token_type="Bearer", expires_at=time.time() + 600)
    assert token_from_profile(bearer) is None
    assert token_from_profile(bearer, allow_bearer=True) is not None


# --- revocation ----------------------------------------------------------------------------


def run(flow: Any, *answers: HttpResponse) -> tuple[Any, list[HttpRequest]]:
    server = Server(*answers)
    from dpop_hsm.login_session import run_flow

    return run_flow(flow, server), server.sent


def test_revocation_request() -> None:
    revoked, sent = run(
        revocation_flow(
            REVOKE_URL,
            client_id="cli",
            client_auth=NoClientAuth(),
            token="rt-1",
            hint="refresh_token",
        ),
        HttpResponse(200, ()),
    )
    assert revoked is True
    assert form(sent[0]) == {
        "token": "rt-1",
        "token_type_hint": "refresh_token",
        "client_id": "cli",
    }
    assert sent[0].header("DPoP") is None


def test_unsupported_token_type_for_access_token_is_fine() -> None:
    revoked, _ = run(
        revocation_flow(
            REVOKE_URL, client_id="c", client_auth=NoClientAuth(), token="at", hint="access_token"
        ),
        error("unsupported_token_type"),
    )
    assert revoked is False


@pytest.mark.parametrize(
    "answer",
    [
        error("unsupported_token_type"),  # for a refresh token it is a failure
        error("invalid_client", 401),
        HttpResponse(503, ()),
        HttpResponse(400, (), json.dumps({"error": "x rt-secret-1 \x1b"}).encode()),
    ],
)
def test_revocation_failures(answer: HttpResponse) -> None:
    with pytest.raises(RevocationError) as info:
        run(
            revocation_flow(
                REVOKE_URL,
                client_id="c",
                client_auth=NoClientAuth(),
                token="rt-secret-1",
                hint="refresh_token",
            ),
            answer,
        )
    assert "rt-secret-1" not in str(info.value) and "\x1b" not in str(info.value)


def test_logout_revokes_both_and_deletes(signer: SoftwareSigner, store: ProfileStore) -> None:
    store.save(stored(signer, expires_at=time.time() + 600, updated_at=time.time()))
    client = load_profile("dev", signer, store=store)
    server = Server(HttpResponse(200, ()), error("unsupported_token_type"))
    result = client.logout(server)
    assert result.revocation_endpoint and result.refresh_token_revoked
    assert not result.access_token_revoked
    assert [form(r)["token_type_hint"] for r in server.sent] == ["refresh_token", "access_token"]
    assert store.names() == []


def test_failed_logout_keeps_the_profile(signer: SoftwareSigner, store: ProfileStore) -> None:
    store.save(stored(signer))
    with pytest.raises(RevocationError):
        load_profile("dev", signer, store=store).logout(Server(HttpResponse(503, ())))
    assert store.names() == ["dev"]


OTHER_ISSUER = "https://other-as.example.net"


def another_login(signer: SoftwareSigner, **changes: Any) -> Profile:
    """What `login --profile dev` with the same key against another AS leaves in the file."""
    metadata = ServerMetadata.from_endpoints(
        OTHER_ISSUER, token_endpoint=OTHER_ISSUER + "/token"
    ).to_document()
    return stored(
        signer, issuer=OTHER_ISSUER, metadata=metadata, refresh_token="rt-other", **changes
    )


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh-access-token", "expired"])
def test_profile_replaced_by_another_login_is_neither_used_nor_touched(
    signer: SoftwareSigner, store: ProfileStore, fresh: bool
) -> None:
    store.save(stored(signer))
    client = load_profile("dev", signer, store=store)
    theirs = another_login(
        signer,
        access_token="at-other",
        expires_at=time.time() + (900 if fresh else -1),
        updated_at=time.time(),
    )
    store.save(theirs)
    server = Server()
    with pytest.raises(ProfileError, match="another login"):
        client.get_token(server)
    # Their refresh token never went to our AS, their access token is not ours to use, and
    # their login is intact (an invalid_grant from our AS would have wiped it).
    assert server.sent == [] and client.refresh_token == "rt-1"
    assert store.load("dev") == theirs


def test_logout_revokes_the_refresh_token_another_process_rotated_in(
    signer: SoftwareSigner, store: ProfileStore
) -> None:
    store.save(stored(signer))
    client = load_profile("dev", signer, store=store)
    store.save(stored(signer, refresh_token="rt-9"))  # another process refreshed meanwhile
    server = Server(HttpResponse(200, ()))
    assert client.logout(server).refresh_token_revoked
    # RFC 7009 §2.2 answers 200 for the dead rt-1 too: revoking it would leave rt-9 alive.
    assert [form(r)["token"] for r in server.sent] == ["rt-9"]
    assert store.names() == []


def test_logout_leaves_another_login_alone(signer: SoftwareSigner, store: ProfileStore) -> None:
    store.save(stored(signer))
    client = load_profile("dev", signer, store=store)
    theirs = another_login(signer)
    store.save(theirs)
    server = Server(HttpResponse(200, ()))
    client.logout(server)
    assert [(r.url, form(r)["token"]) for r in server.sent] == [(REVOKE_URL, "rt-1")]
    assert store.load("dev") == theirs


def test_logout_without_revocation_endpoint(signer: SoftwareSigner, store: ProfileStore) -> None:
    bare = ServerMetadata.from_endpoints(ISSUER, token_endpoint=TOKEN_URL)
    store.save(stored(signer, metadata=bare.to_document()))
    server = Server()
    result = load_profile("dev", signer, store=store).logout(server)
    assert not result.revocation_endpoint and server.sent == [] and store.names() == []


def test_single_flight_across_threads(signer: SoftwareSigner, store: ProfileStore) -> None:
    import threading

    store.save(stored(signer))
    client = load_profile("dev", signer, store=store)
    sent: list[str] = []
    gate = threading.Event()

    def send(request: HttpRequest) -> HttpResponse:
        sent.append(form(request)["refresh_token"])
        gate.wait(5)  # hold the renewal until every thread is waiting for it
        return ok(access_token="at-2", refresh_token="rt-2")

    tokens: list[str] = []
    threads = [
        threading.Thread(target=lambda: tokens.append(client.get_token(send).access_token))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert sent == ["rt-1"] and tokens == ["at-2"] * 8
    assert store.load("dev").refresh_token == "rt-2"
