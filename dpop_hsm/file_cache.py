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

The directory is opened once (``O_NOFOLLOW``), checked (a directory of this user; made 0700
if it was not) and every file is then opened relative to that descriptor, so renaming the
directory away or swapping a symlink in later never sends a token elsewhere. Entries are
written to a temporary file and renamed over the old one, so readers see a whole entry or the
previous one; a crash mid-write leaves the old entry and a ``.tmp-`` file. Files are 0600; an
entry or lock file that is not a regular file of ours with that mode (a symlink, a FIFO, a
directory, another user's file planted while the directory was open to others) is never
trusted nor waited on: it is replaced. The entry's expiry is the writer's wall clock — one
host, one clock. Waiters poll the entry (every ``poll_interval`` s): cheap local ``stat``
calls, no notifications to set up.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
import threading
import time
import weakref
from pathlib import Path

from .errors import ConfigurationError
from .shared_cache import (
    DEFAULT_BACKOFF,
    MAX_ENTRY,
    SharedLock,
    SharedTokenCache,
    Unavailable,
    entry_id,
)
from .shared_entry import store_json
from .strict_json import loads_strict
from .token import CacheKey, Token

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["FileTokenCache"]

# O_NONBLOCK: opening a FIFO planted under an entry's name must not wait for a writer.
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
# What opening a name of ours answers when someone planted another kind of file there.
_FOREIGN_ERRNOS = frozenset({errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.EACCES, errno.EPERM})


def _owned_private(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


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
    user, or cannot be created, or on a platform without ``fcntl``. :meth:`close` (or garbage
    collection) closes the directory's descriptor.
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
        self._dir = self._open_directory()
        self._close_dir = weakref.finalize(self, os.close, self._dir)
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

    def _open_directory(self) -> int:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | _OPEN_FLAGS)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise ConfigurationError(
                    "the token cache path is not a directory (or a symlink)"
                ) from e
            raise ConfigurationError(f"cannot create the token cache directory: {e}") from e
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                raise ConfigurationError("the token cache directory belongs to another user")
            if stat.S_IMODE(st.st_mode) != 0o700:
                os.fchmod(fd, 0o700)  # tokens (and opt-in refresh tokens) are secrets
        except BaseException:
            os.close(fd)
            raise
        return fd

    def close(self) -> None:
        """Close the directory's descriptor; the cache is not used afterwards."""
        self._close_dir()
        self._dir = -1  # never a reused descriptor number: any later use fails (EBADF)

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
        self._fds_lock = threading.Lock()  # the copy is held (by _before_fork): a new one

    def _before_fork(self) -> None:
        # fork() waits for an open+record or discard+close step in another thread, so the
        # child's set names exactly the lock descriptors it has.
        self._fds_lock.acquire()

    def _after_fork_in_parent(self) -> None:
        self._fds_lock.release()

    @staticmethod
    def _name(key: CacheKey, suffix: str) -> str:
        return f"{entry_id(key)}{suffix}"

    # --- files, relative to the directory's descriptor ------------------------------------

    def _read_file(self, name: str) -> bytes | None:
        try:
            fd = os.open(name, os.O_RDONLY | _OPEN_FLAGS, dir_fd=self._dir)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno in _FOREIGN_ERRNOS:
                # A symlink, socket, directory or file we may not open, planted under our
                # name: foreign, so it is replaced — never an outage that would stop sharing.
                return b""
            raise
        try:
            st = os.fstat(fd)
            if not _owned_private(st) or st.st_size > MAX_ENTRY:
                return b""
            with os.fdopen(fd, "rb", closefd=False) as f:
                return f.read(MAX_ENTRY + 1)
        finally:
            os.close(fd)

    def _new_file(self, raw: bytes) -> str:
        """A new 0600 file of ours holding ``raw``, under a temporary name."""
        tmp = f".tmp-{secrets.token_hex(8)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS
        fd = os.open(tmp, flags, 0o600, dir_fd=self._dir)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask: a lock file must open read-write
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self._dir)
            raise
        return tmp

    def _install(self, tmp: str, name: str) -> None:
        """Rename ``tmp`` over ``name`` (atomic); a directory planted there is moved aside."""
        d = self._dir
        try:
            try:
                os.replace(tmp, name, src_dir_fd=d, dst_dir_fd=d)
            except IsADirectoryError:
                os.rename(name, f".foreign-{secrets.token_hex(8)}", src_dir_fd=d, dst_dir_fd=d)
                os.replace(tmp, name, src_dir_fd=d, dst_dir_fd=d)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=d)
            raise

    def _write_file(self, name: str, raw: bytes) -> None:
        self._install(self._new_file(raw), name)

    # --- store primitives -----------------------------------------------------------------

    def _read(self, key: CacheKey) -> tuple[bytes, float | None] | None:
        raw = self._read_file(self._name(key, ".json"))
        return None if raw is None else (raw, None)

    def _write(self, key: CacheKey, raw: bytes, ttl: float) -> None:
        self._write_file(self._name(key, ".json"), raw)

    def _delete(self, key: CacheKey, expected: bytes | None) -> None:
        name = self._name(key, ".json")
        if expected is not None and self._read_file(name) != expected:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self._dir)

    def _open_lock(self, name: str) -> int | None:
        """A descriptor of the lock file ``name`` (created 0600), or None if what is there
        is not a regular file of ours with that mode (the caller replaces it)."""
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o600, dir_fd=self._dir)
        except OSError as e:
            if e.errno in _FOREIGN_ERRNOS:
                return None  # a symlink, socket, directory or file we may not open
            raise
        try:
            if _owned_private(os.fstat(fd)):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        return None

    def _replace_lock_file(self, name: str) -> None:
        """Put a fresh lock file of ours where a foreign one is: once, whoever sees it first.

        Under a flock on the directory (a descriptor of its own, so threads exclude each other
        too), and only if it is still foreign then: replacing a lock file another process of
        ours has locked would let a second one take the "same" lock.
        """
        guard = os.open(".", os.O_RDONLY | os.O_DIRECTORY | _OPEN_FLAGS, dir_fd=self._dir)
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
            fd = self._open_lock(name)
            if fd is not None:
                os.close(fd)  # someone replaced it already
                return
            self._install(self._new_file(b""), name)
        finally:
            os.close(guard)

    def _try_flock(self, key: CacheKey) -> int | None:
        """A descriptor holding the key's flock, or None when another holds it."""
        name = self._name(key, ".lock")
        fd = self._open_recorded(name)
        if fd is None:
            self._replace_lock_file(name)  # not under _fds_lock: it may wait for a flock
            fd = self._open_recorded(name)
            if fd is None:
                raise OSError(errno.EAGAIN, "the lock file keeps being replaced")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._close_lock(fd)
            return None
        except BaseException:
            self._close_lock(fd)
            raise
        return fd

    def _open_recorded(self, name: str) -> int | None:
        """:meth:`_open_lock`, recorded in ``_lock_fds`` before it may hold the flock.

        Opened and recorded as one step (fork() waits for it, see _before_fork): a child forked
        in between would keep an unrecorded copy, and with it the flock taken next.
        """
        with self._fds_lock:
            fd = self._open_lock(name)
            if fd is not None:
                self._lock_fds.add(fd)
            return fd

    def _close_lock(self, fd: int) -> None:
        with self._fds_lock:
            if fd not in self._lock_fds:
                return  # closed by _after_fork: the number may be another file's now
            self._lock_fds.discard(fd)
            os.close(fd)  # inside: a child forked before the close would keep an unrecorded copy

    def lock(self, key: CacheKey, lease: float) -> SharedLock:
        try:
            fd = self._guard(self._try_flock, key)
        except Unavailable:
            return SharedLock(self, key, held=False, available=False)
        if fd is None:
            return SharedLock(self, key, held=False, lease_left=lease)
        lock = _FileLock(self, key, fd, None)
        try:  # the re-read; from here on the lock is released whatever happens
            lock.current = self.load(key)
        except BaseException:
            lock.release()
            raise
        return lock

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

    def _nonce_name(self, origin: str) -> str:
        return "nonce-" + hashlib.sha256(origin.encode()).hexdigest() + ".json"

    def _read_nonce(self, origin: str) -> str | None:
        raw = self._read_file(self._nonce_name(origin))
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
        self._write_file(self._nonce_name(origin), store_json({"origin": origin, "nonce": nonce}))
