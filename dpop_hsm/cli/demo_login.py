"""``dpop-hsm demo --login``: the developer login flow end to end, as a developer meets it.

The demo starts the local authorization + resource servers (DPoP nonces required at both,
short-lived access tokens) and then runs the very commands a developer types, each as its own
``dpop-hsm -v`` process, under a temporary ``DPOP_HSM_STATE_DIR`` so the user's own profiles
are never touched:

1. ``login`` with the public native client ``dpop-hsm-public`` (RFC 8252 §8.5): authorization
   code + PKCE (RFC 7636) pushed with a DPoP proof (RFC 9126, RFC 9449 §10.1), the one-shot
   loopback listener (RFC 8252 §7.3). The demo plays the user at the browser: it reads the
   authorization URL the login prints alone on a line, signs in and consents on the local AS
   over HTTP, and sends the redirect to the listener — no real browser is opened.
2. ``request --profile`` to the API (200), whose answer shows the token's ``cnf.jkt``.
3. The access token expires for real (the servers issue them for a few seconds only); the next
   ``request --profile`` refreshes with a proof from the same key (RFC 9449 §5) and the
   refresh token rotates.
4. ``logout`` revokes the refresh token (RFC 7009) and deletes the profile.

Between the steps the demo shows what the profile on disk holds and its modes (directory
0700, file 0600). Every credential in the transcript is masked, as in the children's session
logs; a summary line ``OK: …`` (or one JSON document under ``--json``) closes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import unquote

from ..errors import DPoPError, ProtocolError
from .common import KEY_ENV, PIN_ENV, Output

__all__ = [
    "LOGIN_DEMO_PROFILE",
    "LOGIN_DEMO_TOKEN_LIFETIME",
    "claims_from_api",
    "run_login_demo",
]

LOGIN_DEMO_PROFILE = "demo"
# Seconds an access token lives on the demo's servers: long enough for the first request to
# use the stored token, short enough that waiting for a real expiry costs only a few seconds.
LOGIN_DEMO_TOKEN_LIFETIME = 6.0
_CHILD_TIMEOUT = 120.0
_USER = "alice"  # the demo's user at the local AS's login page


@dataclass
class _Run:
    """What one ``dpop-hsm`` child printed and returned."""

    shown: str
    returncode: int
    stdout: str
    stderr: str


@dataclass
class _Report:
    """What the demo checked, for the summary line and the JSON document."""

    statuses: list[int] = field(default_factory=list)
    cnf_jkts: list[str | None] = field(default_factory=list)
    par: bool = False
    modes: tuple[str, str] | None = None
    no_secrets: bool = False
    refreshed: bool = False
    rotated: bool = False
    revoked: bool = False
    deleted: bool = False
    client: str = ""
    jkt: str = ""
    label: str = ""
    elapsed: float = 0.0

    @property
    def bound(self) -> bool:
        """Every API answer showed a token whose ``cnf.jkt`` is the key's (RFC 9449 §6.1)."""
        return bool(self.jkt) and all(c == self.jkt for c in self.cnf_jkts)

    @property
    def ok(self) -> bool:
        return (
            self.statuses == [200, 200]
            and self.bound
            and self.par
            and self.modes == ("0700", "0600")
            and self.no_secrets
            and self.refreshed
            and self.rotated
            and self.revoked
            and self.deleted
        )

    def summary(self) -> str:
        refresh = (
            "refreshed with a proof, refresh token rotated"
            if self.refreshed and self.rotated
            else "refresh FAILED"
        )
        return (
            f"{'OK' if self.ok else 'FAILED'}: login as {self.client} (authorization code + PKCE"
            f"{' + PAR' if self.par else ''}, DPoP) -> profile "
            f"{'/'.join(self.modes or ('?', '?'))}, "
            f"{'no key/PIN/secret' if self.no_secrets else 'SECRET STORED'}; request --profile "
            f"-> {', '.join(map(str, self.statuses))}; token "
            f"{'bound to' if self.bound else 'NOT bound to'} this key ({self.label}); {refresh}; "
            f"logout {'revoked the refresh token' if self.revoked else 'revoked NOTHING'}, "
            f"profile {'deleted' if self.deleted else 'LEFT'}; {self.elapsed * 1000:.0f} ms"
        )

    def document(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "statuses": self.statuses,
            "jkt": self.jkt,
            "cnf_jkt": self.cnf_jkts,
            "key": self.label,
            "client_id": self.client,
            "par": self.par,
            "profile_modes": (
                {"dir": self.modes[0], "file": self.modes[1]} if self.modes else None
            ),
            "profile_without_secrets": self.no_secrets,
            "refreshed": self.refreshed,
            "refresh_token_rotated": self.rotated,
            "revoked": self.revoked,
            "profile_deleted": self.deleted,
        }


def _mode(path: Path) -> str:
    return f"{stat.S_IMODE(os.stat(path).st_mode):04o}"


def _pins(ref: str, pin_source: str | None) -> list[str]:
    """The PINs this run's key may use (``--pin-source``, ``$DPOP_HSM_PIN``, the URI's
    ``pin-source``).

    Read only to check that none of them reached the profile or the transcript; an unreadable
    source is simply not checked (the children report it).
    """
    from ..secret_sources import read_secret_source

    pins = [os.environ[PIN_ENV]] if os.environ.get(PIN_ENV) else []
    sources = [pin_source] if pin_source else []
    _, _, query = ref.partition("?")
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if name == "pin-source" and value:
            sources.append(unquote(value))
    for source in sources:
        with contextlib.suppress(DPoPError):
            pins.append(read_secret_source(source, what="PIN"))
    return [p for p in pins if p]


# ``-v`` also traces where each CLI setting came from; the transcript keeps the exchanges.
_SETTING_TRACE = re.compile(r"^setting [a-z_]+ from .*\n?$")


class _Transcript:
    """Runs ``dpop-hsm`` children as a developer would and writes what they print to ``log``."""

    def __init__(self, log: TextIO, env: dict[str, str]) -> None:
        self.log = log
        self.env = env

    def write(self, text: str) -> None:
        self.log.write(text)
        self.log.flush()

    def echo(self, text: str) -> None:
        """A child's stderr, line by line, without the settings trace."""
        self.write("".join(ln for ln in text.splitlines(True) if not _SETTING_TRACE.match(ln)))

    def section(self, title: str) -> None:
        self.write(f"\n# ==== {title}\n")

    def _argv(self, args: list[str], verbose: bool) -> tuple[list[str], str]:
        full = (["-v"] if verbose else []) + args
        return [sys.executable, "-m", "dpop_hsm", *full], "$ dpop-hsm " + shlex.join(full)

    def run(self, args: list[str], *, verbose: bool = True) -> _Run:
        """Run ``dpop-hsm ARGS`` (with ``-v``: the masked session log) and show its output."""
        argv, shown = self._argv(args, verbose)
        self.write(shown + "\n")
        done = subprocess.run(  # noqa: S603 - our own CLI, arguments built here
            argv,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=_CHILD_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        self.echo(done.stderr)
        if done.stdout:
            self.write(done.stdout if done.stdout.endswith("\n") else done.stdout + "\n")
        return _Run(shown, done.returncode, done.stdout, done.stderr)

    def run_login(self, args: list[str], *, report: _Report) -> _Run:
        """``login --no-browser``; the demo reads the URL it prints and plays the browser."""
        argv, shown = self._argv(args, True)
        self.write(shown + "\n")
        proc = subprocess.Popen(  # noqa: S603 - our own CLI, arguments built here
            argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stderr is not None
        err: list[str] = []
        try:
            for line in proc.stderr:
                err.append(line)
                self.echo(line)
                text = line.strip()
                # The login prints the authorization URL alone on a line (RFC 8252 §7.3 flow).
                if text.startswith("http") and " " not in text:
                    self._browse(text, report)
            out = proc.stdout.read()
            proc.wait(timeout=_CHILD_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        if out:
            self.write(out if out.endswith("\n") else out + "\n")
        return _Run(shown, proc.returncode, out, "".join(err))

    def _browse(self, url: str, report: _Report) -> None:
        """The user's browser: sign in and consent on the AS, then follow the redirect."""
        import requests

        from ..logs import loggable_url
        from ..testing.browser import complete_login

        report.par = "request_uri=" in url
        self.write(
            f"# browser  : GET {loggable_url(url)}\n"
            f"# browser  : login + consent page: signed in as {_USER}, approved\n"
        )
        location = complete_login(url, user=_USER, approve=True)
        self.write(f"# browser  : 302 -> {loggable_url(location)}\n")
        answer = requests.get(location, timeout=10)
        self.write(f"# browser  : GET the loopback listener -> {answer.status_code}\n")


def claims_from_api(body: Any) -> dict[str, Any]:
    """The demo API answers a list of {type, value} claims; JSON objects are taken as they are."""
    if isinstance(body, dict):
        return body
    claims: dict[str, Any] = {}
    if isinstance(body, list):
        for item in body:
            if isinstance(item, dict) and isinstance(item.get("type"), str):
                value = item.get("value")
                if isinstance(value, str) and value.startswith("{"):
                    with contextlib.suppress(ValueError):
                        value = json.loads(value)
                claims[item["type"]] = value
    return claims


def _api_status(stderr: str, api: str) -> int | None:
    """The API's last status in a child's session log (``-v``): the answer the user got."""
    found = re.findall(
        r"^---- Received from " + re.escape(api) + r" ----\nHTTP/1\.1 (\d{3}) ", stderr, re.M
    )
    return int(found[-1]) if found else None


def _claims(stdout: str) -> dict[str, Any]:
    """The claims ``request`` printed: the demo API's list of ``{type, value}`` claims."""
    try:
        parsed = json.loads(stdout)
    except ValueError:
        parsed = None
    return claims_from_api(parsed)


def _cnf_jkt(claims: dict[str, Any]) -> str | None:
    cnf = claims.get("cnf")
    jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
    return jkt if isinstance(jkt, str) else None


def _check(run: _Run, step: str) -> None:
    if run.returncode != 0:
        raise ProtocolError(f"{step}: dpop-hsm exited {run.returncode} (its error is above)")


def _show_profile(t: _Transcript, state: Path, ref: str, pins: list[str], report: _Report) -> None:
    """The profile as the login left it: modes, members, and what it must not hold."""
    path = state / f"{LOGIN_DEMO_PROFILE}.json"
    text = path.read_text(encoding="utf-8")
    document = json.loads(text)
    report.modes = (_mode(state), _mode(path))
    members = [
        f"{k} (****)" if k in ("refresh_token", "access_token") else k
        for k, v in document.items()
        if v not in (None, "", [], {})
    ]
    lowered = text.lower()
    report.no_secrets = (
        "private key" not in lowered
        and '"d":' not in text
        and "pin-value" not in lowered
        and not document.get("client_secret")
        and not document.get("client_secret_source")
        and document.get("key") == ref
        and not any(pin in text for pin in pins)
    )
    t.write(
        f"# profile  : {path}\n"
        f"# modes    : directory {report.modes[0]}, file {report.modes[1]}\n"
        f"# holds    : {', '.join(members)}\n"
        f"# secrets  : {'none' if report.no_secrets else 'FOUND'}: no key material, no PIN, "
        "no client secret; the key is only its reference, the refresh token is bound to it\n"
    )


def _request(t: _Transcript, api: str, pin_opts: list[str], report: _Report, step: str) -> None:
    run = t.run(["request", "--profile", LOGIN_DEMO_PROFILE, *pin_opts, api])
    _check(run, step)
    report.statuses.append(_api_status(run.stderr, api) or 0)
    report.cnf_jkts.append(_cnf_jkt(_claims(run.stdout)))


def _make_key(t: _Transcript, workdir: Path) -> str:
    """No key given: a software key file in the demo's temporary directory, made by keygen."""
    ref = str(workdir / "dev-key.pem")
    sys.stderr.write(
        "dpop-hsm demo: no --key given: using a software key file in a temporary directory\n"
    )
    t.section("0. a key (software, for this run only; pass --key for a hardware key)")
    _check(t.run(["keygen", "--key", ref], verbose=False), "keygen")
    return ref


def run_login_demo(
    *,
    out: Output,
    key: str | None,
    pin_source: str | None = None,
    log_stream: Any = None,
    token_lifetime: float = LOGIN_DEMO_TOKEN_LIFETIME,
) -> int:
    """Run the developer flow (see the module docstring); 0 when every step did its part.

    Raises :class:`~dpop_hsm.errors.ProtocolError` when a step's command fails (the command's
    own error is in the transcript above it; the message holds only the step and exit code).
    """
    from ..profiles import ProfileStore
    from ..testing import DEFAULT_PUBLIC_CLIENT_ID, LocalDPoPServers
    from .net import demo_clients

    stream = log_stream or out.log  # stderr under --json: stdout holds the one result
    workdir = Path(tempfile.mkdtemp(prefix="dpop-hsm-demo-"))
    state = workdir / "state"  # created 0700 by the login itself
    env = {**os.environ, "DPOP_HSM_STATE_DIR": str(state)}
    env.pop(KEY_ENV, None)
    t = _Transcript(stream, env)
    report = _Report(client=DEFAULT_PUBLIC_CLIENT_ID)
    servers = LocalDPoPServers(
        clients=demo_clients(None), as_nonce=True, rs_nonce=True, token_lifetime=token_lifetime
    )
    started = time.perf_counter()
    servers.start()
    try:
        t.write(
            "# dpop-hsm demo --login: the developer flow, each step the dpop-hsm command a "
            "developer types\n"
            f"# issuer   : {servers.issuer} (local: DPoP nonces required at the AS and the "
            f"RS, access tokens live {token_lifetime:g} s)\n"
            f"# client   : {DEFAULT_PUBLIC_CLIENT_ID} (public native client, auth none: "
            "RFC 8252 §8.5)\n"
            f"# api      : {servers.api_url}\n"
            f"# state    : DPOP_HSM_STATE_DIR={state} (temporary: your profiles are untouched)\n"
        )
        ref = key or _make_key(t, workdir)
        label = ref if key else "a temporary software key file"
        pins = _pins(ref, pin_source)
        key_opts = ["--key", ref] + (["--pin-source", pin_source] if pin_source else [])
        pin_opts = ["--pin-source", pin_source] if pin_source else []
        t.section("1. the key's thumbprint: the jkt the tokens will be bound to")
        t.write(f"# key      : {ref}\n")
        run = t.run(["thumbprint", *key_opts], verbose=False)
        _check(run, "thumbprint")
        jkt = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""

        t.section(
            "2. login: authorization code + PKCE, pushed (PAR) with a DPoP proof; "
            "the redirect comes back to a loopback listener"
        )
        login_args = [
            "login",
            "--issuer",
            servers.issuer,
            "--client-id",
            DEFAULT_PUBLIC_CLIENT_ID,
            *key_opts,
            "--scope",
            "api",
            "--profile",
            LOGIN_DEMO_PROFILE,
            "--no-browser",
            "--login-timeout",
            "60",
        ]
        _check(t.run_login(login_args, report=report), "login")
        _show_profile(t, state, ref, pins, report)

        store = ProfileStore(state)
        t.section("3. request --profile: the stored DPoP-bound access token, a fresh proof")
        _request(t, servers.api_url, pin_opts, report, "request")
        before = store.load(LOGIN_DEMO_PROFILE)
        wait = max(0.0, (before.expires_at or 0.0) - time.time()) + 0.3
        t.section(
            f"4. the access token expires (in {wait:.1f} s); the next request refreshes "
            "with a proof from the same key"
        )
        time.sleep(wait)
        refreshes = servers.counters.tokens_refresh_token
        _request(t, servers.api_url, pin_opts, report, "request after expiry")
        after = store.load(LOGIN_DEMO_PROFILE)
        report.refreshed = servers.counters.tokens_refresh_token > refreshes
        report.rotated = (
            after.refresh_token is not None and after.refresh_token != before.refresh_token
        )
        refresh = "refresh_token grant with a DPoP proof" if report.refreshed else "NONE"
        rotation = "rotated (the profile holds the new one)" if report.rotated else "NOT rotated"
        t.write(f"# refresh  : {refresh}; refresh token {rotation}\n")

        t.section("5. logout: revoke the refresh token (RFC 7009), delete the profile")
        revocations = servers.counters.revocations
        _check(t.run(["logout", "--profile", LOGIN_DEMO_PROFILE, *pin_opts]), "logout")
        report.revoked = servers.counters.revocations > revocations
        report.deleted = not (state / f"{LOGIN_DEMO_PROFILE}.json").exists()
        counters = servers.counters.snapshot()
    finally:
        servers.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    report.jkt, report.label = jkt, label
    report.elapsed = time.perf_counter() - started
    t.write(
        f"\n# key jkt        : {jkt}\n"
        + "".join(f"# token cnf.jkt  : {c}\n" for c in report.cnf_jkts)
        + f"# server counters: {json.dumps(counters, sort_keys=True)}\n"
    )
    out.emit(report.document(), report.summary())
    return 0 if report.ok else 5
