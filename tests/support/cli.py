"""Fixtures and helpers for the ``dpop-hsm`` command: run it as users do, in a subprocess.

``served`` is ``dpop-hsm serve --json`` running in the background for the whole session (one
AS + RS requiring nonces, with the demo clients); ``run_cli`` runs one command against it with
stdin closed, so nothing can prompt. ``pem_key`` is a fresh ES256 key file made by ``keygen``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CLI = [sys.executable, "-m", "dpop_hsm"]
SECRET = "secret"  # the local servers' demo client secret (test servers only)
# Settings the CLI reads from the environment: a test sets what it needs, never inherits them.
_CLI_ENV = (
    "DPOP_HSM_PIN",
    "DPOP_HSM_KEY",
    "DPOP_HSM_CLIENT_SECRET",
    "DPOP_HSM_TOKEN_ENDPOINT",
    "DPOP_HSM_CLIENT_ID",
    "DPOP_HSM_SCOPE",
    "DPOP_HSM_RESOURCE",
    "DPOP_HSM_AUTH_METHOD",
    "DPOP_HSM_TIMEOUT",
    "DPOP_HSM_ASSERTION_KEY",
    "DPOP_HSM_PIN_SOURCE",
    "DPOP_HSM_CLIENT_SECRET_SOURCE",
    "DPOP_HSM_CONFIG",
    "DPOP_HSM_CONFIG_PROFILE",
    "DPOP_HSM_STATE_DIR",
)


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without the CLI's settings, plus ``env``."""
    base = {k: v for k, v in os.environ.items() if k not in _CLI_ENV}
    # No user config file: XDG_CONFIG_HOME points at a directory that has none.
    base["XDG_CONFIG_HOME"] = os.devnull
    return {**base, **(env or {})}


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def one_json(result: subprocess.CompletedProcess[str]) -> Any:
    """stdout must be exactly one JSON document (``json.loads`` rejects anything after it)."""
    try:
        return json.loads(result.stdout)
    except ValueError as e:
        raise AssertionError(
            f"stdout is not one JSON document: {result.stdout!r}\nstderr: {result.stderr}"
        ) from e


def json_error(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The ``{"error": {code, message, hint}}`` document of a failed ``--json`` run."""
    doc = one_json(result)
    assert set(doc) == {"error"}, doc
    error: dict[str, Any] = doc["error"]
    assert set(error) == {"code", "message", "hint"}, error
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["hint"] is None or isinstance(error["hint"], str)
    assert "Traceback" not in result.stderr
    return error


def read_json_document(stream: Any, timeout: float = 30) -> dict[str, Any]:
    """Read one indented JSON document (ends with a line ``}``) from a running process."""
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("}"):
            break
    doc: dict[str, Any] = json.loads("".join(lines))
    return doc


def stop(proc: subprocess.Popen[str]) -> None:
    """Ctrl-C, as a user stops ``serve``; killed if it does not stop."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@pytest.fixture(scope="session")
def served() -> Iterator[dict[str, Any]]:
    """``dpop-hsm serve --json`` in the background; yields its printed endpoints."""
    proc = subprocess.Popen(
        [*CLI, "serve", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
        env=cli_env(),
    )
    try:
        assert proc.stdout is not None
        yield read_json_document(proc.stdout)
    finally:
        stop(proc)


def request_args(served: dict[str, Any], key: str, *extra: str) -> list[str]:
    """``request`` against ``served`` as the demo client, secret from $TEST_CLIENT_SECRET."""
    return [
        "request",
        "--key",
        key,
        *client_args(served),
        *extra,
        served["api"],
    ]


def client_args(served: dict[str, Any]) -> list[str]:
    return [
        "--token-endpoint",
        served["token_endpoint"],
        "--client-id",
        "m2m.dpop",
        "--auth-method",
        "client_secret_post",
        "--client-secret-source",
        "env:TEST_CLIENT_SECRET",
        "--scope",
        "api",
    ]


@pytest.fixture
def pem_key(tmp_path: Path) -> str:
    """A fresh ES256 key file, made by ``dpop-hsm keygen``."""
    key = str(tmp_path / "k.pem")
    made = run_cli("keygen", "--key", key)
    assert made.returncode == 0, made.stderr
    return key
