"""``dpop-hsm verify`` (the exit code 6 family) and ``serve`` on a port it cannot have."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from dpop_hsm.cli import EXIT_CODES
from dpop_hsm.jose import jwk_thumbprint
from tests.support.cli import json_error, one_json, run_cli

URL = "https://api.example/orders?id=7"
TOKEN = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"


def make_proof(key: str, *extra: str, method: str = "POST", url: str = URL) -> str:
    result = run_cli("proof", "--key", key, "-X", method, *extra, url)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_good_proof_verifies_from_stdin_and_from_a_file(pem_key: str, tmp_path: Path) -> None:
    token_file = tmp_path / "at"
    token_file.write_text(TOKEN + "\n")
    proof = make_proof(pem_key, "--access-token-file", str(token_file), "--nonce", "n-1")
    jwk = one_json(run_cli("jwk", "--key", pem_key, "--json"))["jwk"]
    checks = [
        "--access-token-file",
        str(token_file),
        "--nonce",
        "n-1",
        "--jkt",
        jwk_thumbprint(jwk),
        "--alg",
        "ES256",
    ]
    piped = run_cli("verify", "-X", "POST", *checks, "--json", URL, stdin=proof)
    assert piped.returncode == 0, piped.stderr
    doc = one_json(piped)
    assert doc["valid"] is True and doc["jkt"] == jwk_thumbprint(jwk) and doc["alg"] == "ES256"
    assert doc["claims"]["htu"] == "https://api.example/orders" and doc["claims"]["nonce"] == "n-1"

    proof_file = tmp_path / "proof"
    proof_file.write_text(proof + "\n")
    from_file = run_cli("verify", "-X", "POST", "--proof-file", str(proof_file), URL)
    assert from_file.returncode == 0, from_file.stderr
    assert from_file.stdout.startswith("valid DPoP proof: POST https://api.example/orders\n")


@pytest.mark.parametrize(
    ("args", "code", "check"),
    [
        (["-X", "GET", URL], "invalid_dpop_proof", "htm"),
        (["-X", "POST", "https://api.example/other"], "invalid_dpop_proof", "htu"),
        (["-X", "POST", "--access-token-file", "TOKEN_FILE", URL], "invalid_dpop_proof", "ath"),
        (["-X", "POST", "--nonce", "n-2", URL], "use_dpop_nonce", "nonce"),
        (["-X", "POST", "--jkt", "A" * 43, URL], "invalid_token", "cnf"),
        (["-X", "POST", "--alg", "EdDSA", URL], "invalid_dpop_proof", "alg"),
    ],
    ids=["htm", "htu", "ath", "nonce", "jkt", "alg"],
)
def test_each_failed_check_exits_with_6(
    pem_key: str, tmp_path: Path, args: list[str], code: str, check: str
) -> None:
    token_file = tmp_path / "at"
    token_file.write_text(TOKEN)
    proof = make_proof(pem_key)
    argv = [str(token_file) if a == "TOKEN_FILE" else a for a in args]
    result = run_cli("verify", "--json", *argv, stdin=proof)
    assert result.returncode == EXIT_CODES["verification"], result.stderr
    error = json_error(result)
    assert error["code"] == code and error["message"].startswith(check + ":")
    human = run_cli("verify", *argv, stdin=proof)
    assert human.returncode == EXIT_CODES["verification"]
    assert human.stderr.startswith(f"dpop-hsm: error [{code}]: {check}:")


@pytest.mark.parametrize(
    "junk",
    [
        "",
        "   \n",
        "not-a-jwt",
        "a.b.c",
        "\u00ff.\u00ff.\u00ff",
    ],
    ids=["empty", "blank", "one-part", "bad-base64", "non-ascii"],
)
def test_junk_input(junk: str) -> None:
    result = run_cli("verify", "--json", URL, stdin=junk)
    error = json_error(result)
    if junk.strip():
        assert result.returncode == EXIT_CODES["verification"]
        assert error["code"] == "invalid_dpop_proof"
    else:
        assert result.returncode == EXIT_CODES["usage"] and error["code"] == "usage"


def test_no_proof_at_all_is_a_usage_error() -> None:
    result = run_cli("verify", "--json", URL)  # stdin is /dev/null: nothing to read
    assert result.returncode == EXIT_CODES["usage"]
    assert "no proof" in json_error(result)["message"]


def test_missing_proof_file_is_a_configuration_error(tmp_path: Path) -> None:
    result = run_cli("verify", "--proof-file", str(tmp_path / "absent"), "--json", URL)
    assert result.returncode == EXIT_CODES["configuration"]
    assert json_error(result)["code"] == "configuration_error"


# --- serve ----------------------------------------------------------------------------------


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another socket listens on for the duration of the test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@pytest.mark.parametrize("option", ["--as-port", "--rs-port"])
def test_serve_on_a_busy_port_is_one_typed_line(taken_port: int, option: str) -> None:
    role = option[2:4].upper()
    human = run_cli("serve", option, str(taken_port))
    assert human.returncode == EXIT_CODES["configuration"]
    assert human.stdout == "" and "Traceback" not in human.stderr
    assert human.stderr.count("\n") == 1
    assert human.stderr.startswith(
        f"dpop-hsm: error [address_in_use]: cannot listen on 127.0.0.1:{taken_port} ({role})"
    )
    as_json = run_cli("serve", option, str(taken_port), "--json")
    assert as_json.returncode == EXIT_CODES["configuration"]
    error = json_error(as_json)
    assert error["code"] == "address_in_use" and "--as-port" in error["hint"]


@pytest.mark.parametrize(
    "args", [["--as-port", "70000"], ["--as-port", "40001", "--rs-port", "40001"]]
)
def test_serve_port_misuse_is_a_usage_error(args: list[str]) -> None:
    result = run_cli("serve", *args, "--json")
    assert result.returncode == EXIT_CODES["usage"]
    assert json_error(result)["code"] == "usage"
