"""Software keys through ``cryptography``: for tests, development, and servers without hardware.

The key lives in process memory, so this is the baseline the hardware backends are measured
against; everything else in the stack is identical whichever signer is used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import unquote, urlsplit

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from ..algorithms import DEFAULT_ALG, EC_CURVE_ALGS, MIN_RSA_BITS, AlgorithmInfo, algorithm
from ..ecdsa import der_to_raw
from ..errors import KeyReferenceError, SecretSourceError, UnsupportedKeyError
from ..jose import b64url_decode, b64url_encode, jwk_thumbprint
from ..secret_sources import SecretSource, resolve_secret

__all__ = ["SoftwareSigner", "load_file_reference", "public_jwk_of"]

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey

_JWK_CURVES: dict[str, Callable[[], ec.EllipticCurve]] = {
    "P-256": ec.SECP256R1,
    "P-384": ec.SECP384R1,
    "P-521": ec.SECP521R1,
}
_CURVE_JWK_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_MAX_KEY_FILE = 1 << 20


def _int_to_b64(value: int, length: int | None = None) -> str:
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return b64url_encode(value.to_bytes(size, "big"))


def public_jwk_of(public_key: PublicKey) -> dict[str, str]:
    """The RFC 7517 public JWK of a ``cryptography`` public key, coordinates at full length."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        name = public_key.curve.name
        if name not in _CURVE_JWK_NAMES:
            raise UnsupportedKeyError(f"EC curve {name} is not usable for JWS (P-256/384/521 are)")
        size = (public_key.curve.key_size + 7) // 8
        numbers = public_key.public_numbers()
        return {
            "kty": "EC",
            "crv": _CURVE_JWK_NAMES[name],
            "x": _int_to_b64(numbers.x, size),
            "y": _int_to_b64(numbers.y, size),
        }
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(raw)}
    if isinstance(public_key, rsa.RSAPublicKey):
        rsa_numbers = public_key.public_numbers()
        return {"kty": "RSA", "n": _int_to_b64(rsa_numbers.n), "e": _int_to_b64(rsa_numbers.e)}
    raise UnsupportedKeyError(f"key type {type(public_key).__name__} is not usable for DPoP")


def _default_alg(key: PrivateKey) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        crv = _CURVE_JWK_NAMES.get(key.curve.name)
        if crv is None:
            raise UnsupportedKeyError(
                f"EC curve {key.curve.name} is not usable for JWS; use P-256, P-384 or P-521"
            )
        return EC_CURVE_ALGS[crv]
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(key, rsa.RSAPrivateKey):
        return "PS256"
    raise UnsupportedKeyError(f"key type {type(key).__name__} is not usable for DPoP")


def _check_alg_fits(key: PrivateKey, info: AlgorithmInfo) -> None:
    if info.kty == "EC":
        if (
            not isinstance(key, ec.EllipticCurvePrivateKey)
            or _CURVE_JWK_NAMES.get(key.curve.name) != info.crv
        ):
            raise UnsupportedKeyError(f"{info.name} needs an EC {info.crv} key")
    elif info.kty == "OKP":
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise UnsupportedKeyError(f"{info.name} needs an Ed25519 key")
    elif not isinstance(key, rsa.RSAPrivateKey):
        raise UnsupportedKeyError(f"{info.name} needs an RSA key")
    elif key.key_size < MIN_RSA_BITS:
        raise UnsupportedKeyError(
            f"RSA key has {key.key_size} bits; at least {MIN_RSA_BITS} are required"
        )


def _make_sign(key: PrivateKey, info: AlgorithmInfo) -> Callable[[bytes], bytes]:
    """Bind everything per-key once, so ``sign()`` is one C call plus (ECDSA) one conversion."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        scheme = ec.ECDSA(info.hash_algorithm())
        size = info.coord_size
        ec_sign = key.sign

        def sign_ec(data: bytes) -> bytes:
            return der_to_raw(ec_sign(data, scheme), size)  # cryptography returns DER

        return sign_ec
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign
    pad: padding.AsymmetricPadding
    if info.pss:
        # RFC 7518 §3.5: MGF1 with the same hash, salt length = hash length.
        pad = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    else:
        pad = padding.PKCS1v15()
    rsa_sign = key.sign
    digest = info.hash_algorithm()

    def sign_rsa(data: bytes) -> bytes:
        return rsa_sign(data, pad, digest)

    return sign_rsa


class SoftwareSigner:
    """A Signer over a private key held in process memory by ``cryptography``."""

    blocking = False  # in-process CPU work (~25 µs for ES256): a thread hop costs more than it

    def __init__(self, private_key: PrivateKey, *, alg: str | None = None) -> None:
        if not isinstance(
            private_key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
        ):
            raise UnsupportedKeyError(
                f"key type {type(private_key).__name__} is not usable for DPoP "
                "(EC P-256/384/521, Ed25519 or RSA >= 2048 are)"
            )
        info = algorithm(alg or _default_alg(private_key))
        _check_alg_fits(private_key, info)
        self._key = private_key
        self._alg = info.name
        self._jwk: Mapping[str, str] = MappingProxyType(public_jwk_of(private_key.public_key()))
        self._thumbprint = jwk_thumbprint(self._jwk)
        self.sign: Callable[[bytes], bytes] = _make_sign(private_key, info)

    # Signer members -------------------------------------------------------------------------
    @property
    def alg(self) -> str:
        return self._alg

    @property
    def public_jwk(self) -> Mapping[str, str]:
        return self._jwk

    @property
    def thumbprint(self) -> str:
        return self._thumbprint

    def __repr__(self) -> str:
        return f"SoftwareSigner(alg={self._alg!r}, jkt={self._thumbprint!r})"

    # Construction ---------------------------------------------------------------------------
    @classmethod
    def generate(cls, alg: str = DEFAULT_ALG) -> SoftwareSigner:
        """A fresh key for ``alg`` (RSA: 2048 bits, e=65537)."""
        info = algorithm(alg)
        key: PrivateKey
        if info.kty == "EC":
            key = ec.generate_private_key(_JWK_CURVES[info.crv or "P-256"]())
        elif info.kty == "OKP":
            key = ed25519.Ed25519PrivateKey.generate()
        else:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(key, alg=info.name)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        *,
        password: SecretSource | None = None,
        alg: str | None = None,
    ) -> SoftwareSigner:
        """Load PEM (PKCS#8, SEC1, PKCS#1; encrypted with ``password``), DER or a JWK file."""
        p = Path(path)
        try:
            if p.stat().st_size > _MAX_KEY_FILE:
                raise KeyReferenceError(f"key file {str(p)!r} is larger than 1 MiB")
            data = p.read_bytes()
        except OSError as e:
            raise KeyReferenceError(f"cannot read key file {str(p)!r}: {e.strerror}") from e
        return cls.from_bytes(data, password=password, alg=alg, name=str(p))

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        *,
        password: SecretSource | None = None,
        alg: str | None = None,
        name: str = "key data",
    ) -> SoftwareSigner:
        """Load key bytes, sniffing JSON (JWK), PEM, then DER; errors name ``name``, not content."""
        stripped = data.lstrip()
        if stripped.startswith(b"{"):
            try:
                jwk = json.loads(stripped)
            except ValueError as e:
                raise KeyReferenceError(f"{name}: not valid JWK JSON") from e
            return cls.from_jwk(jwk, alg=alg)
        secret = resolve_secret(password, what=f"password for {name}")
        pw = secret.encode("utf-8") if secret is not None else None
        is_pem = stripped.startswith(b"-----BEGIN")
        if is_pem and b"PRIVATE KEY" not in stripped.split(b"\n", 1)[0]:
            first = stripped.split(b"\n", 1)[0].decode("ascii", "replace")
            if "PUBLIC KEY" in first or "CERTIFICATE" in first:
                raise UnsupportedKeyError(
                    f"{name}: holds a public key only; a private key is needed"
                )
            raise UnsupportedKeyError(f"{name}: PEM block {first!r} is not a private key")
        loader = (
            serialization.load_pem_private_key if is_pem else serialization.load_der_private_key
        )
        try:
            key = loader(stripped if is_pem else data, password=pw)
        except TypeError as e:
            # cryptography: encrypted key without password, or password for a plain key.
            if pw is None:
                raise SecretSourceError(
                    f"{name}: the key is encrypted; give a password source"
                ) from e
            raise KeyReferenceError(f"{name}: the key is not encrypted; drop the password") from e
        except UnsupportedAlgorithm as e:
            raise UnsupportedKeyError(f"{name}: unsupported key algorithm or curve") from e
        except ValueError as e:
            if pw is not None and is_pem and b"ENCRYPTED" in stripped[:64]:
                raise SecretSourceError(f"{name}: wrong password, or corrupt encrypted key") from e
            if not is_pem:
                _reject_public_der(data, name)
            raise KeyReferenceError(f"{name}: not a readable PEM/DER private key or JWK") from e
        if not isinstance(
            key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
        ):
            raise UnsupportedKeyError(
                f"{name}: key type {type(key).__name__} is not usable for DPoP"
            )
        return cls(key, alg=alg)

    @classmethod
    def from_jwk(cls, jwk: Any, *, alg: str | None = None) -> SoftwareSigner:
        """Load a private JWK (RFC 7517/7518): EC, OKP Ed25519 or RSA with ``d``."""
        if not isinstance(jwk, dict):
            raise KeyReferenceError("JWK must be a JSON object")
        kty = jwk.get("kty")
        if kty == "oct":
            raise UnsupportedKeyError("JWK is a symmetric (oct) key; DPoP needs an asymmetric key")
        if "d" not in jwk:
            raise UnsupportedKeyError("JWK holds a public key only; a private key (d) is needed")
        try:
            key = _private_key_from_jwk(jwk)
        except UnsupportedKeyError:
            raise
        except (ValueError, TypeError, KeyError) as e:
            raise KeyReferenceError(f"JWK ({kty}) has missing or malformed members") from e
        return cls(key, alg=alg or (jwk.get("alg") if isinstance(jwk.get("alg"), str) else None))

    def private_pem(self, password: str | None = None) -> bytes:
        """PKCS#8 PEM of this software key (encrypted when ``password`` is given), for key files."""
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password.encode("utf-8"))
            if password
            else serialization.NoEncryption()
        )
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc
        )


def _b64_int(jwk: Mapping[str, Any], name: str) -> int:
    value = jwk[name]
    if not isinstance(value, str):
        raise TypeError(name)
    return int.from_bytes(b64url_decode(value), "big")


def _private_key_from_jwk(jwk: Mapping[str, Any]) -> PrivateKey:
    kty = jwk.get("kty")
    if kty == "EC":
        crv = jwk.get("crv")
        if crv not in _JWK_CURVES:
            raise UnsupportedKeyError(f"JWK curve {crv!r} is not supported (P-256, P-384, P-521)")
        public = ec.EllipticCurvePublicNumbers(
            _b64_int(jwk, "x"), _b64_int(jwk, "y"), _JWK_CURVES[crv]()
        )
        return ec.EllipticCurvePrivateNumbers(_b64_int(jwk, "d"), public).private_key()
    if kty == "OKP":
        if jwk.get("crv") != "Ed25519":
            raise UnsupportedKeyError(f"OKP curve {jwk.get('crv')!r} is not supported (Ed25519)")
        d = jwk["d"]
        if not isinstance(d, str):
            raise TypeError("d")
        key = ed25519.Ed25519PrivateKey.from_private_bytes(b64url_decode(d))
        if "x" in jwk and public_jwk_of(key.public_key())["x"] != jwk["x"]:
            raise ValueError("x does not match d")
        return key
    if kty == "RSA":
        n, e = _b64_int(jwk, "n"), _b64_int(jwk, "e")
        public_numbers = rsa.RSAPublicNumbers(e, n)
        p, q, d = _b64_int(jwk, "p"), _b64_int(jwk, "q"), _b64_int(jwk, "d")
        return rsa.RSAPrivateNumbers(
            p, q, d, _b64_int(jwk, "dp"), _b64_int(jwk, "dq"), _b64_int(jwk, "qi"), public_numbers
        ).private_key()
    raise UnsupportedKeyError(f"JWK kty {kty!r} is not supported (EC, OKP, RSA)")


def _reject_public_der(data: bytes, name: str) -> None:
    try:
        serialization.load_der_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        return
    raise UnsupportedKeyError(f"{name}: holds a public key only; a private key is needed")


def load_file_reference(ref: str, secret: SecretSource | None) -> SoftwareSigner:
    """Registry loader for paths and ``file:`` URIs (``file:key.pem``, ``file:///abs/key.pem``)."""
    path = ref
    if ref.lower().startswith("file:"):
        parts = urlsplit(ref)
        if parts.netloc not in ("", "localhost"):
            raise KeyReferenceError(f"file URI host {parts.netloc!r} is not local")
        path = unquote(parts.path)
    if not path:
        raise KeyReferenceError("file reference names no path")
    return SoftwareSigner.from_file(path, password=secret)
