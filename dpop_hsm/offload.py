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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["SigningOffload", "signer_blocks", "signer_concurrency"]

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
