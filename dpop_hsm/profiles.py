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
  no ``chmod`` afterwards, so there is no moment when another user could open it), whatever the
  umask; missing parent directories are created ``0700`` too (XDG Base Directory).
* A directory or file that other users can reach, or that is not ours, is refused, not
  repaired, like ssh refuses a private key others can read: what others could read may have
  been read, and the message says how to fix the mode. A profile that is a symbolic link is
  refused (``O_NOFOLLOW``).
* The directory is opened and checked once per operation and every file is opened relative to
  that descriptor, so the directory cannot be swapped between the check and the write.
* Writes are atomic: a temporary file in the same directory, ``fsync``, ``rename`` over the
  old file, ``fsync`` of the directory. A crash leaves the old profile or the new one, never a
  torn file; readers need no lock. The temporary file a crash leaves behind (it holds a
  refresh token) is removed by the profile's next writer, or by its deletion.
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
_TEMP = re.compile(r"[0-9a-f]{16}\.tmp")  # what _write appends to ".NAME."
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
    """A profile while its lock is held: load, save and delete without another writer.

    Everything goes through the directory descriptor the lock was taken in, so a state
    directory swapped (renamed, re-linked) while the lock is held changes nothing: the lock,
    the reads and the writes all stay in the directory that was checked.
    """

    def __init__(self, store: ProfileStore, name: str, dir_fd: int) -> None:
        self._store = store
        self._dir_fd = dir_fd
        self.name = name

    def load(self) -> Profile | None:
        """The stored profile, or None when there is none yet."""
        try:
            return self._store._load_at(self._dir_fd, self.name)
        except ProfileNotFoundError:
            return None

    def save(self, profile: Profile) -> None:
        if profile.name != self.name:
            raise ProfileError("saving a profile under another profile's lock")
        self._store._write(self._dir_fd, profile)

    def delete(self) -> bool:
        return self._store._unlink(self._dir_fd, self.name)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


class ProfileStore:
    """The profiles of one state directory (default: :func:`default_state_dir`).

    Each operation opens the directory once, checks *that descriptor* (``fstat``: a directory
    of ours, mode ``0700`` or stricter) and does everything else relative to it (``dir_fd``):
    there is no gap between the check and the use in which another user could swap the
    directory for one of theirs. A symbolic link to a directory of ours is followed (dotfile
    setups link ``~/.local/state``); one to anybody else's directory is refused by the check.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_state_dir()

    def __repr__(self) -> str:
        return f"ProfileStore({str(self.directory)!r})"

    # --- paths and permissions ---------------------------------------------------------------

    def path_for(self, name: str) -> Path:
        return self.directory / f"{validate_profile_name(name)}.json"

    def _where(self) -> str:
        return repr(str(self.directory))

    def _open_dir(self) -> int:
        """A descriptor of the checked state directory; FileNotFoundError when there is none."""
        try:
            fd = os.open(self.directory, _DIR_FLAGS)
        except FileNotFoundError:
            raise
        except NotADirectoryError:
            raise ProfileError(f"the state directory {self._where()} is not a directory") from None
        except OSError as e:
            raise ProfileError(
                f"cannot use the state directory {self._where()}: {e.strerror}"
            ) from e
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or st.st_mode & 0o077:
                raise ProfilePermissionError(
                    f"the state directory {self._where()} is accessible to other users or "
                    f"not yours (mode {stat.S_IMODE(st.st_mode):o}); it holds refresh tokens: "
                    "chmod 700 it if it is yours"
                )
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _make_dirs(self) -> None:
        """Create the state directory and its missing parents, each ``0700``.

        XDG Base Directory: a missing base directory is created 0700. ``mkdir -p`` would give
        the parents the umask's mode — under ``umask 000`` a world-writable
        ``~/.local/state``, in which another user could swap our directory for theirs.
        """
        missing = []
        path = self.directory
        while not os.path.lexists(path) and path != path.parent:
            missing.append(path)
            path = path.parent
        for directory in reversed(missing):
            try:
                os.mkdir(directory, 0o700)
            except FileExistsError:
                pass  # created meanwhile, or a dangling symlink: the check decides
            except OSError as e:
                raise ProfileError(
                    f"cannot create the state directory {self._where()}: {e.strerror}"
                ) from e

    def _open_dir_creating(self) -> int:
        self._make_dirs()
        try:
            return self._open_dir()
        except FileNotFoundError:  # a symbolic link to nowhere
            raise ProfileError(
                f"the state directory {self._where()} is a symbolic link to nothing"
            ) from None

    def ensure_dir(self) -> Path:
        """Create the state directory 0700 (missing parents 0700 too) and check it."""
        os.close(self._open_dir_creating())
        return self.directory

    # --- reading -------------------------------------------------------------------------------

    def load(self, name: str) -> Profile:
        """The profile ``name``. Raises :class:`ProfileNotFoundError`,
        :class:`ProfilePermissionError` or :class:`ProfileCorruptError`."""
        validate_profile_name(name)
        try:
            dir_fd = self._open_dir()
        except FileNotFoundError:
            raise ProfileNotFoundError(f"no profile {name!r}: log in first") from None
        try:
            return self._load_at(dir_fd, name)
        finally:
            os.close(dir_fd)

    def _load_at(self, dir_fd: int, name: str) -> Profile:
        try:
            # O_NONBLOCK: a FIFO in the profile's place is refused below instead of blocking
            # the open until somebody writes to it (no effect on a regular file).
            flags = os.O_RDONLY | os.O_NONBLOCK | _FILE_FLAGS
            fd = os.open(f"{name}.json", flags, dir_fd=dir_fd)
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
                # Like ssh with a private key: refused, not repaired — a file others could
                # read may already have been read; the user decides (chmod 600, or log in).
                raise ProfilePermissionError(
                    f"profile {name!r} is accessible to other users or not yours "
                    f"(mode {stat.S_IMODE(st.st_mode):o}); it may hold a refresh token: "
                    f"chmod 600 {str(self.path_for(name))!r} if it is yours, or log in again"
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
            dir_fd = self._open_dir()
        except FileNotFoundError:
            return []
        try:
            entries = os.listdir(dir_fd)
        finally:
            os.close(dir_fd)
        return sorted(e[:-5] for e in entries if e.endswith(".json") and _NAME.fullmatch(e[:-5]))

    # --- writing -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, name: str, *, timeout: float = 30.0) -> Iterator[LockedProfile]:
        """Hold ``name``'s inter-process lock (``fcntl.flock``) for the block.

        Raises :class:`ProfileLockedError` when another process holds it beyond ``timeout``.
        """
        validate_profile_name(name)
        dir_fd = self._open_dir_creating()
        try:
            flags = os.O_RDWR | os.O_CREAT | _FILE_FLAGS
            try:
                fd = os.open(f"{name}.lock", flags, 0o600, dir_fd=dir_fd)
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
                                f"profile {name!r} is locked by another process "
                                f"(waited {timeout:g} s)"
                            ) from None
                        time.sleep(_LOCK_POLL)
                try:
                    yield LockedProfile(self, name, dir_fd)
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        finally:
            os.close(dir_fd)

    def save(self, profile: Profile) -> None:
        """Write ``profile`` atomically under its lock."""
        with self.locked(profile.name) as handle:
            handle.save(profile)

    def delete(self, name: str) -> bool:
        """Remove the profile; False when there was none. The lock file stays (see below)."""
        with self.locked(name) as handle:
            return handle.delete()

    def _remove_stale_temporaries(self, dir_fd: int, name: str) -> None:
        # A crash between creating a temporary file and renaming it leaves the file behind,
        # with a refresh token in it. Only the holder of name's lock writes ".name.*.tmp", and
        # the caller holds it: whatever is there is a dead writer's, and goes.
        prefix = f".{name}."
        for entry in os.listdir(dir_fd):
            if entry.startswith(prefix) and _TEMP.fullmatch(entry[len(prefix) :]):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry, dir_fd=dir_fd)

    def _write(self, dir_fd: int, profile: Profile) -> None:
        name = profile.name
        data = profile.to_json()
        try:
            self._remove_stale_temporaries(dir_fd, name)
        except OSError as e:
            raise ProfileError(f"cannot write profile {name!r}: {e.strerror}") from e
        tmp = f".{name}.{secrets.token_hex(8)}.tmp"
        # Created 0600 in one step (O_EXCL: never someone else's file, never a symlink).
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FILE_FLAGS
        try:
            fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
        except OSError as e:
            raise ProfileError(f"cannot write profile {name!r}: {e.strerror}") from e
        try:
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, f"{name}.json", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise ProfileError(f"cannot write profile {name!r}: {e.strerror}") from e
        os.fsync(dir_fd)  # the rename is durable only once the directory entry is on disk

    def _unlink(self, dir_fd: int, name: str) -> bool:
        # The .lock file is left in place: unlinking it while another process waits on it
        # would let a third process lock a new file and run beside the waiter.
        try:
            self._remove_stale_temporaries(dir_fd, name)
            os.unlink(f"{name}.json", dir_fd=dir_fd)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise ProfileError(f"cannot delete profile {name!r}: {e.strerror}") from e
        os.fsync(dir_fd)
        return True
