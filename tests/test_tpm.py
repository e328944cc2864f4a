"""TpmSigner against a real TPM 2.0 simulator (swtpm) through tpm2-pytss: contract, proofs,
no transient-object leaks, threads, a TPM restart, typed errors, key files.

Signatures are checked with ``cryptography`` from the public JWK alone, never with our code.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature

import dpop_hsm
from dpop_hsm import (
    DPoPError,
    KeyNotFoundError,
    KeyReferenceError,
    PinError,
    TokenNotPresentError,
    UnsupportedKeyError,
    load_signer,
)
from dpop_hsm.jose import b64url_decode, jwk_thumbprint
from dpop_hsm.proof import ProofFactory
from dpop_hsm.signers import Signer
from tests.support.tpm import SwTpm, fresh_handle
from tests.support.verifier import verify_proof_signature
from tests.support.verifier import verify_signature as verify_raw

pytestmark = pytest.mark.tpm


@pytest.fixture(scope="module")
def persistent(swtpm: SwTpm) -> Iterator[dpop_hsm.TpmSigner]:
    signer = dpop_hsm.TpmSigner.generate(tcti=swtpm.tcti, handle=fresh_handle(), auth="key-auth")
    with signer:
        yield signer


@pytest.fixture(scope="module")
def blob_key(swtpm: SwTpm, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tpmkeys") / "dpop.tss"
    dpop_hsm.TpmSigner.generate(tcti=swtpm.tcti, blob_path=path).close()
    return path


# --- contract -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["persistent", "blob"])
def test_signer_contract(
    kind: str, swtpm: SwTpm, persistent: dpop_hsm.TpmSigner, blob_key: Path
) -> None:
    if kind == "persistent":
        ref = f"tpm2:handle={persistent.reference.handle:#x};tcti={swtpm.tcti}"
        signer = load_signer(ref, secret="key-auth")
    else:
        signer = load_signer(f"tpm2:blob={blob_key};tcti={swtpm.tcti}")
    assert isinstance(signer, dpop_hsm.TpmSigner)
    assert isinstance(signer, Signer)
    with signer:
        assert signer.alg == "ES256"
        jwk = dict(signer.public_jwk)
        assert set(jwk) == {"kty", "crv", "x", "y"}
        assert (jwk["kty"], jwk["crv"]) == ("EC", "P-256")
        assert len(b64url_decode(jwk["x"])) == len(b64url_decode(jwk["y"])) == 32
        assert signer.thumbprint == jwk_thumbprint(jwk)
        for msg in (b"", b"header.payload", os.urandom(3000)):
            sig = signer.sign(msg)
            verify_raw(jwk, msg, sig)
            with pytest.raises(InvalidSignature):
                verify_raw(jwk, msg + b"!", sig)
    if kind == "persistent":
        assert signer.public_jwk == persistent.public_jwk  # same key by handle, new connection


def test_generated_key_attributes(swtpm: SwTpm, persistent: dpop_hsm.TpmSigner) -> None:
    from tpm2_pytss import ESAPI, TPMA_OBJECT

    esapi = ESAPI(swtpm.tcti)
    try:
        tr = esapi.tr_from_tpmpublic(persistent.reference.handle)
        public, _, _ = esapi.read_public(tr)
    finally:
        esapi.close()
    attrs = int(public.publicArea.objectAttributes)
    for must in ("SIGN_ENCRYPT", "FIXEDTPM", "FIXEDPARENT", "SENSITIVEDATAORIGIN", "USERWITHAUTH"):
        assert attrs & int(getattr(TPMA_OBJECT, must)), must
    for must_not in ("RESTRICTED", "DECRYPT", "NODA"):
        assert not attrs & int(getattr(TPMA_OBJECT, must_not)), must_not


def test_lazy_public_name(swtpm: SwTpm) -> None:
    from dpop_hsm.signers.tpm import TpmSigner

    assert dpop_hsm.TpmSigner is TpmSigner


def test_repr_has_no_auth_value(swtpm: SwTpm, persistent: dpop_hsm.TpmSigner) -> None:
    text = repr(persistent)
    assert "key-auth" not in text
    assert persistent.thumbprint in text and f"{persistent.reference.handle:#010x}" in text


# --- proofs and leaks -----------------------------------------------------------------------


def test_2000_es256_proofs_verify_with_cryptography(persistent: dpop_hsm.TpmSigner) -> None:
    factory = ProofFactory(persistent)
    seen = set()
    for i in range(2000):
        proof = factory.create("POST", f"https://api.example/r/{i}", access_token="tok")
        decoded = verify_proof_signature(proof)
        header, claims = decoded.header, decoded.claims
        assert header == {"typ": "dpop+jwt", "alg": "ES256", "jwk": dict(persistent.public_jwk)}
        assert claims["htu"] == f"https://api.example/r/{i}"
        seen.add(claims["jti"])
    assert len(seen) == 2000


def test_200_blob_load_sign_cycles_leave_no_transient_object(swtpm: SwTpm, blob_key: Path) -> None:
    ref = f"tpm2:blob={blob_key};tcti={swtpm.tcti}"
    assert swtpm.transient_handles() == []
    jwk = None
    for i in range(200):
        with dpop_hsm.TpmSigner(ref) as signer:  # full load: primary + key, then saved context
            jwk = jwk or dict(signer.public_jwk)
            assert signer.public_jwk == jwk
            msg = b"cycle %d" % i
            verify_raw(jwk, msg, signer.sign(msg))  # context load + sign + flush
            verify_raw(jwk, msg, signer.sign(msg))
    assert swtpm.transient_handles() == []


def test_errors_leave_no_transient_object(swtpm: SwTpm, tmp_path: Path) -> None:
    path = tmp_path / "authed.tss"
    dpop_hsm.TpmSigner.generate(tcti=swtpm.tcti, blob_path=path, auth="right").close()
    with dpop_hsm.TpmSigner(f"tpm2:blob={path};tcti={swtpm.tcti}", secret="wrong") as signer:
        for _ in range(5):
            with pytest.raises(PinError):
                signer.sign(b"x")
            assert swtpm.transient_handles() == []
    with dpop_hsm.TpmSigner(f"tpm2:blob={path};tcti={swtpm.tcti}", secret="right") as signer:
        verify_raw(signer.public_jwk, b"x", signer.sign(b"x"))
    assert swtpm.transient_handles() == []


# --- threads and faults ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["persistent", "blob"])
def test_eight_threads_sign_correctly(
    kind: str, swtpm: SwTpm, persistent: dpop_hsm.TpmSigner, blob_key: Path
) -> None:
    signer = (
        persistent
        if kind == "persistent"
        else dpop_hsm.TpmSigner(f"tpm2:blob={blob_key};tcti={swtpm.tcti}")
    )
    jwk = dict(signer.public_jwk)
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(n: int) -> None:
        try:
            barrier.wait()
            for i in range(60):
                msg = b"thread %d msg %d" % (n, i)
                verify_raw(jwk, msg, signer.sign(msg))
        except BaseException as e:  # collected and re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if kind == "blob":
        signer.close()
    assert errors == []
    assert swtpm.transient_handles() == []


def test_swtpm_restart_mid_run_is_survived(swtpm_private: SwTpm, tmp_path: Path) -> None:
    tpm = swtpm_private
    blob = dpop_hsm.TpmSigner.generate(tcti=tpm.tcti, blob_path=tmp_path / "k.tss")
    pers = dpop_hsm.TpmSigner.generate(tcti=tpm.tcti, handle=0x81000001)
    with blob, pers:
        for round_ in range(3):
            for signer in (blob, pers):
                for i in range(20):
                    msg = b"round %d sig %d" % (round_, i)
                    verify_raw(signer.public_jwk, msg, signer.sign(msg))
            tpm.restart()  # TPM reset: connections drop, saved contexts die, NV keys stay
        for signer in (blob, pers):
            verify_raw(signer.public_jwk, b"after", signer.sign(b"after"))
        assert tpm.transient_handles() == []

        tpm.stop()  # gone for good: a typed error, not a hang or a TSS exception
        for signer in (blob, pers):
            with pytest.raises(TokenNotPresentError, match="no TPM answers"):
                signer.sign(b"x")
        tpm.start()  # and back: the same signer objects work again
        for signer in (blob, pers):
            verify_raw(signer.public_jwk, b"back", signer.sign(b"back"))


def test_missing_tpm_is_token_not_present(swtpm_private: SwTpm, tmp_path: Path) -> None:
    tcti = swtpm_private.tcti
    dpop_hsm.TpmSigner.generate(tcti=tcti, blob_path=tmp_path / "k.tss").close()
    swtpm_private.stop()
    for ref in (f"tpm2:handle=0x81000001;tcti={tcti}", f"tpm2:blob={tmp_path}/k.tss;tcti={tcti}"):
        with pytest.raises(TokenNotPresentError, match=r"127\.0\.0\.1"):
            load_signer(ref)
    with pytest.raises(TokenNotPresentError):
        dpop_hsm.TpmSigner.generate(tcti=tcti, blob_path=tmp_path / "new.tss")
    assert not (tmp_path / "new.tss").exists()


def test_missing_handle_is_key_not_found(swtpm: SwTpm) -> None:
    with pytest.raises(KeyNotFoundError, match="0x81fffff0"):
        load_signer(f"tpm2:handle=0x81fffff0;tcti={swtpm.tcti}")


def test_wrong_auth_is_pin_error_and_not_retried(
    swtpm: SwTpm, persistent: dpop_hsm.TpmSigner
) -> None:
    from tpm2_pytss import ESAPI, TPM2_CAP, TPM2_PT

    def failures() -> int:
        esapi = ESAPI(swtpm.tcti)
        try:
            _, cap = esapi.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.LOCKOUT_COUNTER, 1)
            return int(cap.data.tpmProperties[0].value)
        finally:
            esapi.close()

    ref = f"tpm2:handle={persistent.reference.handle:#x};tcti={swtpm.tcti}"
    signer = dpop_hsm.TpmSigner(ref, secret="not-the-auth")
    with signer, pytest.raises(PinError) as info:
        signer.sign(b"x")
    assert "not-the-auth" not in str(info.value) and "key-auth" not in str(info.value)
    assert "dictionary-attack" in str(info.value)
    # DA is off on the test TPM (recoveryTime 0), so the counter stays 0: the proof that we
    # tried exactly once is that the error is final and the right auth still works at once.
    assert failures() == 0
    verify_raw(persistent.public_jwk, b"ok", persistent.sign(b"ok"))


def test_blob_needing_auth_without_one_fails_before_the_tpm(
    swtpm: SwTpm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "authed.tss"
    dpop_hsm.TpmSigner.generate(tcti=swtpm.tcti, blob_path=path, auth="s3cret").close()
    monkeypatch.delenv("DPOP_HSM_TPM_AUTH", raising=False)
    with pytest.raises(PinError, match="needs an auth value"):
        dpop_hsm.TpmSigner(f"tpm2:blob={path};tcti=swtpm:host=127.0.0.1,port=1")
    monkeypatch.setenv("DPOP_HSM_TPM_AUTH", "s3cret")
    monkeypatch.setenv("DPOP_HSM_PIN", "not-used-for-tpm")
    with dpop_hsm.TpmSigner(f"tpm2:blob={path};tcti={swtpm.tcti}") as signer:
        verify_raw(signer.public_jwk, b"env", signer.sign(b"env"))
    secret_file = tmp_path / "auth.txt"
    secret_file.write_text("s3cret\n")
    monkeypatch.delenv("DPOP_HSM_TPM_AUTH")
    ref = f"tpm2:blob={path};tcti={swtpm.tcti};auth-source=file:{secret_file}"
    with load_signer(ref) as signer:  # type: ignore[attr-defined]
        verify_raw(signer.public_jwk, b"file", signer.sign(b"file"))


def test_blob_from_another_tpm_is_key_not_found(
    swtpm: SwTpm, swtpm_private: SwTpm, blob_key: Path
) -> None:
    with pytest.raises(KeyNotFoundError, match="not created by this TPM"):
        load_signer(f"tpm2:blob={blob_key};tcti={swtpm_private.tcti}")
    assert swtpm_private.transient_handles() == []


def test_no_tss_noise_on_stderr(swtpm: SwTpm) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TSS2_LOG"}
    code = (
        "import dpop_hsm\n"
        "try:\n"
        "    dpop_hsm.load_signer('tpm2:handle=0x81000001;tcti=swtpm:host=127.0.0.1,port=1')\n"
        "except dpop_hsm.TokenNotPresentError as e:\n"
        "    print(e.code)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "token_not_present"
    assert out.stderr == ""


# --- key creation and key files -------------------------------------------------------------


def test_blob_round_trip(swtpm: SwTpm, tmp_path: Path) -> None:
    from tpm2_pytss.tsskey import TSSPrivKey

    path = tmp_path / "k.tss"
    with dpop_hsm.TpmSigner.generate(tcti=swtpm.tcti, blob_path=path, auth="pw") as created:
        jwk = dict(created.public_jwk)
    data = path.read_bytes()
    assert data.startswith(b"-----BEGIN TSS2 PRIVATE KEY-----\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = TSSPrivKey.from_pem(data)
    assert key.parent == 0x40000001 and key.empty_auth is False  # TPM2_RH_OWNER primary
    with load_signer(f"tpm2:blob={path};tcti={swtpm.tcti};alg=ES256", secret="pw") as again:  # type: ignore[attr-defined]
        assert dict(again.public_jwk) == jwk
        verify_raw(jwk, b"again", again.sign(b"again"))
    with pytest.raises(KeyReferenceError, match="refusing to overwrite"):
        dpop_hsm.TpmSigner.generate(tcti=swtpm.tcti, blob_path=path)
    assert path.read_bytes() == data


def test_occupied_handle_is_refused(swtpm: SwTpm, persistent: dpop_hsm.TpmSigner) -> None:
    handle = persistent.reference.handle
    assert handle is not None
    with pytest.raises(KeyReferenceError, match="already in use"):
        dpop_hsm.TpmSigner.generate(tcti=swtpm.tcti, handle=handle)
    verify_raw(persistent.public_jwk, b"still", persistent.sign(b"still"))


def test_evict_removes_a_persistent_key(swtpm: SwTpm) -> None:
    handle = fresh_handle()
    dpop_hsm.TpmSigner.generate(tcti=swtpm.tcti, handle=handle).close()
    dpop_hsm.TpmSigner.evict(handle, tcti=swtpm.tcti)
    with pytest.raises(KeyNotFoundError):
        dpop_hsm.TpmSigner(f"tpm2:handle={handle:#x};tcti={swtpm.tcti}")


def test_es384_where_supported(swtpm: SwTpm, tmp_path: Path) -> None:
    from tpm2_pytss import ESAPI, TPM2_CAP, TPM2_ECC

    esapi = ESAPI(swtpm.tcti)
    try:
        _, cap = esapi.get_capability(TPM2_CAP.ECC_CURVES, 0, 64)
        curves = {int(cap.data.eccCurves[i]) for i in range(cap.data.eccCurves.count)}
    finally:
        esapi.close()
    if int(TPM2_ECC.NIST_P384) not in curves:
        pytest.skip("this TPM has no P-384")  # a capability, not missing hardware
    path = tmp_path / "p384.tss"
    with dpop_hsm.TpmSigner.generate(tcti=swtpm.tcti, blob_path=path, alg="ES384") as signer:
        assert signer.alg == "ES384" and signer.public_jwk["crv"] == "P-384"
        assert len(b64url_decode(signer.public_jwk["x"])) == 48
        for i in range(50):
            msg = b"es384 %d" % i
            verify_raw(signer.public_jwk, msg, signer.sign(msg))
    with pytest.raises(UnsupportedKeyError, match="ES384 key, not ES256"):
        load_signer(f"tpm2:blob={path};tcti={swtpm.tcti};alg=ES256")


def test_unsupported_alg_for_generate(swtpm: SwTpm, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedKeyError, match="ES256 and ES384"):
        dpop_hsm.TpmSigner.generate(tcti=swtpm.tcti, blob_path=tmp_path / "k", alg="EdDSA")


def test_closed_signer_raises_typed_error(swtpm: SwTpm, blob_key: Path) -> None:
    signer = dpop_hsm.TpmSigner(f"tpm2:blob={blob_key};tcti={swtpm.tcti}")
    signer.close()
    signer.close()  # idempotent
    with pytest.raises(DPoPError, match="closed"):
        signer.sign(b"x")


def test_not_a_key_file(swtpm: SwTpm, tmp_path: Path) -> None:
    path = tmp_path / "junk.tss"
    path.write_text("-----BEGIN TSS2 PRIVATE KEY-----\nAAAA\n-----END TSS2 PRIVATE KEY-----\n")
    with pytest.raises(KeyReferenceError, match="not a TSS2 PRIVATE KEY"):
        load_signer(f"tpm2:blob={path};tcti=swtpm:host=127.0.0.1,port=1")
    with pytest.raises(KeyReferenceError, match="cannot read"):
        load_signer(f"tpm2:blob={tmp_path}/missing.tss")
