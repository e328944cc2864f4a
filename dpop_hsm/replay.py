"""The replay cache of the DPoP verifier: each ``jti`` accepted once per key (RFC 9449 §11.1).

Sans-IO and in-process. ``verify_proof`` consults it last, after every other check passed, so
only validly signed proofs for the request at hand reach it; what it must then withstand is a
flood of such proofs from keys an attacker made for the purpose. It never forgets a live
entry (that would re-open the replay window) and refuses instead, in constant time.
"""

from __future__ import annotations

import enum
import heapq
import math
import threading
from typing import Final, Protocol

from .errors import ConfigurationError, ReplayCacheFullError, ReplayKeyQuotaError

__all__ = [
    "NO_REPLAY_CHECK",
    "ReplayCache",
    "ReplayCheck",
    "ReplayStore",
    "default_replay_cache",
]


class ReplayStore(Protocol):
    """What ``verify_proof`` needs from a replay cache; :class:`ReplayCache` is the in-process one.

    A store shared by several worker processes implements the same contract: refuse a key seen
    before and not yet expired, never forget a live one, and fail closed (raise
    ReplayCacheFullError) rather than make room by dropping live entries.
    """

    def check_and_store(
        self, key: str, expires_at: float, now: float, *, owner: str | None = None
    ) -> bool:
        """Record ``key`` until ``expires_at``; False when it is already recorded and live."""
        ...


class ReplayCache:
    """Seen ``jti`` values until their proofs could no longer pass the ``iat`` window (§11.1).

    Bounded and fail-closed: an entry leaves only once it has expired, so a proof accepted once
    is refused for as long as it could pass the other checks. A cache full of live entries
    refuses new proofs with :class:`ReplayCacheFullError` (a server answers 503 with
    ``Retry-After``) instead of forgetting a live ``jti``: forgetting would let an attacker
    flood it with cheap proofs signed by their own key and then replay a captured one.

    ``owner`` (``verify_proof`` passes the proof's jkt) may hold at most
    ``max_entries_per_key`` live entries, a quarter of the cache by default, so one key —
    hostile, or a client stuck in a loop — cannot fill it for everyone: past its share its
    proofs get :class:`ReplayKeyQuotaError`. A quarter rather than less because one busy
    service client is a normal load for a resource server; raise it for a dedicated server.

    Sizing: an entry lives ``max_age + 2 * leeway`` after its ``iat`` (70 s with the
    defaults), so the default 100,000 entries (~27 MB) carry ~1,400 proofs/s per process, and
    one key ~350/s.

    Cost: a heap ordered by expiry. Storing is O(log n); refusing (replay, full, over quota)
    is O(1); expired entries are popped off the top as they fall due, each once, so no call
    ever scans the cache. Thread-safe.
    """

    def __init__(
        self, *, max_entries: int = 100_000, max_entries_per_key: int | None = None
    ) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ConfigurationError("max_entries must be a positive integer")
        per_key = max(1, max_entries // 4) if max_entries_per_key is None else max_entries_per_key
        if isinstance(per_key, bool) or not isinstance(per_key, int) or per_key < 1:
            raise ConfigurationError("max_entries_per_key must be a positive integer")
        self._max = max_entries
        self._per_key = min(per_key, max_entries)
        self._live: set[str] = set()
        self._expiry: list[tuple[float, str, str | None]] = []  # heap: (expires_at, key, owner)
        self._owned: dict[str, int] = {}  # owner -> live entries
        self._lock = threading.Lock()

    @property
    def max_entries(self) -> int:
        """The most live entries the cache holds before it refuses new proofs."""
        return self._max

    @property
    def max_entries_per_key(self) -> int:
        """The most live entries one ``owner`` (key thumbprint) may hold."""
        return self._per_key

    def __len__(self) -> int:
        return len(self._live)

    def _evict_expired(self, now: float) -> None:
        heap, live, owned = self._expiry, self._live, self._owned
        while heap and heap[0][0] <= now:
            _, key, owner = heapq.heappop(heap)
            live.discard(key)
            if owner is not None:
                left = owned[owner] - 1
                if left:
                    owned[owner] = left
                else:
                    del owned[owner]

    def _retry_after(self, now: float) -> float:
        return max(0.0, self._expiry[0][0] - now) if self._expiry else 0.0

    def check_and_store(
        self, key: str, expires_at: float, now: float, *, owner: str | None = None
    ) -> bool:
        """Record ``key`` until ``expires_at``; False when it was already recorded and is live.

        Raises ReplayKeyQuotaError when ``owner`` already holds its share of live entries, and
        ReplayCacheFullError when the cache is full of live entries; the key is not recorded.
        An entry already expired at ``now`` is accepted and not kept.
        """
        if not math.isfinite(expires_at) or not math.isfinite(now):
            raise ConfigurationError("expires_at and now must be finite numbers")
        with self._lock:
            self._evict_expired(now)
            if key in self._live:  # every entry left after the eviction is live
                return False
            if expires_at <= now:
                return True
            if owner is not None and self._owned.get(owner, 0) >= self._per_key:
                raise ReplayKeyQuotaError(
                    "jti",
                    f"this key already has {self._per_key} live proofs in the replay cache",
                    retry_after=self._retry_after(now),
                )
            if len(self._live) >= self._max:
                raise ReplayCacheFullError(
                    "jti",
                    f"the replay cache is full ({self._max} live proofs); try again later",
                    retry_after=self._retry_after(now),
                )
            heapq.heappush(self._expiry, (expires_at, key, owner))
            self._live.add(key)
            if owner is not None:
                self._owned[owner] = self._owned.get(owner, 0) + 1
            return True


class ReplayCheck(enum.Enum):
    """The explicit opt-out of replay checking: ``verify_proof(..., replay_cache=NO_REPLAY_CHECK)``.

    Replay checking is on unless a caller writes this name (RFC 9449 §11.1): a verifier that
    forgets to pass a cache still refuses replays, and a reader of the call sees when it is off.
    """

    DISABLED = "no replay check"


NO_REPLAY_CHECK: Final = ReplayCheck.DISABLED
"""``replay_cache=NO_REPLAY_CHECK``: accept a proof however often it is presented. Only for
callers that check ``jti`` themselves (e.g. in a store shared by several worker processes)."""

_DEFAULT_REPLAY_CACHE = ReplayCache()


def default_replay_cache() -> ReplayCache:
    """The process-wide cache ``verify_proof`` uses when no ``replay_cache`` is given.

    One per process, bounded like any :class:`ReplayCache` (100,000 entries). Servers running
    several worker processes see each other's proofs only through a shared store of their own.
    """
    return _DEFAULT_REPLAY_CACHE
