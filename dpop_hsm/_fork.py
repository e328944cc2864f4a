"""The one place that re-arms this package's objects in a forked child.

``fork()`` copies the calling thread only: a lock another thread held at fork time stays held
for good in the child, a renewal another thread ran never ends there, and a thread pool keeps
its bookkeeping without its threads (its idle count says a worker is free, so it never starts
one, and the first job waits forever). Every object with such state registers here and gets
its ``_after_fork()`` called in the child, before the child runs any code of its own.

Registered by identity (``id``), not by hash: a ``@dataclass`` subclass (``eq=True`` makes it
unhashable) must register too, and two equal objects are still two objects to re-arm. The
registry holds weak references, so registering keeps nothing alive. One failing hook is
logged and never stops the others. Imports nothing of the package (no import cycle).

An object that must not be forked in the middle of a step (a descriptor opened but not yet
recorded) may also define ``_before_fork()`` (take its lock: the fork waits for the step) and
``_after_fork_in_parent()`` (release it); the child's ``_after_fork()`` replaces that lock.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Protocol

__all__ = ["ForkAware", "register"]

log = logging.getLogger("dpop_hsm.fork")


class ForkAware(Protocol):
    def _after_fork(self) -> None:
        """In a forked child: fresh locks, no state of threads that stayed in the parent."""


# Insertion order is kept, so a cache is re-armed before the client created with it.
_REGISTRY: weakref.WeakValueDictionary[int, ForkAware] = weakref.WeakValueDictionary()


def register(obj: ForkAware) -> None:
    """Have ``obj._after_fork()`` called in every child forked while ``obj`` lives."""
    _REGISTRY[id(obj)] = obj  # a dead object's entry goes before its id can be reused


# The objects whose _before_fork ran for the fork in progress: only those resume in the parent
# (one created meanwhile, or one whose hook raised, holds nothing to release).
_prepared: list[object] = []


def _before_fork() -> None:
    _prepared.clear()
    for obj in list(_REGISTRY.values()):
        before = getattr(obj, "_before_fork", None)
        if before is None:
            continue
        try:
            before()
        except Exception:
            log.exception("preparing %s for fork() failed", type(obj).__name__)
        else:
            _prepared.append(obj)


def _after_fork_in_parent() -> None:
    prepared = _prepared[::-1]
    _prepared.clear()
    for obj in prepared:
        try:
            obj._after_fork_in_parent()  # type: ignore[attr-defined] # it has _before_fork
        except Exception:
            log.exception("resuming %s after fork() failed", type(obj).__name__)


def _after_fork_in_child() -> None:
    _prepared.clear()  # the child replaces those locks in _after_fork
    for obj in list(_REGISTRY.values()):
        try:
            obj._after_fork()
        except Exception:  # one broken hook must not leave the others' locks held
            log.exception("re-arming %s after fork() failed", type(obj).__name__)


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
