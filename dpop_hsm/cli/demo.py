"""``dpop-hsm demo``: a DPoP client-credentials flow end to end, printed as a session log.

The flow is exactly what an application does: load the key, fetch a DPoP-bound token with
``client_credentials`` (client ``m2m.dpop``, secret ``secret``, scope ``api`` against the local
servers), then call ``/api/dpop/test`` twice with fresh proofs. Both local servers require
nonces, so the log shows the one-retry nonce dance at the AS and at the RS. Every credential in
the log is masked; the summary compares the key's jkt with the token's ``cnf.jkt``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError, ProtocolError
from .common import (
    AUTH_METHODS,
    CLIENT_SECRET_ENV,
    KEY_ENV,
    SECRET_METHODS,
    Output,
    UsageError,
    add_key_options,
    close_signer,
    load_key,
    secret_from_options,
)
from .net import DEMO_CLIENT_SECRET, demo_clients
from .settings import KEY_SETTINGS

if TYPE_CHECKING:
    from ..signers.base import Signer

__all__ = ["DEMO_CLIENT_SECRET", "cmd_demo", "register", "run_demo"]


class _SessionLogFormatter(logging.Formatter):
    """A session-log look: ``---- Sending <HTTP date> ----`` then the (masked) message."""

    def format(self, record: logging.LogRecord) -> str:
        from email.utils import formatdate

        text = record.getMessage()
        stamp = formatdate(record.created, usegmt=True)
        first, _, rest = text.partition("\n")
        if first.startswith("---- ") and first.endswith(" ----"):
            first = f"{first[:-5]} {stamp} ----"
        return f"{first}\n{rest}\n"


def _attach_session_log(stream: Any) -> Callable[[], None]:
    logger = logging.getLogger("dpop_hsm.http")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_SessionLogFormatter())
    handler.setLevel(logging.DEBUG)
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False

    def detach() -> None:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate

    return detach


def _protection_line(signer: Signer) -> str:
    """Where the key lives and what the device says about it, for the session log's header."""
    read = getattr(signer, "key_protection", None)
    if not callable(read):
        kind = type(signer).__name__
        if kind == "TpmSigner":
            return "# storage  : TPM 2.0 key (fixedTPM, fixedParent: never leaves the TPM)\n"
        if kind == "SoftwareSigner":
            return "# storage  : software key in process memory (no hardware protection)\n"
        return ""
    flags = read()
    shown = [name.upper() for name, value in flags.items() if value and name != "extractable"]
    if flags.get("extractable") is False:
        shown.append("not EXTRACTABLE")
    return f"# storage  : PKCS#11 token: {', '.join(shown) or 'flags not readable'}\n"


def run_demo(
    signer: Signer,
    *,
    out: Output,
    key_label: str,
    token_endpoint: str | None = None,
    api_url: str | None = None,
    client_id: str = "m2m.dpop",
    client_secret: Any = DEMO_CLIENT_SECRET,
    auth_method: str = "client_secret_post",
    scope: str = "api",
    calls: int = 2,
    log_stream: Any = None,
) -> int:
    """Run the flow; returns 0 when the API answered 200 with a token bound to ``signer``."""
    from ..requests import DPoPSession
    from ..testing import LocalDPoPServers
    from ..token import TokenClient

    stream = log_stream or out.log  # stderr under --json: stdout holds the one result
    servers = None
    if token_endpoint is None:
        servers = LocalDPoPServers(clients=demo_clients(None), as_nonce=True, rs_nonce=True)
        servers.start()
        token_endpoint, api_url = servers.token_endpoint, servers.api_url
    elif api_url is None:
        raise ConfigurationError("--api URL is needed with --token-endpoint")
    assert api_url is not None
    detach = _attach_session_log(stream)
    try:
        stream.write(
            f"# key      : {key_label}\n# alg      : {signer.alg}\n"
            f"# jkt      : {signer.thumbprint}\n"
            f"# token    : {token_endpoint} (client {client_id}, {auth_method}, scope {scope})\n"
            f"# api      : {api_url}\n"
            + _protection_line(signer)
            + ("# servers  : local, DPoP nonces required at both\n\n" if servers else "\n")
        )
        stream.flush()
        client = TokenClient(
            signer,
            token_endpoint=token_endpoint,
            client_id=client_id,
            client_secret=client_secret,
            auth_method=auth_method,  # type: ignore[arg-type]
            scope=scope,
        )
        started = time.perf_counter()
        statuses = []
        body: Any = None
        with DPoPSession(client) as session:
            for _ in range(max(1, calls)):
                response = session.get(api_url, timeout=client.timeout)
                statuses.append(response.status_code)
                try:
                    body = response.json()
                except ValueError:
                    body = None
        elapsed = time.perf_counter() - started
    finally:
        detach()
        if servers is not None:
            requests_count = servers.counters.snapshot()
            servers.stop()
        else:
            requests_count = {}
    from .demo_login import claims_from_api  # here: it imports subprocess, tempfile, shutil

    claims = claims_from_api(body)
    cnf = claims.get("cnf")
    token_jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
    bound = token_jkt == signer.thumbprint
    ok = all(s == 200 for s in statuses) and bound
    stream.write("\n# API response (/api/dpop/test):\n")
    if isinstance(body, list):  # the API's claim list: one claim per line
        stream.write("[\n" + ",\n".join("  " + json.dumps(item) for item in body) + "\n]\n\n")
    else:
        stream.write(json.dumps(body, indent=2) + "\n\n")
    stream.write(f"# key jkt        : {signer.thumbprint}\n")
    stream.write(f"# token cnf.jkt  : {token_jkt}\n")
    if requests_count:
        stream.write(f"# server counters: {json.dumps(requests_count, sort_keys=True)}\n")
    summary = (
        f"{'OK' if ok else 'FAILED'}: {len(statuses)} DPoP call(s) -> "
        f"{', '.join(map(str, statuses))}; token {'bound to' if bound else 'NOT bound to'} "
        f"this {signer.alg} key ({key_label}); {client.token_requests} token request(s); "
        f"{elapsed * 1000:.0f} ms"
    )
    if not ok and not bound and all(s == 200 for s in statuses):
        stream.write(summary + "\n")
        raise ProtocolError("the API answered, but the token is not bound to this key")
    out.emit(
        {
            "ok": ok,
            "statuses": statuses,
            "jkt": signer.thumbprint,
            "cnf_jkt": token_jkt,
            "key": key_label,
        },
        summary,
    )
    return 0 if ok else 5


def cmd_demo(args: argparse.Namespace, out: Output) -> int:
    if args.login:
        return _cmd_login_demo(args, out)
    signer: Signer
    if args.key or os.environ.get(KEY_ENV):
        signer = load_key(args)
        key_label = str(getattr(signer, "uri", args.key))
    else:
        from ..signers.software import SoftwareSigner

        signer = SoftwareSigner.generate("ES256")
        key_label = "software key (in memory; pass --key for a hardware key)"
        sys.stderr.write("dpop-hsm demo: no --key given: using an in-memory software key\n")
    secret: Any = DEMO_CLIENT_SECRET
    if args.token_endpoint:
        secret = (
            secret_from_options(
                args.client_secret_source, env=CLIENT_SECRET_ENV, what="client secret"
            )
            if args.auth_method in SECRET_METHODS
            else None
        )
    try:
        return run_demo(
            signer,
            out=out,
            key_label=key_label,
            token_endpoint=args.token_endpoint,
            api_url=args.api,
            client_id=args.client_id,
            client_secret=secret,
            auth_method=args.auth_method,
            scope=args.scope,
            calls=args.calls,
        )
    finally:
        close_signer(signer)


def _cmd_login_demo(args: argparse.Namespace, out: Output) -> int:
    """``demo --login``: the developer login flow against the local servers only."""
    from .demo_login import run_login_demo

    if args.token_endpoint or args.api:
        raise UsageError("--login runs against the local servers: drop --token-endpoint/--api")
    return run_login_demo(
        out=out, key=args.key or os.environ.get(KEY_ENV), pin_source=args.pin_source
    )


def register(sub: Any) -> None:
    """Add ``demo`` to the main parser's subparsers."""
    p = sub.add_parser(
        "demo",
        help="the main job: token with DPoP, then API calls, as a masked session log",
        description="Without --token-endpoint, starts local servers that require nonces. "
        "--login shows the developer flow instead: login (authorization code + PKCE + PAR, "
        "public client dpop-hsm-public), request --profile, a refresh, logout.",
    )
    add_key_options(p)
    p.add_argument("--token-endpoint", metavar="URL", help="a real AS instead of the local one")
    p.add_argument("--api", metavar="URL", help="the API to call (with --token-endpoint)")
    p.add_argument("--client-id", default="m2m.dpop")
    p.add_argument(
        "--auth-method",
        default="client_secret_post",
        choices=AUTH_METHODS,
    )
    p.add_argument("--client-secret-source", metavar="SRC", help="env:NAME or file:PATH")
    p.add_argument("--scope", default="api")
    p.add_argument("--calls", type=int, default=2, help="API calls to make (default 2)")
    p.add_argument(
        "--login",
        action="store_true",
        help="the developer flow: dpop-hsm login, request --profile (with a refresh), logout, "
        "against the local servers, under a temporary DPOP_HSM_STATE_DIR",
    )
    p.set_defaults(func=cmd_demo, settings=KEY_SETTINGS)
