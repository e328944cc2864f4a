"""Inputs that once crashed a fuzz target (or a property test), replayed through the same target.

Each case is ``(target, input bytes)``: the input goes through the exact per-input function
``scripts/fuzz`` runs, so a regression fails here the way it failed under libFuzzer. Cases for
bugs not fixed yet are ``xfail(strict=True)``: they flip to a failure — remove the mark — the
day the fix lands.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import pytest

from dpop_hsm.jose import b64url_encode
from fuzz.targets import TARGETS, FuzzOne


@cache
def target(name: str) -> FuzzOne:
    if not TARGETS[name].available():
        pytest.skip(f"{TARGETS[name].module} not present")
    return TARGETS[name].prepare()


def signed_case(header: dict[str, Any], claims: dict[str, Any]) -> bytes:
    """Input for the ``verify_signed`` target: header JSON, NUL, claims JSON ("$JWK" = key)."""
    return json.dumps(header).encode() + b"\x00" + json.dumps(claims).encode()


HEADER = {"typ": "dpop+jwt", "alg": "ES256", "jwk": "$JWK"}
CLAIMS = {"jti": "j", "htm": "GET", "htu": "https://rs.example.com/resource", "iat": 1_700_000_000}


def _token_case(expires_in: str) -> bytes:
    body = '{"access_token":"aaaaaaaaaa","token_type":"DPoP","expires_in":' + expires_in + "}"
    return b"\x00" + body.encode()  # status byte 0 -> HTTP 200


def _rsa_jwk(n_bits: int, e: int) -> bytes:
    """A fixed RSA public JWK (any odd n will do: the key must be refused before it is used)."""
    n = (1 << (n_bits - 1)) | 1
    jwk = {
        "kty": "RSA",
        "n": b64url_encode(n.to_bytes(n_bits // 8, "big")),
        "e": b64url_encode(e.to_bytes((e.bit_length() + 7) // 8, "big")),
    }
    return json.dumps(jwk).encode()


CASES: list[Any] = [
    # P-521: the group order constant had two extra hex digits, so r/s >= n passed the range
    # check and values >= 2**528 raised OverflowError (fixed in e8a2c11).
    pytest.param(
        "der",
        b"\x02"
        + bytes.fromhex("308188024201")
        + b"\xff" * 66
        + bytes.fromhex("024201")
        + b"\x01" * 66,
        id="der-p521-order",
    ),
    # verify_proof: ath / nonce claims holding a lone surrogate -> UnicodeEncodeError.
    pytest.param(
        "verify_signed",
        signed_case(HEADER, {**CLAIMS, "ath": "\ud800"}),
        id="verify-ath-lone-surrogate",
    ),
    pytest.param(
        "verify_signed",
        signed_case(HEADER, {**CLAIMS, "nonce": "\udfff"}),
        id="verify-nonce-lone-surrogate",
    ),
    # verify_proof: a non-ASCII access token raised ConfigurationError (a 500 at a server)
    # instead of a verification error; it is now TokenBindingError (not token68).
    pytest.param(
        "verify_signed",
        signed_case(HEADER, {**CLAIMS, "ath": "x"}) + b"\x00t\xf6k\xe9n",
        id="verify-non-ascii-access-token",
    ),
    # public_key_from_jwk accepted RSA keys whose exponent sets the verification cost: a
    # 3071-bit e (~100x a normal check) and e = 3, both outside NIST SP 800-56B's bounds.
    pytest.param("jwk", _rsa_jwk(3072, (1 << 3070) | 1), id="jwk-rsa-3071-bit-exponent"),
    pytest.param("jwk", _rsa_jwk(2048, 3), id="jwk-rsa-exponent-3"),
    # htu.is_loopback_host: ValueError on a malformed authority, and dotted names like
    # "127.999.0.1" (DNS names, not IP literals) accepted as loopback for plain http.
    pytest.param("htu", b"http://]", id="htu-malformed-authority"),
    pytest.param("htu", b"http://127.999.0.1/token", id="htu-not-an-ip-literal"),
    # Not a library bug: the fuzzer found a too-strict oracle of ours ("pin-value" text inside
    # another attribute's value); kept so the oracle stays right.
    pytest.param(
        "pkcs11_uri",
        b"pkcs11:model=PKCS%2315%2e-path=/usr/lib/libykcs11.so&pin-value=120000;"
        b"token=YubiKey%20PIV;id=%02;object=SIGN%20key;type=private"
        b"?module-path=/usr/lib/libykcs11.so&pin-value=12s456",
        id="pkcs11-uri-pin-value-inside-model",
    ),
    # pkcs11 URIs: lone surrogates (non-UTF-8 argv bytes) and a 5000-digit slot-id raised
    # UnicodeEncodeError / ValueError instead of KeyReferenceError (fixed in pkcs11_uri.py).
    pytest.param("pkcs11_uri", b"pkcs11:token=\xff\xfe", id="pkcs11-uri-non-utf8-byte"),
    pytest.param("pkcs11_uri", b"pkcs11:slot-id=" + b"1" * 5000, id="pkcs11-uri-huge-slot-id"),
    # Token responses: the fuzzer's first token_response "crash" was our oracle finding a
    # 3-character access token inside the repr's field names; kept for the same reason.
    pytest.param(
        "token_response",
        b'\x00{"access_token":"acc","token_type":"dpop","expires_in":"3600","scope":"a b"}',
        id="token-short-access-token-oracle",
    ),
    pytest.param(
        "token_response",
        _token_case('"\\u00b2"'),
        id="token-expires-in-superscript-digit",  # was ValueError from int("²"), fixed 0e0281d
    ),
    pytest.param(
        "token_response",
        _token_case("9" * 400),
        id="token-expires-in-beyond-float",  # was OverflowError, fixed in 0e0281d
    ),
]


@pytest.mark.parametrize(("name", "data"), CASES)
def test_fuzz_regression(name: str, data: bytes) -> None:
    target(name)(data)  # raises (test fails) exactly when the fuzz target would crash
