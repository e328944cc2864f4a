"""Pkcs11Signer on a second, very different PKCS#11 module: tpm2-pkcs11 over swtpm.

tpm2-pkcs11 differs from SoftHSM2 in ways our backend must absorb: keys live in the TPM under a
primary in a sqlite store, it rejects some keygen attributes, reports CKA_VALUE as
AttributeTypeInvalid, and talks to the TPM through tpm2-abrmd. Signatures are checked with
``cryptography`` from the public JWK alone.
"""

from __future__ import annotations

import os
import subprocess
import threading

import pytest

import dpop_hsm
from dpop_hsm import KeyReferenceError, PinError
from dpop_hsm.jose import b64url_decode, jwk_thumbprint
from dpop_hsm.proof import ProofFactory
from tests.support.tpm import Tpm2Pkcs11
from tests.support.verifier import verify_proof_signature
from tests.support.verifier import verify_signature as verify_raw

pytestmark = pytest.mark.tpm


@pytest.fixture(scope="module")
def p11_key(tpm2_pkcs11: Tpm2Pkcs11) -> str:
    """A P-256 key made by tpm2_ptool (tpm2-pkcs11's own tool), found by our URI."""
    label = "ptool-es256"
    subprocess.run(
        [
            "tpm2_ptool",
            "addkey",
            "--algorithm=ecc256",
            f"--label={tpm2_pkcs11.token}",
            f"--key-label={label}",
            f"--userpin={tpm2_pkcs11.user_pin}",
            f"--path={tpm2_pkcs11.store}",
        ],
        env=dict(os.environ, TPM2TOOLS_TCTI="tabrmd:bus_type=session"),
        check=True,
        capture_output=True,
    )
    return tpm2_pkcs11.uri(label)


def test_generate_and_load_by_uri(tpm2_pkcs11: Tpm2Pkcs11, p11_key: str) -> None:
    with dpop_hsm.load_signer(p11_key, secret=tpm2_pkcs11.user_pin) as signer:  # type: ignore[attr-defined]
        assert isinstance(signer, dpop_hsm.Pkcs11Signer)
        assert signer.alg == "ES256"
        jwk = dict(signer.public_jwk)
        assert (jwk["kty"], jwk["crv"]) == ("EC", "P-256")
        assert len(b64url_decode(jwk["x"])) == 32
        assert signer.thumbprint == jwk_thumbprint(jwk)
        for i in range(50):
            msg = b"tpm2-pkcs11 %d" % i
            verify_raw(jwk, msg, signer.sign(msg))


def test_proofs_verify(tpm2_pkcs11: Tpm2Pkcs11, p11_key: str) -> None:
    with dpop_hsm.load_signer(p11_key, secret=tpm2_pkcs11.user_pin) as signer:  # type: ignore[attr-defined]
        factory = ProofFactory(signer)
        for i in range(200):
            proof = factory.create("GET", f"https://api.example/{i}")
            verify_proof_signature(proof, signer.public_jwk)


def test_threads(tpm2_pkcs11: Tpm2Pkcs11, p11_key: str) -> None:
    errors: list[BaseException] = []
    with dpop_hsm.load_signer(p11_key, secret=tpm2_pkcs11.user_pin) as signer:  # type: ignore[attr-defined]
        jwk = dict(signer.public_jwk)

        def work(n: int) -> None:
            try:
                for i in range(20):
                    msg = b"t%d m%d" % (n, i)
                    verify_raw(jwk, msg, signer.sign(msg))
            except BaseException as e:  # re-raised below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_wrong_pin_and_existing_label(tpm2_pkcs11: Tpm2Pkcs11, p11_key: str) -> None:
    with pytest.raises(PinError):
        dpop_hsm.load_signer(p11_key, secret="0000")
    with pytest.raises(KeyReferenceError, match="refusing to overwrite"):
        dpop_hsm.Pkcs11Signer.generate(p11_key, alg="ES256", secret=tpm2_pkcs11.user_pin)


def test_pkcs11signer_generate_on_tpm2_pkcs11(tpm2_pkcs11: Tpm2Pkcs11) -> None:
    uri = tpm2_pkcs11.uri("dpop-generated")
    with dpop_hsm.Pkcs11Signer.generate(uri, alg="ES256", secret=tpm2_pkcs11.user_pin) as signer:
        verify_raw(signer.public_jwk, b"gen", signer.sign(b"gen"))
    with dpop_hsm.load_signer(uri, secret=tpm2_pkcs11.user_pin) as again:  # type: ignore[attr-defined]
        assert again.public_jwk == signer.public_jwk
