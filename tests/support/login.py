"""A test acting as the developer at the browser: for ``dpop_hsm.login`` and ``dpop-hsm login``.

:class:`BrowserUser` is a :class:`~dpop_hsm.login.LoginPrompt`: given the authorization URL it
signs in and consents on the local AS over HTTP (``LocalDPoPServers.complete_login``) and then
does what the browser does with the redirect — a GET to the loopback listener — optionally
tampered with first, or sent twice. :class:`DeviceUser` approves (or denies) a device login.
:func:`run_cli_login` runs ``dpop-hsm login`` in a subprocess, reads the URL (or user code) it
prints on stderr exactly as a person would, and acts on it. :func:`claims` reads an access
token's JWT claims.
"""

from __future__ import annotations

import base64
import json
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import requests

from dpop_hsm.device import DeviceAuthorization
from dpop_hsm.testing import LocalDPoPServers
from tests.support.cli import CLI, cli_env

Tamper = Callable[[str], str]
REFUSED = -1  # a callback whose connection the closed listener refused or reset


def claims(access_token: str) -> dict[str, Any]:
    """The payload of a JWT access token (the local AS signs them; the signature is its RS's)."""
    payload = access_token.split(".")[1]
    decoded: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return decoded


def replace_param(url: str, name: str, value: str | None) -> str:
    """``url`` with query parameter ``name`` set to ``value`` (None: removed)."""
    parts = urlsplit(url)
    pairs = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != name]
    if value is not None:
        pairs.append((name, value))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(pairs), ""))


@dataclass
class BrowserUser:
    """Completes the login in a thread, as the user's browser would, and remembers the steps."""

    servers: LocalDPoPServers
    approve: bool = True
    tamper: Tamper | None = None
    callbacks: int = 1
    act: bool = True
    urls: list[str] = field(default_factory=list)
    redirects: list[str] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)

    def show_authorization_url(self, url: str) -> None:
        self.urls.append(url)
        if self.act:
            thread = threading.Thread(target=self._browse, args=(url,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def show_device_code(self, authorization: DeviceAuthorization) -> None:
        raise AssertionError("a browser login showed a device code")

    def _browse(self, url: str) -> None:
        try:
            location = self.servers.complete_login(url, approve=self.approve)
            self.redirects.append(location)
            if self.tamper is not None:
                location = self.tamper(location)
            for _ in range(self.callbacks):
                try:
                    self.statuses.append(requests.get(location, timeout=10).status_code)
                except requests.ConnectionError:
                    self.statuses.append(REFUSED)  # the listener is already closed
        except BaseException as e:  # reported by join(), never lost in the thread
            self.errors.append(e)

    def join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=30)
        if self.errors:
            raise self.errors[0]


@dataclass
class DeviceUser:
    """Approves (or denies) the device login on the AS's page, in a thread."""

    servers: LocalDPoPServers
    approve: bool = True
    act: bool = True
    on_show: Callable[[DeviceAuthorization], None] | None = None
    shown: list[DeviceAuthorization] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def show_authorization_url(self, url: str) -> None:
        raise AssertionError("a device login showed an authorization URL")

    def show_device_code(self, authorization: DeviceAuthorization) -> None:
        self.shown.append(authorization)
        if self.on_show is not None:
            self.on_show(authorization)
        if self.act:
            threading.Thread(target=self._approve, args=(authorization,), daemon=True).start()

    def _approve(self, authorization: DeviceAuthorization) -> None:
        try:
            self.servers.approve_device(authorization.user_code, approve=self.approve)
        except BaseException as e:
            self.errors.append(e)


@dataclass
class CliLogin:
    """What one ``dpop-hsm login`` run printed and returned."""

    returncode: int
    stdout: str
    stderr: str
    url: str | None


def run_cli_login(
    args: list[str],
    *,
    env: dict[str, str],
    servers: LocalDPoPServers,
    device: bool = False,
    timeout: float = 120,
) -> CliLogin:
    """Run ``dpop-hsm login ARGS``; read stderr line by line as a user reads the terminal.

    Browser login: the authorization URL is the line that is nothing but an ``http`` URL; the
    test signs in on the AS and follows the redirect to the CLI's loopback listener. Device
    login: the user code is the last word of the line naming the verification URI; the test
    approves it on the AS.
    """
    proc = subprocess.Popen(
        [*CLI, "login", *args],
        env=cli_env(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None and proc.stdout is not None
    seen: list[str] = []
    url: str | None = None
    try:
        for line in proc.stderr:
            seen.append(line)
            text = line.strip()
            if not device and text.startswith("http") and " " not in text:
                url = text
                location = servers.complete_login(url)
                requests.get(location, timeout=10)
                break
            if device and text.startswith("To log in, open"):
                servers.approve_device(text.split()[-1])
                url = text
                break
        rest_err = proc.stderr.read()
        out = proc.stdout.read()
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    return CliLogin(proc.returncode, out, "".join(seen) + rest_err, url)
