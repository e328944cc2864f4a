"""ProofFactory (RFC 9449 §4.2): exact header and claim sets, fresh jti/iat, ath, nonce, clock
offset — and thousands of signatures checked by an independent verifier: a wrong
ECDSA encoding fails only 1 signature in 256, or only for ES512 (RFC 7518 §3.4)."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature

from dpop_hsm.errors import ConfigurationError
from dpop_hsm.proof import ProofFactory
from dpop_hsm.signers.software import SoftwareSigner
from tests.support.verifier import b64d, decode_proof, signature_verifier

ALL_ALGS = ["ES256", "ES384", "ES512", "EdDSA", "PS256", "RS256"]
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


def parts(proof: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    decoded = decode_proof(proof)
    return decoded.header, decoded.claims, decoded.signature, decoded.signing_input


@pytest.fixture(scope="module")
def signers() -> dict[str, SoftwareSigner]:
    return {alg: SoftwareSigner.generate(alg) for alg in ALL_ALGS}


# --- the independent-verifier stress runs ---------------------------------------------------


@pytest.mark.parametrize(("alg", "count"), [("ES256", 10_000), ("ES384", 2_000), ("ES512", 2_000)])
def test_many_ecdsa_proofs_verify_independently(alg: str, count: int) -> None:
    signer = SoftwareSigner.generate(alg)
    factory = ProofFactory(signer)
    verify = signature_verifier(signer.public_jwk, alg)
    size = {"ES256": 32, "ES384": 48, "ES512": 66}[alg]
    short = 0
    jtis = set()
    for i in range(count):
        proof = factory.create("POST", f"https://as.example/token/{i}")
        h, p, s = proof.split(".")
        sig = b64d(s)
        assert len(sig) == 2 * size
        short += sig[0] == 0 or sig[size] == 0
        verify(sig, f"{h}.{p}".encode())
        if i % 100 == 0:  # spot-check the content; all of it is checked below
            assert json.loads(b64d(p))["htu"] == f"https://as.example/token/{i}"
        jtis.add(json.loads(b64d(p))["jti"])
    assert len(jtis) == count
    # Left-padded r or s occur ~1/128 per signature on P-256/P-384 and ~1/2 on P-521: the runs
    # above really exercised the padding path.
    assert short > 0


@pytest.mark.parametrize("alg", ALL_ALGS)
def test_every_alg_verifies_independently(signers: dict[str, SoftwareSigner], alg: str) -> None:
    signer = signers[alg]
    verify = signature_verifier(signer.public_jwk, alg)
    for _ in range(20):
        _, _, sig, signing_input = parts(ProofFactory(signer).create("GET", "https://rs.example/"))
        verify(sig, signing_input)
        with pytest.raises(InvalidSignature):
            verify(sig, signing_input + b"x")


# --- header and claims -----------------------------------------------------------------------


@pytest.mark.parametrize("alg", ALL_ALGS)
def test_header_is_exactly_typ_alg_public_jwk(signers: dict[str, SoftwareSigner], alg: str) -> None:
    signer = signers[alg]
    header, _, _, _ = parts(ProofFactory(signer).create("GET", "https://rs.example/"))
    assert set(header) == {"typ", "alg", "jwk"}
    assert header["typ"] == "dpop+jwt"
    assert header["alg"] == alg
    assert header["jwk"] == dict(signer.public_jwk)
    assert not PRIVATE_MEMBERS & set(header["jwk"])
    expected = {
        "EC": {"kty", "crv", "x", "y"},
        "OKP": {"kty", "crv", "x"},
        "RSA": {"kty", "n", "e"},
    }
    assert set(header["jwk"]) == expected[header["jwk"]["kty"]]


def test_claims_exact_set_and_values(signers: dict[str, SoftwareSigner]) -> None:
    factory = ProofFactory(signers["ES256"], clock=lambda: 1_700_000_000.9)
    _, claims, _, _ = parts(factory.create("POST", "HTTPS://AS.Example:443/token?x=1#f"))
    assert set(claims) == {"jti", "htm", "htu", "iat"}
    assert claims["htm"] == "POST"
    assert claims["htu"] == "https://as.example/token"
    assert claims["iat"] == 1_700_000_000 and isinstance(claims["iat"], int)
    assert len(b64d(claims["jti"])) * 8 >= 96


def test_jti_and_iat_are_fresh_per_proof(signers: dict[str, SoftwareSigner]) -> None:
    now = [1_000.0]
    factory = ProofFactory(signers["EdDSA"], clock=lambda: now[0])
    seen: set[str] = set()
    iats = []
    for _ in range(10_000):
        _, claims, _, _ = parts(factory.create("GET", "https://rs.example/"))
        seen.add(claims["jti"])
        iats.append(claims["iat"])
        now[0] += 0.5
    assert len(seen) == 10_000
    assert iats[0] == 1_000 and iats[-1] == int(1_000 + 0.5 * 9_999)


def test_ath_and_nonce(signers: dict[str, SoftwareSigner]) -> None:
    token = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
    _, claims, _, _ = parts(
        ProofFactory(signers["ES256"]).create("GET", "https://rs.example/r", access_token=token,
                                              nonce="eyJ7S_zG.eyJH0-Z.HX4w-7v")
    )  # fmt: skip
    expected_ath = base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).rstrip(b"=")
    assert claims["ath"] == expected_ath.decode() == "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
    assert claims["nonce"] == "eyJ7S_zG.eyJH0-Z.HX4w-7v"
    assert set(claims) == {"jti", "htm", "htu", "iat", "ath", "nonce"}


@pytest.mark.parametrize("nonce", ["", 5])
def test_bad_nonce_is_a_configuration_error(signers: dict[str, SoftwareSigner], nonce: Any) -> None:
    with pytest.raises(ConfigurationError):
        ProofFactory(signers["ES256"]).create("GET", "https://rs.example/", nonce=nonce)


def test_clock_offset_shifts_iat(signers: dict[str, SoftwareSigner]) -> None:
    factory = ProofFactory(signers["ES256"], clock=lambda: 5_000.0, clock_offset=-120.4)
    assert parts(factory.create("GET", "https://rs.example/"))[1]["iat"] == 4_879
    factory.clock_offset = 30
    assert parts(factory.create("GET", "https://rs.example/"))[1]["iat"] == 5_030


def test_extra_claims(signers: dict[str, SoftwareSigner]) -> None:
    factory = ProofFactory(signers["ES256"])
    _, claims, _, _ = parts(
        factory.create("GET", "https://rs.example/", extra_claims={"client_id": "c1", "n": [1]})
    )
    assert claims["client_id"] == "c1" and claims["n"] == [1]


@pytest.mark.parametrize("name", ["jti", "htm", "htu", "iat", "ath", "nonce"])
def test_extra_claims_may_not_override_reserved(
    signers: dict[str, SoftwareSigner], name: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        ProofFactory(signers["ES256"]).create(
            "GET", "https://rs.example/", extra_claims={name: "x"}
        )
    assert name in str(info.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), object(), b"bytes"])
def test_extra_claims_must_be_json(signers: dict[str, SoftwareSigner], value: Any) -> None:
    with pytest.raises(ConfigurationError):
        ProofFactory(signers["ES256"]).create(
            "GET", "https://rs.example/", extra_claims={"x": value}
        )


@pytest.mark.parametrize("htm", ["", "GE T", "GET\r\n", "POST/", "x" * 33, None, 1, "GÉT"])
def test_bad_htm_is_a_configuration_error(signers: dict[str, SoftwareSigner], htm: Any) -> None:
    with pytest.raises(ConfigurationError):
        ProofFactory(signers["ES256"]).create(htm, "https://rs.example/")


@pytest.mark.parametrize("htu", ["ftp://x/", "not a url", "https://", "https://h:99999/"])
def test_bad_htu_is_a_configuration_error(signers: dict[str, SoftwareSigner], htu: str) -> None:
    with pytest.raises(ConfigurationError):
        ProofFactory(signers["ES256"]).create("GET", htu)


class _LeakySigner:
    alg = "ES256"
    thumbprint = "t"

    def __init__(self) -> None:
        self.public_jwk = {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "d": "SECRET"}

    def sign(self, signing_input: bytes) -> bytes:
        raise AssertionError("never called")


def test_factory_refuses_a_jwk_with_private_members() -> None:
    with pytest.raises(ConfigurationError) as info:
        ProofFactory(_LeakySigner())
    assert "SECRET" not in str(info.value) and "SECRET" not in repr(info.value)


def test_repr_shows_no_key_material(signers: dict[str, SoftwareSigner]) -> None:
    factory = ProofFactory(signers["ES256"])
    assert repr(factory) == f"ProofFactory(alg='ES256', jkt={signers['ES256'].thumbprint!r})"
    assert factory.thumbprint == signers["ES256"].thumbprint


@pytest.mark.parametrize("member", ["d", "p", "q", "dp", "dq", "qi", "oth", "k"])
def test_factory_refuses_any_private_member(member: str) -> None:
    signer = _LeakySigner()
    signer.public_jwk = {"kty": "RSA", "n": "AQAB", "e": "AQAB", member: "SECRET"}
    with pytest.raises(ConfigurationError):
        ProofFactory(signer)
