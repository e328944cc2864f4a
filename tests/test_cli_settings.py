"""Settings for the CLI: flag > environment > config profile > default, secrets never in the
file, and every ``DPOP_HSM_*`` variable the code reads documented in the README."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

import pytest

from dpop_hsm.cli import EXIT_CODES
from dpop_hsm.cli.settings import (
    CLIENT_SETTINGS,
    SETTINGS,
    ConfigFileError,
    resolve_settings,
)
from dpop_hsm.errors import ConfigurationError
from tests.support.cli import SECRET, json_error, one_json, run_cli

ROOT = Path(__file__).resolve().parent.parent


def namespace(**given: Any) -> argparse.Namespace:
    """What the parser gives when only ``given`` options were on the command line."""
    values: dict[str, Any] = dict.fromkeys(SETTINGS)
    values.update(config=None, config_profile=None)
    values.update(given)
    return argparse.Namespace(**values)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    os.chmod(path, 0o644)  # whatever the test runner's umask: readable by all, writable by us
    return path


CONFIG = """
[profiles.default]
token_endpoint = "https://as.default.example/token"
scope = "from-default-profile"

[profiles.ci]
token_endpoint = "https://as.ci.example/token"
client_id = "ci-client"
scope = "from-ci-profile"
resource = ["https://api.one.example/", "https://api.two.example/"]
timeout = 3
auth_method = "client_secret_post"
client_secret_source = "env:CI_SECRET"
key = "pkcs11:token=ci;object=dpop?module-name=softhsm2"
"""


def test_flag_beats_environment_beats_config_beats_default(tmp_path: Path) -> None:
    path = write_config(tmp_path, CONFIG)
    env = {"DPOP_HSM_CONFIG": str(path), "DPOP_HSM_SCOPE": "from-env", "DPOP_HSM_CLIENT_ID": ""}
    args = namespace(token_endpoint="https://flag.example/token", config_profile="ci")
    origins = resolve_settings(args, CLIENT_SETTINGS, env)
    assert args.token_endpoint == "https://flag.example/token"
    assert origins["token_endpoint"] == "flag"
    assert args.scope == "from-env" and origins["scope"] == "$DPOP_HSM_SCOPE"
    # An empty variable counts as unset: the profile's value applies.
    assert args.client_id == "ci-client" and origins["client_id"] == "profile ci"
    assert args.resource == ["https://api.one.example/", "https://api.two.example/"]
    assert args.timeout == 3.0 and args.auth_method == "client_secret_post"
    assert args.pin_source is None and origins["pin_source"] == "default"

    plain = namespace()
    origins = resolve_settings(plain, CLIENT_SETTINGS, {"XDG_CONFIG_HOME": str(tmp_path / "no")})
    assert plain.auth_method == "client_secret_basic" and plain.timeout == 10.0
    assert set(origins.values()) == {"default"}


def test_default_profile_and_xdg_location(tmp_path: Path) -> None:
    (tmp_path / "dpop-hsm").mkdir()
    (tmp_path / "dpop-hsm" / "config.toml").write_text(CONFIG, encoding="utf-8")
    args = namespace()
    resolve_settings(args, CLIENT_SETTINGS, {"XDG_CONFIG_HOME": str(tmp_path)})
    assert args.scope == "from-default-profile"
    chosen = namespace()
    env = {"XDG_CONFIG_HOME": str(tmp_path), "DPOP_HSM_CONFIG_PROFILE": "ci"}
    resolve_settings(chosen, CLIENT_SETTINGS, env)
    assert chosen.scope == "from-ci-profile"


def test_environment_lists_and_numbers() -> None:
    args = namespace()
    env = {
        "DPOP_HSM_RESOURCE": " https://a.example/  https://b.example/ ",
        "DPOP_HSM_TIMEOUT": "2.5",
        "XDG_CONFIG_HOME": "/nonexistent",
    }
    resolve_settings(args, CLIENT_SETTINGS, env)
    assert args.resource == ["https://a.example/", "https://b.example/"] and args.timeout == 2.5


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DPOP_HSM_AUTH_METHOD", "client_secret_jwt"),
        ("DPOP_HSM_TIMEOUT", "nan"),
        ("DPOP_HSM_TIMEOUT", "-1"),
        ("DPOP_HSM_CLIENT_SECRET_SOURCE", "hunter2-literal"),
        ("DPOP_HSM_PIN_SOURCE", "1234"),
    ],
)
def test_bad_environment_values_are_named_not_shown(name: str, value: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        resolve_settings(namespace(), CLIENT_SETTINGS, {name: value, "XDG_CONFIG_HOME": "/no"})
    assert name in caught.value.message and value not in caught.value.message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('[profiles.ci]\nclient_secret = "hunter2-in-file"\n', "looks like a secret"),
        ('[profiles.ci]\npin = "hunter2-in-file"\n', "looks like a secret"),
        ('[profiles.ci]\nclient_secret_source = "hunter2-in-file"\n', "'env:NAME' or"),
        (
            '[profiles.ci]\nkey = "pkcs11:token=t?module-name=m&pin-value=hunter2-in-file"\n',
            "pin-value",
        ),
        ('[profiles.ci]\ntoken_endpiont = "https://x.example/"\n', "unknown setting"),
        ('[profiles.ci]\ntimeout = "soon"\n', "number of seconds"),
        ("[profiles.ci]\nscope = 7\n", "must be a string"),
        ("[profiles.ci]\nresource = [1]\n", "list of strings"),
        ('token_endpoint = "https://x.example/"\n', "top-level"),
        ("profiles = 3\n", "must be a table"),
        ("[profiles]\nci = 3\n", "must be a table"),
        ("[profiles.ci\n", "not valid TOML"),
        ("[profiles.other]\n", "has no profile 'ci' (profiles: other)"),
    ],
)
def test_config_file_errors(tmp_path: Path, body: str, expected: str) -> None:
    path = write_config(tmp_path, body)
    args = namespace(config=str(path), config_profile="ci")
    with pytest.raises(ConfigFileError) as caught:
        resolve_settings(args, CLIENT_SETTINGS, {})
    assert expected in caught.value.message
    assert "hunter2" not in caught.value.message and str(path) in caught.value.message
    assert caught.value.code == "invalid_config"


def test_named_files_and_profiles_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    with pytest.raises(ConfigFileError, match="does not exist"):
        resolve_settings(namespace(config=str(missing)), CLIENT_SETTINGS, {})
    with pytest.raises(ConfigFileError, match="needed for profile 'ci'"):
        resolve_settings(
            namespace(config_profile="ci"), CLIENT_SETTINGS, {"XDG_CONFIG_HOME": str(tmp_path)}
        )
    # No file at the default place and no profile asked for: nothing to read, no error.
    resolve_settings(namespace(), CLIENT_SETTINGS, {"XDG_CONFIG_HOME": str(tmp_path)})
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigFileError, match="not UTF-8"):
        resolve_settings(namespace(config=str(tmp_path / "bin.toml")), CLIENT_SETTINGS, {})


def _shared_group() -> int:
    """A group the file may be given that is not this user's private group (else: skip)."""
    import pwd

    own = pwd.getpwuid(os.geteuid()).pw_gid
    if os.geteuid() == 0:
        return 65534  # root may give a file any group: nogroup is nobody's private group
    others = [g for g in os.getgroups() if g != own]
    if not others:
        pytest.skip("this user belongs to no group but its own")
    return others[0]


@pytest.mark.parametrize("mode", [0o666, 0o646, 0o664, 0o620])
def test_config_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    # Like ssh with ~/.ssh/config: whoever can write the file chooses the key reference (and
    # with it a module-path to load) and the token endpoint (which receives the secret).
    path = write_config(tmp_path, CONFIG)
    if mode & 0o020:
        os.chown(path, -1, _shared_group())
    os.chmod(path, mode)
    with pytest.raises(ConfigFileError) as caught:
        resolve_settings(namespace(config=str(path), config_profile="ci"), CLIENT_SETTINGS, {})
    assert "writable by other users" in caught.value.message
    assert "chmod go-w" in caught.value.message and str(path) in caught.value.message


def test_group_write_for_the_owners_private_group_is_fine(tmp_path: Path) -> None:
    # umask 002 with user-private groups (RHEL, Fedora, Debian's USERGROUPS): ssh accepts it.
    import grp
    import pwd

    user = pwd.getpwuid(os.geteuid())
    if grp.getgrgid(user.pw_gid).gr_mem not in ([], [user.pw_name]):
        pytest.skip("this user's primary group has other members")
    path = write_config(tmp_path, CONFIG)
    os.chown(path, -1, user.pw_gid)
    os.chmod(path, 0o664)
    args = namespace(config=str(path), config_profile="ci")
    resolve_settings(args, CLIENT_SETTINGS, {})
    assert args.client_id == "ci-client"


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o444])
def test_config_readable_by_others_is_fine(tmp_path: Path, mode: int) -> None:
    path = write_config(tmp_path, CONFIG)
    os.chmod(path, mode)
    args = namespace(config=str(path), config_profile="ci")
    resolve_settings(args, CLIENT_SETTINGS, {})
    assert args.client_id == "ci-client"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_config_of_another_user_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, CONFIG)
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigFileError, match="not yours"):
        resolve_settings(namespace(config=str(path), config_profile="ci"), CLIENT_SETTINGS, {})


def test_cli_refuses_a_shared_config_before_using_its_key(tmp_path: Path) -> None:
    module = tmp_path / "their-module.so"
    path = write_config(
        tmp_path, f'[profiles.default]\nkey = "pkcs11:token=t;object=k?module-path={module}"\n'
    )
    os.chmod(path, 0o666)
    result = run_cli("jwk", "--json", env={"DPOP_HSM_CONFIG": str(path)})
    assert result.returncode == EXIT_CODES["configuration"]
    error = json_error(result)
    assert error["code"] == "invalid_config" and "writable by other users" in error["message"]


# --- end to end: a CI job that sets the environment, a developer with a profile --------------


def test_token_from_environment_only(served: dict[str, Any], pem_key: str) -> None:
    env = {
        "DPOP_HSM_KEY": pem_key,
        "DPOP_HSM_TOKEN_ENDPOINT": served["token_endpoint"],
        "DPOP_HSM_CLIENT_ID": "m2m.dpop",
        "DPOP_HSM_AUTH_METHOD": "client_secret_post",
        "DPOP_HSM_CLIENT_SECRET_SOURCE": "env:CI_SECRET",
        "DPOP_HSM_SCOPE": "api",
        "CI_SECRET": SECRET,
    }
    result = run_cli("token", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert one_json(result)["scope"] == "api"


def test_request_from_a_profile_with_a_flag_on_top(
    served: dict[str, Any], pem_key: str, tmp_path: Path
) -> None:
    path = write_config(
        tmp_path,
        f"""
[profiles.local]
key = "{pem_key}"
token_endpoint = "http://127.0.0.1:1/nothing-listens-here"
client_id = "m2m.dpop"
auth_method = "client_secret_post"
client_secret_source = "env:LOCAL_SECRET"
scope = "api"
""",
    )
    env = {"DPOP_HSM_CONFIG": str(path), "LOCAL_SECRET": SECRET}
    down = run_cli("request", "--config-profile", "local", "--json", served["api"], env=env)
    assert down.returncode == EXIT_CODES["server"]
    assert json_error(down)["code"] == "transport_error"
    # The flag wins over the profile's (wrong) endpoint; -v names where each value came from.
    ok = run_cli(
        "request",
        "--config-profile",
        "local",
        "--token-endpoint",
        served["token_endpoint"],
        "-v",
        "--json",
        served["api"],
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    assert one_json(ok)["status"] == 200
    assert "setting token_endpoint from flag" in ok.stderr
    assert "setting client_id from profile local" in ok.stderr
    assert "client_secret=****" in ok.stderr  # the session log masks it


def test_missing_endpoint_names_every_way_to_give_it(pem_key: str) -> None:
    result = run_cli("token", "--key", pem_key, "--client-id", "x", "--json")
    assert result.returncode == EXIT_CODES["usage"]
    message = json_error(result)["message"]
    assert "--token-endpoint" in message and "$DPOP_HSM_TOKEN_ENDPOINT" in message


def test_bad_config_is_a_configuration_error(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[profiles.default]\nclient_secret = "x"\n')
    result = run_cli("jwk", "--json", env={"DPOP_HSM_CONFIG": str(path)})
    assert result.returncode == EXIT_CODES["configuration"]
    assert json_error(result)["code"] == "invalid_config"


# --- documentation --------------------------------------------------------------------------


def _readme_variables() -> set[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"### Environment variables\n(.*?)\n\n", text, re.S)
    assert match, "README has no environment variable table"
    return set(re.findall(r"^\| `(DPOP_HSM_[A-Z0-9_]+)`", match.group(1), re.M))


def test_every_variable_the_code_reads_is_documented() -> None:
    read: set[str] = set()
    for base in ("dpop_hsm", "scripts"):
        for path in (ROOT / base).rglob("*"):
            if path.is_file() and path.suffix in ("", ".py", ".sh"):
                text = path.read_text(encoding="utf-8", errors="replace")
                read |= set(re.findall(r"DPOP_HSM_[A-Z0-9_]*[A-Z0-9]", text))
    assert read >= {s.env for s in SETTINGS.values()}
    assert read - _readme_variables() == set()
