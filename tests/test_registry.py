"""load_signer and the scheme registry; importing dpop_hsm loads no backend and no httpx."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpop_hsm.errors import KeyReferenceError
from dpop_hsm.secret_sources import SecretSource
from dpop_hsm.signers import Signer, load_signer, register_scheme
from dpop_hsm.signers.software import SoftwareSigner

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SoftwareSigner]:
    signer = SoftwareSigner.generate("ES256")
    path = tmp_path_factory.mktemp("keys") / "dpop key.pem"  # a space, to exercise %20
    path.write_bytes(signer.private_pem())
    return path, signer


def test_plain_path(key_file: tuple[Path, SoftwareSigner]) -> None:
    path, signer = key_file
    assert load_signer(str(path)).thumbprint == signer.thumbprint


def test_relative_path(
    key_file: tuple[Path, SoftwareSigner], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, signer = key_file
    monkeypatch.chdir(path.parent)
    assert load_signer(path.name).thumbprint == signer.thumbprint
    assert load_signer("file:" + path.name.replace(" ", "%20")).thumbprint == signer.thumbprint


def test_file_uris(key_file: tuple[Path, SoftwareSigner]) -> None:
    path, signer = key_file
    quoted = str(path).replace(" ", "%20")
    for ref in (f"file://{quoted}", f"file://localhost{quoted}", f"FILE://{quoted}"):
        assert load_signer(ref).thumbprint == signer.thumbprint


def test_file_uri_with_remote_host(key_file: tuple[Path, SoftwareSigner]) -> None:
    with pytest.raises(KeyReferenceError):
        load_signer(f"file://remote.example{key_file[0]}")


def test_encrypted_key_with_secret(tmp_path: Path) -> None:
    signer = SoftwareSigner.generate("EdDSA")
    path = tmp_path / "enc.pem"
    path.write_bytes(signer.private_pem("pw-123456"))
    assert load_signer(str(path), secret=lambda: "pw-123456").thumbprint == signer.thumbprint


def test_jwk_file(tmp_path: Path) -> None:
    path = tmp_path / "k.jwk"
    path.write_text(json.dumps({"kty": "OKP", "crv": "Ed25519", "d": "A" * 43}))
    assert load_signer(str(path)).alg == "EdDSA"


@pytest.mark.parametrize("ref", ["vault:secret/key", "kms:arn:aws:kms:key", "s3+ssl:bucket/key"])
def test_unknown_scheme(ref: str) -> None:
    with pytest.raises(KeyReferenceError, match="unknown key reference scheme"):
        load_signer(ref)


@pytest.mark.parametrize("ref", ["", "   ", "key\n.pem", "a\x00b"])
def test_malformed_references(ref: str) -> None:
    with pytest.raises(KeyReferenceError):
        load_signer(ref)


def test_non_string_reference() -> None:
    with pytest.raises(KeyReferenceError):
        load_signer(None)  # type: ignore[arg-type]


def test_missing_file() -> None:
    with pytest.raises(KeyReferenceError):
        load_signer("file:///nonexistent/dpop/key.pem")


def test_register_scheme_with_custom_loader() -> None:
    inner = SoftwareSigner.generate("ES384")
    seen: list[tuple[str, SecretSource | None]] = []

    def loader(ref: str, secret: SecretSource | None) -> Signer:
        seen.append((ref, secret))
        return inner

    register_scheme("testkms", loader)
    signer = load_signer("TestKMS:projects/p/keys/k", secret="pin")
    assert signer is inner
    assert seen == [("TestKMS:projects/p/keys/k", "pin")]


@pytest.mark.parametrize("scheme", ["", "bad scheme", "a/b", "é", "x:y"])
def test_register_scheme_rejects_bad_names(scheme: str) -> None:
    with pytest.raises(KeyReferenceError):
        register_scheme(scheme, lambda ref, secret: SoftwareSigner.generate())


def test_import_loads_no_backend_and_no_httpx() -> None:
    code = (
        "import sys, dpop_hsm\n"
        "from dpop_hsm import ProofFactory, SoftwareSigner, verify_proof, load_signer\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('pkcs11', 'tpm2_pytss', 'httpx') or m in ('dpop_hsm.signers.pkcs11', "
        "'dpop_hsm.signers.tpm'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""
