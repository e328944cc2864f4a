"""The ``dpop-hsm`` command as users run it: real subprocesses, real servers, real tokens.

``dpop-hsm serve`` runs in the background as its own process; ``request`` and ``token`` talk to
it over sockets with a PEM key, a SoftHSM2 key and a swtpm key. Every error path checks the
exit code, the one-line message, and that no secret reached stdout or stderr.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dpop_hsm.cli import EXIT_CODES
from tests.support.cli import SECRET, json_error, request_args, run_cli


def assert_no_secret(result: Any, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in result.stdout
        assert secret not in result.stderr


def check_request_ok(served: dict[str, Any], key: str, env: dict[str, str]) -> None:
    result = run_cli(
        "--json", *request_args(served, key), env={**env, "TEST_CLIENT_SECRET": SECRET}
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["status"] == 200
    claims = {c["type"]: c["value"] for c in json.loads(out["body"])}
    jkt = run_cli("thumbprint", "--key", key, env=env).stdout.strip()
    assert json.loads(claims["cnf"]) == {"jkt": jkt}
    assert claims["authorization_scheme"] == "DPoP"


# --- happy paths -----------------------------------------------------------------------------


def test_help_loads_no_backend_and_no_httpx() -> None:
    code = (
        "import sys\n"
        "from dpop_hsm.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('pkcs11', 'tpm2_pytss', 'httpx', 'requests')]\n"
        "print('LOADED=' + ','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "LOADED="
    assert "keygen" in result.stdout and "request" in result.stdout


def test_pem_key_keygen_jwk_thumbprint_proof(tmp_path: Path) -> None:
    key = str(tmp_path / "k.pem")
    gen = run_cli("--json", "keygen", "--key", key)
    assert gen.returncode == 0, gen.stderr
    info = json.loads(gen.stdout)
    assert info["alg"] == "ES256" and set(info["jwk"]) == {"kty", "crv", "x", "y"}
    assert (Path(key).stat().st_mode & 0o777) == 0o600
    assert run_cli("thumbprint", "--key", key).stdout.strip() == info["jkt"]
    assert json.loads(run_cli("jwk", "--key", key).stdout) == info["jwk"]
    again = run_cli("keygen", "--key", key)
    assert again.returncode == EXIT_CODES["configuration"]
    assert "refusing to overwrite" in again.stderr

    token_file = tmp_path / "at"
    token_file.write_text("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU\n")
    proof = run_cli(
        "proof",
        "--key",
        key,
        "-X",
        "post",
        "--access-token-file",
        str(token_file),
        "--nonce",
        "n-1",
        "https://API.example:443/r?q=1",
    )
    assert proof.returncode == 0, proof.stderr
    from dpop_hsm import verify_proof

    verified = verify_proof(
        proof.stdout.strip(),
        htm="POST",
        htu="https://api.example/r",
        access_token="Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU",
        nonce="n-1",
    )
    assert verified.jkt == info["jkt"]
    assert verified.claims["ath"] == "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"


def test_request_with_pem_key(served: dict[str, Any], tmp_path: Path) -> None:
    key = str(tmp_path / "k.pem")
    assert run_cli("keygen", "--key", key).returncode == 0
    check_request_ok(served, key, {})


def test_request_include_headers_and_token(served: dict[str, Any], tmp_path: Path) -> None:
    key = str(tmp_path / "k.pem")
    assert run_cli("keygen", "--key", key).returncode == 0
    env = {"TEST_CLIENT_SECRET": SECRET}
    result = run_cli(*request_args(served, key, "-i", "-H", "X-Trace: 1"), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("HTTP/1.1 200")
    assert "dpop-nonce:" in result.stdout.lower()

    token_args = request_args(served, key)[1:-1]  # same options, no URL
    token = run_cli("--json", "token", *token_args, env=env)
    assert token.returncode == 0, token.stderr
    data = json.loads(token.stdout)
    assert data["token_type"] == "DPoP" and data["scope"] == "api"
    assert "access_token" not in data  # only with --show-token
    shown = json.loads(run_cli("--json", "token", *token_args, "--show-token", env=env).stdout)
    assert shown["access_token"].count(".") == 2


@pytest.mark.softhsm
def test_request_with_softhsm_key(served: dict[str, Any], softhsm: Any) -> None:
    key = softhsm.uri("dpop", object="cli-key")
    env = {"DPOP_HSM_PIN": softhsm.pin}
    gen = run_cli("--json", "keygen", "--key", key, env=env)
    assert gen.returncode == 0, gen.stderr
    assert_no_secret(gen, softhsm.pin)
    assert json.loads(gen.stdout)["key"].startswith("pkcs11:")
    check_request_ok(served, key, env)


@pytest.mark.tpm
def test_request_with_tpm_key(served: dict[str, Any], swtpm: Any, tmp_path: Path) -> None:
    key = f"tpm2:blob={tmp_path / 'cli.tpm2'};tcti={swtpm.tcti}"
    gen = run_cli("--json", "keygen", "--key", key)
    assert gen.returncode == 0, gen.stderr
    check_request_ok(served, key, {})


# --- error paths -----------------------------------------------------------------------------


def test_no_key_is_a_usage_error() -> None:
    result = run_cli("jwk", env={"DPOP_HSM_KEY": ""})
    assert result.returncode == EXIT_CODES["usage"]
    assert "no key" in result.stderr


def test_bad_uri_is_a_configuration_error() -> None:
    result = run_cli("jwk", "--key", "pkcs11:token=a;token=b")
    assert result.returncode == EXIT_CODES["configuration"]
    assert result.stderr.startswith("dpop-hsm: error [invalid_key_reference]")
    assert "Traceback" not in result.stderr
    verbose = run_cli("-v", "jwk", "--key", "pkcs11:token=a;token=b")
    assert "Traceback" in verbose.stderr


@pytest.mark.softhsm
def test_missing_token_is_a_hardware_error(softhsm: Any) -> None:
    key = softhsm.uri("no-such-token", object="k")
    result = run_cli("jwk", "--key", key, env={"DPOP_HSM_PIN": softhsm.pin})
    assert result.returncode == EXIT_CODES["hardware"], result.stderr
    assert "[token_not_present]" in result.stderr
    assert_no_secret(result, softhsm.pin)


@pytest.mark.softhsm
def test_wrong_pin_is_a_hardware_error_without_the_pin(softhsm: Any) -> None:
    key = softhsm.uri("dpop", object="cli-wrong-pin")
    wrong = "wrong-pin-4711"
    result = run_cli("jwk", "--key", key, env={"DPOP_HSM_PIN": wrong})
    assert result.returncode == EXIT_CODES["hardware"], result.stderr
    assert "[pin_incorrect]" in result.stderr
    assert_no_secret(result, wrong)


def test_server_down_is_a_server_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    key = str(tmp_path / "k.pem")
    assert run_cli("keygen", "--key", key).returncode == 0
    served = {"token_endpoint": f"http://127.0.0.1:{port}/token", "api": "http://127.0.0.1:1/"}
    result = run_cli(*request_args(served, key), env={"TEST_CLIENT_SECRET": SECRET})
    assert result.returncode == EXIT_CODES["server"], result.stderr
    assert "[transport_error]" in result.stderr


def test_bad_client_secret_is_a_server_error_without_the_secret(
    served: dict[str, Any], tmp_path: Path
) -> None:
    key = str(tmp_path / "k.pem")
    assert run_cli("keygen", "--key", key).returncode == 0
    wrong = "not-the-secret-0815"
    result = run_cli(*request_args(served, key), env={"TEST_CLIENT_SECRET": wrong})
    assert result.returncode == EXIT_CODES["server"], result.stderr
    assert "invalid_client" in result.stderr
    assert_no_secret(result, wrong)


def test_missing_client_secret_source_is_a_configuration_error(
    served: dict[str, Any], tmp_path: Path
) -> None:
    key = str(tmp_path / "k.pem")
    assert run_cli("keygen", "--key", key).returncode == 0
    result = run_cli(*request_args(served, key), env={})
    assert result.returncode == EXIT_CODES["configuration"], result.stderr
    assert "TEST_CLIENT_SECRET" in result.stderr


def test_client_secret_is_not_an_option() -> None:
    result = run_cli("token", "--help")
    assert "--client-secret-source" in result.stdout
    assert "--client-secret " not in result.stdout and "--pin " not in result.stdout


_SECRET_WORDS = re.compile(r"pin|secret|passw|refresh|access-token|credential|auth-value")


def test_no_option_of_any_command_takes_a_secret_value() -> None:
    # Arguments are visible to every local user (ps): an option named after a secret either
    # names where the secret comes from (-source, -file) or takes no value at all.
    import argparse

    from dpop_hsm.cli import build_parser

    def walk(parser: argparse.ArgumentParser, path: str) -> list[tuple[str, str, Any]]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found += walk(sub, f"{path} {name}")
            for flag in action.option_strings:
                found.append((path, flag, action))
        return found

    options = walk(build_parser(), "dpop-hsm")
    assert len(options) > 50
    offending = [
        f"{path} {flag}"
        for path, flag, action in options
        if _SECRET_WORDS.search(flag)
        and action.nargs != 0
        and not flag.endswith(("-source", "-file"))
    ]
    assert offending == []


@pytest.mark.parametrize(
    "args",
    [
        ["jwk", "--key", "{uri}"],
        ["keygen", "--key", "{uri}"],
        ["token", "--key", "k.pem", "--assertion-key", "{uri}", "--token-endpoint", "x"],
        ["serve", "--jwt-client-key", "{uri}"],
        ["login", "--issuer", "https://as.example", "--client-id", "c", "--key", "{uri}"],
        ["demo", "--key", "{uri}"],
    ],
    ids=lambda a: a[0],
)
def test_a_pin_value_on_the_command_line_is_refused(args: list[str]) -> None:
    pin = "271828-on-argv"
    uri = f"pkcs11:token=t;object=k?module-name=libsofthsm2.so&pin-value={pin}"
    result = run_cli(*[a.replace("{uri}", uri) for a in args], "--json", timeout=30)
    assert result.returncode == EXIT_CODES["usage"], result.stderr
    error = json_error(result)
    assert error["code"] == "usage" and "pin-value" in error["message"]
    flag = next(a for a in args if a.startswith("--") and "{uri}" in args[args.index(a) + 1])
    assert flag in error["message"] and "--pin-source" in error["message"]
    assert_no_secret(result, pin)


def test_a_malformed_header_is_not_echoed(pem_key: str) -> None:
    secret = "hunter2-api-key-0815"
    for header in (f"X-Api-Key {secret}", secret):
        result = run_cli("request", "--key", pem_key, "-H", header, "http://127.0.0.1:1/")
        assert result.returncode == EXIT_CODES["configuration"], result.stderr
        assert "'Name: value'" in result.stderr
        assert_no_secret(result, secret)


@pytest.mark.softhsm
def test_a_pin_value_in_the_environment_is_no_argv_problem(softhsm: Any) -> None:
    # $DPOP_HSM_KEY is readable by this user only: the PIN works there, with the warning.
    key = softhsm.uri("dpop", object=f"cli-env-pin-value-{os.urandom(4).hex()}")
    assert run_cli("keygen", "--key", key, env={"DPOP_HSM_PIN": softhsm.pin}).returncode == 0
    result = run_cli("jwk", "--json", env={"DPOP_HSM_KEY": f"{key}&pin-value={softhsm.pin}"})
    assert result.returncode == 0, result.stderr
    assert "pin-value" in result.stderr  # the backend's warning
    assert_no_secret(result, softhsm.pin)


def test_demo_with_software_key_masks_every_secret() -> None:
    result = run_cli("demo", "--calls", "2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("---- Sending") >= 4  # token (+ nonce retry), API (+ nonce retry), API
    assert "# storage  : software key in process memory" in out
    assert "Authorization: ****" in out and "DPoP: ****" in out
    assert "client_secret=****" in out and '"access_token":"****"' in out
    assert "eyJ" not in out  # no JWT (proof or token) anywhere
    key_jkt = next(line for line in out.splitlines() if line.startswith("# key jkt"))
    cnf_jkt = next(line for line in out.splitlines() if line.startswith("# token cnf.jkt"))
    assert key_jkt.split(":")[1].strip() == cnf_jkt.split(":")[1].strip()
    assert out.rstrip().splitlines()[-1].startswith("OK: 2 DPoP call(s) -> 200, 200")
