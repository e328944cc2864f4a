"""``--json``: accepted before and after every subcommand's name; stdout is exactly one JSON
document, for success and for every error family; human text goes to stderr.

Every command runs as a subprocess against ``dpop-hsm serve`` (the ``served`` fixture).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dpop_hsm import verify_proof
from dpop_hsm.cli import EXIT_CODES
from tests.support.cli import (
    SECRET,
    cli_env,
    client_args,
    json_error,
    one_json,
    request_args,
    run_cli,
)

ENV = {"TEST_CLIENT_SECRET": SECRET}


@pytest.mark.parametrize("where", ["before", "after"])
def test_key_commands_print_one_document(tmp_path: Path, where: str) -> None:
    key = str(tmp_path / "k.pem")

    def run(command: str, *rest: str) -> Any:
        args = ["--json", command, *rest] if where == "before" else [command, *rest, "--json"]
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
        return one_json(result)

    made = run("keygen", "--key", key, "--alg", "ES384")
    assert made["alg"] == "ES384" and made["jwk"]["crv"] == "P-384"
    assert run("jwk", "--key", key) == {"jwk": made["jwk"], "alg": "ES384", "jkt": made["jkt"]}
    assert run("thumbprint", "--key", key) == {"jkt": made["jkt"]}
    proof = run("proof", "--key", key, "-X", "PUT", "https://api.example/x")
    assert proof["jkt"] == made["jkt"]
    assert verify_proof(proof["proof"], htm="PUT", htu="https://api.example/x").jkt == made["jkt"]


def test_token_and_request_print_one_document(served: dict[str, Any], pem_key: str) -> None:
    token = run_cli("token", "--key", pem_key, *client_args(served), "--json", env=ENV)
    assert token.returncode == 0, token.stderr
    data = one_json(token)
    assert data["token_type"] == "DPoP" and data["scope"] == "api"
    assert "access_token" not in data

    # -i and -v are human options: under --json the headers are in the document and the
    # session log goes to stderr.
    response = run_cli(*request_args(served, pem_key, "-i", "-v", "--json"), env=ENV)
    assert response.returncode == 0, response.stderr
    doc = one_json(response)
    assert doc["status"] == 200 and "dpop-nonce" in {k.lower() for k in doc["headers"]}
    assert "---- Sending" in response.stderr and "DPoP: ****" in response.stderr


def test_demo_puts_the_session_log_on_stderr() -> None:
    result = run_cli("demo", "--calls", "1", "--json")
    assert result.returncode == 0, result.stderr
    doc = one_json(result)
    assert doc["ok"] is True and doc["statuses"] == [200]
    assert doc["jkt"] == doc["cnf_jkt"]
    assert "---- Sending" in result.stderr and "# key jkt" in result.stderr
    assert "no --key given" in result.stderr


def test_serve_prints_its_endpoints_as_one_document(served: dict[str, Any]) -> None:
    # The fixture started "dpop-hsm serve --json" (the option after the name).
    assert served["token_endpoint"].startswith("http://127.0.0.1:")
    assert served["api"].endswith("/api/dpop/test")
    assert "m2m.dpop" in served["clients"]


def test_help_is_a_document_too() -> None:
    result = run_cli("token", "--help", "--json")
    assert result.returncode == 0
    assert "--client-secret-source" in one_json(result)["help"]


# --- each error family: one document, the family's exit code ---------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["proof", "--key", "k.pem", "--json"],  # argparse: the URL is missing
        ["--json", "keygen", "--alg"],  # argparse: an option without its value
        ["--json", "nosuchcommand"],
        ["jwk", "--json"],  # parses, but there is no key
    ],
    ids=["missing-argument", "missing-value", "unknown-command", "no-key"],
)
def test_usage_errors(args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == EXIT_CODES["usage"], result.stderr
    assert json_error(result)["code"] == "usage"


def test_configuration_error() -> None:
    result = run_cli("thumbprint", "--key", "pkcs11:token=a;token=b", "--json")
    assert result.returncode == EXIT_CODES["configuration"]
    assert json_error(result)["code"] == "invalid_key_reference"


def test_hardware_error_with_an_accurate_hint(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-module.so"
    result = run_cli("jwk", "--json", "--key", f"pkcs11:token=t?module-path={missing}")
    assert result.returncode == EXIT_CODES["hardware"]
    error = json_error(result)
    assert error["code"] == "token_not_present"
    # Not the smart-card advice (pcscd, plugged in): the module file is what is missing.
    assert "pcscd" not in error["hint"] and "module-path" in error["hint"]


def test_server_errors(served: dict[str, Any], pem_key: str) -> None:
    wrong = "not-the-secret-0815"
    refused = run_cli(*request_args(served, pem_key, "--json"), env={"TEST_CLIENT_SECRET": wrong})
    assert refused.returncode == EXIT_CODES["server"]
    error = json_error(refused)
    assert error["code"] == "oauth_error" and "invalid_client" in error["message"]
    assert wrong not in refused.stdout + refused.stderr

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    down = {"token_endpoint": f"http://127.0.0.1:{port}/token", "api": "http://127.0.0.1:1/"}
    unreachable = run_cli(*request_args(down, pem_key, "--json"), env=ENV)
    assert unreachable.returncode == EXIT_CODES["server"]
    assert json_error(unreachable)["code"] == "transport_error"


def test_errors_stay_one_line_of_text_without_json(tmp_path: Path) -> None:
    result = run_cli("jwk", "--key", f"pkcs11:token=t?module-path={tmp_path / 'x.so'}")
    assert result.returncode == EXIT_CODES["hardware"]
    assert result.stdout == ""
    assert result.stderr.startswith("dpop-hsm: error [token_not_present]: ")
    assert result.stderr.count("\n") == 1


# --- in-process: what no subprocess can provoke ------------------------------------------------


def _failing_command(error: BaseException) -> Any:
    def command(args: Any, out: Any) -> int:
        raise error

    return command


@pytest.mark.parametrize(
    ("error", "code", "exit_code"),
    [
        (RuntimeError("text that might hold anything: hunter2"), "internal_error", 1),
        (KeyboardInterrupt(), "interrupted", 130),
    ],
    ids=["bug", "ctrl-c"],
)
def test_unexpected_failures_are_documents_too(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: BaseException,
    code: str,
    exit_code: int,
) -> None:
    from dpop_hsm.cli import keys, main

    monkeypatch.setattr(keys, "cmd_thumbprint", _failing_command(error))
    assert main(["thumbprint", "--json"]) == exit_code
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["error"]["code"] == code
    assert "hunter2" not in captured.out + captured.err


def test_native_writes_to_fd_1_do_not_reach_stdout() -> None:
    """Under --json, fd 1 points at stderr while the command runs (PKCS#11 modules print)."""
    code = (
        "import os, sys\n"
        "from dpop_hsm.cli import keys, main\n"
        "def noisy(args, out):\n"
        "    os.write(1, b'banner from a native module\\n')\n"
        "    print('a stray print')\n"
        "    out.emit({'ok': True}, 'ok')\n"
        "    return 0\n"
        "keys.cmd_thumbprint = noisy\n"
        "status = main(['--json', 'thumbprint'])\n"
        "os.write(1, b'fd 1 is stdout again\\n')\n"
        "sys.exit(status)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=cli_env()
    )
    assert result.returncode == 0, result.stderr
    document, _, after = result.stdout.partition("}\n")
    assert json.loads(document + "}") == {"ok": True}
    assert after == "fd 1 is stdout again\n"
    assert "banner from a native module" in result.stderr and "a stray print" in result.stderr
