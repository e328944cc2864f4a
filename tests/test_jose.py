"""jose.py against RFC 7515 (base64url, compact serialization) and RFC 7638 (thumbprints)."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from dpop_hsm.errors import ConfigurationError, InvalidProofError, UnsupportedKeyError
from dpop_hsm.jose import b64url_decode, b64url_encode, compact_json, jwk_thumbprint, split_compact
from dpop_hsm.proof import access_token_hash

VECTORS = Path(__file__).parent / "vectors"


def _vector(name: str) -> Any:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


# --- base64url (RFC 7515 §2, Appendix C) ---------------------------------------------------


@pytest.mark.parametrize("length", range(0, 70))
def test_b64url_round_trip_without_padding(length: int) -> None:
    data = bytes((i * 37 + 11) % 256 for i in range(length))
    text = b64url_encode(data)
    assert "=" not in text and "+" not in text and "/" not in text
    assert text == base64.urlsafe_b64encode(data).decode().rstrip("=")
    assert b64url_decode(text) == data
    assert b64url_decode(text.encode()) == data


@pytest.mark.parametrize(
    "bad",
    [
        "AA==",  # padding
        "A",  # length % 4 == 1 cannot be base64
        "AAAAA",
        "AA AA",  # whitespace
        "AA\nAA",
        "+/8A",  # standard alphabet, not the URL one
        "AB",  # non-canonical: trailing bits set (a second spelling of b"\x00")
        "AAF",  # non-canonical: same for two bytes
        "é",  # non-ASCII
    ],
)
def test_b64url_decode_is_strict(bad: str) -> None:
    with pytest.raises(ValueError):
        b64url_decode(bad)


def test_compact_json_has_no_whitespace_and_keeps_order() -> None:
    assert (
        compact_json({"b": 1, "a": [1, 2], "c": {"x": "y"}}) == b'{"b":1,"a":[1,2],"c":{"x":"y"}}'
    )
    assert compact_json({"n": "é"}) == '{"n":"é"}'.encode()  # UTF-8, not \u escapes


def test_compact_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        compact_json({"x": float("nan")})


# --- compact serialization -------------------------------------------------------------------


def test_split_compact_three_parts() -> None:
    assert split_compact("a.b.c") == ("a", "b", "c")
    assert split_compact("a.b.") == ("a", "b", "")  # empty signature is the verifier's call


@pytest.mark.parametrize("bad", ["", "a", "a.b", "a.b.c.d", ".b.c", "a..c", "...."])
def test_split_compact_rejects_other_shapes(bad: str) -> None:
    with pytest.raises(InvalidProofError) as info:
        split_compact(bad)
    assert info.value.check == "syntax"


# --- RFC 7638 thumbprints --------------------------------------------------------------------


def test_rfc7638_section_3_1_rsa_thumbprint() -> None:
    vector = _vector("rfc7638.json")
    assert "kid" in vector["jwk"] and "alg" in vector["jwk"]  # present, and ignored
    assert jwk_thumbprint(vector["jwk"]) == vector["thumbprint"]


def test_rfc9449_example_key_thumbprint() -> None:
    vector = _vector("rfc9449.json")["example_public_jwk"]
    assert jwk_thumbprint(vector["jwk"]) == vector["jkt"]


def test_thumbprint_ignores_member_order_and_optional_members() -> None:
    jwk = dict(_vector("rfc9449.json")["example_public_jwk"]["jwk"])
    reordered = dict(reversed(list(jwk.items())))
    extended = {**jwk, "kid": "k1", "use": "sig", "alg": "ES256"}
    assert jwk_thumbprint(reordered) == jwk_thumbprint(jwk) == jwk_thumbprint(extended)


def test_okp_thumbprint_uses_crv_kty_x_in_order() -> None:
    # RFC 8037 §2 / RFC 7638 §3.2: required members crv, kty, x, lexicographic, no whitespace.
    x = b64url_encode(bytes(range(32)))
    canonical = '{"crv":"Ed25519","kty":"OKP","x":"' + x + '"}'
    expected = b64url_encode(hashlib.sha256(canonical.encode()).digest())
    assert jwk_thumbprint({"x": x, "kty": "OKP", "crv": "Ed25519", "kid": "z"}) == expected


@pytest.mark.parametrize(
    "jwk",
    [
        {"kty": "oct", "k": "AAAA"},
        {"kty": "EC", "crv": "P-256", "x": "AA"},  # y missing
        {"kty": "EC", "crv": "P-256", "x": "AA", "y": ""},
        {"kty": "EC", "crv": "P-256", "x": "AA", "y": 5},
        {"kty": "RSA", "n": "AA"},
        {"kty": 1},
        {},
        {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "d": "AA"},  # private
    ],
)
def test_thumbprint_refuses_bad_jwks(jwk: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedKeyError) as info:
        jwk_thumbprint(jwk)
    if "d" in jwk:
        assert "AA" not in str(info.value)  # the private value is never echoed


# --- ath (RFC 9449 §4.2, §7.1) ----------------------------------------------------------------


def test_rfc9449_ath_vector() -> None:
    vector = _vector("rfc9449.json")["ath"]
    assert access_token_hash(vector["access_token"]) == vector["ath"]


def test_ath_requires_ascii_token_and_does_not_echo_it() -> None:
    with pytest.raises(ConfigurationError) as info:
        access_token_hash("tökén-secret")
    assert "secret" not in str(info.value)
