"""verify_proof against inputs built to hurt the verifier, not merely to fail it.

Bounded cost: the proof's ``jwk`` is unauthenticated and chooses how much work the signature
check takes, so an RSA key is bounded before any verification (NIST SP 800-56B Rev. 2 §6.2.1:
odd ``e``, 2^16 < e < 2^256; a modulus of 2048 to 8192 bits; RFC 7518 §2 minimal octets).
"""

from __future__ import annotations

import math
import secrets
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from dpop_hsm.errors import InvalidProofError
from dpop_hsm.jose import b64url_decode, b64url_encode, compact_json
from dpop_hsm.signers.software import public_jwk_of
from dpop_hsm.verify import MAX_RSA_BITS, NO_REPLAY_CHECK, public_key_from_jwk, verify_proof

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
