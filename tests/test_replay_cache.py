"""The replay cache (RFC 9449 §11.1): bounded, fail-closed, each key's share bounded.

The attack these tests build: an attacker who captured one proof floods the verifier with cheap,
validly signed proofs from keys of their own until the cache is full. A cache that makes room by
evicting live entries then forgets the captured proof's ``jti`` and accepts it again; ours
refuses new proofs instead (ReplayCacheFullError, a 503) and keeps every live ``jti``.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from dpop_hsm.errors import (
    ConfigurationError,
    ReplayCacheFullError,
    ReplayError,
    ReplayKeyQuotaError,
    VerificationError,
)
from dpop_hsm.proof import ProofFactory
from dpop_hsm.signers.software import SoftwareSigner
from dpop_hsm.verify import NO_REPLAY_CHECK, ReplayCache, ReplayStore, verify_proof

NOW = 1_700_000_000.0
HTU = "https://rs.example/resource"
LIFETIME = 70.0  # max_age + 2 * leeway with verify_proof's defaults


def _verify(proof: str, cache: Any, now: float = NOW) -> None:
    verify_proof(proof, htm="GET", htu=HTU, now=now, replay_cache=cache)


def _factory(signer: SoftwareSigner | None = None) -> ProofFactory:
    return ProofFactory(signer or SoftwareSigner.generate("ES256"), clock=lambda: NOW)


# --- the flood, end to end through verify_proof ---------------------------------------------


def test_flood_of_attacker_keys_cannot_make_a_captured_proof_verify_again() -> None:
    cache = ReplayCache(max_entries=40, max_entries_per_key=5)
    captured = _factory().create("GET", HTU)
    _verify(captured, cache)  # the victim's request: accepted once
    flood_refused = 0
    for _ in range(10):  # ten attacker keys, each sending more than its share
        attacker = _factory()
        for _ in range(6):
            try:
                _verify(attacker.create("GET", HTU), cache)
            except ReplayCacheFullError:
                flood_refused += 1
    assert len(cache) == 40  # full of live entries ...
    assert flood_refused == 10 * 6 - 39
    with pytest.raises(ReplayError):  # ... and the captured proof's jti is still among them
        _verify(captured, cache)


def test_one_key_cannot_take_more_than_its_share() -> None:
    cache = ReplayCache(max_entries=100, max_entries_per_key=10)
    attacker, honest = _factory(), _factory()
    for _ in range(10):
        _verify(attacker.create("GET", HTU), cache)
    with pytest.raises(ReplayKeyQuotaError) as info:
        _verify(attacker.create("GET", HTU), cache)
    assert info.value.code == "replay_key_quota" and info.value.check == "jti"
    assert isinstance(info.value, ReplayCacheFullError)  # a server's 503 mapping covers both
    for _ in range(10):  # everyone else still gets their share
        _verify(honest.create("GET", HTU), cache)
    assert len(cache) == 20


def test_full_cache_error_is_a_typed_verification_error_with_retry_after() -> None:
    cache = ReplayCache(max_entries=3, max_entries_per_key=3)
    for i in range(3):
        assert cache.check_and_store(f"k{i}", NOW + 10.0 + i, NOW)
    with pytest.raises(ReplayCacheFullError) as info:
        cache.check_and_store("new", NOW + 60.0, NOW + 4.0)
    err = info.value
    assert type(err) is ReplayCacheFullError and isinstance(err, VerificationError)
    assert err.code == "replay_cache_full" and err.check == "jti"
    assert err.oauth_error == "temporarily_unavailable"
    assert err.retry_after == pytest.approx(6.0)  # the first entry expires at NOW + 10
    assert "new" not in str(err)


def test_flood_through_verify_proof_is_refused_once_full_and_accepted_after_expiry() -> None:
    cache = ReplayCache(max_entries=20, max_entries_per_key=20)
    factory = _factory()
    for _ in range(20):
        _verify(factory.create("GET", HTU), cache)
    late = _factory()
    with pytest.raises(ReplayCacheFullError):
        _verify(late.create("GET", HTU), cache)
    # Once the window has passed the old entries go, and new proofs (with a fresh iat) pass.
    later = NOW + LIFETIME
    fresh = ProofFactory(late.signer, clock=lambda: later).create("GET", HTU)
    _verify(fresh, cache, now=later)
    assert len(cache) == 1


# --- ReplayCache directly ---------------------------------------------------------------------


def test_full_of_live_entries_refuses_and_forgets_nothing() -> None:
    cache = ReplayCache(max_entries=100)
    for i in range(100):
        assert cache.check_and_store(f"k{i}", NOW + 60.0, NOW)
    for i in range(100, 1_000):
        with pytest.raises(ReplayCacheFullError):
            cache.check_and_store(f"k{i}", NOW + 60.0, NOW)
        assert len(cache) == 100
    for i in range(100):  # every live entry is still refused as a replay
        assert not cache.check_and_store(f"k{i}", NOW + 60.0, NOW)


def test_a_refused_key_was_not_recorded() -> None:
    cache = ReplayCache(max_entries=1)
    assert cache.check_and_store("a", NOW + 10.0, NOW)
    with pytest.raises(ReplayCacheFullError):
        cache.check_and_store("b", NOW + 10.0, NOW)
    assert cache.check_and_store("b", NOW + 30.0, NOW + 10.0)  # room again: b is new, not a replay


def test_replay_is_reported_before_full() -> None:
    cache = ReplayCache(max_entries=2, max_entries_per_key=1)
    assert cache.check_and_store("a", NOW + 10.0, NOW, owner="k1")
    assert cache.check_and_store("b", NOW + 10.0, NOW, owner="k2")
    assert not cache.check_and_store("a", NOW + 10.0, NOW, owner="k1")


def test_expiry() -> None:
    cache = ReplayCache()
    assert cache.check_and_store("a", 10.0, 0.0)
    assert not cache.check_and_store("a", 10.0, 5.0)
    assert cache.check_and_store("a", 30.0, 11.0)


def test_entries_leave_exactly_when_they_expire_whatever_the_insertion_order() -> None:
    """Proofs arrive with any iat in the window, so expiry order is not insertion order."""
    cache = ReplayCache(max_entries=3, max_entries_per_key=3)
    assert cache.check_and_store("long", NOW + 100.0, NOW)
    assert cache.check_and_store("short", NOW + 10.0, NOW)
    assert cache.check_and_store("mid", NOW + 50.0, NOW)
    assert cache.check_and_store("next", NOW + 90.0, NOW + 10.0)  # "short" made room
    assert not cache.check_and_store("long", NOW + 100.0, NOW + 60.0)  # "mid" went, "long" stays
    assert not cache.check_and_store("next", NOW + 90.0, NOW + 60.0)
    assert len(cache) == 2


def test_expired_entries_are_evicted_without_refusing() -> None:
    cache = ReplayCache(max_entries=1_000, max_entries_per_key=1_000)
    for i in range(1_000):
        assert cache.check_and_store(f"old{i}", NOW + 1.0, NOW, owner="k")
    for i in range(1_000):  # all old entries expired: the cache is empty for the new ones
        assert cache.check_and_store(f"new{i}", NOW + 61.0, NOW + 1.0, owner=f"k{i}")
    assert len(cache) == 1_000


def test_the_quota_frees_as_the_keys_entries_expire() -> None:
    cache = ReplayCache(max_entries=10, max_entries_per_key=2)
    assert cache.check_and_store("a", NOW + 5.0, NOW, owner="k")
    assert cache.check_and_store("b", NOW + 9.0, NOW, owner="k")
    with pytest.raises(ReplayKeyQuotaError) as info:
        cache.check_and_store("c", NOW + 9.0, NOW, owner="k")
    assert info.value.retry_after == pytest.approx(5.0)
    assert cache.check_and_store("c", NOW + 20.0, NOW + 5.0, owner="k")
    assert cache.check_and_store("d", NOW + 20.0, NOW + 5.0)  # no owner: no quota


def test_an_entry_already_expired_is_accepted_and_not_kept() -> None:
    cache = ReplayCache(max_entries=1)
    assert cache.check_and_store("a", NOW - 1.0, NOW)
    assert len(cache) == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"max_entries": 0}, {"max_entries": -1}, {"max_entries": True}, {"max_entries": 1.5},
     {"max_entries_per_key": 0}, {"max_entries_per_key": False}],
)  # fmt: skip
def test_bad_bounds_are_configuration_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        ReplayCache(**kwargs)


def test_default_share_is_a_quarter_and_never_above_the_bound() -> None:
    assert ReplayCache().max_entries == 100_000
    assert ReplayCache().max_entries_per_key == 25_000
    assert ReplayCache(max_entries=5).max_entries_per_key == 1
    assert ReplayCache(max_entries=5, max_entries_per_key=50).max_entries_per_key == 5


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_times_are_configuration_errors(value: float) -> None:
    cache = ReplayCache()
    with pytest.raises(ConfigurationError):
        cache.check_and_store("a", value, NOW)
    with pytest.raises(ConfigurationError):
        cache.check_and_store("a", NOW + 1.0, value)


# --- verify_proof's cache argument -----------------------------------------------------------


@pytest.mark.parametrize("bad", [False, True, 0, "off", {}])
def test_anything_but_a_store_none_or_the_sentinel_is_refused(bad: Any) -> None:
    """``replay_cache=False`` does not read as an opt-out; only NO_REPLAY_CHECK does."""
    proof = _factory().create("GET", HTU)
    with pytest.raises(ConfigurationError):
        _verify(proof, bad)
    _verify(proof, NO_REPLAY_CHECK)


def test_a_replay_store_of_ones_own_is_used_with_the_jkt_as_owner() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[str, float, float, str | None]] = []

        def check_and_store(
            self, key: str, expires_at: float, now: float, *, owner: str | None = None
        ) -> bool:
            self.calls.append((key, expires_at, now, owner))
            return len(self.calls) == 1

    store: ReplayStore = Recorder()
    signer = SoftwareSigner.generate("ES256")
    proof = _factory(signer).create("GET", HTU)
    _verify(proof, store)
    with pytest.raises(ReplayError):
        _verify(proof, store)
    key, expires_at, now, owner = store.calls[0]  # type: ignore[attr-defined]
    assert owner == signer.thumbprint and key.startswith(signer.thumbprint + ":")
    assert (expires_at, now) == (NOW + LIFETIME, NOW)


# --- threads ----------------------------------------------------------------------------------


def test_threads_unique_jtis() -> None:
    cache = ReplayCache(max_entries=1_000_000)
    results: list[bool] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        local = [cache.check_and_store(f"{t}-{i}", NOW + 60.0, NOW) for i in range(5_000)]
        with lock:
            results.extend(local)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 40_000 and all(results)
    assert len(cache) == 40_000


def test_threads_duplicates_accept_exactly_once() -> None:
    """Eight threads race on the same 2,000 keys: each key is accepted by exactly one of them."""
    cache = ReplayCache()
    accepted = [0] * 2_000
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        for i in range(2_000):
            if cache.check_and_store(f"dup-{i}", NOW + 60.0, NOW):
                with lock:
                    accepted[i] += 1

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert accepted == [1] * 2_000


def test_threads_flooding_a_full_cache_keep_the_bound_and_every_live_entry() -> None:
    cache = ReplayCache(max_entries=500, max_entries_per_key=500)
    accepted: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def worker(t: int) -> None:
        barrier.wait()
        for i in range(1_000):
            key = f"{t}-{i}"
            try:
                if cache.check_and_store(key, NOW + 60.0, NOW, owner=f"k{t}"):
                    with lock:
                        accepted.append(key)
            except ReplayCacheFullError:
                pass

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(accepted) == 500 == len(cache)
    assert not any(cache.check_and_store(key, NOW + 60.0, NOW) for key in accepted)


def test_verify_proof_threads_with_shared_cache() -> None:
    factory = _factory()
    proofs = [factory.create("GET", HTU) for _ in range(200)]
    cache = ReplayCache()
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        for proof in proofs:
            try:
                _verify(proof, cache)
                outcome = "ok"
            except ReplayError:
                outcome = "replay"
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("ok") == 200 and outcomes.count("replay") == 600
