"""``dpop-hsm login`` / ``logout`` / ``--profile``: the refusals that need no authorization
server, run as a user runs them (a subprocess, stdin closed, ``--json``)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from dpop_hsm.cli import EXIT_CODES
from tests.support.cli import json_error, one_json, run_cli


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


def test_an_open_state_directory_is_refused_before_the_login(
    pem_key: str, state: dict[str, str]
) -> None:
    # Refused before the issuer is contacted (nothing listens there: that would be a
    # transport_error), so nobody logs in for tokens that could not be stored.
    directory = Path(state["DPOP_HSM_STATE_DIR"])
    directory.mkdir()
    os.chmod(directory, 0o777)
    result = run_cli(*login(pem_key), env=state)
    assert result.returncode == EXIT_CODES["configuration"]
    assert json_error(result)["code"] == "profile_insecure_permissions"
    assert os.listdir(directory) == []


def test_key_with_a_pin_is_refused_before_anything(state: dict[str, str]) -> None:
    # On the command line a pin-value is refused for every command (ps shows it); from the
    # environment, login still refuses to store it in a profile.
    key = "pkcs11:token=t;object=k?module-name=libsofthsm2.so&pin-value=271828"
    result = run_cli(*login(key), env=state)
    assert result.returncode == EXIT_CODES["usage"]
    error = json_error(result)
    assert error["code"] == "usage" and "271828" not in result.stdout + result.stderr
    args = login(key)
    del args[args.index("--key") : args.index("--key") + 2]
    result = run_cli(*args, env={**state, "DPOP_HSM_KEY": key})
    assert result.returncode == EXIT_CODES["configuration"]
    error = json_error(result)
    assert error["code"] == "profile_error" and "271828" not in result.stdout + result.stderr
    assert not Path(state["DPOP_HSM_STATE_DIR"]).exists()


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


def stored_login(state: dict[str, str], key: str, revocation_endpoint: str) -> Path:
    """A profile as login leaves it, for an AS that is gone (nothing listens on its port)."""
    from dpop_hsm import SoftwareSigner
    from dpop_hsm.discovery import ServerMetadata
    from dpop_hsm.profiles import Profile, ProfileStore

    issuer = revocation_endpoint.rsplit("/", 1)[0]
    metadata = ServerMetadata.from_endpoints(
        issuer, token_endpoint=issuer + "/token", revocation_endpoint=revocation_endpoint
    )
    store = ProfileStore(state["DPOP_HSM_STATE_DIR"])
    store.save(
        Profile(
            name="dev",
            issuer=issuer,
            metadata=metadata.to_document(),
            client_id="cli",
            auth_method="none",
            key=key,
            jkt=SoftwareSigner.from_file(key).thumbprint,
            refresh_token="rt-kept-0815",
            created_at=1.0,
            updated_at=1.0,
        )
    )
    return store.path_for("dev")


def test_failed_revocation_keeps_the_profile_and_local_logout_deletes_it(
    pem_key: str, state: dict[str, str]
) -> None:
    path = stored_login(state, pem_key, f"http://127.0.0.1:{closed_port()}/revoke")
    result = run_cli("logout", "--profile", "dev", "--timeout", "2", "--json", env=state)
    assert result.returncode == EXIT_CODES["server"]
    assert json_error(result)["code"] == "transport_error"
    # Kept on purpose (a retry can still revoke it), and the way out is named.
    assert path.exists() and "logout --local --profile dev" in result.stderr
    os.unlink(pem_key)  # the key is lost too: --local needs neither key nor network
    result = run_cli("logout", "--profile", "dev", "--local", "--json", env=state)
    assert result.returncode == 0, result.stderr
    assert one_json(result)["revoked_refresh_token"] is False
    assert not path.exists() and "rt-kept-0815" not in result.stdout + result.stderr
    result = run_cli("logout", "--profile", "dev", "--local", "--json", env=state)
    assert json_error(result)["code"] == "profile_not_found"


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


def test_a_waiting_signature_says_so() -> None:
    import io
    import threading

    from dpop_hsm import SoftwareSigner
    from dpop_hsm.cli.login import TouchNotice

    inner = SoftwareSigner.generate()
    told = threading.Event()

    class Stream(io.StringIO):
        def write(self, text: str) -> int:
            told.set()
            return super().write(text)

    class WaitsForTouch:
        """Blocks like a YubiKey with touch policy 'always' until the user is told."""

        alg, public_jwk, thumbprint = inner.alg, inner.public_jwk, inner.thumbprint

        def sign(self, data: bytes) -> bytes:
            assert told.wait(10), "the user was never told to touch the key"
            return inner.sign(data)

    stream = Stream()
    signer = TouchNotice(WaitsForTouch(), stream=stream, after=0.01)
    assert signer.thumbprint == inner.thumbprint
    assert len(signer.sign(b"x.y")) == 64
    assert "touch it" in stream.getvalue()
    quiet = io.StringIO()
    TouchNotice(inner, stream=quiet, after=60).sign(b"x.y")
    assert quiet.getvalue() == ""


def test_the_pin_prompt_names_the_token() -> None:
    from dpop_hsm.cli.login import _pin_prompt

    ref = "pkcs11:token=YubiKey%20PIV%20%2312345678;object=k?module-name=libykcs11.so"
    assert "YubiKey PIV #12345678" in _pin_prompt(ref).what
    assert _pin_prompt("tpm2:handle=0x81000001").what == "TPM key auth value"
