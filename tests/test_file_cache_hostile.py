"""FileTokenCache against what may sit in (or happen to) its directory, with real files,
flocks and fork().

Planted files (a FIFO, a symlink, a directory, another user's file, a truncated entry) must
never be trusted, hang a reader or switch sharing off; the directory swapped for a symlink after
the cache opened it must never receive a token; a fork() during a renewal must leave the child
neither the parent's lock nor a renewal that never ends.
"""

from __future__ import annotations

import json
import os
import select
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dpop_hsm.errors import ConfigurationError
from dpop_hsm.file_cache import FileTokenCache
from dpop_hsm.shared_cache import SharedLock, decode_entry, entry_id
from dpop_hsm.signers.software import SoftwareSigner
from dpop_hsm.testing import LocalDPoPServers
from dpop_hsm.token import Renewal
from tests.support.caches import CACHE_CLIENT_SECRET, cache_client, cache_servers

SECRET = CACHE_CLIENT_SECRET
NOBODY = 65534


@pytest.fixture
def servers() -> Iterator[LocalDPoPServers]:
    with cache_servers() as srv:
        yield srv


@pytest.fixture(scope="module")
def signer() -> SoftwareSigner:
    return SoftwareSigner.generate("ES256")


_client = cache_client


def _in_thread(fn: Any) -> Any:
    """``fn()`` in a daemon thread, joined with a hang guard: a hang fails, not blocks, the run."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), "hung"
    assert result, "raised (see the thread's traceback above)"
    return result[0]


def test_a_fifo_under_the_entry_name_never_hangs_a_reader(
    tmp_path: Path, servers: LocalDPoPServers, signer: SoftwareSigner
) -> None:
    """open(O_RDONLY) of a FIFO waits for a writer: a FIFO planted under an entry's name (one
    of ours, 0600, passes every owner check) hung every process's renewal for good."""
    directory = tmp_path / "cache"
    cache = FileTokenCache(directory)
    client = _client(servers, signer, cache)
    entry = directory / f"{entry_id(client.cache_key)}.json"
    os.mkfifo(entry, 0o600)
    token = _in_thread(client.get_token)
    assert entry.is_file() and not entry.is_fifo()  # replaced by the renewal's entry
    decoded = decode_entry(client.cache_key, entry.read_bytes())
    assert decoded is not None and decoded.token.access_token == token.access_token


@pytest.mark.parametrize("kind", ["symlink", "world-readable", "other user", "directory"])
def test_a_foreign_lock_file_is_replaced_and_sharing_goes_on(
    tmp_path: Path,
    servers: LocalDPoPServers,
    signer: SoftwareSigner,
    kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A lock file that is not a 0600 regular file of ours (say, planted while the directory
    was open to others) made every lock attempt fail: an outage WARNING, then no sharing for
    that key for good (each process fetched its own token)."""
    directory = tmp_path / "cache"
    first_cache = FileTokenCache(directory)
    first = _client(servers, signer, first_cache)
    lock = directory / f"{entry_id(first.cache_key)}.lock"
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    if kind == "symlink":
        lock.symlink_to(target)
    elif kind == "directory":
        lock.mkdir()
    else:
        lock.write_bytes(b"")
        os.chmod(lock, 0o644 if kind == "world-readable" else 0o600)
        if kind == "other user":
            if os.geteuid() != 0:
                pytest.skip("planting another user's file needs root")
            os.chown(lock, NOBODY, NOBODY)
    token = first.get_token()
    second = _client(servers, signer, FileTokenCache(directory)).get_token()
    assert second.access_token == token.access_token
    assert servers.counters.tokens_issued == 1
    assert first_cache.outage.stats["outages"] == 0
    assert not any("unavailable" in r.getMessage() for r in caplog.records)
    st = os.lstat(lock)
    assert lock.is_file() and not lock.is_symlink() and st.st_uid == os.geteuid()
    assert st.st_mode & 0o777 == 0o600
    assert target.read_bytes() == b""  # what the symlink pointed to was never touched


def test_a_directory_under_the_entry_name_is_moved_aside(
    tmp_path: Path, servers: LocalDPoPServers, signer: SoftwareSigner
) -> None:
    """rename() cannot replace a directory with a file: a directory at an entry's name made
    every publish fail, an outage for good."""
    directory = tmp_path / "cache"
    cache = FileTokenCache(directory)
    client = _client(servers, signer, cache)
    entry = directory / f"{entry_id(client.cache_key)}.json"
    entry.mkdir()
    (entry / "inside").write_bytes(b"someone's")
    token = client.get_token()
    assert cache.outage.stats["outages"] == 0
    decoded = decode_entry(client.cache_key, entry.read_bytes())
    assert decoded is not None and decoded.token.access_token == token.access_token
    aside = [p for p in directory.iterdir() if p.name.startswith(".foreign-")]
    assert len(aside) == 1 and (aside[0] / "inside").read_bytes() == b"someone's"


def test_a_directory_swapped_for_a_symlink_later_never_receives_a_token(
    tmp_path: Path, servers: LocalDPoPServers, signer: SoftwareSigner
) -> None:
    """The directory was checked once, by path, and then used by path: whoever can rename in
    its parent could move it away and put a symlink to a directory of theirs in its place, and
    every token was written there."""
    directory, moved, theirs = tmp_path / "cache", tmp_path / "moved", tmp_path / "theirs"
    cache = FileTokenCache(directory)
    theirs.mkdir(mode=0o777)
    directory.rename(moved)
    directory.symlink_to(theirs)
    client = _client(servers, signer, cache)
    client.get_token()
    assert list(theirs.iterdir()) == []
    assert (moved / f"{entry_id(client.cache_key)}.json").is_file()
    cache.close()


def test_a_truncated_entry_is_ignored_and_rewritten_whole(
    tmp_path: Path,
    servers: LocalDPoPServers,
    signer: SoftwareSigner,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What a crash of a writer that does not rename (or a power loss) leaves: half an entry.
    Our writer renames a whole temporary file over the entry, so a reader sees the old entry or
    the new one, never a part."""
    directory = tmp_path / "cache"
    first = _client(servers, signer, FileTokenCache(directory))
    first.get_token()
    entry = directory / f"{entry_id(first.cache_key)}.json"
    whole = entry.read_bytes()
    entry.write_bytes(whole[: len(whole) // 2])
    other = _client(servers, signer, FileTokenCache(directory))
    token = other.get_token()
    assert servers.counters.tokens_issued == 2  # the half entry was not trusted
    assert any("corrupt or foreign" in r.getMessage() for r in caplog.records)
    assert json.loads(entry.read_bytes())["access_token"] == token.access_token
    assert [p.name for p in directory.iterdir() if p.name.startswith(".tmp-")] == []


def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("making another user's directory needs root")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(ConfigurationError, match="another user"):
        FileTokenCache(theirs)


def test_a_world_writable_directory_is_closed_before_the_first_token(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o1777)
    FileTokenCache(loose)
    assert loose.stat().st_mode & 0o7777 == 0o700


def _answer(fd: int) -> bytes:
    ready, _, _ = select.select([fd], [], [], 10)
    assert ready, "the child did not answer"
    return os.read(fd, 200)


def test_fork_during_a_renewal_leaves_the_child_no_lock_and_no_stuck_renewal(
    tmp_path: Path, servers: LocalDPoPServers, signer: SoftwareSigner
) -> None:
    """fork() copies one thread. A child forked while another thread renewed (1) kept a copy of
    that thread's lock descriptor, holding the fleet lock for as long as it lived, and (2) saw
    the client's renewal slot taken by a thread it does not have: it waited out every request's
    timeout and failed, for good."""
    directory = tmp_path / "cache"
    cache = FileTokenCache(directory)
    client = _client(servers, signer, cache)
    servers.token_delay = 1.0  # the renewal is at the AS when we fork
    renewer = threading.Thread(target=client.get_token, daemon=True)
    renewer.start()
    deadline = time.monotonic() + 10
    while servers.counters.token_requests < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert servers.counters.token_requests >= 1, "the renewal never reached the AS"
    answer_r, answer_w = os.pipe()  # child -> parent
    exit_r, exit_w = os.pipe()  # parent -> child: "you may exit now"
    pid = os.fork()
    if pid == 0:  # the child: answer, wait to be told, never return into pytest
        code = 1
        try:
            slot = client.try_acquire()
            os.write(answer_w, b"free" if isinstance(slot, Renewal) else b"taken")
            _answer(exit_r)
            code = 0
        finally:
            os._exit(code)
    try:
        assert _answer(answer_r) == b"free"
        renewer.join(timeout=10)
        assert not renewer.is_alive()
        # The child still lives: yet the parent's released lock is free for the next process.
        other = FileTokenCache(directory)
        attempt = other.lock(client.cache_key, 1.0)
        assert attempt.held
        attempt.release()
    finally:
        os.write(exit_w, b"exit")
        os.waitpid(pid, 0)
        for fd in (answer_r, answer_w, exit_r, exit_w):
            os.close(fd)


@pytest.mark.parametrize("suffix", [".json", ".lock"])
def test_a_socket_under_an_entry_or_lock_name_is_replaced_not_an_outage(
    tmp_path: Path,
    servers: LocalDPoPServers,
    signer: SoftwareSigner,
    suffix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """open() of a unix socket fails with ENXIO: re-raised, it made load() or lock() an outage,
    the back-off skipped the store that would have replaced it, and sharing never resumed."""
    import socket

    directory = tmp_path / "cache"
    cache = FileTokenCache(directory)
    client = _client(servers, signer, cache)
    planted = socket.socket(socket.AF_UNIX)
    try:
        monkeypatch.chdir(directory)  # a relative name: the full path is over AF_UNIX's limit
        planted.bind(f"{entry_id(client.cache_key)}{suffix}")
        token = _in_thread(client.get_token)
        assert not cache.outage.down and cache.outage.stats["failures"] == 0
        newcomer = _client(servers, signer, FileTokenCache(directory))
        assert _in_thread(newcomer.get_token).access_token == token.access_token  # shared
        assert servers.counters.tokens_issued == 1
    finally:
        planted.close()


class _PausedOpenCache(FileTokenCache):
    """A file cache whose lock-file open pauses once, after the open, for the test: a fork
    can then be started while a descriptor is open but perhaps not yet recorded."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.opened = threading.Event()
        self.proceed = threading.Event()

    def _open_lock(self, name: str) -> int | None:
        fd = super()._open_lock(name)
        if not self.opened.is_set():
            self.opened.set()
            assert self.proceed.wait(10)
        return fd


def test_a_fork_while_a_lock_file_is_being_opened_leaves_the_child_no_copy_of_it(
    tmp_path: Path, servers: LocalDPoPServers, signer: SoftwareSigner
) -> None:
    """The lock file was opened, then recorded: a child forked in between kept an unrecorded
    copy of the descriptor, and with it the flock the parent took next, for as long as the
    child lived. Now fork() waits for the open+record step."""
    directory = tmp_path / "cache"
    cache = _PausedOpenCache(directory)
    key = _client(servers, signer, cache).cache_key
    taken: list[SharedLock] = []
    locker = threading.Thread(target=lambda: taken.append(cache.lock(key, 5.0)))
    locker.start()
    assert cache.opened.wait(10)
    answer_r, answer_w = os.pipe()  # child -> parent
    exit_r, exit_w = os.pipe()  # parent -> child: "you may exit now"
    pids: list[int] = []

    def fork() -> None:  # waits in fork() for the locker's step (once fixed)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.write(answer_w, b"forked")
                _answer(exit_r)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)

    forker = threading.Thread(target=fork)
    forker.start()
    # Ordering only, asserted nowhere: on the old code the fork happens right away, in the gap;
    # fixed, it waits for the step, which goes on now.
    time.sleep(0.2)
    cache.proceed.set()
    try:
        locker.join(timeout=10)
        forker.join(timeout=10)
        assert len(taken) == 1 and taken[0].held and pids
        assert _answer(answer_r) == b"forked"
        taken[0].release()
        # The child still lives: yet the released lock is free for the next process.
        attempt = FileTokenCache(directory).lock(key, 1.0)
        assert attempt.held, "the forked child kept the parent's flock"
        attempt.release()
    finally:
        os.write(exit_w, b"exit")
        for pid in pids:
            os.waitpid(pid, 0)
        for fd in (answer_r, answer_w, exit_r, exit_w):
            os.close(fd)
