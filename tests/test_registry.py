"""load_signer, generate_signer and the scheme registry; importing dpop_hsm loads no backend
and no httpx."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dpop_hsm.errors import KeyReferenceError, PinError, SecretSourceError
from dpop_hsm.secret_sources import SecretSource
from dpop_hsm.signers import Signer, generate_signer, load_signer, register_scheme
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


# --- generate_signer ---------------------------------------------------------------------


def test_generate_file_key(tmp_path: Path) -> None:
    path = tmp_path / "new key.pem"
    signer = generate_signer(str(path), alg="EdDSA")
    assert signer.alg == "EdDSA"
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_signer(str(path)).thumbprint == signer.thumbprint
    assert load_signer("file:" + str(path).replace(" ", "%20")).thumbprint == signer.thumbprint
    default = generate_signer("file:" + str(tmp_path / "d.pem").replace(" ", "%20"))
    assert default.alg == "ES256" and (tmp_path / "d.pem").is_file()


def test_generate_file_key_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(b"precious")
    with pytest.raises(KeyReferenceError, match="refusing to overwrite"):
        generate_signer(str(path))
    assert path.read_bytes() == b"precious"
    # A dangling symlink is not followed: O_EXCL refuses to create its target.
    target = tmp_path / "target.pem"
    link = tmp_path / "link.pem"
    link.symlink_to(target)
    with pytest.raises(KeyReferenceError, match="cannot create"):
        generate_signer(str(link))
    assert not target.exists()
    with pytest.raises(KeyReferenceError, match="cannot create"):
        generate_signer(str(tmp_path / "no-such-dir" / "k.pem"))


def test_generate_encrypted_file_key(tmp_path: Path) -> None:
    path = tmp_path / "enc.pem"
    password = "pw-" + "5" * 12
    asked: list[int] = []

    def prompt() -> str:
        asked.append(1)
        return password

    signer = generate_signer(str(path), secret=prompt)
    assert asked == [1]  # the source is asked once
    assert password not in path.read_text(encoding="ascii")
    assert b"ENCRYPTED PRIVATE KEY" in path.read_bytes()
    with pytest.raises(SecretSourceError):
        load_signer(str(path))
    assert load_signer(str(path), secret=password).thumbprint == signer.thumbprint


@pytest.mark.softhsm
def test_generate_pkcs11_key(softhsm: Any) -> None:
    uri = softhsm.uri(object="registry-keygen")
    signer = generate_signer(uri, alg="ES384", secret=softhsm.pin)
    try:
        assert signer.alg == "ES384"
        with load_signer(uri, secret=softhsm.pin) as again:  # type: ignore[attr-defined]
            assert again.thumbprint == signer.thumbprint
        with pytest.raises(KeyReferenceError, match="refusing to overwrite"):
            generate_signer(uri, secret=softhsm.pin)
    finally:
        signer.close()  # type: ignore[attr-defined]


@pytest.mark.tpm
def test_generate_tpm_keys(swtpm: Any, tmp_path: Path) -> None:
    from tests.support.tpm import fresh_handle

    blob = f"tpm2:blob={tmp_path / 'k.tss'};tcti={swtpm.tcti}"
    with generate_signer(blob) as signer:  # type: ignore[attr-defined]
        assert signer.alg == "ES256"
        with load_signer(blob) as again:  # type: ignore[attr-defined]
            assert again.thumbprint == signer.thumbprint
    with pytest.raises(KeyReferenceError, match="refusing to overwrite"):
        generate_signer(blob)
    handle = f"tpm2:handle={fresh_handle():#x};tcti={swtpm.tcti};alg=ES384"
    with pytest.raises(KeyReferenceError, match="contradicts"):
        generate_signer(handle, alg="ES256")
    with generate_signer(handle, alg="ES384") as persistent:  # type: ignore[attr-defined]
        assert persistent.alg == "ES384"
    with pytest.raises(KeyReferenceError, match="already in use"):
        generate_signer(handle)


@pytest.mark.tpm
def test_generate_tpm_key_auth_from_the_reference(
    swtpm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DPOP_HSM_TEST_KEY_AUTH", "key-auth-71")
    monkeypatch.setenv("DPOP_HSM_TPM_AUTH", "never-used-for-new-keys")
    ref = f"tpm2:blob={tmp_path / 'a.tss'};tcti={swtpm.tcti};auth-source=env:DPOP_HSM_TEST_KEY_AUTH"
    made = generate_signer(ref, secret="ignored-the-reference-names-a-source")
    made.close()  # type: ignore[attr-defined]
    monkeypatch.delenv("DPOP_HSM_TPM_AUTH")
    with load_signer(ref) as signer:  # type: ignore[attr-defined]
        assert len(signer.sign(b"x")) == 64
    wrong = load_signer(ref, secret="wrong")
    with wrong, pytest.raises(PinError):  # type: ignore[attr-defined]
        wrong.sign(b"x")


def test_generate_with_a_user_scheme() -> None:
    made: list[tuple[str, str | None, SecretSource | None]] = []

    def generator(ref: str, alg: str | None, secret: SecretSource | None) -> Signer:
        made.append((ref, alg, secret))
        return SoftwareSigner.generate(alg or "ES256")

    register_scheme("testgen", lambda ref, secret: SoftwareSigner.generate(), generator=generator)
    assert generate_signer("testgen:k1", alg="ES384", secret="s").alg == "ES384"
    assert made == [("testgen:k1", "ES384", "s")]
    register_scheme("testnogen", lambda ref, secret: SoftwareSigner.generate())
    with pytest.raises(KeyReferenceError, match="cannot create keys"):
        generate_signer("testnogen:k1")
    with pytest.raises(KeyReferenceError, match="unknown key reference scheme"):
        generate_signer("nosuchscheme:k1")
    for bad in ("", "a\nb"):
        with pytest.raises(KeyReferenceError):
            generate_signer(bad)
