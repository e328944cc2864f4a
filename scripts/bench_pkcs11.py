#!/usr/bin/env python3
"""PKCS#11 rows for scripts/bench: raw CKM_ECDSA vs Pkcs11Signer proofs, 1 -> 2 thread scaling.

``bench_pkcs11(seconds)`` makes a throwaway SoftHSM2 token in a temp dir and measures in a
child process: SOFTHSM2_CONF must be set before the module loads, and a fresh process keeps
other threads of the caller (GIL contention) out of the numbers. Standalone:
``python scripts/bench_pkcs11.py [seconds]``. SoftHSM2 speed is software speed: never quote it
as HSM or YubiKey speed.

Rows: the two raw baselines (python-pkcs11's ``key.sign`` and the bare ctypes
``C_SignInit``+``C_Sign`` the signer's hot path makes), ``Pkcs11Signer.sign``, proofs, the
ratios, the microseconds each layer adds (signer over ctypes raw, ProofFactory over the signer),
and 1 -> 2 thread scaling. On a loaded box the scaling row is meaningless: check ``uptime``.
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


def _threaded_rate(calls: list[object], seconds: float) -> float:
    """Total calls/s with one thread per zero-argument callable in ``calls``."""
    counts = [0] * len(calls)
    barrier = threading.Barrier(len(calls) + 1)
    stop = threading.Event()

    def work(i: int) -> None:
        call = calls[i]
        barrier.wait()
        n = 0
        while not stop.is_set():
            call()  # type: ignore[operator]
            n += 1
        counts[i] = n

    pool = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
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
    from dpop_hsm.signers.pkcs11.admin import init_token
    from dpop_hsm.signers.pkcs11.cryptoki import SignBuffer

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
    session_handle, key_handle, buf = session.handle, key.handle, SignBuffer()

    def raw_ctypes() -> None:
        sign_once(session_handle, key_handle, digest, buf)

    # A second session for the raw 2-thread baseline: what the module itself scales to.
    session2 = token.open()
    key2 = session2.get_key(object_class=ObjectClass.PRIVATE_KEY, label="bench")
    session2_handle, key2_handle, buf2 = session2.handle, key2.handle, SignBuffer()

    def raw_ctypes2() -> None:
        sign_once(session2_handle, key2_handle, digest, buf2)

    def signer_sign() -> None:
        signer.sign(signing_input)

    def proof() -> None:
        factory.create("GET", htu)

    signing_input = factory.create("GET", htu).rsplit(".", 1)[0].encode()  # a real proof's size
    # Short alternating rounds, medians of the per-round values: the box may be shared, and a
    # noisy neighbour then hits both sides of each ratio alike.
    rounds = max(3, int(seconds / 0.8))
    part = max(seconds / (6 * rounds), 0.1)
    raws, ctypes_raws, signs, proofs = [], [], [], []
    ones, twos, raw_ones, raw_twos = [], [], [], []
    for _ in range(rounds):
        raws.append(_rate(raw, part))
        ctypes_raws.append(_rate(raw_ctypes, part))
        signs.append(_rate(signer_sign, part))
        proofs.append(_rate(proof, part))
        ones.append(_threaded_rate([signer_sign], part / 2))
        twos.append(_threaded_rate([signer_sign, signer_sign], part / 2))
        raw_ones.append(_threaded_rate([raw_ctypes], part / 2))
        raw_twos.append(_threaded_rate([raw_ctypes, raw_ctypes2], part / 2))

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    def ratio(a: list[float], b: list[float]) -> float:
        return med([x / y for x, y in zip(a, b, strict=True)])

    def extra_us(slow: list[float], fast: list[float]) -> float:
        return med([1e6 / x - 1e6 / y for x, y in zip(slow, fast, strict=True)])

    session2.close()
    session.close()
    signer.close()
    return [
        ("pkcs11 raw CKM_ECDSA P-256 signs/s (python-pkcs11, SoftHSM2)", med(raws)),
        ("pkcs11 raw C_SignInit+C_Sign via ctypes signs/s (no wrappers)", med(ctypes_raws)),
        ("pkcs11 Pkcs11Signer.sign/s (hash + pool + gate + ctypes sign)", med(signs)),
        ("pkcs11 ES256 proofs/s (Pkcs11Signer + ProofFactory)", med(proofs)),
        ("pkcs11 proof/raw ratio, raw = python-pkcs11 (target >= 0.9)", ratio(proofs, raws)),
        (
            "pkcs11 proof/ctypes-raw ratio (the floor Pkcs11Signer signs at)",
            ratio(proofs, ctypes_raws),
        ),
        ("pkcs11 Pkcs11Signer.sign/python-pkcs11 raw ratio", ratio(signs, raws)),
        ("pkcs11 us/sign added by Pkcs11Signer over ctypes raw", extra_us(signs, ctypes_raws)),
        ("pkcs11 us/proof added by ProofFactory over Pkcs11Signer.sign", extra_us(proofs, signs)),
        ("pkcs11 Pkcs11Signer.sign/s, 1 thread", med(ones)),
        ("pkcs11 Pkcs11Signer.sign/s, 2 threads", med(twos)),
        ("pkcs11 1 -> 2 thread scaling (x)", ratio(twos, ones)),
        (
            "pkcs11 raw ctypes 1 -> 2 thread scaling, 2 sessions (module's own)",
            ratio(raw_twos, raw_ones),
        ),
        ("pkcs11 module parallel (OS locking) 1=yes", 1.0 if signer.parallel else 0.0),
    ]


def run_softhsm_worker(
    script: str, module: str, args: list[str], *, timeout: float, prefix: str
) -> subprocess.CompletedProcess[str]:
    """Run ``script --worker URI ARGS…`` against a throwaway SoftHSM2 token of its own.

    The token directory and config live in a temporary directory, ``SOFTHSM2_CONF`` is set
    before the child loads the module, and the PIN travels in the environment, never argv.
    """
    sys.path.insert(0, str(REPO))
    from dpop_hsm.signers.pkcs11.uri import Pkcs11Uri

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
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
        return subprocess.run(
            [sys.executable, script, "--worker", uri, *args],
            env=env, check=False, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip


def bench_pkcs11(seconds: float) -> Rows:
    """Measure for about ``seconds`` on a throwaway SoftHSM2 token; returns (name, value) rows."""
    sys.path.insert(0, str(REPO))
    from dpop_hsm.signers.pkcs11.locate import resolve_module_name

    module = resolve_module_name("softhsm2")
    proc = run_softhsm_worker(
        __file__, module, [str(seconds)], timeout=120 + 4 * seconds, prefix="dpop-bench-softhsm-"
    )
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
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
