"""The pytest plugin as a user meets it: a sample project whose tests use only its fixtures.

The sample is the README's complete test, run by a separate pytest process in a directory of
its own (no conftest of ours, the plugin found through its ``pytest11`` entry point).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from dpop_hsm.signers.base import Signer
from dpop_hsm.testing import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_PUBLIC_CLIENT_ID,
    LocalDPoPServers,
)
from dpop_hsm.token import TokenClient

README = Path(__file__).resolve().parent.parent / "README.md"

SECOND_TEST = """

def test_fixtures_are_fresh_per_test(dpop_servers, dpop_signer):
    assert dpop_servers.counters.tokens_issued == 0
    assert dpop_signer.alg == "ES256" and "d" not in dpop_signer.public_jwk
"""


def readme_plugin_example() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"## Testing your code with pytest.*?```python\n(.*?)```", text, re.S)
    assert match, "README has no pytest plugin example"
    return match.group(1)


def _run_pytest(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_entry_point_names_the_plugin_module() -> None:
    (plugin,) = [e for e in entry_points(group="pytest11") if e.name == "dpop_hsm"]
    assert plugin.value == "dpop_hsm.pytest_plugin"


def test_a_sample_project_passes_with_only_the_plugin_fixtures(tmp_path: Path) -> None:
    # Its own rootdir and ini file: nothing of this repository's test setup applies.
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = --strict-markers\n")
    (tmp_path / "test_sample.py").write_text(readme_plugin_example() + SECOND_TEST)
    result = _run_pytest(tmp_path, "-W", "error")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
    # Without the plugin the same tests cannot even find their fixtures.
    without = _run_pytest(tmp_path, "-p", "no:dpop_hsm")
    assert without.returncode != 0 and "fixture 'dpop_servers' not found" in without.stdout


def test_loading_the_plugin_imports_no_optional_extra() -> None:
    code = (
        "import sys, dpop_hsm.pytest_plugin\n"
        "heavy = ('pkcs11', 'tpm2_pytss', 'httpx', 'anyio', 'requests', 'cryptography')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


def test_the_default_client_of_bare_servers_gets_a_token(dpop_signer: Signer) -> None:
    with LocalDPoPServers() as servers:
        token = TokenClient(
            dpop_signer,
            token_endpoint=servers.token_endpoint,
            client_id=DEFAULT_CLIENT_ID,
            client_secret=DEFAULT_CLIENT_SECRET,
        ).get_token()
        assert token.is_dpop
        assert list(servers.clients) == [DEFAULT_CLIENT_ID, DEFAULT_PUBLIC_CLIENT_ID]
        assert servers.clients[DEFAULT_PUBLIC_CLIENT_ID].public
    assert list(LocalDPoPServers(clients=[]).clients) == []


def test_this_repositorys_dpop_signer_still_wins_over_the_plugins(
    dpop_signer: Signer, request: pytest.FixtureRequest
) -> None:
    # tests/support/servers.py defines its own parametrized dpop_signer; the plugin's
    # (loaded earlier, through the entry point) must not shadow it here.
    assert request.config.pluginmanager.has_plugin("dpop_hsm")
    kind = request.node.callspec.params["dpop_signer"]
    expected = {"software-es256": "ES256", "software-ed25519": "EdDSA"}
    if kind in expected:
        assert dpop_signer.alg == expected[kind]
