"""One worker process of the fleet tests (``python -m tests.support.fleet_worker``), driven
over stdio.

Reads JSON commands, one per line, on stdin; answers each with one JSON line on stdout.
Secrets (the PIN, the client secret) arrive on stdin only, never in argv.

* ``{"cmd": "init", "uri", "pin"}`` — load the SoftHSM2 key and sign once (a failure is
  answered; the test retries that start in a new process: SoftHSM2's file store, opened while
  another process logs in, sometimes shows no token); or ``{"cmd": "init", "software_pem"}``.
* ``{"cmd": "run", "cache", "client", "threads", "requests" | "duration", "interval"}`` — a
  cold TokenClient with a new shared cache; ``threads`` threads call the API through
  ``DPoPSession``; answers statuses, errors, this process's token requests, the WARNINGs
  logged on ``dpop_hsm`` and the cache's outage stats.
* ``{"cmd": "exit"}``.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import Counter
from typing import Any

from dpop_hsm.errors import DPoPError
from dpop_hsm.signers.base import Signer


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


def _load_signer(command: dict[str, Any]) -> Signer:
    if "software_pem" in command:
        from dpop_hsm.signers.software import SoftwareSigner

        return SoftwareSigner.from_bytes(command["software_pem"].encode())
    from dpop_hsm.signers.pkcs11 import Pkcs11Signer

    signer = Pkcs11Signer(command["uri"], secret=command["pin"])
    signer.sign(b"warm-up")  # log in and sign once before the test proper
    return signer


def _make_cache(spec: dict[str, Any]) -> Any:
    options = {k: v for k, v in spec.items() if k not in ("kind", "url", "dir")}
    if spec["kind"] == "redis":
        from dpop_hsm.redis import RedisTokenCache

        return RedisTokenCache.from_url(spec["url"], **options)
    from dpop_hsm.file_cache import FileTokenCache

    return FileTokenCache(spec["dir"], **options)


def _run(signer: Signer, command: dict[str, Any], warnings: _Warnings) -> dict[str, Any]:
    from dpop_hsm.requests import DPoPSession
    from dpop_hsm.token import TokenClient

    warnings.messages.clear()
    cache = _make_cache(command["cache"])
    c = command["client"]
    client = TokenClient(
        signer,
        token_endpoint=c["token_endpoint"],
        client_id=c["client_id"],
        client_secret=c["client_secret"],
        scope="api",
        timeout=tuple(c.get("timeout", (5.0, 5.0))),
        cache=cache,
    )
    statuses: Counter[str] = Counter()
    errors: list[str] = []
    lock = threading.Lock()
    interval = float(command.get("interval", 0.0))
    count = command.get("requests")
    stop_at = time.monotonic() + float(command.get("duration", 0.0))

    def work() -> None:
        with DPoPSession(client) as session:
            done = 0
            while (done < count) if count is not None else (time.monotonic() < stop_at):
                try:
                    status = str(session.get(c["api_url"], timeout=10).status_code)
                except (DPoPError, OSError) as e:
                    status = type(e).__name__
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                with lock:
                    statuses[status] += 1
                done += 1
                if interval:
                    time.sleep(interval)

    threads = [threading.Thread(target=work) for _ in range(int(command["threads"]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = dict(cache.outage.stats)
    if hasattr(cache, "close"):
        cache.close()
    return {
        "statuses": dict(statuses),
        "errors": errors[:5],
        "token_requests": client.token_requests,
        "warnings": list(warnings.messages),
        "stats": stats,
    }


def main() -> None:
    warnings = _Warnings()
    logging.getLogger("dpop_hsm").addHandler(warnings)
    signer: Signer | None = None
    for line in sys.stdin:
        command = json.loads(line)
        try:
            if command["cmd"] == "init":
                signer = _load_signer(command)
                answer: dict[str, Any] = {"ok": True, "jkt": signer.thumbprint}
            elif command["cmd"] == "run":
                assert signer is not None, "init first"
                answer = {"ok": True, **_run(signer, command, warnings)}
            else:
                return
        except Exception as e:  # reported to the test, which fails with it
            answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
