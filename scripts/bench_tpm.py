"""TPM rows for ``scripts/bench``: raw TPM2_Sign rate, DPoP proof rate, and their ratio.

Runs against its own swtpm (started on a free 127.0.0.1 port, stopped by PID at the end).
swtpm is a software simulator: its speed says nothing about a real TPM, which signs at roughly
10-50 ECDSA signatures per second — with a real TPM the TPM is the whole cost of a proof.

Standalone: ``.venv/bin/python scripts/bench_tpm.py [SECONDS]``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WARNING = (
    "swtpm is a simulator: these rates are NOT real TPM speed "
    "(a real TPM 2.0 signs ~10-50 ECDSA P-256 signatures/s)"
)


def _rate(fn: Callable[[], object], seconds: float) -> float:
    fn()  # warm up (first blob load, header caches)
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        fn()
        n += 1
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


def bench_tpm(seconds: float) -> list[tuple[str, float]]:
    """Rows (label, value) for swtpm: persistent-key and key-file signs/s, proofs/s, ratio."""
    from dpop_hsm.proof import ProofFactory
    from dpop_hsm.signers.tpm import TpmSigner
    from tests.support.tpm import SwTpm

    per = max(seconds / 3, 0.2)
    with tempfile.TemporaryDirectory(prefix="dpop-bench-swtpm-") as tmp:
        tpm = SwTpm(Path(tmp) / "state")
        tpm.start()
        try:
            persistent = TpmSigner.generate(tcti=tpm.tcti, handle=0x81000001)
            blob = TpmSigner.generate(tcti=tpm.tcti, blob_path=Path(tmp) / "key.tss")
            with persistent, blob:
                digest_input = b"x" * 200  # a typical proof's signing input length
                raw = _rate(lambda: persistent.sign(digest_input), per)
                raw_blob = _rate(lambda: blob.sign(digest_input), per)
                factory = ProofFactory(persistent)
                proofs = _rate(lambda: factory.create("GET", "https://api.example/r"), per)
        finally:
            tpm.stop()
    return [
        ("swtpm ES256 TPM2_Sign/s, persistent key (NOT real TPM speed)", raw),
        ("swtpm ES256 load+sign+flush/s, key file (NOT real TPM speed)", raw_blob),
        ("swtpm ES256 DPoP proofs/s, persistent key (NOT real TPM speed)", proofs),
        ("swtpm proof rate / raw sign rate", proofs / raw),
    ]


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    print(f"NOTE: {WARNING}")
    for label, value in bench_tpm(seconds):
        print(f"{label:66} {value:10.2f}")


if __name__ == "__main__":
    main()
