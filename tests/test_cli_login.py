"""``dpop-hsm login`` / ``logout`` / ``--profile``: the refusals that need no authorization
server, run as a user runs them (a subprocess, stdin closed, ``--json``)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from dpop_hsm.cli import EXIT_CODES
from tests.support.cli import json_error, run_cli


@pytest.fixture
def state(tmp_path: Path) -> dict[str, str]:
    return {"DPOP_HSM_STATE_DIR": str(tmp_path / "state")}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def login(key: str, *extra: str) -> list[str]:
    issuer = f"http://127.0.0.1:{closed_port()}"
    return ["login", "--issuer", issuer, "--client-id", "cli", "--key", key, "--json", *extra]


@pytest.mark.parametrize("name", ["../escape", ".hidden", "a/b", "x" * 65])
def test_hostile_profile_names(pem_key: str, state: dict[str, str], name: str) -> None:
    result = run_cli(*login(pem_key, "--profile", name), env=state)
    assert result.returncode == EXIT_CODES["configuration"]
    assert json_error(result)["code"] == "profile_error"
    assert not Path(state["DPOP_HSM_STATE_DIR"]).exists()


def test_key_with_a_pin_is_refused_before_anything(state: dict[str, str]) -> None:
    key = "pkcs11:token=t;object=k?module-name=libsofthsm2.so&pin-value=271828"
    result = run_cli(*login(key), env=state)
    assert result.returncode == EXIT_CODES["configuration"]
    error = json_error(result)
    assert error["code"] == "profile_error" and "271828" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "extra",
    [
        ("--device", "--no-browser"),
        ("--login-timeout", "0"),
        ("--auth-method", "none", "--client-secret-source", "env:X"),
    ],
)
def test_options_that_do_not_fit(
    pem_key: str, state: dict[str, str], extra: tuple[str, ...]
) -> None:
    result = run_cli(*login(pem_key, *extra), env={**state, "X": "secret-value"})
    assert result.returncode in (EXIT_CODES["usage"], EXIT_CODES["configuration"])
    json_error(result)
    assert "secret-value" not in result.stdout + result.stderr


def test_unreachable_issuer_is_a_server_error(pem_key: str, state: dict[str, str]) -> None:
    result = run_cli(*login(pem_key, "--timeout", "2"), env=state)
    assert result.returncode == EXIT_CODES["server"]
    assert json_error(result)["code"] == "transport_error"


def test_plain_http_issuer_off_loopback(pem_key: str, state: dict[str, str]) -> None:
    result = run_cli(
        "login",
        "--issuer",
        "http://as.example",
        "--client-id",
        "c",
        "--key",
        pem_key,
        "--json",
        env=state,
    )
    assert result.returncode == EXIT_CODES["configuration"]
    assert json_error(result)["code"] == "insecure_endpoint"


@pytest.mark.parametrize(
    "command",
    [
        ["logout", "--profile", "nobody"],
        ["token", "--profile", "nobody"],
        ["request", "--profile", "nobody", "http://127.0.0.1:1/x"],
    ],
)
def test_missing_profile(state: dict[str, str], command: list[str]) -> None:
    result = run_cli(*command, "--json", env=state)
    assert result.returncode == EXIT_CODES["configuration"]
    assert json_error(result)["code"] == "profile_not_found"


def test_corrupt_and_exposed_profiles(state: dict[str, str]) -> None:
    directory = Path(state["DPOP_HSM_STATE_DIR"])
    directory.mkdir(mode=0o700)
    path = directory / "dev.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b'{"version": 1, "name": "dev"')
    os.close(fd)
    result = run_cli("token", "--profile", "dev", "--json", env=state)
    assert result.returncode == EXIT_CODES["configuration"]
    assert json_error(result)["code"] == "profile_corrupt"
    os.chmod(path, 0o644)
    result = run_cli("token", "--profile", "dev", "--json", env=state)
    assert json_error(result)["code"] == "profile_insecure_permissions"


def test_help_lists_the_login_options() -> None:
    result = run_cli("login", "--help")
    assert result.returncode == 0
    for option in (
        "--issuer",
        "--client-id",
        "--device",
        "--no-browser",
        "--no-par",
        "--redirect-port",
        "--profile",
        "--auth-method",
        "--login-timeout",
        "--timeout",
    ):
        assert option in result.stdout
