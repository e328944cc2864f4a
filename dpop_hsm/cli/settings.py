"""Settings for ``dpop-hsm``: a flag, else the environment, else a config profile, else a default.

CI scripts set ``DPOP_HSM_TOKEN_ENDPOINT``, ``DPOP_HSM_CLIENT_ID``, … once instead of repeating
long flags; people keep named profiles in a small TOML file::

    # $DPOP_HSM_CONFIG, else $XDG_CONFIG_HOME/dpop-hsm/config.toml (~/.config/dpop-hsm/…)
    [profiles.default]
    token_endpoint = "https://as.example/connect/token"
    client_id = "m2m.dpop"

    [profiles.prod]
    key = "pkcs11:token=prod;object=dpop?module-name=softhsm2"
    client_secret_source = "file:/run/secrets/client-secret"
    resource = ["https://api.example/"]

A profile is chosen with ``--config-profile NAME`` (or ``$DPOP_HSM_CONFIG_PROFILE``); without
one, ``default`` applies when the file has it. The file holds no secret, only where secrets
come from (``env:NAME`` / ``file:PATH``): a key that looks like a secret, a ``pin-value`` in a
key reference, or any unknown key is an error that names the file and the key, never a value.
A file that other users can write, or that belongs to another user (root aside), is refused
like ssh refuses such a ``~/.ssh/config``: its key references may load code.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from ..errors import ConfigurationError

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "CONFIG_ENV",
    "PROFILE_ENV",
    "SETTINGS",
    "ConfigFileError",
    "Setting",
    "config_path",
    "load_profile",
    "missing",
    "resolve_settings",
]

log = logging.getLogger("dpop_hsm.cli")

CONFIG_ENV = "DPOP_HSM_CONFIG"
PROFILE_ENV = "DPOP_HSM_CONFIG_PROFILE"
DEFAULT_PROFILE = "default"
_MAX_CONFIG = 64 * 1024
_AUTH_METHODS = ("client_secret_basic", "client_secret_post", "private_key_jwt", "none")
# Names a secret would have: refused in the file with advice to name a source instead.
_SECRET_NAMES = frozenset(
    {"client_secret", "secret", "pin", "pin_value", "password", "auth", "token", "access_token"}
)


class ConfigFileError(ConfigurationError):
    """The config file cannot be read or holds something it must not (messages hold no value)."""

    code = "invalid_config"


def _text(value: str, what: str) -> str:
    if not value.strip():
        raise ConfigurationError(f"{what} is empty")
    return value


def _source(value: str, what: str) -> str:
    # The same two forms every secret option takes: never the secret itself.
    if not value.startswith(("env:", "file:")) or value in ("env:", "file:"):
        raise ConfigurationError(f"{what} must be 'env:NAME' or 'file:PATH'")
    return value


def _auth_method(value: str, what: str) -> str:
    if value not in _AUTH_METHODS:
        raise ConfigurationError(f"{what} must be one of {', '.join(_AUTH_METHODS)}")
    return value


def _timeout(value: str, what: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigurationError(f"{what} is not a number of seconds") from None
    if not 0 < seconds <= 3600:  # also rejects nan and inf
        raise ConfigurationError(f"{what} must be between 0 and 3600 seconds")
    return seconds


def _resources(value: str, what: str) -> list[str]:
    # RFC 8707 resource indicators are absolute URIs, which hold no whitespace.
    items = value.split()
    if not items:
        raise ConfigurationError(f"{what} is empty")
    return items


class Setting(NamedTuple):
    """One setting: its option's ``dest`` (also its config key) and its environment variable.

    ``parse`` turns the variable's text (or a config string) into the option's value and raises
    ConfigurationError naming ``what`` (never the value) when it does not fit.
    """

    name: str
    env: str
    parse: Callable[[str, str], Any]
    default: Any = None
    many: bool = False  # a list: whitespace-separated in the environment, a TOML array

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("key", "DPOP_HSM_KEY", _text),
        Setting("pin_source", "DPOP_HSM_PIN_SOURCE", _source),
        Setting("token_endpoint", "DPOP_HSM_TOKEN_ENDPOINT", _text),
        Setting("client_id", "DPOP_HSM_CLIENT_ID", _text),
        Setting("auth_method", "DPOP_HSM_AUTH_METHOD", _auth_method, "client_secret_basic"),
        Setting("client_secret_source", "DPOP_HSM_CLIENT_SECRET_SOURCE", _source),
        Setting("assertion_key", "DPOP_HSM_ASSERTION_KEY", _text),
        Setting("scope", "DPOP_HSM_SCOPE", _text),
        Setting("resource", "DPOP_HSM_RESOURCE", _resources, many=True),
        Setting("timeout", "DPOP_HSM_TIMEOUT", _timeout, 10.0),
    )
}
KEY_SETTINGS = ("key", "pin_source")
# With --profile a stored login brings its own key, client, endpoint and secret source: the
# environment and the config file (set up for another client, say in CI) must not replace them
# — their client secret would go to the profile's AS. Flags still do.
PROFILE_SETTINGS = ("pin_source", "timeout")
CLIENT_SETTINGS = (
    *KEY_SETTINGS,
    "token_endpoint",
    "client_id",
    "auth_method",
    "client_secret_source",
    "assertion_key",
    "scope",
    "resource",
    "timeout",
)


def config_path(explicit: str | None, environ: Mapping[str, str]) -> tuple[Path, bool]:
    """``(path, named)``: ``--config``, ``$DPOP_HSM_CONFIG``, else the XDG default.

    ``named`` is True when the user named the file, which then must exist.
    """
    from pathlib import Path  # here, not at the top: ``dpop-hsm --help`` stays cheap

    if explicit:
        return Path(explicit), True
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV]), True
    base = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "dpop-hsm" / "config.toml", False


def _check_owner(path: Path, st: os.stat_result) -> None:
    """Refuse a config file other users may write, as ssh does for ``~/.ssh/config``.

    It holds no secret, so reading is harmless, but it decides which code and which servers
    dpop-hsm trusts: a key reference in it may load a PKCS#11 module (``module-path=``, allowed
    because the user wrote it), and its token endpoint receives the client secret. Whoever can
    write it can do both. Owner: this user or root; no world write bit, and a group write bit
    only for the owner's private group with no other members (what ssh's secure_permissions
    allows, so umask 002 systems with user-private groups keep working).
    """
    import stat

    group_writable = bool(st.st_mode & 0o020) and not _private_group(st.st_gid, st.st_uid)
    if st.st_uid not in (os.geteuid(), 0) or st.st_mode & 0o002 or group_writable:
        raise ConfigFileError(
            f"config file {str(path)!r} is writable by other users or not yours (mode "
            f"{stat.S_IMODE(st.st_mode):o}): it chooses the code and servers dpop-hsm trusts; "
            "chmod go-w it if it is yours"
        )


def _private_group(gid: int, uid: int) -> bool:
    """True when ``gid`` is ``uid``'s own group: its primary group, with no other members."""
    import grp
    import pwd

    try:
        group = grp.getgrgid(gid)
        user = pwd.getpwuid(uid)
    except KeyError:
        return False
    return user.pw_gid == gid and all(member == user.pw_name for member in group.gr_mem)


def _read_config(path: Path) -> dict[str, Any]:
    import tomllib

    try:
        with path.open("rb") as f:
            _check_owner(path, os.fstat(f.fileno()))
            raw = f.read(_MAX_CONFIG + 1)
    except OSError as e:
        raise ConfigFileError(f"cannot read config file {str(path)!r}: {e.strerror}") from e
    if len(raw) > _MAX_CONFIG:
        raise ConfigFileError(f"config file {str(path)!r} is larger than 64 KiB")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigFileError(f"config file {str(path)!r} is not UTF-8") from e
    except tomllib.TOMLDecodeError as e:
        # tomllib's message names the line and column, not the text there.
        raise ConfigFileError(f"config file {str(path)!r} is not valid TOML: {e}") from e


def load_profile(
    path: Path, profile: str | None, *, named: bool, allowed: Iterable[str]
) -> tuple[str | None, dict[str, Any]]:
    """The settings of one profile, checked: ``(profile name or None, {setting: value})``.

    A missing file is an error only when the user named the file or the profile; a missing
    ``default`` profile is no error.
    """
    if not path.is_file():
        if named or profile is not None:
            raise ConfigFileError(
                f"config file {str(path)!r} does not exist"
                + (f" (needed for profile {profile!r})" if profile is not None else "")
            )
        return None, {}
    doc = _read_config(path)
    where = f"config file {str(path)!r}"
    extra = sorted(set(doc) - {"profiles"})
    if extra:
        raise ConfigFileError(f"{where}: unknown top-level key(s) {extra}; use [profiles.NAME]")
    profiles = doc.get("profiles", {})
    if not isinstance(profiles, dict):
        raise ConfigFileError(f"{where}: 'profiles' must be a table")
    name = profile if profile is not None else DEFAULT_PROFILE
    table = profiles.get(name)
    if table is None:
        if profile is None:
            return None, {}
        known = ", ".join(sorted(profiles)) or "none"
        raise ConfigFileError(f"{where} has no profile {name!r} (profiles: {known})")
    if not isinstance(table, dict):
        raise ConfigFileError(f"{where}: profile {name!r} must be a table")
    return name, _check_profile(table, f"{where}, profile {name!r}", set(allowed))


def _check_profile(table: dict[str, Any], where: str, allowed: set[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, value in table.items():
        setting = SETTINGS.get(key)
        if key in _SECRET_NAMES or (key.endswith("_secret") and setting is None):
            raise ConfigFileError(
                f"{where}: {key!r} looks like a secret; secrets never go in the config file, "
                f"name their source instead (client_secret_source / pin_source = "
                "'env:NAME' or 'file:PATH')"
            )
        if setting is None:
            raise ConfigFileError(
                f"{where}: unknown setting {key!r} (known: {', '.join(SETTINGS)})"
            )
        what = f"{where}: {key}"
        if setting.many:
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise ConfigFileError(f"{what} must be a string or a list of strings")
            parsed: Any = [p for i in items for p in _wrap(setting.parse, i, what)]
        elif (
            setting.name == "timeout"
            and isinstance(value, int | float)
            and not isinstance(value, bool)
        ):
            parsed = _wrap(setting.parse, str(value), what)
        elif isinstance(value, str):
            parsed = _wrap(setting.parse, value, what)
        else:
            raise ConfigFileError(f"{what} must be a string")
        if key in ("key", "assertion_key") and "pin-value=" in value:
            raise ConfigFileError(
                f"{what}: the key reference carries pin-value; secrets never go in the config "
                "file (use pin-source=env:NAME or file:PATH)"
            )
        if key in allowed:
            values[key] = parsed
    return values


def _wrap(parse: Callable[[str, str], Any], value: str, what: str) -> Any:
    try:
        return parse(value, what)
    except ConfigFileError:
        raise
    except ConfigurationError as e:
        raise ConfigFileError(e.message) from e


def resolve_settings(
    args: argparse.Namespace, names: Iterable[str], environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Fill each named setting on ``args``: flag > environment > config profile > default.

    Returns where each value came from (``flag``, ``$NAME``, ``profile NAME``, ``default``),
    also logged at DEBUG (``-v``); values are never logged. An empty variable counts as unset.
    Raises ConfigurationError for a variable that does not parse, ConfigFileError for the file.
    """
    env = os.environ if environ is None else environ
    names = [n for n in names if n in SETTINGS]
    origins: dict[str, str] = {}
    pending = []
    for name in names:
        setting = SETTINGS[name]
        if getattr(args, name, None) is not None:
            origins[name] = "flag"
        elif env.get(setting.env, "").strip():
            setattr(args, name, setting.parse(env[setting.env], f"${setting.env}"))
            origins[name] = f"${setting.env}"
        else:
            pending.append(name)
    profile_arg = getattr(args, "config_profile", None) or env.get(PROFILE_ENV) or None
    if pending or profile_arg is not None:
        path, named = config_path(getattr(args, "config", None), env)
        profile, values = load_profile(path, profile_arg, named=named, allowed=names)
        for name in pending:
            if name in values:
                setattr(args, name, values[name])
                origins[name] = f"profile {profile}"
            else:
                setattr(args, name, SETTINGS[name].default)
                origins[name] = "default"
    for name in names:
        log.debug("setting %s from %s", name, origins[name])
    return origins


def missing(setting: str, what: str) -> str:
    """How to give a required setting, for the error that says it is missing."""
    s = SETTINGS[setting]
    return f"no {what}: give {s.flag}, set ${s.env}, or add {s.name} to a config profile"
