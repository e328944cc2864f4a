"""The one curve table and JWK <-> key conversion (RFC 7517, RFC 7518 §6, RFC 8037).

The table is checked against ``cryptography``'s own curve registry; conversion against the RFC
vectors in tests/vectors and against hostile JWKs built here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from dpop_hsm import jwk
from dpop_hsm.algorithms import ALGORITHMS, EC_CURVE_ALGS, verify_signature
from dpop_hsm.ecdsa import CURVE_ORDERS
from dpop_hsm.errors import InvalidJwkError, SignatureEncodingError, UnsupportedKeyError
from dpop_hsm.jose import b64url_encode, jwk_thumbprint
from dpop_hsm.signers.software import SoftwareSigner

VECTORS = Path(__file__).resolve().parent / "vectors"


def _vector(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text(encoding="utf-8"))
    return data


# --- the curve table -----------------------------------------------------------------------


@pytest.mark.parametrize("crv", ["P-256", "P-384", "P-521"])
def test_ec_rows_agree_with_cryptography(crv: str) -> None:
    c = jwk.curve(crv)
    curve_obj = c.ec_curve()
    assert curve_obj.name in c.aliases
    assert (curve_obj.key_size + 7) // 8 == c.size
    by_oid = ec.get_curve_for_oid(x509.ObjectIdentifier(c.oid))
    assert isinstance(curve_obj, by_oid)
    # n is the group order: n - 1 is a valid private scalar, n is not.
    ec.derive_private_key(c.order - 1, curve_obj)
    with pytest.raises(ValueError):
        ec.derive_private_key(c.order, curve_obj)
    assert CURVE_ORDERS[c.size] == c.order
    assert EC_CURVE_ALGS[crv] == c.alg
    assert ALGORITHMS[c.alg].crv == crv and ALGORITHMS[c.alg].coord_size == c.size


def test_ed25519_row() -> None:
    c = jwk.curve("Ed25519")
    assert (c.kty, c.alg, c.oid, c.size) == ("OKP", "EdDSA", "1.3.101.112", 32)
    assert ALGORITHMS["EdDSA"].crv == "Ed25519"
    with pytest.raises(UnsupportedKeyError):
        c.ec_curve()


def test_lookups_by_every_name() -> None:
    assert jwk.curve_for_oid("1.3.132.0.34").crv == "P-384"
    assert jwk.curve_for_name("SECP256R1") is jwk.curve("P-256")
    assert jwk.curve_for_name("prime256v1") is jwk.curve("P-256")
    assert jwk.curve_for_name("edwards25519") is jwk.curve("Ed25519")  # PKCS#11 3.0 name
    assert jwk.curve_for_name("secp256k1") is None
    with pytest.raises(UnsupportedKeyError, match=r"1\.3\.132\.0\.10"):
        jwk.curve_for_oid("1.3.132.0.10")  # secp256k1: no JWS alg of ours
    for bad in ("secp256k1", None, 5, "p-256"):
        with pytest.raises(UnsupportedKeyError):
            jwk.curve(bad)
    k1 = ec.generate_private_key(ec.SECP256K1())
    with pytest.raises(UnsupportedKeyError, match="secp256k1"):
        jwk.curve_of_key(k1.public_key())


# --- key -> JWK -> key ---------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "ES384", "ES512", "EdDSA", "PS256"])
def test_round_trip(alg: str) -> None:
    signer = SoftwareSigner.generate(alg)
    public = jwk.public_key_from_jwk(signer.public_jwk)
    assert jwk.jwk_from_public_key(public) == dict(signer.public_jwk)
    assert jwk_thumbprint(jwk.jwk_from_public_key(public)) == signer.thumbprint
    verify_signature(public, alg, signer.sign(b"data"), b"data")
    with pytest.raises(InvalidSignature):
        verify_signature(public, alg, signer.sign(b"data"), b"datA")


def test_ec_coordinates_are_written_at_full_length() -> None:
    # A P-521 x with leading zero octets must still be 66 bytes (RFC 7518 §6.2.1.2).
    for _ in range(400):
        key = ec.generate_private_key(ec.SECP521R1()).public_key()
        if key.public_numbers().x.bit_length() <= 520:  # first of 66 octets is zero
            break
    else:  # pragma: no cover - probability ~2**-400
        pytest.fail("no short coordinate drawn")
    written = jwk.jwk_from_public_key(key)
    assert len(written["x"]) == len(written["y"]) == 88  # 66 bytes in base64url


def test_rfc_vectors() -> None:
    rfc9449 = _vector("rfc9449.json")["example_public_jwk"]
    key = jwk.public_key_from_jwk(rfc9449["jwk"])
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert jwk_thumbprint(jwk.jwk_from_public_key(key)) == rfc9449["jkt"]
    rfc7638 = _vector("rfc7638.json")
    rsa_key = jwk.public_key_from_jwk(rfc7638["jwk"])
    assert isinstance(rsa_key, rsa.RSAPublicKey)
    assert jwk_thumbprint(jwk.jwk_from_public_key(rsa_key)) == rfc7638["thumbprint"]
    # RFC 8037 §A.2 / §A.3: the Ed25519 public key and its thumbprint.
    okp = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    assert isinstance(jwk.public_key_from_jwk(okp), ed25519.Ed25519PublicKey)
    assert jwk_thumbprint(okp) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


# --- hostile public JWKs -------------------------------------------------------------------

EC_JWK = dict(SoftwareSigner.generate("ES256").public_jwk)


def _b64int(value: int, length: int | None = None) -> str:
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return b64url_encode(value.to_bytes(size, "big"))


@pytest.mark.parametrize("member", sorted(jwk.PRIVATE_MEMBERS))
def test_private_members_are_refused(member: str) -> None:
    with pytest.raises(InvalidJwkError, match="private"):
        jwk.public_key_from_jwk({**EC_JWK, member: "AAAA"})


@pytest.mark.parametrize(
    "bad",
    [
        {"x": EC_JWK["x"][:-2]},  # short coordinate
        {"x": "AA" + EC_JWK["x"]},  # long coordinate
        {"y": 5},
        {"y": ""},
        {"x": EC_JWK["x"][:-1] + "+"},  # not base64url
        {"x": EC_JWK["x"] + "="},  # padding
        {"x": b64url_encode(b"\x00" * 31 + b"\x01")},  # off the curve
    ],
)
def test_malformed_ec(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidJwkError):
        jwk.public_key_from_jwk({**EC_JWK, **bad})


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ({"kty": "oct", "k": "AAAA"}, UnsupportedKeyError),
        ({**EC_JWK, "kty": "DSA"}, UnsupportedKeyError),
        ({**EC_JWK, "crv": "secp256k1"}, UnsupportedKeyError),
        ({**EC_JWK, "crv": "Ed25519"}, UnsupportedKeyError),  # an OKP curve under kty EC
        ({"kty": "OKP", "crv": "P-256", "x": EC_JWK["x"]}, UnsupportedKeyError),
        ({"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}, InvalidJwkError),
        ({"crv": "P-256", "x": EC_JWK["x"], "y": EC_JWK["y"]}, UnsupportedKeyError),
        ([EC_JWK], InvalidJwkError),
        ("jwk", InvalidJwkError),
    ],
)
def test_unsupported_and_malformed(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        jwk.public_key_from_jwk(value)


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
RSA_N = RSA_KEY.public_numbers().n


@pytest.mark.parametrize(
    ("n", "e", "match"),
    [
        (_b64int(RSA_N), _b64int(3), "exponent"),  # too small (NIST SP 800-56B)
        (_b64int(RSA_N), _b64int(65536), "exponent"),  # even
        (_b64int(RSA_N), _b64int((1 << 3071) + 1), "exponent"),  # costly to verify with
        (_b64int(RSA_N), _b64int((1 << 256) + 1), "exponent"),
        (_b64int(RSA_N, 257), _b64int(65537), "leading zero"),  # second spelling of n
        (_b64int(RSA_N), _b64int(65537, 4), "leading zero"),
        (_b64int(RSA_N >> 1100), _b64int(65537), "bits"),  # ~948-bit modulus
        (_b64int((1 << 8200) + 1), _b64int(65537), "bits"),
    ],
)
def test_rsa_bounds(n: str, e: str, match: str) -> None:
    with pytest.raises(InvalidJwkError, match=match):
        jwk.public_key_from_jwk({"kty": "RSA", "n": n, "e": e})


def test_rsa_largest_allowed_exponent_is_accepted() -> None:
    e = (1 << 256) - 1  # odd, below 2**256
    key = jwk.public_key_from_jwk({"kty": "RSA", "n": _b64int(RSA_N), "e": _b64int(e)})
    assert isinstance(key, rsa.RSAPublicKey) and key.public_numbers().e == e


# --- private JWKs (key files) --------------------------------------------------------------


def test_private_round_trips() -> None:
    ec_key = ec.generate_private_key(ec.SECP384R1())
    pn = ec_key.private_numbers()
    private = {
        **jwk.jwk_from_public_key(ec_key.public_key()),
        "d": _b64int(pn.private_value, 48),
    }
    assert jwk.private_key_from_jwk(private).private_numbers() == pn  # type: ignore[union-attr]
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rn = rsa_key.private_numbers()
    members = {"p": rn.p, "q": rn.q, "d": rn.d, "dp": rn.dmp1, "dq": rn.dmq1, "qi": rn.iqmp}
    private = {
        **jwk.jwk_from_public_key(rsa_key.public_key()),
        **{k: _b64int(v) for k, v in members.items()},
    }
    assert jwk.private_key_from_jwk(private).private_numbers() == rn  # type: ignore[union-attr]


def test_private_jwk_errors() -> None:
    okp = ed25519.Ed25519PrivateKey.generate()
    other = jwk.jwk_from_public_key(ed25519.Ed25519PrivateKey.generate().public_key())
    d = b64url_encode(okp.private_bytes_raw())
    assert isinstance(
        jwk.private_key_from_jwk({"kty": "OKP", "crv": "Ed25519", "d": d}),
        ed25519.Ed25519PrivateKey,
    )
    with pytest.raises(InvalidJwkError, match="does not match"):
        jwk.private_key_from_jwk({"kty": "OKP", "crv": "Ed25519", "d": d, "x": other["x"]})
    with pytest.raises(InvalidJwkError):
        jwk.private_key_from_jwk({**EC_JWK, "d": "AAAA"})  # d does not fit x, y
    with pytest.raises(InvalidJwkError, match="'d'"):
        jwk.private_key_from_jwk(EC_JWK)
    with pytest.raises(UnsupportedKeyError):
        jwk.private_key_from_jwk({"kty": "oct", "k": "AAAA"})


# --- signature check -----------------------------------------------------------------------


def test_verify_signature_refuses_mismatched_keys_and_lengths() -> None:
    es256 = SoftwareSigner.generate("ES256")
    p256 = jwk.public_key_from_jwk(es256.public_jwk)
    sig = es256.sign(b"m")
    with pytest.raises(UnsupportedKeyError):
        verify_signature(p256, "ES384", sig, b"m")  # curve does not fit the alg
    with pytest.raises(UnsupportedKeyError):
        verify_signature(p256, "EdDSA", sig, b"m")
    with pytest.raises(UnsupportedKeyError):
        verify_signature(p256, "PS256", sig, b"m")
    with pytest.raises(SignatureEncodingError):
        verify_signature(p256, "ES256", sig + b"\x00", b"m")
    with pytest.raises(SignatureEncodingError):
        verify_signature(p256, "ES256", b"\x00" * 64, b"m")  # r = s = 0
