"""Where a signature runs under asyncio: inline when it cannot block, else in a bounded pool.

A software ECDSA P-256 signature takes ~25 µs; a hop to a worker thread and back costs more
than that, so signers that never block (``blocking = False``, e.g. ``SoftwareSigner``) sign on
the event loop. A YubiKey, an HSM or a TPM may take 10-100+ ms (or wait for a touch): those
signatures go to a thread pool of the signer's own, sized to what the device can do at once
(its ``concurrency`` member, e.g. a PKCS#11 session pool; 4 when it does not say), so 64 tasks
queue fairly in FIFO order instead of starving the default executor that DNS lookups and
other libraries share. A signer without a ``blocking`` member is assumed to block: the
``Signer`` protocol stays structural, and a wrong guess costs speed, never a stalled loop.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from . import _fork
from .resource_flow import FlowAdapter, RedirectPolicy

if TYPE_CHECKING:
    from .token import TokenClient

__all__ = [
    "AsyncFlowAdapter",
    "LoopLocks",
    "SigningOffload",
    "signer_blocks",
    "signer_concurrency",
]

T = TypeVar("T")
DEFAULT_CONCURRENCY = 4


def signer_blocks(signer: object) -> bool:
    """Whether ``signer.sign()`` may block (default: yes)."""
    return bool(getattr(signer, "blocking", True))


def signer_concurrency(signer: object) -> int:
    """How many signatures the signer's device can work on at once (default 4)."""
    value = getattr(signer, "concurrency", None)
    return value if isinstance(value, int) and value >= 1 else DEFAULT_CONCURRENCY


class SigningOffload:
    """Runs signing steps for one signer from async code without stalling the event loop."""

    def __init__(self, signer: object) -> None:
        self.inline = not signer_blocks(signer)
        self._workers = signer_concurrency(signer)
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        _fork.register(self)

    def _after_fork(self) -> None:
        """In a forked child: a new pool on first use. The parent's pool came without its
        threads, yet its idle count says a worker is free, so it would never start one and the
        first signature would wait forever. Dropped, not shut down (its threads are not here)."""
        self._lock = threading.Lock()
        self._executor = None

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=self._workers, thread_name_prefix="dpop_hsm-sign"
                )
            return self._executor

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``: inline for a non-blocking signer, else in the signer's pool."""
        if self.inline:
            return fn(*args)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # trio or another anyio backend (httpx brings anyio)
            import anyio.to_thread

            return await anyio.to_thread.run_sync(fn, *args)
        return await loop.run_in_executor(self._pool(), fn, *args)

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)


class LoopLocks:
    """One ``asyncio.Lock`` per event loop (a lock is bound to the loop that first awaits it),
    so tasks of each loop queue for a token renewal without blocking any loop."""

    def __init__(self) -> None:
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )

    def current(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks.setdefault(loop, asyncio.Lock())
        return lock


class AsyncFlowAdapter(FlowAdapter):
    """An async adapter's state: the flow, the signer's offload policy, per-loop renewal locks."""

    def __init__(
        self,
        token_client: TokenClient,
        *,
        raise_on_rejection: bool = False,
        cross_origin_redirects: RedirectPolicy = "strip",
    ) -> None:
        super().__init__(
            token_client,
            raise_on_rejection=raise_on_rejection,
            cross_origin_redirects=cross_origin_redirects,
        )
        self.token_client = token_client
        self._offload = SigningOffload(token_client.signer)
        self._loop_locks = LoopLocks()
