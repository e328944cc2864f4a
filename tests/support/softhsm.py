"""A throwaway SoftHSM2 installation per test run.

``SOFTHSM2_CONF`` is set before anything loads libsofthsm2 (the module reads it once, at
``C_Initialize``), and every token the run needs is initialized up front, because SoftHSM2 only
sees tokens that exist when it is initialized. PINs are random per run.

Tokens are initialized and keys imported in a child process (``children.softhsm_admin``) through
``dpop_hsm.signers.pkcs11_admin``, with the PINs on its stdin: no PIN is ever an argument
(``softhsm2-util --pin`` would show it in ``ps``), and a token re-created under a live signer
is created outside the test process, as a re-inserted token would be.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import children
from tests.support.hardware import unavailable

ROOT = Path(__file__).resolve().parents[2]

# Tokens of one run: "dpop" for signing tests, "fault" for the re-initialization test (it is
# wiped and re-created under a live signer), "spare" for tests that must not share a login.
TOKEN_LABELS = ("dpop", "fault", "spare")


@dataclass(frozen=True)
class SoftHsm:
    """Where the run's SoftHSM2 lives and how to reach its tokens (PINs are test-only)."""

    module: str
    conf: Path
    tokendir: Path
    pin: str
    so_pin: str

    def uri(self, token: str = "dpop", **attrs: Any) -> str:
        """A pkcs11: URI on one of the run's tokens (no PIN inside)."""
        from dpop_hsm.signers.pkcs11_uri import Pkcs11Uri

        return str(Pkcs11Uri(token=token, module_path=self.module).replace(**attrs))

    def util(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``softhsm2-util`` for what needs no PIN (``--delete-token``, ``--show-slots``)."""
        return subprocess.run(
            ["softhsm2-util", *args],
            env={**os.environ, "SOFTHSM2_CONF": str(self.conf)},
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def admin(self, request: dict[str, Any]) -> None:
        """Run ``children.softhsm_admin`` in a child process; PINs travel on its stdin only."""
        secrets_in = {"module": self.module, "pin": self.pin, "so_pin": self.so_pin}
        done = subprocess.run(
            children.command("softhsm_admin"),
            input=json.dumps({**secrets_in, **request}),
            env={**os.environ, "SOFTHSM2_CONF": str(self.conf)},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise AssertionError(f"SoftHSM2 admin step {sorted(request)} failed:\n{done.stderr}")

    def init_token(self, *labels: str) -> None:
        self.admin({"init": list(labels)})

    def import_ec_key(self, token: str, pem: Path, *, label: str, key_id: bytes) -> None:
        """Import a PKCS#8 EC key as a private/public object pair (token must exist)."""
        self.admin(
            {"import": {"token": token, "pem": str(pem), "label": label, "id": key_id.hex()}}
        )

    def delete_token(self, label: str) -> None:
        self.util("--delete-token", "--token", label)


def softhsm_module() -> str | None:
    from dpop_hsm.errors import TokenNotPresentError
    from dpop_hsm.signers.pkcs11_uri import resolve_module_name

    try:
        return resolve_module_name("softhsm2")
    except TokenNotPresentError:
        return None


def write_conf(conf: Path, tokendir: Path) -> None:
    conf.write_text(
        f"directories.tokendir = {tokendir}\nobjectstore.backend = file\nlog.level = ERROR\n",
        encoding="utf-8",
    )


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    if shutil.which("softhsm2-util") is None:
        unavailable("softhsm2-util not installed (apt-get install softhsm2)")
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        unavailable("python-pkcs11 not installed (pip install 'dpop_hsm[pkcs11]')")
    module = softhsm_module()
    if module is None:
        unavailable("libsofthsm2.so not found")
    base = tmp_path_factory.mktemp("softhsm")
    tokendir = base / "tokens"
    tokendir.mkdir()
    conf = base / "softhsm2.conf"
    write_conf(conf, tokendir)
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    hsm = SoftHsm(
        module=module,
        conf=conf,
        tokendir=tokendir,
        pin=secrets.token_hex(6),
        so_pin=secrets.token_hex(6),
    )
    hsm.init_token(*TOKEN_LABELS)
    yield hsm
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous


@pytest.fixture(scope="session")
def softhsm_es256_signer(softhsm: SoftHsm) -> Iterator[Any]:
    """An ES256 key generated on the run's SoftHSM2 token, for the ``dpop_signer`` suite."""
    from dpop_hsm.signers.pkcs11 import Pkcs11Signer

    with Pkcs11Signer.generate(
        softhsm.uri(object="contract-es256"), "ES256", secret=softhsm.pin
    ) as signer:
        yield signer


def pytest_configure(config: pytest.Config) -> None:
    # Every test parametrized over ``dpop_signer`` (token client, transports, local servers)
    # also runs with the SoftHSM2 key: the same contract, a real PKCS#11 token behind it.
    # Imported here, not at module top: conftest registers tests.support.servers as a plugin
    # after this module, and importing it earlier would defeat pytest's assertion rewriting.
    from tests.support.servers import register_dpop_signer

    register_dpop_signer("softhsm-es256", "softhsm_es256_signer")
