"""verify_proof against inputs built to hurt the verifier, not merely to fail it.

Bounded cost: the proof's ``jwk`` is unauthenticated and chooses how much work the signature
check takes, so an RSA key is bounded before any verification (NIST SP 800-56B Rev. 2 §6.2.1:
odd ``e``, 2^16 < e < 2^256; a modulus of 2048 to 8192 bits; RFC 7518 §2 minimal octets).

One error family: everything that comes with the request (the proof, the access token, the
token's ``cnf.jkt``, even the method and URI the server read off the request) fails as a
VerificationError, never as ConfigurationError, which a server would answer with a 500.

Strict JSON (RFC 8259 §4, §6, §8.1): header and claims in UTF-8 without a BOM, unique member
names, finite numbers; a second parser must not read another proof from the same bytes.
"""

from __future__ import annotations

import math
import secrets
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from dpop_hsm.errors import (
    ConfigurationError,
    InvalidProofError,
    TokenBindingError,
    VerificationError,
)
from dpop_hsm.jose import b64url_decode, b64url_encode, compact_json
from dpop_hsm.jwk import MAX_RSA_BITS
from dpop_hsm.proof import access_token_hash
from dpop_hsm.signers.software import SoftwareSigner, public_jwk_of
from dpop_hsm.verify import (
    NO_REPLAY_CHECK,
    public_key_from_jwk,
    verify_jws_signature,
    verify_proof,
)

NOW = 1_700_000_000
HTU = "https://rs.example/resource"
CLAIMS = {"jti": "j-1", "htm": "GET", "htu": HTU, "iat": NOW}


def b64(data: bytes) -> str:
    return b64url_encode(data)


def uint(value: int) -> str:
    return b64(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def rs256_proof(key: rsa.RSAPrivateKey, jwk: dict[str, Any] | None = None) -> str:
    header = {"typ": "dpop+jwt", "alg": "RS256", "jwk": jwk or public_jwk_of(key.public_key())}
    signing_input = b64(compact_json(header)) + "." + b64(compact_json(CLAIMS))
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + b64(signature)


def verify(proof: str) -> Any:
    return verify_proof(proof, htm="GET", htu=HTU, now=NOW, replay_cache=NO_REPLAY_CHECK)


@pytest.fixture(scope="module")
def rsa2048() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def huge_e_key() -> rsa.RSAPrivateKey:
    """A real 3072-bit RSA key pair whose public exponent has 3071 bits.

    Such a key is valid RSA and its signatures verify; checking one costs ~100x a normal RSA
    verification, which is why the verifier refuses the key instead.
    """
    base = rsa.generate_private_key(public_exponent=65537, key_size=3072).private_numbers()
    p, q = base.p, base.q
    n = p * q
    carmichael = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
    while True:
        e = secrets.randbits(3071) | 1 | (1 << 3070)
        if math.gcd(e, carmichael) == 1:
            break
    d = pow(e, -1, carmichael)
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, n)
    )
    return numbers.private_key()


# --- RSA: bounded exponent and modulus -----------------------------------------------------


def test_rsa_3071_bit_exponent_is_refused_before_the_signature_check(
    huge_e_key: rsa.RSAPrivateKey,
) -> None:
    proof = rs256_proof(huge_e_key)
    # The proof is genuine: its signature verifies with the key it carries ...
    signing_input, _, signature = proof.rpartition(".")
    huge_e_key.public_key().verify(
        b64url_decode(signature), signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()
    )
    assert huge_e_key.public_key().public_numbers().e.bit_length() == 3071
    # ... and is refused for its key, at the jwk check, which runs before the signature's.
    with pytest.raises(InvalidProofError) as info:
        verify(proof)
    assert info.value.check == "jwk"
    assert "2^16 < e < 2^256" in str(info.value)


def test_a_normal_rsa_proof_still_verifies(rsa2048: rsa.RSAPrivateKey) -> None:
    assert verify(rs256_proof(rsa2048)).header["alg"] == "RS256"


@pytest.mark.parametrize(
    ("e", "ok"),
    [(1, False), (3, False), (17, False), (2**16 - 1, False), (2**16, False),
     (2**16 + 1, True), (2**32 + 15, True), (2**255 + 1, True), (2**256 - 1, True),
     (2**256 + 1, False), (2**300 + 1, False), (65538, False), (2**100, False)],
)  # fmt: skip
def test_rsa_exponent_bounds(rsa2048: rsa.RSAPrivateKey, e: int, ok: bool) -> None:
    """NIST SP 800-56B Rev. 2 §6.2.1: e is odd and 2^16 < e < 2^256."""
    n = rsa2048.public_key().public_numbers().n
    jwk = {"kty": "RSA", "n": uint(n), "e": uint(e)}
    if ok:
        assert public_key_from_jwk(jwk).public_numbers().e == e  # type: ignore[union-attr]
    else:
        with pytest.raises(InvalidProofError) as info:
            public_key_from_jwk(jwk)
        assert info.value.check == "jwk"


def _odd_modulus(bits: int) -> int:
    return secrets.randbits(bits) | 1 | (1 << (bits - 1))


@pytest.mark.parametrize(
    ("bits", "ok"), [(1024, False), (2047, False), (2048, True), (4096, True),
                     (MAX_RSA_BITS, True), (MAX_RSA_BITS + 1, False), (16384, False)]
)  # fmt: skip
def test_rsa_modulus_size_bounds(bits: int, ok: bool) -> None:
    jwk = {"kty": "RSA", "n": uint(_odd_modulus(bits)), "e": "AQAB"}
    if ok:
        assert public_key_from_jwk(jwk).key_size == bits  # type: ignore[union-attr]
    else:
        with pytest.raises(InvalidProofError) as info:
            public_key_from_jwk(jwk)
        assert info.value.check == "jwk"


def test_rsa_even_modulus_is_refused() -> None:
    with pytest.raises(InvalidProofError):
        public_key_from_jwk({"kty": "RSA", "n": uint(_odd_modulus(2048) - 1), "e": "AQAB"})


@pytest.mark.parametrize("member", ["n", "e"])
def test_rsa_members_with_a_leading_zero_octet_are_refused(
    rsa2048: rsa.RSAPrivateKey, member: str
) -> None:
    """RFC 7518 §2/§6.3.1: Base64urlUInt uses the fewest octets; a zero-padded n or e would
    give the same key a second thumbprint (and a second replay-cache identity)."""
    numbers = rsa2048.public_key().public_numbers()
    value = {"n": numbers.n, "e": numbers.e}[member]
    padded = b64(b"\x00" + value.to_bytes((value.bit_length() + 7) // 8, "big"))
    jwk = {**public_jwk_of(rsa2048.public_key()), member: padded}
    with pytest.raises(InvalidProofError) as info:
        verify(rs256_proof(rsa2048, jwk))
    assert info.value.check == "jwk" and "leading zero" in str(info.value)


@pytest.mark.parametrize("member", ["kty", "crv", "x", "y", "n", "e"])
@pytest.mark.parametrize("value", [5, None, ["a"], {"a": "b"}, True])
def test_key_members_that_are_not_strings_are_refused(member: str, value: Any) -> None:
    jwk: dict[str, Any] = {"kty": "EC", "crv": "P-256", "x": "A" * 43, "y": "A" * 43}
    jwk[member] = value
    with pytest.raises(InvalidProofError) as info:
        public_key_from_jwk(jwk)
    assert info.value.check == "jwk"


# --- one error family: the proof and the token are input, and input never makes a 500 ------

SIGNER = SoftwareSigner.generate("ES256")


def es256_proof(claims: dict[str, Any] | None = None, header_text: str | None = None) -> str:
    header = (
        header_text
        or compact_json(
            {"typ": "dpop+jwt", "alg": "ES256", "jwk": dict(SIGNER.public_jwk)}
        ).decode()
    )
    return signed_text(header, compact_json(claims or CLAIMS).decode())


def signed_text(header_text: str, claims_text: str | bytes) -> str:
    raw = claims_text.encode() if isinstance(claims_text, str) else claims_text
    signing_input = b64(header_text.encode()) + "." + b64(raw)
    return signing_input + "." + b64(SIGNER.sign(signing_input.encode()))


@pytest.mark.parametrize(
    "token",
    ["tökén", "tok\u00e9n", "\ud800", "tok en", "tok\ten", "tok\r\n", "", "=", "a=b",
     "Bearer abc", "abc,def", 'ab"c', "ab\x00", "ab;c", "\uff41\uff42"],
)  # fmt: skip
def test_a_malformed_access_token_is_invalid_token_never_configuration(token: str) -> None:
    """RFC 9449 §7.1: the token is token68; one that is not is the client's invalid_token."""
    proof = es256_proof({**CLAIMS, "ath": access_token_hash("abc")})
    with pytest.raises(VerificationError) as info:
        verify_proof(proof, htm="GET", htu=HTU, now=NOW, access_token=token)
    assert type(info.value) is TokenBindingError and info.value.check == "token"
    assert info.value.oauth_error == "invalid_token"


@pytest.mark.parametrize(
    "token", ["abc", "a.b-c_d~e+f/g==", "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU", "A" * 4000]
)
def test_token68_access_tokens_are_accepted(token: str) -> None:
    proof = es256_proof({**CLAIMS, "ath": access_token_hash(token)})
    verified = verify_proof(
        proof, htm="GET", htu=HTU, now=NOW, access_token=token, replay_cache=NO_REPLAY_CHECK
    )
    assert verified.claims["ath"] == access_token_hash(token)


def test_an_access_token_that_is_not_a_str_is_the_callers_mistake() -> None:
    with pytest.raises(ConfigurationError):
        verify_proof(es256_proof(), htm="GET", htu=HTU, now=NOW, access_token=b"abc")  # type: ignore[arg-type]


@pytest.mark.parametrize("jkt", [5, ["x"], {"a": 1}, "\ud800", "", "x" * 10_000, True])
def test_a_malformed_cnf_jkt_is_a_binding_error(jkt: Any) -> None:
    """expected_jkt comes from the token's claims: whatever it holds, the answer is 401."""
    with pytest.raises(VerificationError) as info:
        verify_proof(es256_proof(), htm="GET", htu=HTU, now=NOW, expected_jkt=jkt)
    assert type(info.value) is TokenBindingError and info.value.check == "cnf"


@pytest.mark.parametrize(
    "request_htu",
    ["ftp://rs.example/resource", "http://[::1/", "https://\ud800/x", "rs.example/resource",
     "https://rs.example:99999/", "", "https://" + "a" * 5000],
)  # fmt: skip
def test_a_request_uri_that_cannot_be_normalized_is_a_rejected_proof(request_htu: str) -> None:
    """Servers build the request URI from the request line and Host: client input too."""
    with pytest.raises(VerificationError) as info:
        verify_proof(es256_proof(), htm="GET", htu=request_htu, now=NOW)
    assert type(info.value) is InvalidProofError and info.value.check == "htu"


@pytest.mark.parametrize("method", ["G" * 10_000, "\x1b[2J", None, 5, "GET\r\n"])
def test_a_hostile_request_method_is_an_htm_mismatch_with_a_bounded_message(method: Any) -> None:
    with pytest.raises(VerificationError) as info:
        verify_proof(es256_proof(), htm=method, htu=HTU, now=NOW)
    assert info.value.check == "htm"
    assert len(str(info.value)) < 200 and "\x1b" not in str(info.value)


def test_verify_jws_signature_refuses_an_unknown_alg() -> None:
    key = public_key_from_jwk(dict(SIGNER.public_jwk))
    for alg in ("none", "HS256", None, 5):
        with pytest.raises(InvalidProofError) as info:
            verify_jws_signature(key, alg, b"\x00" * 64, b"x")  # type: ignore[arg-type]
        assert info.value.check == "alg"


# --- strict JSON (RFC 8259): one parse, the same for every parser ----------------------------

_CLAIMS_TEXT = compact_json(CLAIMS).decode()


@pytest.mark.parametrize(
    "claims_raw",
    [
        pytest.param(b"\xef\xbb\xbf" + _CLAIMS_TEXT.encode(), id="utf8-bom"),
        pytest.param(_CLAIMS_TEXT.encode("utf-16"), id="utf16-with-bom"),
        pytest.param(_CLAIMS_TEXT.encode("utf-16-le"), id="utf16-le"),
        pytest.param(_CLAIMS_TEXT.encode("utf-32"), id="utf32"),
        pytest.param(b'{"jti":"\xff","htm":"GET"}', id="invalid-utf8"),
        pytest.param(b'{"jti":"\xed\xa0\x80"}', id="utf8-encoded-surrogate"),
        pytest.param(_CLAIMS_TEXT[:-1].encode() + b',"iat":1}', id="duplicate-iat"),
        pytest.param(_CLAIMS_TEXT[:-1].encode() + b',"htm":"POST"}', id="duplicate-htm"),
        pytest.param(_CLAIMS_TEXT[:-1].encode() + b',"x":NaN}', id="nan"),
        pytest.param(_CLAIMS_TEXT[:-1].encode() + b',"x":-Infinity}', id="infinity"),
        pytest.param(_CLAIMS_TEXT.replace(str(NOW), "1e400").encode(), id="iat-overflows"),
    ],
)
def test_claims_that_are_not_strict_json_are_a_syntax_error(claims_raw: bytes) -> None:
    header = compact_json({"typ": "dpop+jwt", "alg": "ES256", "jwk": dict(SIGNER.public_jwk)})
    proof = signed_text(header.decode(), claims_raw)
    with pytest.raises(InvalidProofError) as info:
        verify(proof)
    assert info.value.check == "syntax"


@pytest.mark.parametrize(
    "header_text",
    [
        '\ufeff{"typ":"dpop+jwt","alg":"ES256","jwk":$JWK}',
        '{"typ":"dpop+jwt","alg":"ES256","alg":"ES256","jwk":$JWK}',
        '{"typ":"dpop+jwt","typ":"JWT","alg":"ES256","jwk":$JWK}',
        '{"typ":"dpop+jwt","alg":"ES256","jwk":$JWK,"jwk":$JWK}',
        '{"typ":"dpop+jwt","alg":"ES256","jwk":$JWK,"x":Infinity}',
    ],
)
def test_headers_that_are_not_strict_json_are_a_syntax_error(header_text: str) -> None:
    jwk = compact_json(dict(SIGNER.public_jwk)).decode()
    proof = es256_proof(header_text=header_text.replace("$JWK", jwk))
    with pytest.raises(InvalidProofError) as info:
        verify(proof)
    assert info.value.check == "syntax"
