#!/usr/bin/env python3
"""PKCS#11 rows for scripts/bench: raw CKM_ECDSA vs Pkcs11Signer proofs, 1 -> 2 thread scaling.

``bench_pkcs11(seconds)`` makes a throwaway SoftHSM2 token in a temp dir and measures in a
child process: SOFTHSM2_CONF must be set before the module loads, and a fresh process keeps
other threads of the caller (GIL contention) out of the numbers. Standalone:
``python scripts/bench_pkcs11.py [seconds]``. SoftHSM2 speed is software speed: never quote it
as HSM or YubiKey speed.
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

Rows = list[tuple[str, float]]


def _rate(fn: object, seconds: float) -> float:
    call = fn  # a zero-argument callable; typed loosely to keep the loop lean
    n = 0
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        for _ in range(50):
            call()  # type: ignore[operator]
        n += 50
    return n / (time.perf_counter() - start)


def _threaded_rate(sign: object, threads: int, seconds: float) -> float:
    counts = [0] * threads
    barrier = threading.Barrier(threads + 1)
    stop = threading.Event()

    def work(i: int) -> None:
        barrier.wait()
        n = 0
        while not stop.is_set():
            sign(b"bench-input")  # type: ignore[operator]
            n += 1
        counts[i] = n

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in pool:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def _worker(uri: str, pin: str, seconds: float) -> Rows:
    """Runs in the child: SOFTHSM2_CONF is already set."""
    import hashlib

    import pkcs11
    from pkcs11 import Mechanism, ObjectClass

    from dpop_hsm.proof import ProofFactory
    from dpop_hsm.signers.pkcs11 import Pkcs11Signer
    from dpop_hsm.signers.pkcs11_admin import init_token

    # Through the PKCS#11 API: no PIN on any command line, even for a throwaway token.
    module_path = uri.split("module-path=", 1)[1]
    init_token(module_path, label="dpop", so_pin=secrets.token_hex(8), user_pin=pin)
    signer = Pkcs11Signer.generate(uri, "ES256", secret=pin)
    # The same module object, already re-initialized with OS locking by the signer; this
    # session is logged in through the signer's login.
    lib = pkcs11.lib(signer.uri.split("module-path=", 1)[1])
    token = lib.get_token(token_label="dpop")
    session = token.open()
    key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="bench")
    digest = hashlib.sha256(b"bench").digest()
    factory = ProofFactory(signer)
    htu = "https://api.example.com/resource"

    def raw() -> None:
        key.sign(digest, mechanism=Mechanism.ECDSA)

    # The same two C calls with no wrapper objects: what Pkcs11Signer's ctypes hot path makes.
    sign_once = signer._module.raw_signer(int(Mechanism.ECDSA), 64)
    session_handle, key_handle = session.handle, key.handle

    def raw_ctypes() -> None:
        sign_once(session_handle, key_handle, digest)

    def proof() -> None:
        factory.create("GET", htu)

    # Short alternating rounds, median of the per-round ratios: the box may be shared, and a
    # noisy neighbour then hits both sides of each ratio alike.
    rounds = max(3, int(seconds / 0.8))
    part = max(seconds / (4 * rounds), 0.1)
    raws, ctypes_raws, proofs, ones, twos = [], [], [], [], []
    for _ in range(rounds):
        raws.append(_rate(raw, part))
        ctypes_raws.append(_rate(raw_ctypes, part))
        proofs.append(_rate(proof, part))
        ones.append(_threaded_rate(signer.sign, 1, part))
        twos.append(_threaded_rate(signer.sign, 2, part))
    raw_rate, proof_rate = statistics.median(raws), statistics.median(proofs)
    one, two = statistics.median(ones), statistics.median(twos)
    ratio = statistics.median(p / r for p, r in zip(proofs, raws, strict=True))
    ctypes_ratio = statistics.median(p / r for p, r in zip(proofs, ctypes_raws, strict=True))
    sign_ratio = statistics.median(o / r for o, r in zip(ones, raws, strict=True))
    scaling = statistics.median(b / a for a, b in zip(ones, twos, strict=True))
    session.close()
    signer.close()
    return [
        ("pkcs11 raw CKM_ECDSA P-256 signs/s (python-pkcs11, SoftHSM2)", raw_rate),
        ("pkcs11 ES256 proofs/s (Pkcs11Signer + ProofFactory)", proof_rate),
        ("pkcs11 proof/raw ratio (target >= 0.9)", ratio),
        (
            "pkcs11 raw C_SignInit+C_Sign via ctypes signs/s (no wrappers)",
            statistics.median(ctypes_raws),
        ),
        ("pkcs11 proof/ctypes-raw ratio (the floor Pkcs11Signer signs at)", ctypes_ratio),
        ("pkcs11 Pkcs11Signer.sign/s, 1 thread", one),
        ("pkcs11 Pkcs11Signer.sign/raw ratio (signer overhead alone)", sign_ratio),
        ("pkcs11 Pkcs11Signer.sign/s, 2 threads", two),
        ("pkcs11 1 -> 2 thread scaling (x)", scaling),
        ("pkcs11 module parallel (OS locking) 1=yes", 1.0 if signer.parallel else 0.0),
    ]


def bench_pkcs11(seconds: float) -> Rows:
    """Measure for about ``seconds`` on a throwaway SoftHSM2 token; returns (name, value) rows."""
    sys.path.insert(0, str(REPO))
    from dpop_hsm.signers.pkcs11_uri import Pkcs11Uri, resolve_module_name

    module = resolve_module_name("softhsm2")
    with tempfile.TemporaryDirectory(prefix="dpop-bench-softhsm-") as tmp:
        base = Path(tmp)
        (base / "store").mkdir()
        conf = base / "softhsm2.conf"
        template = (REPO / "softhsm" / "softhsm2.conf.in").read_text(encoding="utf-8")
        conf.write_text(template.replace("@TOKENDIR@", str(base / "store")), encoding="utf-8")
        pin = secrets.token_hex(8)
        env = {**os.environ, "SOFTHSM2_CONF": str(conf), "DPOP_HSM_BENCH_PIN": pin}
        env["PYTHONPATH"] = str(REPO) + (
            os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else ""
        )
        uri = str(Pkcs11Uri(token="dpop", object="bench", module_path=module))
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", uri, str(seconds)],
            env=env, check=True, capture_output=True, text=True, timeout=120 + 4 * seconds,
        )  # fmt: skip
    return [(name, float(value)) for name, value in json.loads(proc.stdout.splitlines()[-1])]


def main(argv: list[str]) -> int:
    if argv[:1] == ["--worker"]:
        pin = os.environ.pop("DPOP_HSM_BENCH_PIN")
        print(json.dumps(_worker(argv[1], pin, float(argv[2]))))
        return 0
    seconds = float(argv[0]) if argv else 4.0
    for name, value in bench_pkcs11(seconds):
        print(f"{name:<66} {value:>12,.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
