"""dpop_hsm benchmark: raw signing rate vs proof creation rate on the SAME key, in ONE run.

The two measurements are interleaved in several short rounds and the median of the per-round
ratios is reported, so CPU frequency changes and noisy neighbours hit both sides equally.
Backends written elsewhere plug in as ``scripts/bench_<name>.py:bench_<name>(seconds)`` returning
``list[tuple[str, float]]``; a missing module or a failure prints one line and the run goes on.
Speed is measured only here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

Row = tuple[str, float]
TARGET_RATIO = 0.6


def _rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``fn`` over roughly ``seconds`` (batched to keep timer overhead out)."""
    batch = 1
    while True:  # size a batch to ~5 ms
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed > 0.005:
            break
        batch *= 2
    calls = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(batch):
            fn()
        calls += batch
        now = time.perf_counter()
        if now >= deadline:
            return calls / (now - start)


def _interleaved(
    raw: Callable[[], object], proof: Callable[[], object], seconds: float, rounds: int = 7
) -> tuple[float, float, float]:
    """Median raw rate, median proof rate and median per-round ratio."""
    per = seconds / (2 * rounds)
    raws, proofs, ratios = [], [], []
    for i in range(rounds):
        if i % 2:  # alternate the order so neither side always runs on a warmer CPU
            p = _rate(proof, per)
            r = _rate(raw, per)
        else:
            r = _rate(raw, per)
            p = _rate(proof, per)
        raws.append(r)
        proofs.append(p)
        ratios.append(p / r)
    return statistics.median(raws), statistics.median(proofs), statistics.median(ratios)


def bench_software(seconds: float) -> list[Row]:
    from cryptography.hazmat.primitives.asymmetric import ec

    from dpop_hsm.proof import ProofFactory
    from dpop_hsm.signers.software import SoftwareSigner

    rows: list[Row] = []
    for alg in ("ES256", "ES384", "EdDSA"):
        signer = SoftwareSigner.generate(alg)
        key = signer._key  # the SAME key, signed through cryptography directly
        data = b"x" * 300  # about the size of a proof's signing input
        if alg == "EdDSA":

            def raw(key: object = key, data: bytes = data) -> object:
                return key.sign(data)  # type: ignore[attr-defined]
        else:
            scheme = ec.ECDSA(_hash(alg))  # type: ignore[arg-type]

            def raw(key: object = key, scheme: object = scheme, data: bytes = data) -> object:
                return key.sign(data, scheme)  # type: ignore[attr-defined]

        factory = ProofFactory(signer)
        token = "access-token-" + "x" * 40

        def proof(factory: ProofFactory = factory, token: str = token) -> object:
            return factory.create("POST", "https://as.example.com/token", access_token=token)

        r, p, ratio = _interleaved(raw, proof, seconds)
        rows.append((f"software {alg} raw cryptography sign/s", r))
        rows.append((f"software {alg} proof create/s", p))
        mark = "ok" if ratio >= TARGET_RATIO else f"BELOW TARGET {TARGET_RATIO}"
        rows.append((f"software {alg} proof/raw ratio (median of rounds; {mark})", ratio))

    rows.extend(bench_verify(seconds / 4))
    rows.extend(bench_replay_flood(seconds / 4))
    rows.extend(_import_times())
    return rows


def _timed_calls(fn: Callable[[str], object], items: list[str]) -> float:
    """Calls per second of ``fn`` over every item once (each proof is verified exactly once)."""
    start = time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - start)


def bench_verify(seconds: float, rounds: int = 7) -> list[Row]:
    """verify_proof with the default replay check vs without, paired proof by proof.

    Replay checking is on by default, so every proof must be new: each proof is verified once
    through the process-wide cache and once with NO_REPLAY_CHECK, the order alternating, so
    both sides see the same proofs and the same moment of a noisy machine.
    """
    from dpop_hsm.proof import ProofFactory
    from dpop_hsm.signers.software import SoftwareSigner
    from dpop_hsm.verify import NO_REPLAY_CHECK, verify_proof

    htu = "https://rs.example.com/r"
    per_round = max(100, int(5_000 * seconds / rounds))  # ~seconds at ~10k verifications/s
    clock = time.perf_counter
    ons, offs, ratios = [], [], []
    for _ in range(rounds):
        # a new key per round, as from many clients: one key may hold only a share of the cache
        factory = ProofFactory(SoftwareSigner.generate("ES256"))
        proofs = [factory.create("GET", htu) for _ in range(per_round)]
        on = off = 0.0
        for i, proof in enumerate(proofs):
            if i % 2:
                t0 = clock()
                verify_proof(proof, htm="GET", htu=htu)
                t1 = clock()
                verify_proof(proof, htm="GET", htu=htu, replay_cache=NO_REPLAY_CHECK)
                t2 = clock()
                on, off = on + (t1 - t0), off + (t2 - t1)
            else:
                t0 = clock()
                verify_proof(proof, htm="GET", htu=htu, replay_cache=NO_REPLAY_CHECK)
                t1 = clock()
                verify_proof(proof, htm="GET", htu=htu)
                t2 = clock()
                off, on = off + (t1 - t0), on + (t2 - t1)
        ons.append(per_round / on)
        offs.append(per_round / off)
        ratios.append(off / on)
    return [
        ("verify_proof ES256 /s (replay check on: default cache)", statistics.median(ons)),
        ("verify_proof ES256 /s (replay_cache=NO_REPLAY_CHECK)", statistics.median(offs)),
        (
            "verify_proof replay-check on/off rate ratio (median of rounds)",
            statistics.median(ratios),
        ),
    ]


def _full_cache(size: int, now: float) -> tuple[object, float]:
    """A cache full of live entries, and the microseconds each insertion took to fill it."""
    from dpop_hsm.verify import ReplayCache

    cache = ReplayCache(max_entries=size, max_entries_per_key=size)
    keys = [(f"fill-{i}:j", f"fill-{i % 1000}") for i in range(size)]
    start = time.perf_counter()
    for i, (key, owner) in enumerate(keys):  # live for the whole run: nothing may be evicted
        cache.check_and_store(key, now + 1e6 + i, now, owner=owner)
    return cache, (time.perf_counter() - start) / size * 1e6


def bench_replay_flood(seconds: float, rounds: int = 9) -> list[Row]:
    """A flood of distinct proofs against a full replay cache: refused in constant time.

    Caches of 1k and 100k live entries, measured back to back in each round (the order
    alternating); the cost per refused proof is the median of the per-round ratios 100k / 1k,
    once for the cache alone and once through verify_proof with distinct validly signed proofs
    (what an attacker sends). A scan of the cache per refusal would show ~100 here.
    """
    from dpop_hsm.errors import ReplayCacheFullError
    from dpop_hsm.proof import ProofFactory
    from dpop_hsm.signers.software import SoftwareSigner
    from dpop_hsm.verify import verify_proof

    now = 1_700_000_000.0
    htu = "https://rs.example.com/r"
    filled = {size: _full_cache(size, now) for size in (1_000, 100_000)}
    caches = {size: cache for size, (cache, _) in filled.items()}
    factory = ProofFactory(SoftwareSigner.generate("ES256"), clock=lambda: now)
    per_round = max(100, int(5_000 * seconds / rounds))
    store_rates: dict[int, list[float]] = {1_000: [], 100_000: []}
    verify_rates: dict[int, list[float]] = {1_000: [], 100_000: []}
    store_ratios, verify_ratios = [], []  # per round: both sizes measured back to back
    for r in range(rounds):
        keys = [f"flood-{r}-{i}:j" for i in range(20 * per_round)]
        proofs = [factory.create("GET", htu) for _ in range(per_round)]
        for size in (1_000, 100_000) if r % 2 == 0 else (100_000, 1_000):
            cache: Any = caches[size]

            def store(key: str, cache: Any = cache) -> None:
                try:
                    cache.check_and_store(key, now + 60.0, now, owner="flood")
                except ReplayCacheFullError:
                    return
                raise AssertionError("a full cache accepted a new entry")

            def verify(proof: str, cache: Any = cache) -> None:
                try:
                    verify_proof(proof, htm="GET", htu=htu, now=now, replay_cache=cache)
                except ReplayCacheFullError:
                    return
                raise AssertionError("a full cache accepted a new proof")

            store_rates[size].append(_timed_calls(store, keys))
            verify_rates[size].append(_timed_calls(verify, proofs))
        store_ratios.append(store_rates[1_000][-1] / store_rates[100_000][-1])
        verify_ratios.append(verify_rates[1_000][-1] / verify_rates[100_000][-1])
    small_store, big_store = (statistics.median(store_rates[s]) for s in (1_000, 100_000))
    small_verify, big_verify = (statistics.median(verify_rates[s]) for s in (1_000, 100_000))
    return [
        ("replay cache: microseconds per stored entry, filling 100k", filled[100_000][1]),
        ("replay cache full, 1k entries: refused check_and_store/s", small_store),
        ("replay cache full, 100k entries: refused check_and_store/s", big_store),
        (
            "  cost per refused entry, 100k / 1k (median of rounds; 1.0 = constant)",
            statistics.median(store_ratios),
        ),
        ("replay cache full, 1k entries: refused verify_proof/s", small_verify),
        ("replay cache full, 100k entries: refused verify_proof/s", big_verify),
        (
            "  cost per refused proof, 100k / 1k (median of rounds; 1.0 = constant)",
            statistics.median(verify_ratios),
        ),
    ]


def _hash(alg: str) -> object:
    from cryptography.hazmat.primitives import hashes

    return {"ES256": hashes.SHA256(), "ES384": hashes.SHA384(), "ES512": hashes.SHA512()}[alg]


def _import_ms(statement: str) -> float:
    """Best of 5 fresh interpreters: milliseconds for ``statement`` after interpreter start."""
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    best = float("inf")
    for _ in range(5):
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )  # fmt: skip
        best = min(best, float(out.stdout.strip()) * 1000)
    return best


def _import_times() -> list[Row]:
    rows = [("import dpop_hsm (ms)", _import_ms("import dpop_hsm"))]
    if importlib.util.find_spec("dpop_hsm.cli") is None:
        print("  (dpop-hsm --help import time skipped: dpop_hsm.cli does not exist yet)")
    else:
        rows.append(
            ("import dpop_hsm.cli for dpop-hsm --help (ms)", _import_ms("import dpop_hsm.cli"))
        )
    return rows


def _external(name: str, seconds: float) -> list[Row] | str:
    """Rows from scripts/bench_<name>.py:bench_<name>(seconds), or one line saying why not."""
    try:
        module = importlib.import_module(f"bench_{name}")
    except ModuleNotFoundError as e:
        if e.name == f"bench_{name}":
            return f"{name}: skipped (scripts/bench_{name}.py not present)"
        return f"{name}: skipped (missing module {e.name!r})"
    except Exception as e:  # a broken plug-in must not stop the other rows
        return f"{name}: failed to import ({type(e).__name__}: {e})"
    try:
        rows = getattr(module, f"bench_{name}")(seconds)
    except Exception as e:
        if os.environ.get("DPOP_HSM_BENCH_TRACE"):
            traceback.print_exc()
        return f"{name}: failed ({type(e).__name__}: {e})"
    return [(str(label), float(value)) for label, value in rows]


def _print(rows: list[Row]) -> None:
    width = max((len(label) for label, _ in rows), default=10)
    for label, value in rows:
        shown = f"{value:12.3f}" if value < 10 else f"{value:12,.0f}"
        print(f"  {label:<{width}}  {shown}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time budget per backend")
    parser.add_argument(
        "--only", choices=["software", "pkcs11", "tpm", "http", "cache", "async"], default=None
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    print(f"dpop_hsm bench (python {sys.version.split()[0]}, {os.cpu_count()} CPUs)")
    status = 0
    for name in ("software", "pkcs11", "tpm", "http", "cache", "async"):
        if args.only not in (None, name):
            continue
        print(f"[{name}]")
        if name == "software":
            rows = bench_software(args.seconds)
            _print(rows)
            if any("BELOW TARGET" in label for label, _ in rows):
                status = 1
            continue
        result = _external(name, args.seconds)
        if isinstance(result, str):
            print(f"  {result}")
        else:
            _print(result)
    return status


if __name__ == "__main__":
    sys.exit(main())
