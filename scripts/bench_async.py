#!/usr/bin/env python3
"""Async rows for scripts/bench: client CPU per request, adapter vs a hand-made DPoP header.

``bench_async(seconds)`` measures, in one run, what an adapter costs the CLIENT over the
cheapest correct alternative: the same HTTP library's client, sending ``Authorization: DPoP
<token>`` and a proof made with :meth:`ProofFactory.create` directly (no auth plugin, no
middleware, same token, same key). Configurations:

* ``httpx.AsyncClient`` + :class:`dpop_hsm.httpx.DPoPAuth` (attached) and
  ``aiohttp.ClientSession`` + :class:`dpop_hsm.aiohttp.DPoPMiddleware`, with 1 and 32 tasks in
  flight, with a software ES256 key and with a SoftHSM2 ES256 key. The hand-made side signs
  inline on the loop even with SoftHSM2 (the cost floor; the adapter moves those signatures to
  the signer's pool, and the stall rows show why);
* the event loop's worst stall (a 5 ms ticker task) while 32 tasks sign on SoftHSM2, and while
  they sign with a signer that blocks 40 ms per signature, two at a time, like a busy YubiKey
  (acceptance: no stall over 50 ms; the test suite proves the loop free by a handshake instead,
  so a loaded CI machine cannot fail it on a stopwatch);
* sync ``requests.Session`` + :class:`dpop_hsm.requests.DPoPAuth` and ``httpx.Client`` +
  ``DPoPAuth``, one thread, software key: the sync adapters must cost no more than before.

How: the local AS/RS (:class:`dpop_hsm.testing.LocalDPoPServers`, ``rs_nonce`` off: steady
state, every request is one round trip) run in a SEPARATE process, so ``time.process_time()``
of the measuring process is client CPU only (all its threads: the signing pool included). Both
sides of a ratio alternate in short slices (order flipped every round) and the ratio is the
median of the per-round ratios, so drift and noisy neighbours hit both sides alike. Loopback,
one-box numbers on a shared machine: read the ratios, not the absolute rates.

Standalone: ``python scripts/bench_async.py [seconds]``. SoftHSM2 speed is software speed:
never quote it as HSM or YubiKey speed.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
Rows = list[tuple[str, float]]
TARGET = 1.11  # adapter CPU per request <= 1.11x the hand-made header's (software key, 32 tasks)
SLICE = 0.2  # seconds per measured slice
TASKS = (1, 32)
MAX_TASKS = max(TASKS)
# httpx: 8 connections, saturated by 32 tasks. httpcore hands every queued request to the one
# connection that just went idle, so an unsaturated pool settles at a size that depends on its
# history (13 on one client, 32 on its twin in one run), and it scans every connection for
# every queued request: pool size alone moved CPU per request by 1.7x, more than DPoP costs.
HTTPX_POOL = 8
# aiohttp takes an idle connection or opens one, so its pool settles at one per task: +1 for
# the AS connection the adapter's client also holds.
AIOHTTP_POOL = MAX_TASKS + 1
_SECRET = "bench-async-secret"  # a throwaway client secret of the throwaway local AS
Send = Callable[[], Awaitable[None]]


# --- the local servers, in their own process -------------------------------------------------


def _serve() -> int:
    """Child: run the local AS/RS; print their URLs; answer ``counters`` lines until EOF."""
    sys.path.insert(0, str(REPO))
    from dpop_hsm.testing import ClientRegistration, LocalDPoPServers

    servers = LocalDPoPServers(
        clients=[ClientRegistration("bench", client_secret=_SECRET)],
        as_nonce=True,
        rs_nonce=False,  # steady state: one round trip per request
        token_lifetime=3600,
    )
    with servers:
        urls = {"token_endpoint": servers.token_endpoint, "api_url": servers.api_url}
        print(json.dumps(urls), flush=True)
        for line in sys.stdin:
            if line.strip() == "counters":
                print(json.dumps(servers.counters.snapshot()), flush=True)
    return 0


class _Servers:
    """The server child process: started here, stopped by closing its stdin."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--servers"],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the local servers process did not start")
        urls = json.loads(line)
        self.token_endpoint: str = urls["token_endpoint"]
        self.api_url: str = urls["api_url"]

    def counters(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("counters\n")
        self.proc.stdin.flush()
        result: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return result

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- measuring ---------------------------------------------------------------------------


async def _async_slice(send: Send, tasks: int, seconds: float) -> tuple[int, float, float]:
    """(requests, client CPU s, wall s) with ``tasks`` coroutines each sending in a loop."""
    stop = time.perf_counter() + seconds
    count = 0

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < stop:
            await send()
            count += 1

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(tasks)])
    return count, time.process_time() - cpu, time.perf_counter() - wall


def _sync_slice(send: Callable[[], None], seconds: float) -> tuple[int, float, float]:
    stop = time.perf_counter() + seconds
    count = 0
    cpu, wall = time.process_time(), time.perf_counter()
    while time.perf_counter() < stop:
        send()
        count += 1
    return count, time.process_time() - cpu, time.perf_counter() - wall


Slice = Callable[[str], Awaitable[tuple[int, float, float]]]


async def _compare(run: Slice, rounds: int) -> dict[str, float]:
    """Alternate ``run("adapter")`` and ``run("hand")``; medians of per-round values."""
    await run("adapter")  # warm: connections opened, caches filled
    await run("hand")
    cpu = {"adapter": [], "hand": []}  # type: dict[str, list[float]]
    rate = {"adapter": [], "hand": []}  # type: dict[str, list[float]]
    for i in range(rounds):
        for side in ("hand", "adapter") if i % 2 else ("adapter", "hand"):
            n, spent, wall = await run(side)
            if n == 0:
                raise RuntimeError(f"{side}: no request finished within a slice")
            cpu[side].append(spent / n)
            rate[side].append(n / wall)
    return {
        "adapter_us": statistics.median(cpu["adapter"]) * 1e6,
        "hand_us": statistics.median(cpu["hand"]) * 1e6,
        "cpu_ratio": statistics.median(
            a / h for a, h in zip(cpu["adapter"], cpu["hand"], strict=True)
        ),
        "rate_ratio": statistics.median(
            a / h for a, h in zip(rate["adapter"], rate["hand"], strict=True)
        ),
    }


async def _stall(send: Send, tasks: int, seconds: float) -> float:
    """Worst delay (ms) of a 5 ms ticker beyond its 5 ms while ``tasks`` coroutines send."""
    worst = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst
        while not done.is_set():
            before = time.monotonic()
            await asyncio.sleep(0.005)
            worst = max(worst, time.monotonic() - before - 0.005)

    monitor = asyncio.create_task(ticker())
    try:
        await _async_slice(send, tasks, seconds)
    finally:
        done.set()
        await monitor
    return worst * 1000


def _rows_of(label: str, r: dict[str, float], target: bool) -> Rows:
    mark = ""
    if target:
        mark = "; ok" if r["cpu_ratio"] <= TARGET else f"; ABOVE TARGET {TARGET}"
    return [
        (f"{label}: adapter client CPU us/request", r["adapter_us"]),
        (f"{label}: hand-made header client CPU us/request", r["hand_us"]),
        (f"{label}: adapter/hand-made CPU ratio (target <= {TARGET}{mark})", r["cpu_ratio"])
        if target
        else (f"{label}: adapter/hand-made CPU ratio", r["cpu_ratio"]),
        (f"{label}: adapter/hand-made requests/s ratio", r["rate_ratio"]),
    ]


# --- the adapters and their hand-made twins ----------------------------------------------


class _Hand:
    """A hand-made ``Authorization`` + ``DPoP`` pair: ProofFactory.create, nothing else."""

    def __init__(self, signer: Any, access_token: str, token_type: str) -> None:
        from dpop_hsm.proof import ProofFactory

        self.create = ProofFactory(signer).create
        self.access_token = access_token
        self.authorization = f"{token_type} {access_token}"

    def headers(self, url: str) -> dict[str, str]:
        proof = self.create("GET", url, access_token=self.access_token)
        return {"Authorization": self.authorization, "DPoP": proof}


def _token_client(servers: _Servers, signer: Any) -> Any:
    from dpop_hsm.token import TokenClient

    return TokenClient(
        signer,
        token_endpoint=servers.token_endpoint,
        client_id="bench",
        client_secret=_SECRET,
        scope="api",
    )


def _hand_for(tc: Any) -> _Hand:
    token = tc.cached_token()
    if token is None:
        raise RuntimeError("the adapter did not leave a cached token")
    return _Hand(tc.signer, token.access_token, token.token_type)


async def _httpx_pair(servers: _Servers, signer: Any) -> tuple[Send, Send, Callable[[], Any]]:
    import httpx

    from dpop_hsm.httpx import DPoPAuth

    url = servers.api_url
    limits = httpx.Limits(max_connections=HTTPX_POOL, max_keepalive_connections=HTTPX_POOL)
    authed = httpx.AsyncClient(timeout=60, limits=limits)
    plain = httpx.AsyncClient(timeout=60, limits=limits)
    DPoPAuth(_token_client(servers, signer)).attach(authed)
    auth = authed.auth
    assert isinstance(auth, DPoPAuth)

    async def adapter() -> None:
        response = await authed.get(url)
        if response.status_code != 200:
            raise RuntimeError(f"adapter request got {response.status_code}")

    await adapter()  # fetches the token through the adapter
    hand = _hand_for(auth.token_client)

    async def handmade() -> None:
        response = await plain.get(url, headers=hand.headers(url))
        if response.status_code != 200:
            raise RuntimeError(f"hand-made request got {response.status_code}")

    await _fill_pool(adapter, handmade)

    async def close() -> None:
        await authed.aclose()
        await plain.aclose()

    return adapter, handmade, close


async def _aiohttp_pair(servers: _Servers, signer: Any) -> tuple[Send, Send, Callable[[], Any]]:
    import aiohttp

    from dpop_hsm.aiohttp import DPoPMiddleware

    url = servers.api_url
    middleware = DPoPMiddleware(_token_client(servers, signer))
    authed = aiohttp.ClientSession(
        middlewares=(middleware,),
        connector=aiohttp.TCPConnector(limit=AIOHTTP_POOL, keepalive_timeout=120),
    )
    plain = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=AIOHTTP_POOL, keepalive_timeout=120)
    )

    async def adapter() -> None:
        async with authed.get(url) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"adapter request got {response.status}")

    await adapter()
    hand = _hand_for(middleware.token_client)

    async def handmade() -> None:
        async with plain.get(url, headers=hand.headers(url)) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"hand-made request got {response.status}")

    await _fill_pool(adapter, handmade)

    async def close() -> None:
        await authed.close()
        await plain.close()

    return adapter, handmade, close


async def _fill_pool(*sends: Send) -> None:
    """Bring both pools to their steady size before anything is measured."""
    for send in sends:
        await asyncio.gather(*[send() for _ in range(MAX_TASKS)])


PAIRS = {"httpx async": _httpx_pair, "aiohttp": _aiohttp_pair}
POOLS = {"httpx async": HTTPX_POOL, "aiohttp": AIOHTTP_POOL}


async def _async_rows(
    servers: _Servers, signers: dict[str, Any], per_config: float, notes: list[str]
) -> Rows:
    rows: Rows = []
    for lib, make in PAIRS.items():
        try:
            __import__("aiohttp" if lib == "aiohttp" else "httpx")
        except ImportError as e:
            notes.append(f"{lib} rows skipped (missing module {e.name!r})")
            continue
        for key, signer in signers.items():
            try:
                adapter, handmade, close = await make(servers, signer)
            except ImportError as e:  # an older tree without this adapter: the others still run
                notes.append(f"{lib} rows skipped (missing module {e.name!r})")
                break
            sides = {"adapter": adapter, "hand": handmade}
            try:
                for tasks in TASKS:
                    target = key == "software" and tasks == MAX_TASKS
                    # The acceptance rows get twice the rounds: their medians must be tight.
                    rounds = max(3, round(per_config * (2 if target else 1) / (2 * SLICE)))

                    async def run(
                        side: str, tasks: int = tasks, sides: dict[str, Send] = sides
                    ) -> tuple[int, float, float]:
                        return await _async_slice(sides[side], tasks, SLICE)

                    result = await _compare(run, rounds)
                    conns = f" ({min(tasks, POOLS[lib])} conns)" if tasks > 1 else ""
                    label = f"{lib} {key} ES256 {tasks:>2} tasks{conns}"
                    rows += _rows_of(label, result, target=target)
                if key == "softhsm":
                    stall_s = max(per_config / 4, 0.5)
                    label = f"{lib} softhsm {MAX_TASKS} tasks: worst loop stall (ms, 5 ms ticker)"
                    rows.append((f"{label}, adapter", await _stall(adapter, MAX_TASKS, stall_s)))
                    rows.append(
                        (
                            f"{label}, hand-made signing inline",
                            await _stall(handmade, MAX_TASKS, stall_s / 2),
                        )
                    )
            finally:
                await close()
        rows.append(await _sleeping_signer_stall(lib, make, servers, signers["software"]))
    return rows


class _SleepingSigner:
    """A software key that blocks 40 ms per signature, at most two at a time (a busy YubiKey)."""

    blocking = True
    concurrency = 2
    DELAY = 0.04

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.alg = inner.alg
        self.public_jwk = inner.public_jwk
        self.thumbprint = inner.thumbprint

    def sign(self, signing_input: bytes) -> bytes:
        time.sleep(self.DELAY)
        signature: bytes = self._inner.sign(signing_input)
        return signature


async def _sleeping_signer_stall(
    lib: str, make: Callable[..., Any], servers: _Servers, key: Any
) -> tuple[str, float]:
    adapter, _handmade, close = await make(servers, _SleepingSigner(key))
    try:
        worst = await _stall(adapter, MAX_TASKS, 1.0)
    finally:
        await close()
    label = f"{lib} signer blocking 40 ms/signature, {MAX_TASKS} tasks: worst loop stall (ms"
    mark = "ok" if worst < 50 else "ABOVE 50"
    return (f"{label}, acceptance < 50; {mark})", worst)


# --- sync adapters -----------------------------------------------------------------------


def _sync_rows(servers: _Servers, signer: Any, per_config: float) -> Rows:
    import requests

    from dpop_hsm.requests import DPoPAuth as RequestsAuth

    url = servers.api_url
    rounds = max(3, round(per_config / (2 * SLICE)))
    rows: Rows = []
    with requests.Session() as authed, requests.Session() as plain:
        auth = RequestsAuth(_token_client(servers, signer), session=authed)

        def adapter() -> None:
            if authed.get(url, auth=auth).status_code != 200:
                raise RuntimeError("requests adapter request failed")

        adapter()
        hand = _hand_for(auth.token_client)

        def handmade() -> None:
            if plain.get(url, headers=hand.headers(url)).status_code != 200:
                raise RuntimeError("requests hand-made request failed")

        rows += _sync_compare("requests sync software ES256", adapter, handmade, rounds)
    try:
        import httpx

        from dpop_hsm.httpx import DPoPAuth as HttpxAuth
    except ImportError:
        return rows
    with httpx.Client(timeout=60) as hauthed, httpx.Client(timeout=60) as hplain:
        HttpxAuth(_token_client(servers, signer)).attach(hauthed)
        hauth = hauthed.auth
        assert isinstance(hauth, HttpxAuth)

        def hadapter() -> None:
            if hauthed.get(url).status_code != 200:
                raise RuntimeError("httpx sync adapter request failed")

        hadapter()
        hhand = _hand_for(hauth.token_client)

        def hhandmade() -> None:
            if hplain.get(url, headers=hhand.headers(url)).status_code != 200:
                raise RuntimeError("httpx sync hand-made request failed")

        rows += _sync_compare("httpx sync software ES256", hadapter, hhandmade, rounds)
    return rows


def _sync_compare(
    label: str, adapter: Callable[[], None], hand: Callable[[], None], rounds: int
) -> Rows:
    sides = {"adapter": adapter, "hand": hand}

    async def run(side: str) -> tuple[int, float, float]:
        return _sync_slice(sides[side], SLICE)

    return _rows_of(label, asyncio.run(_compare(run, rounds)), target=False)


# --- the measuring child -----------------------------------------------------------------


def _worker(uri: str, pin: str, seconds: float) -> dict[str, Any]:
    """Runs in the child: SOFTHSM2_CONF is set; returns rows and notes."""
    sys.path.insert(0, str(REPO))
    from dpop_hsm.signers.software import SoftwareSigner

    notes: list[str] = []
    signers: dict[str, Any] = {"software": SoftwareSigner.generate("ES256")}
    try:
        from dpop_hsm.signers.pkcs11 import Pkcs11Signer
        from dpop_hsm.signers.pkcs11_admin import init_token

        module_path = uri.split("module-path=", 1)[1]
        # Through the PKCS#11 API: no PIN on any command line, even for a throwaway token.
        init_token(module_path, label="dpop", so_pin=secrets.token_hex(8), user_pin=pin)
        signers["softhsm"] = Pkcs11Signer.generate(uri, "ES256", secret=pin)
    except Exception as e:  # no SoftHSM2 here: the software rows still run
        notes.append(f"softhsm rows skipped ({type(e).__name__}: {e})")
    try:
        import sniffio  # noqa: F401
    except ImportError:
        # httpcore (1.0) imports it again for every lock it sets up when it is missing: about
        # ten failed imports per request, which both sides of the httpx rows pay.
        notes.append("httpx rows: sniffio is not installed; httpcore retries its import per lock")
    env = {**os.environ}
    servers = _Servers(env)
    try:
        per_config = seconds  # 8 async configurations + 2 sync ones, ~seconds each
        rows = asyncio.run(_async_rows(servers, signers, per_config, notes))
        rows += _sync_rows(servers, signers["software"], per_config)
        counters = servers.counters()
    finally:
        servers.close()
        for signer in signers.values():
            close = getattr(signer, "close", None)
            if close is not None:
                close()
    rejections = dict(counters.get("rejections", {}))
    # The AS asks each new client for a nonce once (RFC 9449 §8); anything else is a failure.
    if rejections.get("use_dpop_nonce") == counters.get("as_nonce_challenges"):
        rejections.pop("use_dpop_nonce", None)
    if rejections:
        raise RuntimeError(f"the resource server rejected requests: {rejections}")
    rows.append(("token requests at the AS for the whole run (1 + nonce retry per client)",
                 float(counters.get("token_requests", 0))))  # fmt: skip
    return {"rows": rows, "notes": notes}


def bench_async(seconds: float) -> Rows:
    """Measure for about ``10 * seconds`` plus setup; returns (name, value) rows."""
    sys.path.insert(0, str(REPO))
    from dpop_hsm.signers.pkcs11_uri import resolve_module_name

    try:
        module = resolve_module_name("softhsm2")
    except Exception:  # no SoftHSM2: the worker skips those rows and says so
        module = "libsofthsm2.so"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_pkcs11 import run_softhsm_worker

    proc = run_softhsm_worker(
        __file__,
        module,
        [str(seconds)],
        timeout=120 + 20 * seconds,
        prefix="dpop-bench-async-",
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"worker failed: {tail[0]}")
    result = json.loads(proc.stdout.splitlines()[-1])
    for note in result["notes"]:
        print(f"  ({note})")
    return [(name, float(value)) for name, value in result["rows"]]


def main(argv: list[str]) -> int:
    if argv[:1] == ["--servers"]:
        return _serve()
    if argv[:1] == ["--worker"]:
        pin = os.environ.pop("DPOP_HSM_BENCH_PIN")
        print(json.dumps(_worker(argv[1], pin, float(argv[2]))))
        return 0
    seconds = float(argv[0]) if argv else 3.0
    rows = bench_async(seconds)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        shown = f"{value:12.3f}" if value < 10 else f"{value:12,.0f}"
        print(f"  {name:<{width}}  {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
