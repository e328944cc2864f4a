"""``dpop-hsm login`` as a developer runs it, against the local AS/RS with nonces required.

Each run is a subprocess with stdin closed; the test reads what the command prints on stderr
(the authorization URL alone on a line, or the device instructions), completes the login on
the AS's page over HTTP, and the redirect reaches the command's loopback listener. Keys:
a software key file, a SoftHSM2 key and a swtpm key, each only by reference.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from dpop_hsm.cli import EXIT_CODES
from dpop_hsm.profiles import ProfileStore
from dpop_hsm.testing import (
    DEFAULT_PUBLIC_CLIENT,
    DEFAULT_PUBLIC_CLIENT_ID,
    ClientRegistration,
    LocalDPoPServers,
)
from tests.support.cli import CLI, cli_env, json_error, one_json, run_cli
from tests.support.login import claims, run_cli_login

SECRET = "conf-secret-7d1e"  # a fixture value the local AS registers, not a credential


@pytest.fixture
def servers() -> Iterator[LocalDPoPServers]:
    srv = LocalDPoPServers(
        clients=[
            DEFAULT_PUBLIC_CLIENT,
            ClientRegistration(
                "conf-basic",
                "client_secret_basic",
                SECRET,
                grant_types=frozenset({"authorization_code", "refresh_token"}),
            ),
        ],
        as_nonce=True,
        rs_nonce=True,
        device_interval=1,
    )
    with srv:
        yield srv


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture(params=["software", "softhsm", "swtpm"])
def key(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, str]]:
    """(key reference, environment the CLI needs for it): never the key, never a PIN in argv."""
    if request.param == "software":
        ref = str(tmp_path / "dev.pem")
        assert run_cli("keygen", "--key", ref).returncode == 0
        return ref, {}
    if request.param == "softhsm":
        from dpop_hsm.signers.pkcs11 import Pkcs11Signer

        hsm = request.getfixturevalue("softhsm")
        ref = hsm.uri(object=f"login-{os.urandom(4).hex()}")
        Pkcs11Signer.generate(ref, "ES256", secret=hsm.pin).close()
        return ref, {"DPOP_HSM_PIN": hsm.pin}
    from dpop_hsm.signers.tpm import TpmSigner

    tpm = request.getfixturevalue("swtpm")
    blob = tmp_path / "dev.tpm.pem"
    TpmSigner.generate(tcti=tpm.tcti, blob_path=blob).close()
    return f"tpm2:blob={blob};tcti={tpm.tcti}", {}


def thumbprint(ref: str, env: dict[str, str]) -> str:
    result = run_cli("thumbprint", "--key", ref, "--json", env=env)
    assert result.returncode == 0, result.stderr
    jkt: str = one_json(result)["jkt"]
    return jkt


def login_args(servers: LocalDPoPServers, ref: str, *extra: str) -> list[str]:
    return [
        "--issuer",
        servers.issuer,
        "--client-id",
        DEFAULT_PUBLIC_CLIENT_ID,
        "--key",
        ref,
        "--scope",
        "api",
        "--profile",
        "dev",
        "--no-browser",
        "--login-timeout",
        "60",
        "--json",
        *extra,
    ]


def check_profile_on_disk(state: Path, *, forbidden: list[str]) -> dict[str, Any]:
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    path = state / "dev.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = path.read_text()
    for value in forbidden:
        assert value not in text
    document: dict[str, Any] = json.loads(text)
    return document


def test_login_request_refresh_logout(
    servers: LocalDPoPServers, key: tuple[str, dict[str, str]], state: Path
) -> None:
    ref, key_env = key
    env = {**key_env, "DPOP_HSM_STATE_DIR": str(state)}
    jkt = thumbprint(ref, key_env)
    done = run_cli_login(login_args(servers, ref), env=env, servers=servers)
    assert done.returncode == 0, done.stderr
    assert done.url is not None and servers.counters.par_requests == 1
    summary = json.loads(done.stdout)
    assert summary["profile"] == "dev" and summary["jkt"] == jkt
    assert "offline_access" in summary["scope"].split() and summary["refresh_token"] is True
    pin = key_env.get("DPOP_HSM_PIN", "no-pin-here")
    stored = check_profile_on_disk(state, forbidden=[pin])
    assert stored["access_token"] not in done.stdout + done.stderr
    assert stored["refresh_token"] not in done.stdout + done.stderr
    assert stored["key"] == ref and stored["jkt"] == jkt

    # request --profile: the stored token, bound to the key.
    result = run_cli("request", "--profile", "dev", servers.api_url, "--json", env=env)
    assert result.returncode == 0, result.stderr
    echoed = {item["type"]: item["value"] for item in json.loads(one_json(result)["body"])}
    assert json.loads(echoed["cnf"])["jkt"] == jkt == claims(stored["access_token"])["cnf"]["jkt"]
    assert servers.counters.tokens_refresh_token == 0

    # After the access token expired, the next request refreshes, with a proof from the key.
    profiles = ProfileStore(state)
    profiles.save(replace(profiles.load("dev"), expires_at=time.time() - 1))
    result = run_cli("request", "--profile", "dev", servers.api_url, "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert servers.counters.tokens_refresh_token == 1
    refreshed = profiles.load("dev")
    assert refreshed.refresh_token != stored["refresh_token"]  # rotated, stored
    assert claims(refreshed.access_token or "")["cnf"]["jkt"] == jkt

    # token --profile: what the token is, never the token.
    result = run_cli("token", "--profile", "dev", "--json", env=env)
    assert result.returncode == 0, result.stderr
    shown = one_json(result)
    assert shown["token_type"] == "DPoP" and shown["jkt"] == jkt and "access_token" not in shown
    assert (refreshed.access_token or "") not in result.stdout

    # logout revokes (RFC 7009) and deletes the profile.
    result = run_cli("logout", "--profile", "dev", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert one_json(result)["revoked_refresh_token"] is True
    assert servers.counters.revocations >= 1 and not (state / "dev.json").exists()
    result = run_cli("request", "--profile", "dev", servers.api_url, "--json", env=env)
    assert json_error(result)["code"] == "profile_not_found"


def test_verbose_session_logs_and_json_hold_no_token(
    servers: LocalDPoPServers, pem_key: str, state: Path
) -> None:
    # -v is the masked session log people paste into bug reports: login (code, verifier,
    # tokens), refresh (old and new refresh token, proof) and logout (the revoked token).
    env = {"DPOP_HSM_STATE_DIR": str(state)}
    done = run_cli_login(login_args(servers, pem_key, "-v"), env=env, servers=servers)
    assert done.returncode == 0, done.stderr
    profiles = ProfileStore(state)
    first = profiles.load("dev")
    profiles.save(replace(first, expires_at=time.time() - 1))
    refresh = run_cli("request", "--profile", "dev", "-v", "--json", servers.api_url, env=env)
    assert refresh.returncode == 0, refresh.stderr
    second = profiles.load("dev")
    assert second.refresh_token != first.refresh_token
    logout = run_cli("logout", "--profile", "dev", "-v", "--json", env=env)
    assert logout.returncode == 0, logout.stderr
    assert "code=****" in done.stderr and "code_verifier=****" in done.stderr
    assert "refresh_token=****" in refresh.stderr and "DPoP: ****" in refresh.stderr
    assert "token=****" in logout.stderr
    tokens = [first.refresh_token, first.access_token, second.refresh_token, second.access_token]
    assert all(tokens)
    for result in (done, refresh, logout):
        for token in tokens:
            assert token is not None and token not in result.stdout + result.stderr


def test_concurrent_requests_share_one_refresh(
    servers: LocalDPoPServers, pem_key: str, state: Path
) -> None:
    # Four `request --profile` at once with an expired access token: the profile lock lets one
    # refresh; the others wait and take its rotated refresh token and fresh access token. The
    # local AS treats a reused refresh token as theft (RFC 9700 §4.14.2) and revokes the grant:
    # a lost rotation would make every later refresh fail.
    env = {"DPOP_HSM_STATE_DIR": str(state)}
    assert run_cli_login(login_args(servers, pem_key), env=env, servers=servers).returncode == 0
    profiles = ProfileStore(state)
    profiles.save(replace(profiles.load("dev"), expires_at=time.time() - 1))
    procs = [
        subprocess.Popen(
            [*CLI, "request", "--profile", "dev", "--json", servers.api_url],
            env=cli_env(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, outputs
    assert servers.counters.tokens_refresh_token == 1
    profiles.save(replace(profiles.load("dev"), expires_at=time.time() - 1))
    again = run_cli("request", "--profile", "dev", "--json", servers.api_url, env=env)
    assert again.returncode == 0, again.stderr  # the stored refresh token is the live one
    assert servers.counters.tokens_refresh_token == 2


def test_without_par_and_text_output(servers: LocalDPoPServers, pem_key: str, state: Path) -> None:
    env = {"DPOP_HSM_STATE_DIR": str(state)}
    args = [a for a in login_args(servers, pem_key, "--no-par") if a != "--json"]
    done = run_cli_login(args, env=env, servers=servers)
    assert done.returncode == 0, done.stderr
    assert servers.counters.par_requests == 0 and done.url is not None
    assert "dpop_jkt=" in done.url
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("profile dev: logged in to ")
    # The URL was printed on stderr alone on a line.
    assert done.url + "\n" in done.stderr


def test_device_login(servers: LocalDPoPServers, pem_key: str, state: Path) -> None:
    env = {"DPOP_HSM_STATE_DIR": str(state)}
    args = [a for a in login_args(servers, pem_key, "--device") if a != "--no-browser"]
    done = run_cli_login(args, env=env, servers=servers, device=True)
    assert done.returncode == 0, done.stderr
    assert servers.counters.device_approvals == 1
    result = run_cli("request", "--profile", "dev", servers.api_url, "--json", env=env)
    assert result.returncode == 0, result.stderr


def test_confidential_client(servers: LocalDPoPServers, pem_key: str, state: Path) -> None:
    env = {"DPOP_HSM_STATE_DIR": str(state), "MY_CLIENT_SECRET": SECRET}
    args = login_args(servers, pem_key, "--client-secret-source", "env:MY_CLIENT_SECRET")
    args[args.index(DEFAULT_PUBLIC_CLIENT_ID)] = "conf-basic"
    done = run_cli_login(args, env=env, servers=servers)
    assert done.returncode == 0, done.stderr
    stored = check_profile_on_disk(state, forbidden=[SECRET])
    assert stored["auth_method"] == "client_secret_basic"
    assert stored["client_secret_source"] == "env:MY_CLIENT_SECRET"
    profiles = ProfileStore(state)
    profiles.save(replace(profiles.load("dev"), expires_at=time.time() - 1))
    result = run_cli("request", "--profile", "dev", servers.api_url, "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert servers.counters.tokens_refresh_token == 1
    # Without its secret the confidential client cannot continue.
    result = run_cli(
        "request",
        "--profile",
        "dev",
        servers.api_url,
        "--json",
        env={"DPOP_HSM_STATE_DIR": str(state)},
    )
    assert result.returncode == EXIT_CODES["configuration"]


def test_a_profile_keeps_its_own_client_secret_and_key(
    servers: LocalDPoPServers, pem_key: str, state: Path, tmp_path: Path
) -> None:
    # A CI environment (or config file) set up for another client must not leak into a stored
    # login: its client secret would go to this profile's AS, its key would replace the
    # profile's. Only flags override a profile's own settings.
    env = {"DPOP_HSM_STATE_DIR": str(state), "MY_CLIENT_SECRET": SECRET}
    args = login_args(servers, pem_key, "--client-secret-source", "env:MY_CLIENT_SECRET")
    args[args.index(DEFAULT_PUBLIC_CLIENT_ID)] = "conf-basic"
    assert run_cli_login(args, env=env, servers=servers).returncode == 0
    other_key = str(tmp_path / "ci.pem")
    assert run_cli("keygen", "--key", other_key).returncode == 0
    ci = {
        "DPOP_HSM_CLIENT_SECRET_SOURCE": "env:CI_SECRET",
        "CI_SECRET": "secret-of-another-client-4711",
        "DPOP_HSM_TOKEN_ENDPOINT": "http://127.0.0.1:1/another-as",
    }
    profiles = ProfileStore(state)
    profiles.save(replace(profiles.load("dev"), expires_at=time.time() - 1))
    result = run_cli("request", "--profile", "dev", servers.api_url, "--json", env={**env, **ci})
    assert result.returncode == 0, result.stderr  # refreshed with the profile's own secret
    assert servers.counters.tokens_refresh_token == 1
    ci["DPOP_HSM_KEY"] = other_key
    result = run_cli("token", "--profile", "dev", "--json", env={**env, **ci})
    assert result.returncode == 0, result.stderr
    assert one_json(result)["jkt"] == thumbprint(pem_key, {})


def test_profile_copied_to_another_key_cannot_refresh(
    servers: LocalDPoPServers, pem_key: str, state: Path, tmp_path: Path
) -> None:
    env = {"DPOP_HSM_STATE_DIR": str(state)}
    assert run_cli_login(login_args(servers, pem_key), env=env, servers=servers).returncode == 0
    other = str(tmp_path / "other.pem")
    assert run_cli("keygen", "--key", other).returncode == 0
    profiles = ProfileStore(state)
    stolen = replace(
        profiles.load("dev"),
        name="stolen",
        key=other,
        jkt=thumbprint(other, {}),
        access_token=None,
        expires_at=None,
    )
    profiles.save(stolen)
    result = run_cli("request", "--profile", "stolen", servers.api_url, "--json", env=env)
    assert result.returncode == EXIT_CODES["server"]
    assert json_error(result)["code"] in ("login_required", "oauth_error")
    assert servers.counters.tokens_refresh_token == 0


def test_login_errors_exit_non_zero(servers: LocalDPoPServers, pem_key: str, state: Path) -> None:
    env = {"DPOP_HSM_STATE_DIR": str(state)}
    servers.dpop_signing_algs = frozenset({"EdDSA"})
    result = run_cli("login", *login_args(servers, pem_key), env=env)
    assert result.returncode == EXIT_CODES["configuration"]
    assert json_error(result)["code"] == "dpop_alg_not_supported"
    servers.dpop_signing_algs = frozenset({"ES256"})
    result = run_cli("login", *login_args(servers, pem_key, "--login-timeout", "0.5"), env=env)
    assert result.returncode == EXIT_CODES["server"]
    assert json_error(result)["code"] == "login_timeout"
    assert not (state / "dev.json").exists()
