"""The client-secret prompt on a real terminal: asked once per run, although the token request
is sent twice (the AS of ``dpop-hsm serve`` demands a DPoP nonce first, RFC 9449 §8).

The command runs on a pseudo-terminal (``pty.fork``: the child's controlling terminal, where
``getpass`` asks); the test answers the first prompt with one line and then only reads.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import sys
import time
from typing import Any

from tests.support.cli import SECRET, cli_env

PROMPT = b"client secret: "


def run_on_terminal(args: list[str], answer: bytes, timeout: float = 60) -> tuple[int, bytes]:
    """Run ``dpop-hsm ARGS`` on a pty; type ``answer`` at each prompt's first appearance only.

    Returns (exit status, everything the terminal showed). A second prompt gets no answer:
    the child would wait forever, so after ``timeout`` it is killed and the status is -9.
    """
    env = cli_env()
    pid, fd = pty.fork()
    if pid == 0:  # the child: never returns
        os.execve(sys.executable, [sys.executable, "-m", "dpop_hsm", *args], env)
    shown = b""
    answered = False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal (it exited)
                break
            if not chunk:
                break
            shown += chunk
            if not answered and PROMPT in shown:
                os.write(fd, answer + b"\n")
                answered = True
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return (os.waitstatus_to_exitcode(status), shown)


def test_secret_prompt_appears_once_despite_the_nonce_retry(
    served: dict[str, Any], pem_key: str
) -> None:
    args = [
        "request",
        "--key",
        pem_key,
        "--token-endpoint",
        served["token_endpoint"],
        "--client-id",
        "m2m.dpop",
        "--auth-method",
        "client_secret_post",
        "--scope",
        "api",
        "-v",  # the session log shows both token requests
        served["api"],
    ]
    status, shown = run_on_terminal(args, SECRET.encode(), timeout=30)
    assert status == 0, shown.decode(errors="replace")
    assert shown.count(PROMPT) == 1
    text = shown.decode(errors="replace")
    # Two token requests (the first answered use_dpop_nonce), one prompt; the API answered.
    assert text.count("POST /connect/token") == 2
    assert "use_dpop_nonce" in text
    assert '"authorization_scheme"' in text
    assert SECRET.encode() + b"\r\n" not in shown  # getpass does not echo what was typed
