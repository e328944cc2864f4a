"""The tests' independent JWS/DPoP proof verifier: ``cryptography`` and the standard library only.

Nothing here imports ``dpop_hsm``: a bug in our base64url, JWK, DER or signature code cannot be
cancelled out by the same bug on the checking side. Its own tables say which curve, hash and
padding go with each ``alg`` (RFC 7518 §3), its own base64url decoder (RFC 7515 §2) and its own
DER encoder for ECDSA signatures (X.690 §8.3), so even ``cryptography``'s encoder is not trusted
to turn a raw ``r || s`` into what it verifies.

Every check raises (``cryptography.exceptions.InvalidSignature`` for a bad signature,
``AssertionError`` for a malformed proof); none returns False.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

__all__ = [
    "DecodedProof",
    "b64d",
    "decode_proof",
    "der_int",
    "der_len",
    "der_sig",
    "signature_verifier",
    "verify_proof_signature",
    "verify_signature",
]

# RFC 7518 §3.4: curve, hash and coordinate size of each ECDSA alg.
_EC: dict[str, tuple[type[ec.EllipticCurve], type[hashes.HashAlgorithm], int, str]] = {
    "ES256": (ec.SECP256R1, hashes.SHA256, 32, "P-256"),
    "ES384": (ec.SECP384R1, hashes.SHA384, 48, "P-384"),
    "ES512": (ec.SECP521R1, hashes.SHA512, 66, "P-521"),
}
_CRV_ALG = {crv: alg for alg, (_, _, _, crv) in _EC.items()}


def b64d(text: str) -> bytes:
    """Strict base64url without padding (RFC 7515 §2): raises ``AssertionError`` on junk."""
    assert "=" not in text, "base64url with padding"
    try:
        return base64.b64decode(
            text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4), validate=True
        )
    except binascii.Error as e:
        raise AssertionError(f"not base64url: {text[:40]!r}") from e


def der_int(value: int) -> bytes:
    """Minimal two's-complement DER INTEGER (X.690 §8.3) for non-negative ``value``."""
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")  # one spare byte keeps the sign
    while len(body) > 1 and body[0] == 0 and body[1] < 0x80:
        body = body[1:]
    return b"\x02" + der_len(len(body)) + body


def der_len(length: int) -> bytes:
    """DER definite length (X.690 §8.1.3): short form below 128, long form above."""
    if length < 0x80:
        return bytes([length])
    encoded = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(encoded)]) + encoded


def der_sig(r: int, s: int) -> bytes:
    """The ECDSA-Sig-Value SEQUENCE { r INTEGER, s INTEGER } (RFC 3279 §2.2.3)."""
    body = der_int(r) + der_int(s)
    return b"\x30" + der_len(len(body)) + body


def _alg_of(jwk: Mapping[str, Any]) -> str:
    if jwk.get("kty") == "EC":
        return _CRV_ALG[jwk["crv"]]
    if jwk.get("kty") == "OKP":
        return "EdDSA"
    raise AssertionError(f"no default alg for a {jwk.get('kty')!r} key; pass alg=")


def signature_verifier(
    jwk: Mapping[str, Any], alg: str | None = None
) -> Callable[[bytes, bytes], None]:
    """``verify(signature, data)`` for a public JWK (RFC 7517); raises, never returns False.

    ``alg`` defaults to the one the key implies (EC curve, Ed25519); RSA keys need it. The
    signature is the JWS form: raw ``r || s`` of full length for ECDSA (RFC 7518 §3.4).
    """
    alg = alg or _alg_of(jwk)
    if alg in _EC:
        curve, hash_cls, size, crv = _EC[alg]
        assert (jwk["kty"], jwk["crv"]) == ("EC", crv), f"{alg} with a {jwk.get('crv')} key"
        x, y = b64d(jwk["x"]), b64d(jwk["y"])
        assert len(x) == len(y) == size, "EC coordinates must be full length (RFC 7518 §6.2.1.2)"
        key = ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve()
        ).public_key()
        scheme = ec.ECDSA(hash_cls())

        def verify_ec(sig: bytes, data: bytes) -> None:
            assert len(sig) == 2 * size, f"{alg} signature of {len(sig)} bytes, not {2 * size}"
            r, s = int.from_bytes(sig[:size], "big"), int.from_bytes(sig[size:], "big")
            key.verify(der_sig(r, s), data, scheme)

        return verify_ec
    if alg == "EdDSA":
        assert (jwk["kty"], jwk["crv"]) == ("OKP", "Ed25519")
        okp = ed25519.Ed25519PublicKey.from_public_bytes(b64d(jwk["x"]))
        return lambda sig, data: okp.verify(sig, data)
    assert alg in ("PS256", "RS256") and jwk["kty"] == "RSA", f"unknown alg {alg!r}"
    rsa_key = rsa.RSAPublicNumbers(
        int.from_bytes(b64d(jwk["e"]), "big"), int.from_bytes(b64d(jwk["n"]), "big")
    ).public_key()
    # RFC 7518 §3.5: PSS with MGF1 over the same hash and a salt as long as the hash.
    pad: padding.AsymmetricPadding = (
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        if alg == "PS256"
        else padding.PKCS1v15()
    )
    return lambda sig, data: rsa_key.verify(sig, data, pad, hashes.SHA256())


def verify_signature(
    jwk: Mapping[str, Any], data: bytes, sig: bytes, alg: str | None = None
) -> None:
    """Check one signature over ``data`` with the public JWK (see :func:`signature_verifier`)."""
    signature_verifier(jwk, alg)(sig, data)


@dataclass(frozen=True)
class DecodedProof:
    """A compact JWS split and decoded, nothing checked yet."""

    header: dict[str, Any]
    claims: dict[str, Any]
    signature: bytes
    signing_input: bytes


def decode_proof(proof: str) -> DecodedProof:
    """Split a compact JWS (RFC 7515 §7.1) into its decoded parts; asserts it is well formed."""
    pieces = proof.split(".")
    assert len(pieces) == 3, "a compact JWS has three parts"
    head, payload, sig = pieces
    header, claims = json.loads(b64d(head)), json.loads(b64d(payload))
    assert isinstance(header, dict) and isinstance(claims, dict)
    return DecodedProof(header, claims, b64d(sig), f"{head}.{payload}".encode("ascii"))


def verify_proof_signature(proof: str, jwk: Mapping[str, Any] | None = None) -> DecodedProof:
    """Decode a DPoP proof and verify its signature with the ``alg`` its header names.

    The key is the header's ``jwk`` (RFC 9449 §4.2) unless ``jwk`` is given, in which case the
    header's must equal it. Only the signature and the key binding are checked: claims are the
    caller's to assert, exactly.
    """
    decoded = decode_proof(proof)
    header_jwk = decoded.header.get("jwk")
    assert isinstance(header_jwk, dict), "a DPoP proof carries its public key as 'jwk'"
    if jwk is not None:
        assert header_jwk == dict(jwk), "the proof names a different key"
    verify_signature(header_jwk, decoded.signing_input, decoded.signature, decoded.header["alg"])
    return decoded
