"""The README's promises, executed: its first lines are the two newcomer commands, and the
Quickstart runs exactly as printed — both shell blocks and the Python code, byte for byte —
against ``dpop-hsm serve`` and the SoftHSM2 token that ``scripts/demo`` sets up.

The Quickstart names fixed ports (a reader must be able to paste it), so concurrent runs of
this test on one machine take turns through a lock file instead of racing for the ports.
"""

from __future__ import annotations

import ast
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.hardware import unavailable
from tests.support.softhsm import softhsm_module

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def quickstart_blocks() -> tuple[str, str, str]:
    """The Quickstart's code blocks in reading order: serve (sh), client (sh), Python."""
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Quickstart.*?(?=^## )", text, re.S | re.M)
    assert section, "README has no Quickstart section"
    blocks = re.findall(r"^```(\w+)\n(.*?)^```", section.group(0), re.S | re.M)
    assert [lang for lang, _ in blocks] == ["sh", "sh", "python"], blocks
    return blocks[0][1], blocks[1][1], blocks[2][1]


def test_first_lines_are_the_two_newcomer_commands() -> None:
    lines = [line for line in README.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert lines[1] == "```sh"
    assert lines[2].startswith("scripts/demo ") and lines[3].startswith("scripts/test ")
    assert lines[4] == "```"
    assert "bash scripts/test" in (README.parent / ".ci" / "run").read_text(encoding="utf-8")


def test_quickstart_is_valid_python_and_shell() -> None:
    serve, client, code = quickstart_blocks()
    ast.parse(code, "README.md quickstart")
    for block in (serve, client):
        subprocess.run(["bash", "-n", "-c", block], check=True)


@contextmanager
def ports_lock() -> Iterator[None]:
    """One Quickstart run at a time per machine: they all need the README's ports."""
    path = Path(tempfile.gettempdir()) / "dpop_hsm-readme-quickstart.lock"
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def wait_listening(port: int, proc: subprocess.Popen[str]) -> None:
    """Until 127.0.0.1:port accepts connections; fails if the server process exits first."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"dpop-hsm serve exited with {proc.returncode}: {err}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail(f"dpop-hsm serve did not listen on port {port}")


@pytest.mark.softhsm
def test_quickstart_runs_verbatim_against_dpop_hsm_serve(tmp_path: Path) -> None:
    if shutil.which("softhsm2-util") is None or softhsm_module() is None:
        unavailable("SoftHSM2 is not installed (apt-get install softhsm2)")
    serve, client, code = quickstart_blocks()
    venv_bin = Path(sys.prefix) / "bin"
    for tool in ("python", "dpop-hsm"):
        assert (venv_bin / tool).exists(), (
            f"the Quickstart runs .venv/bin/{tool}: not in {venv_bin}"
        )

    # A checkout as scripts/demo leaves it: the token, its conf and PIN file under
    # softhsm/tokens (made by the same script the demo runs), and .venv with dpop_hsm.
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DPOP_HSM_") and k not in ("SOFTHSM2_CONF", "CLIENT_SECRET")
    }
    setup = subprocess.run(
        [str(ROOT / "scripts" / "softhsm-setup"), str(checkout / "softhsm" / "tokens")],
        env={**env, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert setup.returncode == 0, setup.stderr
    (checkout / "quickstart.py").write_text(code, encoding="utf-8")

    # The key's thumbprint, to check the printed tokens are bound to it (RFC 9449 §6).
    ref = re.search(r'load_signer\(\s*"([^"]+)"', code)
    assert ref, "the Quickstart loads no key by reference"
    conf = checkout / "softhsm" / "tokens" / "softhsm2.conf"
    thumbprint = subprocess.run(
        [sys.executable, "-m", "dpop_hsm", "thumbprint", "--key", ref.group(1)],
        cwd=checkout,
        env={**env, "SOFTHSM2_CONF": str(conf)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", thumbprint), thumbprint

    ports = [int(p) for p in re.findall(r"--(?:as|rs)-port (\d+)", serve)]
    assert len(ports) == 2, serve
    with ports_lock():
        server = subprocess.Popen(
            ["bash", "-c", serve],
            cwd=checkout,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            for port in ports:
                wait_listening(port, server)
            run = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", client],
                cwd=checkout,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert server.poll() is None, "dpop-hsm serve stopped during the Quickstart"
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.communicate(timeout=30)
    assert run.returncode == 0, run.stderr
    printed = run.stdout.splitlines()
    assert len(printed) == 2, run.stdout  # one line from requests, one from httpx
    for line in printed:
        claims = {item["type"]: item["value"] for item in ast.literal_eval(line)}
        assert claims["authorization_scheme"] == "DPoP"
        assert thumbprint in claims["cnf"]  # the token is bound to the SoftHSM2 key
    assert printed[0] == printed[1]  # one cached token served both adapters
