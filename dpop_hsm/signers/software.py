"""Software keys through ``cryptography``: for tests, development, and servers without hardware.

The key lives in process memory, so this is the baseline the hardware backends are measured
against; everything else in the stack is identical whichever signer is used.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import unquote, urlsplit

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ..algorithms import DEFAULT_ALG, MIN_RSA_BITS, AlgorithmInfo, algorithm
from ..bounded_read import read_bounded
from ..ecdsa import der_to_raw
from ..errors import InvalidJwkError, KeyReferenceError, SecretSourceError, UnsupportedKeyError
from ..jose import jwk_thumbprint
from ..jwk import PrivateKey, curve, curve_of_key, jwk_from_public_key
from ..jwk import private_key_from_jwk as _private_key_from_jwk
from ..secret_sources import SecretSource, resolve_secret

__all__ = ["SoftwareSigner", "generate_file_reference", "load_file_reference", "public_jwk_of"]


_MAX_KEY_FILE = 1 << 20
log = logging.getLogger("dpop_hsm.signers")

# The one JWK writer (dpop_hsm.jwk), under the name this module has always exported.
public_jwk_of = jwk_from_public_key


def _default_alg(key: PrivateKey) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        return curve_of_key(key).alg
    if isinstance(key, rsa.RSAPrivateKey):
        return "PS256"
    raise UnsupportedKeyError(f"key type {type(key).__name__} is not usable for DPoP")


def _check_alg_fits(key: PrivateKey, info: AlgorithmInfo) -> None:
    if info.kty == "EC":
        if not isinstance(key, ec.EllipticCurvePrivateKey) or curve_of_key(key).crv != info.crv:
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
    pad = info.rsa_padding()  # RFC 7518 §3.5: PSS with MGF1 of the same hash, salt = hash size
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
            key = ec.generate_private_key(curve(info.crv).ec_curve())
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
        data = _read_key_file(p)
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
        except InvalidJwkError as e:
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


def _read_key_file(path: Path) -> bytes:
    """At most 1 MiB of one opened file: ``st_size`` says nothing for a device or a pipe
    (``/dev/zero`` reports 0 and never ends), so the read itself is bounded.

    A key file other users can reach is used, with a warning: ssh refuses such a private key,
    but secret volumes (Kubernetes mounts them 0644 by default) make a refusal here break
    working deployments, while the warning still reaches the person who can ``chmod 600``.
    """
    shown = repr(str(path))
    data, st = read_bounded(path, _MAX_KEY_FILE, f"key file {shown}", KeyReferenceError)
    if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
        log.warning(
            "key file %s is accessible to other users (mode %o): chmod 600 it",
            shown,
            stat.S_IMODE(st.st_mode),
        )
    return data


def _reject_public_der(data: bytes, name: str) -> None:
    try:
        serialization.load_der_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        return
    raise UnsupportedKeyError(f"{name}: holds a public key only; a private key is needed")


def _path_of_reference(ref: str) -> Path:
    """The path a plain path or ``file:`` URI names (``file:key.pem``, ``file:///abs/key.pem``)."""
    path = ref
    if ref.lower().startswith("file:"):
        parts = urlsplit(ref)
        if parts.netloc not in ("", "localhost"):
            raise KeyReferenceError(f"file URI host {parts.netloc!r} is not local")
        path = unquote(parts.path)
    if not path:
        raise KeyReferenceError("file reference names no path")
    return Path(path)


def load_file_reference(
    ref: str, secret: SecretSource | None, *, allow_module_path: bool = False
) -> SoftwareSigner:
    """Registry loader for paths and ``file:`` URIs (``file:key.pem``, ``file:///abs/key.pem``).

    ``allow_module_path`` is accepted for the registry's sake: a key file names no code.
    """
    return SoftwareSigner.from_file(_path_of_reference(ref), password=secret)


def generate_file_reference(
    ref: str, alg: str | None, secret: SecretSource | None, *, allow_module_path: bool = False
) -> SoftwareSigner:
    """Registry generator for paths and ``file:`` URIs: a new PKCS#8 PEM key file.

    The file is created with ``O_EXCL`` and mode 0600: an existing file (or a symlink, even a
    dangling one) is never overwritten, and nobody else can read the key. ``secret`` (a string
    or a callable) encrypts the PEM. Raises KeyReferenceError when the file exists or cannot be
    created; the path, never the password, is in the message.
    """
    path = _path_of_reference(ref)
    if path.exists():
        raise KeyReferenceError(f"{str(path)!r} exists; refusing to overwrite a key file")
    password = resolve_secret(secret, what=f"password for the new key file {str(path)!r}")
    signer = SoftwareSigner.generate(alg or DEFAULT_ALG)
    pem = signer.private_pem(password)
    try:
        # O_EXCL: never clobber a key created meanwhile; 0600: the key is a secret.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise KeyReferenceError(f"cannot create {str(path)!r}: {e.strerror}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
    except OSError as e:
        path.unlink(missing_ok=True)  # no half-written key file left behind
        raise KeyReferenceError(f"cannot write {str(path)!r}: {e.strerror}") from e
    return signer
