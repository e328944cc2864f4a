#!/usr/bin/env python3
"""HTTP rows for scripts/bench: DPoP vs plain-bearer request rate against the local RS, and the
single-flight count (N threads starting with no token -> token requests at the AS).

``bench_http(seconds)`` starts ``dpop_hsm.testing.LocalDPoPServers`` on 127.0.0.1 and measures
both request kinds in the same run, interleaved in short slices so drift hits both equally. The
"bearer" request carries ``Authorization: Bearer <token>`` and no proof; the RS refuses it (a
bound token may not be used as Bearer, RFC 9449 §7.2) after parsing and checking the token, so
it is the cost floor of one round trip + token check — the ratio is what DPoP adds (signing the
proof, verifying it server-side). Both sides run in this process: the numbers are loopback,
one-box numbers, not a server benchmark. Standalone: ``python scripts/bench_http.py [seconds]``.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests

from dpop_hsm.requests import DPoPAuth
from dpop_hsm.signers.software import SoftwareSigner
from dpop_hsm.testing import ClientRegistration, LocalDPoPServers
from dpop_hsm.token import TokenClient

Rows = list[tuple[str, float]]
THREADS = 32
_SECRET = "bench-secret"


def _client(servers: LocalDPoPServers, signer: SoftwareSigner) -> TokenClient:
    return TokenClient(
        signer,
        token_endpoint=servers.token_endpoint,
        client_id="bench",
        client_secret=_SECRET,
        scope="api",
    )


def _single_flight(servers: LocalDPoPServers, signer: SoftwareSigner) -> tuple[int, int]:
    servers.counters.reset()
    tc = _client(servers, signer)
    barrier = threading.Barrier(THREADS)
    failures: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            tc.get_token()
        except BaseException as e:  # reported as a failure row below
            failures.append(e)

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError(f"{len(failures)} threads failed: {failures[0]!r}")
    return servers.counters.token_requests, servers.counters.tokens_issued


def bench_http(seconds: float) -> Rows:
    signer = SoftwareSigner.generate("ES256")
    servers = LocalDPoPServers(
        clients=[ClientRegistration("bench", client_secret=_SECRET)],
        as_nonce=True,
        rs_nonce=True,
        nonce_lifetime=3600,
    )
    with servers, requests.Session() as session:
        tc = _client(servers, signer)
        auth = DPoPAuth(tc, session=session)
        token = auth.token()  # fetched through `session`
        bearer = {"Authorization": f"Bearer {token.access_token}"}
        url = servers.api_url
        assert session.get(url, auth=auth).status_code == 200  # warm: nonce learned
        assert session.get(url, headers=bearer).status_code == 401
        counts = {"dpop": 0, "bearer": 0}
        spent = {"dpop": 0.0, "bearer": 0.0}
        slice_s = 0.25
        deadline = time.perf_counter() + max(seconds - 0.5, 0.5)
        while time.perf_counter() < deadline:
            for kind in ("dpop", "bearer"):
                start = time.perf_counter()
                end = start + slice_s
                n = 0
                while time.perf_counter() < end:
                    if kind == "dpop":
                        session.get(url, auth=auth)
                    else:
                        session.get(url, headers=bearer)
                    n += 1
                counts[kind] += n
                spent[kind] += time.perf_counter() - start
        dpop_rate = counts["dpop"] / spent["dpop"]
        bearer_rate = counts["bearer"] / spent["bearer"]
        if servers.counters.rejections.get("proof_iat") or servers.counters.rejections.get(
            "replay"
        ):
            raise RuntimeError(f"unexpected rejections: {servers.counters.snapshot()}")
        token_requests, issued = _single_flight(servers, signer)
    return [
        ("http: DPoP requests/s (requests.Session, local RS)", dpop_rate),
        ("http: plain Bearer-header requests/s (same RS, same run)", bearer_rate),
        ("http: DPoP / Bearer rate ratio", dpop_rate / bearer_rate),
        (
            f"single flight: AS token requests for {THREADS} threads (1 + 1 nonce retry)",
            token_requests,
        ),
        (f"single flight: tokens issued for {THREADS} threads", issued),
    ]


if __name__ == "__main__":
    budget = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    for label, value in bench_http(budget):
        print(f"  {label:<72} {value:12.3f}" if value < 10 else f"  {label:<72} {value:12,.0f}")
