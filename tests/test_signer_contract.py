"""The Signer contract, checked the same way on every backend present.

Software keys (ES256, ES384, ES512, EdDSA, PS256, RS256), SoftHSM2 through PKCS#11 (the same
algorithms), swtpm through tpm2-pytss (blob and persistent keys), and tpm2-pkcs11 over swtpm.
For each: ``alg``/``public_jwk``/``thumbprint`` agree; hundreds of signatures verify with
``cryptography`` alone (the checker below reads the JWK itself, never through dpop_hsm), ECDSA
signatures are raw ``r||s`` at full length (RFC 7518 §3.4); a tampered message fails; many
threads sign at once; hardware signers are context managers that refuse to sign once closed.
A backend whose hardware is absent is skipped with the reason (a failure in CI).
"""

from __future__ import annotations

import base64
import hashlib
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from dpop_hsm.proof import ProofFactory
from dpop_hsm.signers import Signer
from dpop_hsm.signers.software import SoftwareSigner
from dpop_hsm.verify import verify_proof

SOFTWARE_ALGS = ("ES256", "ES384", "ES512", "EdDSA", "PS256", "RS256")
SIGNATURES = 300  # per backend, all checked
# ECDSA: sign until some r or s needs left-padding (about 1 in 128 for P-256/P-384, 1 in 2
# for P-521), so the full-length encoding is seen on a value that needs it; 4000 make missing
# one a ~1e-13 event.
MAX_FOR_A_SHORT_VALUE = 4000

# JWS alg -> (curve, coordinate bytes, hash); written out here, independent of dpop_hsm's tables.
EC_PARAMS: dict[str, tuple[ec.EllipticCurve, int, hashes.HashAlgorithm]] = {
    "ES256": (ec.SECP256R1(), 32, hashes.SHA256()),
    "ES384": (ec.SECP384R1(), 48, hashes.SHA384()),
    "ES512": (ec.SECP521R1(), 66, hashes.SHA512()),
}
JWK_MEMBERS = {"EC": {"kty", "crv", "x", "y"}, "OKP": {"kty", "crv", "x"}, "RSA": {"kty", "n", "e"}}


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _thumbprint(jwk: Mapping[str, str]) -> str:
    # RFC 7638 §3: required members, lexicographic order, no whitespace.
    names = sorted(JWK_MEMBERS[jwk["kty"]])
    text = "{" + ",".join(f'"{n}":"{jwk[n]}"' for n in names) + "}"
    return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()


def independent_verifier(alg: str, jwk: Mapping[str, str]) -> Callable[[bytes, bytes], None]:
    """A verify(message, signature) built from the JWK with ``cryptography`` alone."""
    if alg in EC_PARAMS:
        curve, size, digest = EC_PARAMS[alg]
        assert jwk["kty"] == "EC"
        x, y = _b64(jwk["x"]), _b64(jwk["y"])
        assert len(x) == len(y) == size  # RFC 7518 §6.2.1.2: full-length coordinates
        key = ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve
        ).public_key()

        def verify_ec(message: bytes, signature: bytes) -> None:
            assert len(signature) == 2 * size, f"{alg}: {len(signature)} bytes, not raw r||s"
            r = int.from_bytes(signature[:size], "big")
            s = int.from_bytes(signature[size:], "big")
            key.verify(encode_dss_signature(r, s), message, ec.ECDSA(digest))

        return verify_ec
    if alg == "EdDSA":
        assert (jwk["kty"], jwk["crv"]) == ("OKP", "Ed25519")
        okp = ed25519.Ed25519PublicKey.from_public_bytes(_b64(jwk["x"]))

        def verify_okp(message: bytes, signature: bytes) -> None:
            assert len(signature) == 64
            okp.verify(signature, message)

        return verify_okp
    assert jwk["kty"] == "RSA"
    public = rsa.RSAPublicNumbers(
        int.from_bytes(_b64(jwk["e"]), "big"), int.from_bytes(_b64(jwk["n"]), "big")
    ).public_key()
    pad: padding.AsymmetricPadding = (
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        if alg == "PS256"
        else padding.PKCS1v15()
    )

    def verify_rsa(message: bytes, signature: bytes) -> None:
        assert len(signature) == public.key_size // 8
        public.verify(signature, message, pad, hashes.SHA256())

    return verify_rsa


# --- one factory per backend and alg; hardware fixtures are asked for lazily ----------------


def _software(alg: str) -> Callable[[pytest.FixtureRequest, Path], Any]:
    return lambda request, tmp: SoftwareSigner.generate(alg)


def _softhsm(alg: str) -> Callable[[pytest.FixtureRequest, Path], Any]:
    def make(request: pytest.FixtureRequest, tmp: Path) -> Any:
        from dpop_hsm.signers.pkcs11 import Pkcs11Signer

        hsm = request.getfixturevalue("softhsm")
        uri = hsm.uri("spare", object=f"contract-{alg.lower()}")
        return Pkcs11Signer.generate(uri, alg, secret=hsm.pin)

    return make


def _swtpm(kind: str, alg: str) -> Callable[[pytest.FixtureRequest, Path], Any]:
    def make(request: pytest.FixtureRequest, tmp: Path) -> Any:
        from dpop_hsm.signers.tpm import TpmSigner
        from tests.support.tpm import fresh_handle

        tpm = request.getfixturevalue("swtpm")
        if kind == "blob":
            return TpmSigner.generate(tcti=tpm.tcti, blob_path=tmp / "contract.tss", alg=alg)
        return TpmSigner.generate(tcti=tpm.tcti, handle=fresh_handle(), alg=alg)

    return make


def _tpm2_pkcs11(request: pytest.FixtureRequest, tmp: Path) -> Any:
    from dpop_hsm.signers.pkcs11 import Pkcs11Signer

    store = request.getfixturevalue("tpm2_pkcs11")
    return Pkcs11Signer.generate(store.uri("contract-es256"), "ES256", secret=store.user_pin)


BACKENDS: dict[str, tuple[str, Callable[[pytest.FixtureRequest, Path], Any]]] = {
    **{f"software-{a}": (a, _software(a)) for a in SOFTWARE_ALGS},
    **{f"softhsm-{a}": (a, _softhsm(a)) for a in SOFTWARE_ALGS},
    "swtpm-blob-ES256": ("ES256", _swtpm("blob", "ES256")),
    "swtpm-persistent-ES256": ("ES256", _swtpm("persistent", "ES256")),
    "swtpm-blob-ES384": ("ES384", _swtpm("blob", "ES384")),
    "tpm2-pkcs11-ES256": ("ES256", _tpm2_pkcs11),
}


def _marks(name: str) -> list[pytest.MarkDecorator]:
    if name.startswith("softhsm"):
        return [pytest.mark.softhsm]
    if name.startswith(("swtpm", "tpm2-pkcs11")):
        return [pytest.mark.tpm]
    return []


@pytest.fixture(
    scope="module",
    params=[pytest.param(name, id=name, marks=_marks(name)) for name in BACKENDS],
)
def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str, Any]]:
    """(backend name, alg it was made for, the signer) — one key per backend and module."""
    name = request.param
    alg, make = BACKENDS[name]
    signer = make(request, tmp_path_factory.mktemp("contract"))
    try:
        yield name, alg, signer
    finally:
        close = getattr(signer, "close", None)
        if callable(close):
            close()


# --- the contract --------------------------------------------------------------------------


def test_members_agree(backend: tuple[str, str, Any]) -> None:
    _, alg, signer = backend
    assert isinstance(signer, Signer)
    assert signer.alg == alg
    jwk = signer.public_jwk
    assert isinstance(jwk, Mapping)
    assert set(jwk) == JWK_MEMBERS[jwk["kty"]]  # public members only, nothing private
    assert all(isinstance(v, str) and v for v in jwk.values())
    assert signer.thumbprint == _thumbprint(jwk)  # RFC 7638, computed here independently
    with pytest.raises(TypeError):
        jwk["kty"] = "oct"  # type: ignore[index]  # read-only: nobody swaps the key's JWK
    assert signer.public_jwk == jwk and signer.thumbprint == _thumbprint(signer.public_jwk)


def test_many_signatures_verify_independently(backend: tuple[str, str, Any]) -> None:
    _, alg, signer = backend
    verify = independent_verifier(alg, signer.public_jwk)
    for i in range(SIGNATURES):
        message = b"contract %d " % i + bytes(range(i % 256))
        verify(message, signer.sign(message))
    for message in (b"", b"x" * 65536):  # empty and long inputs
        verify(message, signer.sign(message))
    if alg in EC_PARAMS:
        # RFC 7518 §3.4: r and s each take exactly the curve's size however small they are;
        # the verifier checks the length, and here it does so on a value that needed padding.
        size = EC_PARAMS[alg][1]
        for i in range(MAX_FOR_A_SHORT_VALUE):
            message = b"padding %d" % i
            signature = signer.sign(message)
            verify(message, signature)
            if signature[0] == 0 or signature[size] == 0:
                break
        else:
            pytest.fail(f"no short r or s in {MAX_FOR_A_SHORT_VALUE} {alg} signatures")


def test_tampered_message_fails(backend: tuple[str, str, Any]) -> None:
    _, alg, signer = backend
    verify = independent_verifier(alg, signer.public_jwk)
    signature = signer.sign(b"the message")
    with pytest.raises(InvalidSignature):
        verify(b"the messagf", signature)
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    with pytest.raises(InvalidSignature):
        verify(b"the message", flipped)


def test_threads_sign_at_once(backend: tuple[str, str, Any]) -> None:
    _, alg, signer = backend
    verify = independent_verifier(alg, signer.public_jwk)
    errors: list[BaseException] = []
    counts = [0] * 8
    start = threading.Barrier(len(counts))

    def work(n: int) -> None:
        try:
            start.wait()
            for i in range(25):
                message = b"thread %d message %d" % (n, i)
                verify(message, signer.sign(message))
                counts[n] += 1
        except BaseException as e:  # re-raised by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(len(counts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert counts == [25] * len(counts)


def test_proofs_verify(backend: tuple[str, str, Any]) -> None:
    _, alg, signer = backend
    factory = ProofFactory(signer)
    for i in range(5):
        url = f"https://api.example/contract/{i}"
        verified = verify_proof(factory.create("GET", url), htm="GET", htu=url, algorithms=(alg,))
        assert verified.jkt == signer.thumbprint


HARDWARE = [pytest.param(n, id=n, marks=_marks(n)) for n in BACKENDS if _marks(n)]


@pytest.mark.parametrize("backend", HARDWARE, indirect=True)
def test_context_manager_closes(
    backend: tuple[str, str, Any], request: pytest.FixtureRequest
) -> None:
    # Hardware signers own sessions or a TPM connection: ``with`` releases them.
    from dpop_hsm.errors import SignerError

    name, alg, signer = backend
    # A second signer on the same key, so the module's signer stays open for the next tests.
    second = _reopen(name, signer, alg, request)
    with second as entered:
        assert entered is second
        assert second.thumbprint == signer.thumbprint
        independent_verifier(alg, second.public_jwk)(b"m", second.sign(b"m"))
    with pytest.raises(SignerError):
        second.sign(b"after close")
    second.close()  # closing twice is harmless
    independent_verifier(alg, signer.public_jwk)(b"m", signer.sign(b"m"))  # the first lives on


def _reopen(name: str, signer: Any, alg: str, request: pytest.FixtureRequest) -> Any:
    from dpop_hsm.signers.pkcs11 import Pkcs11Signer
    from dpop_hsm.signers.tpm import TpmSigner

    # An RSA key's URI cannot say PS256 or RS256: the caller picks, as here.
    if name.startswith("softhsm"):
        return Pkcs11Signer(signer.uri, secret=request.getfixturevalue("softhsm").pin, alg=alg)
    if name.startswith("tpm2-pkcs11"):
        store = request.getfixturevalue("tpm2_pkcs11")
        return Pkcs11Signer(signer.uri, secret=store.user_pin, alg=alg)
    return TpmSigner(signer.reference)
