"""``dpop-hsm demo --login``: the developer flow, run as ``scripts/demo --login`` runs it.

The demo drives the real commands (``login``, ``request --profile``, ``logout``) against the
real local servers, playing the user at the browser; these tests run it in a subprocess with
stdin closed and check what a person reads: the exit code, the ``OK`` line, the steps, and that
nothing secret (no token, proof, code or PIN) is printed. The user's own state directory is
never touched: the demo works under a temporary ``DPOP_HSM_STATE_DIR``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dpop_hsm.cli import EXIT_CODES
from tests.support.cli import json_error, one_json, run_cli
from tests.support.softhsm import SoftHsm


def assert_nothing_secret(text: str, *secrets: str) -> None:
    assert "eyJ" not in text  # no JWT: neither an access token nor a proof
    assert "code=****" in text and "refresh_token=****" in text  # masked, not shown
    for secret in secrets:
        assert secret not in text


@pytest.mark.softhsm
def test_demo_login_with_a_softhsm_key(softhsm: SoftHsm, tmp_path: Path) -> None:
    from dpop_hsm.signers.pkcs11 import Pkcs11Signer

    ref = softhsm.uri(object=f"demo-login-{os.urandom(4).hex()}")
    with Pkcs11Signer.generate(ref, "ES256", secret=softhsm.pin) as signer:
        jkt = signer.thumbprint
    mine = tmp_path / "my-state"  # the user's real profiles: the demo must not use them
    result = run_cli(
        "demo",
        "--login",
        "--key",
        ref,
        env={"DPOP_HSM_PIN": softhsm.pin, "DPOP_HSM_STATE_DIR": str(mine)},
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("OK: login as dpop-hsm-public (authorization code + PKCE + PAR, DPoP)")
    assert "profile 0700/0600, no key/PIN/secret" in last
    assert "request --profile -> 200, 200" in last and f"this key ({ref})" in last
    assert "refreshed with a proof, refresh token rotated" in last
    assert "logout revoked the refresh token, profile deleted" in last
    # The steps are the commands a developer types, each with its masked session log.
    for step in (
        f"$ dpop-hsm thumbprint --key '{ref}'",
        "$ dpop-hsm -v login --issuer http://127.0.0.1:",
        "$ dpop-hsm -v request --profile demo http://127.0.0.1:",
        "$ dpop-hsm -v logout --profile demo",
    ):
        assert step in out
    assert "POST /par HTTP/1.1" in out and "# browser  : GET the loopback listener -> 200" in out
    assert "grant_type=authorization_code&code=****" in out
    assert "# modes    : directory 0700, file 0600" in out
    assert out.count(f"# token cnf.jkt  : {jkt}") == 2
    assert "POST /revoke HTTP/1.1" in out
    assert_nothing_secret(out + result.stderr, softhsm.pin)
    assert not mine.exists()


def test_demo_login_json_is_one_document_with_a_software_key() -> None:
    result = run_cli("demo", "--login", "--json", timeout=240)
    assert result.returncode == 0, result.stderr
    doc = one_json(result)
    assert doc["ok"] is True and doc["statuses"] == [200, 200]
    assert doc["cnf_jkt"] == [doc["jkt"], doc["jkt"]]
    assert doc["client_id"] == "dpop-hsm-public" and doc["par"] is True
    assert doc["profile_modes"] == {"dir": "0700", "file": "0600"}
    assert doc["profile_without_secrets"] is True
    assert doc["refreshed"] and doc["refresh_token_rotated"] and doc["revoked"]
    assert doc["profile_deleted"] is True
    # The transcript goes to stderr under --json; the key was a throwaway software key file.
    assert "no --key given" in result.stderr and "$ dpop-hsm keygen --key " in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("# server counters:")
    assert_nothing_secret(result.stdout + result.stderr)


def test_demo_login_runs_only_against_the_local_servers() -> None:
    result = run_cli("demo", "--login", "--token-endpoint", "https://as.example/token", "--json")
    assert result.returncode == EXIT_CODES["usage"]
    assert "--login runs against the local servers" in json_error(result)["message"]
