"""A signer's pool of logged-in sessions, each with its own view of the key.

Object handles are per session, so each pooled :class:`Entry` carries the session, the key
object found from it, the raw handles for the ctypes hot path and a preallocated output buffer.
Entries are tagged with the *generation* they were opened in, ``(module generation, signer
epoch)``: a module re-initialization or a reconnect starts a new generation, and an entry from
an older one is dropped (never closed when the module was re-initialized: after ``C_Finalize``
its handle number may already belong to someone else's new session).

The fast path is lock-free: ``deque.append``/``pop`` are atomic in CPython. Only when no session
is idle does a thread take ``cond`` (to open one, or to wait for one). A waiter counts itself in
``waiting`` BEFORE its last look at the deque, and a releaser appends BEFORE it looks at
``waiting``, so no wake-up is lost.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from ...errors import SignerError
from .cryptoki import SignBuffer

__all__ = ["Entry", "SessionPool"]

Generation = tuple[int, int]


class Entry:
    """A pooled session and the key object as seen from it (handles are per session)."""

    __slots__ = ("buf", "generation", "key", "key_handle", "session", "session_handle")

    def __init__(self, session: Any, key: Any, generation: Generation) -> None:
        self.session = session
        self.key = key
        self.generation = generation
        # Raw handles for the ctypes fast path (Module.raw_signer).
        self.session_handle: int = session.handle
        self.key_handle: int = key.handle
        self.buf = SignBuffer()  # owned by whichever thread holds the entry


class SessionPool:
    """At most ``max_sessions`` open sessions; ``idle`` is the lock-free fast path."""

    def __init__(self, max_sessions: int) -> None:
        self.max = max_sessions
        self.idle: deque[Entry] = deque()
        self.cond = threading.Condition(threading.Lock())
        self.open = 0
        self.waiting = 0
        self.closed = False
        self.generation: Generation = (0, 0)

    def reserve(self) -> Entry | Generation:
        """Slow path: an idle entry, or the generation of a newly reserved slot to open.

        A caller that gets a generation must later :meth:`add` an entry or :meth:`forget` the
        slot. Raises SignerError once the pool is closed.
        """
        with self.cond:
            self.waiting += 1
            try:
                while True:
                    if self.closed:
                        raise SignerError("Pkcs11Signer is closed")
                    try:
                        return self.idle.pop()
                    except IndexError:
                        pass
                    if self.open < self.max:
                        self.open += 1
                        return self.generation
                    self.cond.wait(0.5)
            finally:
                self.waiting -= 1

    def connected(self, session: Any, key: Any, generation: Generation) -> None:
        """A (re)connect's first session: it opens ``generation`` and joins the pool."""
        with self.cond:
            self.generation = generation
            self.open += 1
            self.idle.append(Entry(session, key, generation))

    def release(self, entry: Entry) -> bool:
        """Back to the pool; False when the pool moved on or closed (the caller discards)."""
        if entry.generation == self.generation and not self.closed:
            self.idle.append(entry)
            if self.waiting:
                with self.cond:
                    self.cond.notify()
            return True
        return False

    def forget(self) -> None:
        """One open session fewer (closed, or abandoned after a module re-initialization)."""
        with self.cond:
            self.open -= 1
            self.cond.notify()

    def new_generation(self, module_generation: int, epoch: int) -> list[Entry]:
        """Start a generation; returns the idle entries of the old one for the caller to drop."""
        with self.cond:
            idle = list(self.idle)
            self.idle.clear()
            self.generation = (module_generation, epoch)
        return idle

    def close(self) -> list[Entry]:
        """Refuse new work; returns the idle entries for the caller to close."""
        with self.cond:
            self.closed = True
            idle = list(self.idle)
            self.idle.clear()
            self.cond.notify_all()
        return idle

    def after_fork(self) -> None:
        """In a forked child: fresh locks; the parent's sessions are dropped, never closed."""
        self.cond = threading.Condition(threading.Lock())
        self.idle.clear()
        self.open = 0
        self.waiting = 0
