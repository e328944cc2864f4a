"""Bounded resources: the nonce store, the replay cache and the token cache keep a fixed size.

A hostile or merely busy peer controls how many distinct origins, ``jti`` values and cache keys
we see; memory must follow the configured limit, not the input. Two measurements per structure:

* a million distinct keys through the lightest public call, in a fresh subprocess, reading the
  process's *current* RSS (``/proc/self/statm``) after 10 % and after 100 % of the input: a
  bounded structure stays flat, an unbounded one grows by ~100 MB;
* ``tracemalloc`` in-process over a smaller run: bytes retained after 10x more input than the
  limit stay within a bound proportional to the limit.

The figures are printed (``pytest -s``) for the issue's closing note.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from dpop_hsm.errors import ReplayCacheFullError
from dpop_hsm.verify import ReplayCache

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 1000
MILLION = 1_000_000
RSS_GROWTH_BOUND = 24 * 1024 * 1024  # unbounded growth over 900k keys is >= 90 MB
RETAINED_PER_ENTRY = 1024  # generous bytes per retained entry for the tracemalloc bound

nonces = pytest.importorskip("dpop_hsm.nonces", reason="nonce store not landed")
token_mod = pytest.importorskip("dpop_hsm.token", reason="token client not landed")


# Each feeder: (set-up code, per-key statement) run in a fresh interpreter.
FEEDERS: dict[str, tuple[str, str]] = {
    "nonce_store": (
        f"from dpop_hsm.nonces import NonceStore\nstore = NonceStore(max_origins={LIMIT})",
        'store.put(f"https://h{i}.example", "nonce")',
    ),
    "replay_cache": (
        textwrap.dedent(
            f"""
            from dpop_hsm.errors import ReplayCacheFullError
            from dpop_hsm.verify import ReplayCache
            cache = ReplayCache(max_entries={LIMIT})
            def feed(i):
                # twice as many live jtis as the bound: half are refused (the cache fails
                # closed), the rest expire and leave as time moves on
                try:
                    cache.check_and_store(
                        f"jkt{{i}}:j", i + 2.0 * {LIMIT}, float(i), owner=f"jkt{{i}}"
                    )
                except ReplayCacheFullError:
                    pass
            """
        ),
        "feed(i)",
    ),
    "token_cache": (
        textwrap.dedent(
            f"""
            from dpop_hsm.token import CacheKey, Token, TokenCache
            cache = TokenCache(max_entries={LIMIT})
            token = Token(access_token="t" * 40, token_type="DPoP", expires_at=1e12,
                          renew_at=1e12, issued_at=0.0, lifetime=300.0, jkt="jkt")
            """
        ),
        'cache.put(CacheKey("https://as.example/token", f"client-{i}", None, (), "jkt"), token)',
    ),
}

_RUNNER = """
import json, os, sys, time
sys.path.insert(0, {root!r})
{setup}
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
marks = {{}}
started = time.perf_counter()
tenth = {count} // 10
for i in range({count}):
    {statement}
    if i + 1 == tenth:
        marks["rss_at_10pct"] = rss()
marks["rss_at_100pct"] = rss()
marks["seconds"] = time.perf_counter() - started
marks["entries"] = len({obj})
print(json.dumps(marks))
"""


def feed_million(kind: str) -> dict[str, Any]:
    setup, statement = FEEDERS[kind]
    obj = {"nonce_store": "store"}.get(kind, "cache")
    code = _RUNNER.format(root=str(ROOT), setup=setup, statement=statement, count=MILLION, obj=obj)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def report(request: pytest.FixtureRequest, line: str) -> None:
    """A line in pytest's own output, past output capture: the figures the hardening
    acceptance asks for (bounded memory under distinct keys)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    if capture is None or reporter is None:  # pragma: no cover - plugins disabled
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(line)


@pytest.fixture(scope="module")
def million_runs(request: pytest.FixtureRequest) -> dict[str, dict[str, Any]]:
    """All three feeds, two at a time (the box has two cores)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(FEEDERS, pool.map(feed_million, FEEDERS), strict=True))
    for kind, r in results.items():
        growth = r["rss_at_100pct"] - r["rss_at_10pct"]
        report(
            request,
            f"\n{kind}: {MILLION:,} distinct keys in {r['seconds']:.1f}s, entries kept "
            f"{r['entries']:,} (limit {LIMIT:,}), RSS {r['rss_at_10pct'] / 2**20:.1f} MiB at "
            f"100k -> {r['rss_at_100pct'] / 2**20:.1f} MiB at 1M "
            f"(growth {growth / 2**20:+.1f} MiB)",
        )
    return results


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "kind",
    ["nonce_store", "replay_cache", "token_cache"],
)
def test_a_million_distinct_keys_keep_memory_flat(
    kind: str, million_runs: dict[str, dict[str, Any]]
) -> None:
    run = million_runs[kind]
    assert run["entries"] <= LIMIT
    assert run["rss_at_100pct"] - run["rss_at_10pct"] < RSS_GROWTH_BOUND


def retained_bytes(make: Callable[[], Any], feed: Callable[[Any, int], None], count: int) -> int:
    """Bytes still allocated (tracemalloc) after ``count`` keys, structure alive."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        structure = make()
        for i in range(count):
            feed(structure, i)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(structure) <= LIMIT
    return after - before


def _replay(cache: ReplayCache, i: int) -> None:
    # As in the subprocess feed: twice the bound live at any time, so the cache both refuses
    # (full of live entries) and evicts (expired ones) all along.
    with contextlib.suppress(ReplayCacheFullError):
        cache.check_and_store(f"jkt{i}:j", i + 2.0 * LIMIT, float(i), owner=f"jkt{i}")


def _nonce(store: Any, i: int) -> None:
    store.put(f"https://h{i}.example", "nonce")


_TOKEN = None


def _token_cache() -> Any:
    return token_mod.TokenCache(max_entries=LIMIT)


def _token_put(cache: Any, i: int) -> None:
    global _TOKEN
    if _TOKEN is None:
        _TOKEN = token_mod.Token(
            access_token="t" * 40,
            token_type="DPoP",
            expires_at=1e12,
            renew_at=1e12,
            issued_at=0.0,
            lifetime=300.0,
            jkt="jkt",
        )
    cache.put(token_mod.CacheKey("https://as.example/token", f"c-{i}", None, (), "jkt"), _TOKEN)


@pytest.mark.parametrize(
    ("kind", "make", "feed"),
    [
        ("replay_cache", lambda: ReplayCache(max_entries=LIMIT), _replay),
        ("nonce_store", lambda: nonces.NonceStore(max_origins=LIMIT), _nonce),
        ("token_cache", _token_cache, _token_put),
    ],
)
def test_retained_memory_is_proportional_to_the_limit_not_the_input(
    request: pytest.FixtureRequest,
    kind: str,
    make: Callable[[], Any],
    feed: Callable[[Any, int], None],
) -> None:
    at_limit = retained_bytes(make, feed, LIMIT)
    at_20x = retained_bytes(make, feed, 20 * LIMIT)
    report(
        request,
        f"\n{kind}: retained {at_limit:,} B after {LIMIT:,} keys, "
        f"{at_20x:,} B after {20 * LIMIT:,}",
    )
    assert at_20x < LIMIT * RETAINED_PER_ENTRY
    assert at_20x < 1.5 * at_limit + 64 * 1024  # flat: 20x the input, about the same memory


def test_replay_cache_bound_refuses_rather_than_forget_a_live_entry() -> None:
    """RFC 9449 §11.1: a live jti is never evicted to make room; new ones are refused."""
    cache = ReplayCache(max_entries=3)
    for i in range(3):
        assert cache.check_and_store(f"j{i}", 1e12, 0.0)
    for i in range(3, 10):
        with pytest.raises(ReplayCacheFullError):
            cache.check_and_store(f"j{i}", 1e12, 0.0)
    assert len(cache) == 3
    assert not cache.check_and_store("j0", 1e12, 0.0)  # the oldest is still remembered
