"""A token cache in a directory for the worker processes of ONE host: no Redis needed.

``FileTokenCache(directory)`` is passed as ``TokenClient(…, cache=…)``; the semantics are
those of :class:`dpop_hsm.redis.RedisTokenCache` (see :mod:`dpop_hsm.shared_cache`): the same
validated entries, one renewal per cache key among all processes, waiters that adopt the
holder's token, and local renewal when the directory fails (one WARNING per outage).

The fleet lock is an ``fcntl.flock`` on one lock file per cache key, the way kubelogin locks
its token cache: the kernel releases it when the holder exits or dies, so a dead holder costs
nothing, and a hung one at most the lease (waiters then renew locally). ``flock`` is used, not
POSIX record locks, because those belong to the process and vanish when any of its file
descriptors to the file is closed. Local file systems only (flock over NFS is not atomic). A
forked child closes its copies of the parent's lock descriptors (else the child would hold the
parent's lock for as long as it lives).

Entries are written to a temporary file and renamed over the old one, so readers see a whole
entry or the previous one. Files are 0600 in a 0700 directory owned by this user; an entry
file that is not a regular file of ours with those permissions is ignored and replaced. The
entry's expiry is the writer's wall clock — one host, one clock. Waiters poll the entry (every
``poll_interval`` s): cheap local ``stat`` calls, no notifications to set up.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import tempfile
import threading
import time
from pathlib import Path

from .errors import ConfigurationError
from .jose import compact_json
from .shared_cache import (
    DEFAULT_BACKOFF,
    MAX_ENTRY,
    SharedLock,
    SharedTokenCache,
    Unavailable,
    entry_id,
)
from .strict_json import loads_strict
from .token import CacheKey, Token

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["FileTokenCache"]

_OPEN_FLAGS = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _owned_private(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & 0o077


class _FileLock(SharedLock):
    cache: FileTokenCache

    def __init__(
        self, cache: FileTokenCache, key: CacheKey, fd: int, current: Token | None
    ) -> None:
        super().__init__(cache, key, held=True, current=current)
        self.fd = fd

    def _publish(self, raw: bytes, ttl: float, release: bool) -> None:
        try:
            self.cache._write(self.key, raw, ttl)
        finally:
            if release:
                self._release()

    def _release(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            self.cache._close_lock(fd)  # closing the descriptor drops the flock

    def _extend(self) -> None:
        pass  # the kernel holds the lock as long as we live

    def release(self) -> None:
        # Local and non-blocking: release at once, even on an event loop.
        if self.held:
            self.held = False
            self._release()


class FileTokenCache(SharedTokenCache):
    """Tokens shared through files in ``directory`` (created 0700); see the module docstring.

    Raises :class:`ConfigurationError` when the directory is not a directory owned by this
    user, or cannot be created, or on a platform without ``fcntl``.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        lease: float | None = None,
        backoff: float = DEFAULT_BACKOFF,
        share_refresh_tokens: bool = False,
        share_nonces: bool = False,
        poll_interval: float = 0.02,
        max_entries: int = 1024,
    ) -> None:
        if fcntl is None:  # pragma: no cover
            raise ConfigurationError("FileTokenCache needs fcntl (POSIX)")
        self.directory = Path(directory)
        self._prepare_directory()
        self._lock_fds: set[int] = set()  # descriptors holding a flock now (see _after_fork)
        self._fds_lock = threading.Lock()
        super().__init__(
            what=f"directory {self.directory.name!r}",
            lease=lease,
            backoff=backoff,
            share_refresh_tokens=share_refresh_tokens,
            share_nonces=share_nonces,
            max_entries=max_entries,
            poll_interval=poll_interval,
        )

    def _prepare_directory(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.lstat(self.directory)
        except OSError as e:
            raise ConfigurationError(f"cannot create the token cache directory: {e}") from e
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigurationError("the token cache path is not a directory (or a symlink)")
        if st.st_uid != os.geteuid():
            raise ConfigurationError("the token cache directory belongs to another user")
        if st.st_mode & 0o077:
            os.chmod(self.directory, 0o700)  # tokens (and opt-in refresh tokens) are secrets

    def __repr__(self) -> str:
        return f"FileTokenCache({str(self.directory)!r})"

    def _after_fork(self) -> None:
        # The child's copies of lock descriptors (a renewal in another parent thread) would
        # keep the parent's flock alive as long as the child lives: closed here.
        super()._after_fork()
        for fd in self._lock_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._lock_fds = set()
        self._fds_lock = threading.Lock()

    def _path(self, name: str, suffix: str) -> Path:
        return self.directory / f"{name}{suffix}"

    # --- store primitives -----------------------------------------------------------------

    def _read_file(self, path: Path) -> bytes | None:
        try:
            fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                return b""  # a symlink planted in our directory: corrupt, gets replaced
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or not _owned_private(st):
                return b""
            if st.st_size > MAX_ENTRY:
                return b""
            with os.fdopen(fd, "rb", closefd=False) as f:
                return f.read(MAX_ENTRY + 1)
        finally:
            os.close(fd)

    def _write_file(self, path: Path, raw: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")  # 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _read(self, key: CacheKey) -> tuple[bytes, float | None] | None:
        raw = self._read_file(self._path(entry_id(key), ".json"))
        return None if raw is None else (raw, None)

    def _write(self, key: CacheKey, raw: bytes, ttl: float) -> None:
        self._write_file(self._path(entry_id(key), ".json"), raw)

    def _delete(self, key: CacheKey, expected: bytes | None) -> None:
        path = self._path(entry_id(key), ".json")
        if expected is not None and self._read_file(path) != expected:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def _open_lock(self, key: CacheKey) -> int:
        path = self._path(entry_id(key), ".lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o600)
        try:
            if not _owned_private(os.fstat(fd)):
                raise PermissionError("lock file is not ours with mode 0600")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _try_flock(self, key: CacheKey) -> int | None:
        """A descriptor holding the key's flock, or None when another holds it."""
        fd = self._open_lock(key)
        with self._fds_lock:
            self._lock_fds.add(fd)  # before it may hold the flock: a fork() then closes it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._close_lock(fd)
            return None
        except BaseException:
            self._close_lock(fd)
            raise
        return fd

    def _close_lock(self, fd: int) -> None:
        with self._fds_lock:
            if fd not in self._lock_fds:
                return  # closed by _after_fork: the number may be another file's now
            self._lock_fds.discard(fd)
        os.close(fd)

    def lock(self, key: CacheKey, lease: float) -> SharedLock:
        try:
            fd = self._guard(self._try_flock, key)
        except Unavailable:
            return SharedLock(self, key, held=False, available=False)
        if fd is None:
            return SharedLock(self, key, held=False, lease_left=lease)
        return _FileLock(self, key, fd, self.load(key))

    def wait_for_update(self, key: CacheKey, timeout: float) -> Token | None:
        end = time.monotonic() + timeout
        try:
            while True:
                token = self.load(key)
                if token is not None and not token.needs_renewal():
                    return token
                fd = self._guard(self._try_flock, key)
                if fd is not None:  # the holder is gone: released, or died
                    self._close_lock(fd)
                    return self.load(key)
                left = end - time.monotonic()
                if left <= 0:
                    return token
                time.sleep(min(self.poll_interval, left))
        except Unavailable:
            return None

    def _nonce_path(self, origin: str) -> Path:
        return self._path("nonce-" + hashlib.sha256(origin.encode()).hexdigest(), ".json")

    def _read_nonce(self, origin: str) -> str | None:
        raw = self._read_file(self._nonce_path(origin))
        if not raw:
            return None
        try:
            value = loads_strict(raw)
        except ValueError:
            return None
        if not isinstance(value, dict) or value.get("origin") != origin:
            return None
        nonce = value.get("nonce")
        return nonce if isinstance(nonce, str) else None

    def _write_nonce(self, origin: str, nonce: str) -> None:
        self._write_file(self._nonce_path(origin), compact_json({"origin": origin, "nonce": nonce}))
