"""Login profiles on disk: what a later run needs to continue a login, and nothing more.

A profile holds the issuer and its metadata, the client id and authentication method, the key
*reference* (``pkcs11:…``, ``tpm2:…``, a path), scope and resource, the refresh token, the
current access token with its expiry (wall clock), and the key's RFC 7638 thumbprint. Never key
material, PINs or client secrets: a confidential client's secret comes from its source on every
run (a source *name* such as ``env:VAR`` may be stored; its value never is).

Where: ``$DPOP_HSM_STATE_DIR``, else ``$XDG_STATE_HOME/dpop-hsm`` (XDG Base Directory spec:
only an absolute ``XDG_STATE_HOME`` counts), else ``~/.local/state/dpop-hsm``.

How, and why:

* The directory is ``0700`` and each file ``0600`` *from creation* (``os.open`` with the mode,
  no ``chmod`` afterwards, so there is no moment when another user could open it). A directory
  or file that other users can reach, or that is not ours, is refused, like ssh refuses keys.
* Writes are atomic: a temporary file in the same directory, ``fsync``, ``rename`` over the
  old file, ``fsync`` of the directory. A crash leaves the old profile or the new one, never a
  torn file; readers need no lock.
* Writers lock the profile with ``fcntl.flock`` on a sibling ``.lock`` file: a rotated refresh
  token kills the old one (RFC 9700 §4.14.2), so two processes refreshing with the same old token
  would lose the grant. Hold :meth:`ProfileStore.locked` around load → refresh → save.
* Loading validates every member; anything unexpected is :class:`ProfileCorruptError`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .discovery import ServerMetadata, metadata_from_document
from .errors import (
    DPoPError,
    ProfileCorruptError,
    ProfileError,
    ProfileLockedError,
    ProfileNotFoundError,
    ProfilePermissionError,
)
from .strict_json import StrictJsonError, loads_strict

__all__ = [
    "DEFAULT_PROFILE",
    "PROFILE_VERSION",
    "LockedProfile",
    "Profile",
    "ProfileStore",
    "default_state_dir",
    "validate_key_reference",
    "validate_profile_name",
]

PROFILE_VERSION = 1
DEFAULT_PROFILE = "default"
MAX_PROFILE_SIZE = 1024 * 1024
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_JKT = re.compile(r"[A-Za-z0-9_-]{43}")  # base64url of a SHA-256 digest (RFC 7638 §3)
_AUTH_METHODS = ("none", "client_secret_basic", "client_secret_post", "private_key_jwt")
_LOCK_POLL = 0.05


def validate_profile_name(name: str) -> str:
    """``name`` if it is a safe profile file name: 1-64 of ``A-Z a-z 0-9 . _ -``, not dotted."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        shown = "".join(c if c.isprintable() else "?" for c in str(name)[:40])
        raise ProfileError(
            f"profile name {shown!r} must be 1-64 characters of A-Z a-z 0-9 . _ - "
            "starting with a letter or digit"
        )
    return name


def validate_key_reference(ref: str) -> str:
    """``ref`` if it names a key without containing a secret, else :class:`ProfileError`.

    A profile stores the reference, never the key or its PIN: a ``pkcs11:`` URI with
    ``pin-value`` (RFC 7512 §2.3), inline PEM or JWK text are refused. The message never
    repeats the reference, which might hold exactly that secret.
    """
    if not isinstance(ref, str) or not ref.strip() or len(ref) > 4096:
        raise ProfileError("the key reference must be a non-empty string")
    if any(ord(ch) < 0x20 for ch in ref):
        raise ProfileError("the key reference contains control characters")
    lowered = ref.lower()
    if lowered.startswith("pkcs11:") and re.search(r"(^|[;?&])pin-value=", lowered[7:]):
        raise ProfileError(
            "the key reference carries a pin-value; a profile never stores a PIN: "
            "use pin-source=env:NAME or file:PATH, or DPOP_HSM_PIN"
        )
    if "-----begin" in lowered or ref.lstrip().startswith("{"):
        raise ProfileError("the key reference looks like key material; give a path or URI")
    return ref


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where profiles live (see the module docstring for the order)."""
    env = os.environ if environ is None else environ
    explicit = env.get("DPOP_HSM_STATE_DIR")
    if explicit:
        return Path(explicit)
    xdg = env.get("XDG_STATE_HOME")
    if xdg and os.path.isabs(xdg):  # XDG Base Directory: relative values are invalid
        return Path(xdg) / "dpop-hsm"
    home = env.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".local" / "state" / "dpop-hsm"


@dataclass(frozen=True)
class Profile:
    """One stored login. ``repr`` never shows the tokens.

    ``expires_at`` is the access token's expiry as wall-clock seconds since the epoch (a later
    process has no use for another process's monotonic clock). ``metadata`` is the AS document
    it was discovered with, revalidated on load. ``client_secret_source`` may name a source
    (``env:NAME``/``file:PATH``), never hold a secret.
    """

    name: str
    issuer: str
    metadata: Mapping[str, Any] = field(repr=False)
    client_id: str
    auth_method: str
    key: str
    jkt: str
    scope: str | None = None
    resource: tuple[str, ...] = ()
    refresh_token: str | None = field(default=None, repr=False)
    access_token: str | None = field(default=None, repr=False)
    token_type: str | None = None
    expires_at: float | None = None
    allow_bearer: bool = False
    client_secret_source: str | None = None
    assertion_key: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0

    def __post_init__(self) -> None:
        _validate(self)

    def server_metadata(self) -> ServerMetadata:
        """The stored metadata, validated like a freshly fetched document."""
        return metadata_from_document(self.metadata, issuer=self.issuer)

    def to_json(self) -> bytes:
        """The file's bytes: one JSON object, members sorted, with a ``version``."""
        document: dict[str, Any] = {"version": PROFILE_VERSION}
        for name in self.__dataclass_fields__:
            document[name] = getattr(self, name)
        document["metadata"] = dict(self.metadata)
        document["resource"] = list(self.resource)
        return (json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, *, name: str) -> Profile:
        """Parse and validate a stored profile; :class:`ProfileCorruptError` for anything odd."""
        try:
            document = loads_strict(data)
        except StrictJsonError as e:
            raise ProfileCorruptError(f"profile {name!r} is not valid JSON: {e}") from e
        if not isinstance(document, dict):
            raise ProfileCorruptError(f"profile {name!r} is not a JSON object")
        version = document.pop("version", None)
        if version != PROFILE_VERSION or isinstance(version, bool):
            raise ProfileCorruptError(
                f"profile {name!r} has version {str(version)[:10]!r}; this dpop_hsm reads "
                f"version {PROFILE_VERSION}"
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(k for k in document if k not in known)
        if unknown:
            raise ProfileCorruptError(
                f"profile {name!r} has unknown members: {', '.join(u[:40] for u in unknown[:5])}"
            )
        if document.get("name") != name:
            raise ProfileCorruptError(f"profile file {name!r} holds another profile's name")
        resource = document.get("resource", [])
        if not isinstance(resource, list):
            raise ProfileCorruptError(f"profile {name!r}: resource must be a list")
        document["resource"] = tuple(resource)
        metadata = document.get("metadata")
        if isinstance(metadata, dict):
            document["metadata"] = MappingProxyType(metadata)
        try:
            return cls(**document)
        except TypeError as e:  # a required member is missing
            raise ProfileCorruptError(f"profile {name!r} lacks a required member") from e
        except ProfileCorruptError:
            raise
        except DPoPError as e:
            raise ProfileCorruptError(f"profile {name!r} is invalid: {e.message}") from e


def _need(cond: bool, profile: Profile, what: str) -> None:
    if not cond:
        raise ProfileCorruptError(f"profile {profile.name!r}: {what}")


def _is_text(value: Any, limit: int = 8192) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit and value.isprintable()


def _is_time(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _validate(p: Profile) -> None:
    """Every member's type and form; raised as :class:`ProfileCorruptError` (never a value)."""
    _need(isinstance(p.name, str) and bool(_NAME.fullmatch(p.name)), p, "invalid name")
    _need(_is_text(p.issuer), p, "issuer must be a URL string")
    _need(isinstance(p.metadata, Mapping), p, "metadata must be an object")
    _need(_is_text(p.client_id, 1024), p, "client_id must be a string")
    _need(p.auth_method in _AUTH_METHODS, p, "unknown auth_method")
    _need(isinstance(p.jkt, str) and bool(_JKT.fullmatch(p.jkt)), p, "jkt is not a thumbprint")
    _need(p.scope is None or _is_text(p.scope), p, "scope must be a string")
    _need(
        isinstance(p.resource, tuple) and all(_is_text(r) for r in p.resource),
        p,
        "resource must be a list of URIs",
    )
    for member in ("refresh_token", "access_token"):
        value = getattr(p, member)
        _need(
            value is None or (_is_text(value, 65536) and value.isascii() and " " not in value),
            p,
            f"{member} must be a printable ASCII string",
        )
    _need(p.token_type is None or _is_text(p.token_type, 40), p, "token_type must be a string")
    _need(p.expires_at is None or _is_time(p.expires_at), p, "expires_at must be a time")
    _need(isinstance(p.allow_bearer, bool), p, "allow_bearer must be true or false")
    _need(
        p.client_secret_source is None
        or (
            _is_text(p.client_secret_source, 4096)
            and p.client_secret_source.startswith(("env:", "file:"))
        ),
        p,
        "client_secret_source must be env:NAME or file:PATH",
    )
    _need(_is_time(p.created_at) and _is_time(p.updated_at), p, "timestamps must be times")
    try:
        validate_key_reference(p.key)
        if p.assertion_key is not None:
            validate_key_reference(p.assertion_key)
        p.server_metadata()
    except ProfileCorruptError:
        raise
    except DPoPError as e:
        raise ProfileCorruptError(f"profile {p.name!r}: {e.message}") from e


class LockedProfile:
    """A profile while its lock is held: load, save and delete without another writer."""

    def __init__(self, store: ProfileStore, name: str) -> None:
        self._store = store
        self.name = name

    def load(self) -> Profile | None:
        """The stored profile, or None when there is none yet."""
        try:
            return self._store.load(self.name)
        except ProfileNotFoundError:
            return None

    def save(self, profile: Profile) -> None:
        if profile.name != self.name:
            raise ProfileError("saving a profile under another profile's lock")
        self._store._write(profile)

    def delete(self) -> bool:
        return self._store._unlink(self.name)


class ProfileStore:
    """The profiles of one state directory (default: :func:`default_state_dir`)."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_state_dir()

    def __repr__(self) -> str:
        return f"ProfileStore({str(self.directory)!r})"

    # --- paths and permissions ---------------------------------------------------------------

    def path_for(self, name: str) -> Path:
        return self.directory / f"{validate_profile_name(name)}.json"

    def _check_dir(self) -> None:
        try:
            st = os.stat(self.directory)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise ProfileError(
                f"cannot use the state directory {str(self.directory)!r}: {e.strerror}"
            ) from e
        if not stat.S_ISDIR(st.st_mode):
            raise ProfileError(f"{str(self.directory)!r} is not a directory")
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise ProfilePermissionError(
                f"the state directory {str(self.directory)!r} is accessible to other users or "
                f"not yours (mode {stat.S_IMODE(st.st_mode):o}); chmod 700 it"
            )

    def ensure_dir(self) -> Path:
        """Create the state directory 0700 (parents with the default mode) and check it."""
        try:
            self.directory.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(self.directory, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise ProfileError(
                f"cannot create the state directory {str(self.directory)!r}: {e.strerror}"
            ) from e
        self._check_dir()
        return self.directory

    # --- reading -------------------------------------------------------------------------------

    def load(self, name: str) -> Profile:
        """The profile ``name``. Raises :class:`ProfileNotFoundError`,
        :class:`ProfilePermissionError` or :class:`ProfileCorruptError`."""
        path = self.path_for(name)
        try:
            self._check_dir()
        except FileNotFoundError:
            raise ProfileNotFoundError(f"no profile {name!r}: log in first") from None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ProfileNotFoundError(f"no profile {name!r}: log in first") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ProfilePermissionError(f"profile {name!r} is a symbolic link") from e
            raise ProfileError(f"cannot read profile {name!r}: {e.strerror}") from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ProfileCorruptError(f"profile {name!r} is not a regular file")
            if st.st_uid != os.geteuid() or st.st_mode & 0o077:
                raise ProfilePermissionError(
                    f"profile {name!r} is accessible to other users or not yours "
                    f"(mode {stat.S_IMODE(st.st_mode):o}); it may hold a refresh token"
                )
            if st.st_size > MAX_PROFILE_SIZE:
                raise ProfileCorruptError(f"profile {name!r} is larger than {MAX_PROFILE_SIZE}")
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(MAX_PROFILE_SIZE + 1)
        finally:
            os.close(fd)
        if len(data) > MAX_PROFILE_SIZE:
            raise ProfileCorruptError(f"profile {name!r} is larger than {MAX_PROFILE_SIZE}")
        return Profile.from_json(data, name=name)

    def names(self) -> list[str]:
        """Profile names present, sorted (files that are not profiles are ignored)."""
        try:
            self._check_dir()
            entries = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(e[:-5] for e in entries if e.endswith(".json") and _NAME.fullmatch(e[:-5]))

    # --- writing -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, name: str, *, timeout: float = 30.0) -> Iterator[LockedProfile]:
        """Hold ``name``'s inter-process lock (``fcntl.flock``) for the block.

        Raises :class:`ProfileLockedError` when another process holds it beyond ``timeout``.
        """
        validate_profile_name(name)
        self.ensure_dir()
        lock_path = self.directory / f"{name}.lock"
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(lock_path, flags, 0o600)
        except OSError as e:
            raise ProfileError(f"cannot open the lock of profile {name!r}: {e.strerror}") from e
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise ProfileLockedError(
                            f"profile {name!r} is locked by another process (waited {timeout:g} s)"
                        ) from None
                    time.sleep(_LOCK_POLL)
            try:
                yield LockedProfile(self, name)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def save(self, profile: Profile) -> None:
        """Write ``profile`` atomically under its lock."""
        with self.locked(profile.name) as handle:
            handle.save(profile)

    def delete(self, name: str) -> bool:
        """Remove the profile; False when there was none. The lock file stays (see below)."""
        with self.locked(name) as handle:
            return handle.delete()

    def _write(self, profile: Profile) -> None:
        directory = self.ensure_dir()
        final = self.path_for(profile.name)
        data = profile.to_json()
        tmp = directory / f".{profile.name}.{secrets.token_hex(8)}.tmp"
        # Created 0600 in one step (O_EXCL: never someone else's file, never a symlink).
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600)
        except OSError as e:
            raise ProfileError(f"cannot write profile {profile.name!r}: {e.strerror}") from e
        try:
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise ProfileError(f"cannot write profile {profile.name!r}: {e.strerror}") from e
        self._sync_dir()

    def _sync_dir(self) -> None:
        # The rename is durable only once the directory entry is on disk.
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _unlink(self, name: str) -> bool:
        # The .lock file is left in place: unlinking it while another process waits on it
        # would let a third process lock a new file and run beside the waiter.
        try:
            os.unlink(self.path_for(name))
        except FileNotFoundError:
            return False
        except OSError as e:
            raise ProfileError(f"cannot delete profile {name!r}: {e.strerror}") from e
        self._sync_dir()
        return True
