"""A forked child gets working copies of the package's objects.

``fork()`` copies one thread: locks a parent thread held stay held in the child, and a thread
pool arrives without its threads. Each test forks with a pipe; the child runs the check, writes
its outcome and leaves with ``os._exit`` (never returning into pytest); the parent asserts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from dpop_hsm import _fork
from dpop_hsm.file_cache import FileTokenCache
from dpop_hsm.grants import RefreshTokenGrant
from dpop_hsm.nonces import NonceStore
from dpop_hsm.offload import SigningOffload
from dpop_hsm.shared_cache import SharedNonceStore
from dpop_hsm.signers.software import SoftwareSigner
from dpop_hsm.token import TokenCache

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")

CHILD_LIMIT = 30.0  # seconds: a child that has not answered by then hangs


def in_child(check: Callable[[], str]) -> str:
    """``check()`` in a forked child: its answer, or why there was none."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer, never return into pytest
        code = 1
        try:
            os.close(read_fd)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)  # not pytest-timeout's handler
            signal.alarm(int(CHILD_LIMIT))  # a hung child dies rather than outliving the test
            try:
                answer = check()
            except BaseException as e:  # the parent reports what it was
                answer = f"raised {type(e).__name__}: {e}"
            os.write(write_fd, answer.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], CHILD_LIMIT + 5)
        return os.read(read_fd, 4096).decode() if ready else "no answer"
    finally:
        os.close(read_fd)
        with contextlib.suppress(ProcessLookupError):  # it exited after answering
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


class _Device:
    """What SigningOffload reads of a signer: it blocks (an HSM), one signature at a time."""

    blocking = True
    concurrency = 1


def test_a_signing_offload_used_before_fork_signs_in_the_child() -> None:
    """The child kept the parent's pool without its thread; the pool's idle count said a
    worker was free, so it never started one and the child's first signature hung."""
    key = SoftwareSigner.generate("ES256")
    off = SigningOffload(_Device())
    assert asyncio.run(off.run(key.sign, b"parent"))  # the pool now has its one worker

    def sign() -> str:
        signature = asyncio.run(asyncio.wait_for(off.run(key.sign, b"child"), 10))
        return "signed" if signature else "empty"

    try:
        assert in_child(sign) == "signed"
    finally:
        off.close()


def test_locks_held_at_fork_time_are_fresh_in_the_child(tmp_path: Path) -> None:
    """A lock a parent thread holds at fork time is held for good in the child, where that
    thread does not exist: each of these objects re-arms its lock there."""
    store = NonceStore()
    grant = RefreshTokenGrant("rt-fork-1")
    cache = FileTokenCache(tmp_path / "cache", share_nonces=True)
    shared = SharedNonceStore(cache)
    off = SigningOffload(_Device())
    held = [store._lock, grant._lock, shared._guard_lock, off._lock]
    for lock in held:
        assert lock.acquire(blocking=False)

    def use() -> str:
        store.put("https://as.example/token", "n-1")
        grant.replace("rt-fork-2")
        free = [lock.acquire(timeout=2) for lock in (shared._guard_lock, off._lock)]
        return f"{store.get('https://as.example/x')} {grant.refresh_token} {free}"

    try:
        assert in_child(use) == "n-1 rt-fork-2 [True, True]"
    finally:
        for lock in held:
            lock.release()
        cache.close()


class _BrokenHook:
    def _after_fork(self) -> None:
        raise RuntimeError("this hook is broken")


def test_one_failing_fork_hook_does_not_stop_the_others() -> None:
    broken = _BrokenHook()
    _fork.register(broken)  # registered before the store: its hook runs first
    store = NonceStore()
    assert store._lock.acquire(blocking=False)
    try:
        assert in_child(lambda: str(store._lock.acquire(timeout=2))) == "True"
    finally:
        store._lock.release()
    del broken


@dataclass
class _LabelledCache(TokenCache):
    """A dataclass subclass: ``eq=True`` makes it unhashable and equal by value."""

    label: str = "same"

    def __post_init__(self) -> None:
        super().__init__()


def test_an_unhashable_dataclass_cache_constructs_and_each_is_re_armed_after_fork() -> None:
    """The registry was a WeakSet: construction raised TypeError (unhashable), and two equal
    caches would have been one entry, the other left with a held lock in the child."""
    first, second = _LabelledCache(), _LabelledCache()
    assert first == second and first is not second
    for cache in (first, second):
        assert cache._lock.acquire(blocking=False)

    def check() -> str:
        return str([cache._lock.acquire(timeout=2) for cache in (first, second)])

    try:
        assert in_child(check) == "[True, True]"
    finally:
        first._lock.release()
        second._lock.release()
