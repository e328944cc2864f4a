"""The README's promises, executed: the quickstart runs as printed (only the URLs, the token's
label and the secrets swapped for the test run's), and its first lines are the two commands."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import pytest

from dpop_hsm.signers.pkcs11 import Pkcs11Signer
from dpop_hsm.testing import ClientRegistration, LocalDPoPServers

README = Path(__file__).resolve().parent.parent / "README.md"


def quickstart() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"## Quickstart.*?```python\n(.*?)```", text, re.S)
    assert match, "README has no Python quickstart"
    return match.group(1)


def test_first_lines_are_the_two_newcomer_commands() -> None:
    lines = [line for line in README.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert lines[1] == "```sh"
    assert lines[2].startswith("scripts/demo ") and lines[3].startswith("scripts/test ")
    assert lines[4] == "```"
    assert "bash scripts/test" in (README.parent / ".ci" / "run").read_text(encoding="utf-8")


@pytest.mark.softhsm
def test_quickstart_runs_as_printed(softhsm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    code = quickstart()
    uri = softhsm.uri("dpop", object="readme-key")
    with Pkcs11Signer.generate(uri, "ES256", secret=softhsm.pin) as generated:
        jkt = generated.thumbprint
    monkeypatch.setenv("DPOP_HSM_PIN", softhsm.pin)
    monkeypatch.setenv("CLIENT_SECRET", "readme-secret")
    client = ClientRegistration("m2m.dpop", "client_secret_basic", "readme-secret")
    with LocalDPoPServers(clients=[client]) as servers:
        code = code.replace("token=dpop;object=dpop-demo", "token=dpop;object=readme-key")
        code = code.replace("https://as.example/connect/token", servers.token_endpoint)
        code = code.replace("https://api.example/api/dpop/test", servers.api_url)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md quickstart", "exec"), {})
        counters = servers.counters.snapshot()
    printed = out.getvalue().splitlines()
    assert len(printed) == 2  # one line from requests, one from httpx
    for line in printed:
        assert "'authorization_scheme', 'value': 'DPoP'" in line
        assert jkt in line  # cnf.jkt of the token is the SoftHSM2 key's thumbprint
    assert counters["tokens_issued"] == 1  # one cached token served both adapters
