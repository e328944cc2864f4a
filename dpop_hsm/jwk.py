"""JWK <-> ``cryptography`` keys, and the one curve table (RFC 7517, RFC 7518 §6, RFC 8037).

Every place that needs to know a curve — its JWK ``crv``, the ``cryptography`` class, the OID a
PKCS#11 token or a certificate names it by, the coordinate size, the group order, the JWS alg
that signs with it — reads :data:`CURVES`. Adding a curve is one row here.

Two directions, both strict:

- :func:`jwk_from_public_key` writes the public JWK a signer publishes: EC coordinates at full
  length (RFC 7518 §6.2.1.2: a short ``x`` or ``y`` breaks other implementations' thumbprints),
  RSA integers in the minimum number of octets (§6.3.1.1).
- :func:`public_key_from_jwk` reads a public JWK from untrusted input (a proof header): private
  members are refused, EC coordinates must have exactly the curve's length, RSA keys are bounded
  (2048-8192 bits; the exponent odd and 2**16 < e < 2**256, NIST SP 800-56B §6.2.1) so a key
  cannot make verification expensive, and every integer must be minimally encoded, so one key
  has one JWK spelling.

Errors: :class:`~dpop_hsm.errors.InvalidJwkError` for a malformed JWK,
:class:`~dpop_hsm.errors.UnsupportedKeyError` for a well-formed one we do not support (a verifier
maps both to its own ``invalid_dpop_proof``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .errors import InvalidJwkError, UnsupportedKeyError
from .jose import b64url_decode, b64url_encode

__all__ = [
    "CURVES",
    "MAX_RSA_BITS",
    "MIN_RSA_BITS",
    "PRIVATE_MEMBERS",
    "Curve",
    "PrivateKey",
    "PublicKey",
    "curve",
    "curve_for_name",
    "curve_for_oid",
    "curve_of_key",
    "jwk_from_public_key",
    "private_key_from_jwk",
    "public_key_from_jwk",
]

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey

MIN_RSA_BITS = 2048  # RFC 7518 §3.3 / §3.5: 2048 bits or larger
MAX_RSA_BITS = 8192  # bounds the cost of verifying with an attacker's key
_MIN_RSA_E = 1 << 16  # NIST SP 800-56B §6.2.1: 2**16 < e < 2**256, e odd
_MAX_RSA_E = 1 << 256

# RFC 7518 §6.2.2, §6.3.2, §6.4; RFC 8037 §2: members that hold private key material.
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


@dataclass(frozen=True)
class Curve:
    """One curve JWS can sign with, under every name it goes by."""

    crv: str  # JWK "crv" (RFC 7518 §6.2.1.1, RFC 8037 §2)
    kty: str  # JWK "kty": EC or OKP
    alg: str  # the JWS alg that signs with it (RFC 7518 §3.4, RFC 8037 §3.1)
    oid: str  # named-curve OID (SEC 2, RFC 8410): CKA_EC_PARAMS, SubjectPublicKeyInfo
    size: int  # bytes per coordinate (EC) or of the public key (OKP)
    order: int  # group order n (SEC 2 / FIPS 186-4; RFC 8032 §5.1 for Ed25519)
    aliases: tuple[str, ...] = ()  # other names: cryptography/OpenSSL, PKCS#11 3.0 strings

    def ec_curve(self) -> ec.EllipticCurve:
        """The ``cryptography`` curve object (EC curves only)."""
        factory = _EC_CLASSES.get(self.crv)
        if factory is None:
            raise UnsupportedKeyError(f"{self.crv} is not a short-Weierstrass EC curve")
        return factory()


_EC_CLASSES: dict[str, type[ec.EllipticCurve]] = {
    "P-256": ec.SECP256R1,
    "P-384": ec.SECP384R1,
    "P-521": ec.SECP521R1,
}

CURVES: Mapping[str, Curve] = MappingProxyType(
    {
        "P-256": Curve(
            "P-256",
            "EC",
            "ES256",
            "1.2.840.10045.3.1.7",
            32,
            0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
            ("secp256r1", "prime256v1"),
        ),
        "P-384": Curve(
            "P-384",
            "EC",
            "ES384",
            "1.3.132.0.34",
            48,
            int(
                "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
                "581A0DB248B0A77AECEC196ACCC52973",
                16,
            ),
            ("secp384r1",),
        ),
        "P-521": Curve(
            "P-521",
            "EC",
            "ES512",
            "1.3.132.0.35",
            66,
            int(
                "01FF"
                + "FFFFFFFF" * 7
                + "FFFFFFFA51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409",
                16,
            ),
            ("secp521r1",),
        ),
        "Ed25519": Curve(
            "Ed25519",
            "OKP",
            "EdDSA",
            "1.3.101.112",
            32,
            (1 << 252) + 27742317777372353535851937790883648493,
            ("edwards25519", "ed25519"),
        ),
    }
)

_BY_OID = {c.oid: c for c in CURVES.values()}
_BY_NAME = {name.lower(): c for c in CURVES.values() for name in (c.crv, *c.aliases)}


def curve(crv: object) -> Curve:
    """The curve of a JWK ``crv``; UnsupportedKeyError names the ones we sign with."""
    found = CURVES.get(crv) if isinstance(crv, str) else None
    if found is None:
        raise UnsupportedKeyError(
            f"curve {str(crv)[:20]!r} is not supported ({', '.join(CURVES)} are)"
        )
    return found


def curve_for_oid(oid: str) -> Curve:
    """The curve of a named-curve OID (dotted), e.g. from CKA_EC_PARAMS."""
    found = _BY_OID.get(oid)
    if found is None:
        raise UnsupportedKeyError(
            f"EC curve {oid[:40]} is not usable for JWS ({', '.join(CURVES)} are)"
        )
    return found


def curve_for_name(name: str) -> Curve | None:
    """The curve a name means (``P-256``, ``secp256r1``, ``edwards25519``…), case-insensitive."""
    return _BY_NAME.get(name.lower())


def curve_of_key(key: Any) -> Curve:
    """The curve of a ``cryptography`` EC or Ed25519 key, public or private."""
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        found = _BY_NAME.get(key.curve.name.lower())
        if found is None or found.kty != "EC":
            raise UnsupportedKeyError(
                f"EC curve {key.curve.name} is not usable for JWS (P-256, P-384, P-521 are)"
            )
        return found
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return CURVES["Ed25519"]
    raise UnsupportedKeyError(f"key type {type(key).__name__} has no JWS curve")


# --- key -> JWK ----------------------------------------------------------------------------


def _int_to_b64(value: int, length: int | None = None) -> str:
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return b64url_encode(value.to_bytes(size, "big"))


def jwk_from_public_key(key: PublicKey) -> dict[str, str]:
    """The RFC 7517 public JWK of a ``cryptography`` public key (public members only).

    EC coordinates are left-padded to the curve's full length (RFC 7518 §6.2.1.2); RSA ``n``
    and ``e`` use the minimum number of octets (§6.3.1.1). Raises UnsupportedKeyError for
    other key types and curves.
    """
    if isinstance(key, ec.EllipticCurvePublicKey):
        c = curve_of_key(key)
        numbers = key.public_numbers()
        return {
            "kty": "EC",
            "crv": c.crv,
            "x": _int_to_b64(numbers.x, c.size),
            "y": _int_to_b64(numbers.y, c.size),
        }
    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(raw)}
    if isinstance(key, rsa.RSAPublicKey):
        rsa_numbers = key.public_numbers()
        return {"kty": "RSA", "n": _int_to_b64(rsa_numbers.n), "e": _int_to_b64(rsa_numbers.e)}
    raise UnsupportedKeyError(f"key type {type(key).__name__} is not usable for DPoP")


# --- JWK -> key ----------------------------------------------------------------------------


def _member(jwk: Mapping[str, Any], name: str) -> bytes:
    value = jwk.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidJwkError(f"JWK member {name!r} is missing or not a string")
    try:
        return b64url_decode(value)
    except ValueError as e:
        raise InvalidJwkError(f"JWK member {name!r} is not base64url") from e


def _fixed(jwk: Mapping[str, Any], name: str, size: int) -> bytes:
    data = _member(jwk, name)
    if len(data) != size:
        raise InvalidJwkError(f"JWK coordinate {name!r} is not {size} bytes")
    return data


def _minimal_int(jwk: Mapping[str, Any], name: str) -> int:
    data = _member(jwk, name)
    if len(data) > 1 and data[0] == 0:
        # RFC 7518 §6.3.1.1: the minimum number of octets; a second spelling of one key
        # would give it a second thumbprint.
        raise InvalidJwkError(f"JWK member {name!r} has leading zero octets")
    return int.from_bytes(data, "big")


def _ec_curve_of(jwk: Mapping[str, Any], kty: str) -> Curve:
    c = curve(jwk.get("crv"))
    if c.kty != kty:
        raise UnsupportedKeyError(f"curve {c.crv} is not a {kty} curve")
    return c


def public_key_from_jwk(jwk: Mapping[str, Any]) -> PublicKey:
    """A ``cryptography`` public key from a public JWK, checked strictly (see module docstring).

    Raises InvalidJwkError (malformed, private members, off-curve point, out-of-bounds RSA
    numbers) or UnsupportedKeyError (a kty or curve we do not use).
    """
    if not isinstance(jwk, Mapping):
        raise InvalidJwkError("JWK is not a JSON object")
    private = PRIVATE_MEMBERS.intersection(jwk)
    if private:
        raise InvalidJwkError(f"JWK carries private key members {sorted(private)}")
    kty = jwk.get("kty")
    if kty == "EC":
        c = _ec_curve_of(jwk, "EC")
        x = int.from_bytes(_fixed(jwk, "x", c.size), "big")
        y = int.from_bytes(_fixed(jwk, "y", c.size), "big")
        try:
            return ec.EllipticCurvePublicNumbers(x, y, c.ec_curve()).public_key()
        except ValueError as e:
            raise InvalidJwkError(f"JWK point is not on {c.crv}") from e
    if kty == "OKP":
        c = _ec_curve_of(jwk, "OKP")
        try:
            return ed25519.Ed25519PublicKey.from_public_bytes(_fixed(jwk, "x", c.size))
        except ValueError as e:  # pragma: no cover - any 32 bytes decode today
            raise InvalidJwkError("JWK Ed25519 public key is malformed") from e
    if kty == "RSA":
        n, exponent = _minimal_int(jwk, "n"), _minimal_int(jwk, "e")
        if not MIN_RSA_BITS <= n.bit_length() <= MAX_RSA_BITS or n % 2 == 0:
            raise InvalidJwkError(
                f"JWK RSA modulus has {n.bit_length()} bits; an odd modulus of "
                f"{MIN_RSA_BITS}-{MAX_RSA_BITS} bits is accepted"
            )
        if not (exponent & 1 and _MIN_RSA_E < exponent < _MAX_RSA_E):
            raise InvalidJwkError(
                "JWK RSA exponent e must be odd and 2^16 < e < 2^256 (NIST SP 800-56B)"
            )
        try:
            return rsa.RSAPublicNumbers(exponent, n).public_key()
        except ValueError as err:
            raise InvalidJwkError("JWK RSA public key is malformed") from err
    if kty == "oct":
        raise UnsupportedKeyError("JWK is a symmetric (oct) key; DPoP needs an asymmetric key")
    raise UnsupportedKeyError(f"JWK kty {str(kty)[:20]!r} is not EC, OKP or RSA")


def private_key_from_jwk(jwk: Mapping[str, Any]) -> PrivateKey:
    """A ``cryptography`` private key from a private JWK (EC, OKP Ed25519, RSA with CRT).

    For key files the user controls: RSA exponents are not bounded here. Raises InvalidJwkError
    (missing, malformed or inconsistent members) or UnsupportedKeyError.
    """
    if not isinstance(jwk, Mapping):
        raise InvalidJwkError("JWK is not a JSON object")
    kty = jwk.get("kty")
    try:
        if kty == "EC":
            c = _ec_curve_of(jwk, "EC")
            public = ec.EllipticCurvePublicNumbers(_int(jwk, "x"), _int(jwk, "y"), c.ec_curve())
            return ec.EllipticCurvePrivateNumbers(_int(jwk, "d"), public).private_key()
        if kty == "OKP":
            _ec_curve_of(jwk, "OKP")
            key = ed25519.Ed25519PrivateKey.from_private_bytes(_member(jwk, "d"))
            if "x" in jwk and jwk_from_public_key(key.public_key())["x"] != jwk["x"]:
                raise InvalidJwkError("JWK member 'x' does not match 'd'")
            return key
        if kty == "RSA":
            public_numbers = rsa.RSAPublicNumbers(_int(jwk, "e"), _int(jwk, "n"))
            return rsa.RSAPrivateNumbers(
                _int(jwk, "p"),
                _int(jwk, "q"),
                _int(jwk, "d"),
                _int(jwk, "dp"),
                _int(jwk, "dq"),
                _int(jwk, "qi"),
                public_numbers,
            ).private_key()
    except ValueError as e:  # cryptography: inconsistent numbers, bad lengths
        raise InvalidJwkError(f"JWK ({kty}) members do not form a valid key") from e
    raise UnsupportedKeyError(f"JWK kty {str(kty)[:20]!r} is not supported (EC, OKP, RSA)")


def _int(jwk: Mapping[str, Any], name: str) -> int:
    return int.from_bytes(_member(jwk, name), "big")
